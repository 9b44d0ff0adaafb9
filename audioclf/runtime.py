"""Where and how one training process computes: device, precision, its share of the data,
its random streams.

Under torchrun each process holds ``batch_size / world_size`` clips per step and a
``DistributedSampler`` shard of every shuffled epoch (the same permutation on every rank,
rank r taking every W-th clip), so the union of the ranks' batches at each step is the
batch one process would take. Evaluation shards with :class:`~audioclf.distributed.ShardSampler`.

Every random stream is re-seeded at the start of each epoch from (seed, rank, epoch):
Python's, NumPy's, torch's (CPU and CUDA: dropout), the augmentation generators and the
DataLoader's. An epoch therefore replays exactly whether the run was resumed or not, and
every rank draws different MixUp and SpecAugment parameters from the others.
"""

from __future__ import annotations

import contextlib
import importlib.util
import math
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from audioclf.config import TrainConfig
from audioclf.distributed import DistInfo, ShardSampler, broadcast_tensors
from audioclf.errors import ConfigError

__all__ = ["Runtime", "make_runtime", "seed_epoch", "derive_seed", "train_loader", "eval_loader",
           "steps_per_epoch", "wrap_ddp", "sync_batchnorm", "tensorboard_writer"]


@dataclass
class Runtime:
    """Device, process rank, per-process batch size and numeric settings of a run."""

    device: torch.device
    dist: DistInfo
    batch_size: int  # per process
    amp_dtype: torch.dtype | None
    scaler: torch.amp.GradScaler
    grad_clip: float | None = None
    label_smoothing: float = 0.0
    num_workers: int = 0

    def autocast(self):
        """bf16 (or fp16 with loss scaling) autocast on CUDA; float32 elsewhere."""
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)


def make_runtime(tc: TrainConfig, device: torch.device, info: DistInfo) -> Runtime:
    """The runtime for ``tc`` on ``device``.

    Raises:
        ConfigError: the global batch size is not divisible by the number of processes.
    """
    if tc.batch_size % info.world_size:
        raise ConfigError(f"batch_size {tc.batch_size} (global) is not divisible by the "
                          f"{info.world_size} processes; use a multiple of {info.world_size}")
    amp_dtype = None
    if device.type == "cuda" and tc.amp:
        amp_dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    return Runtime(device, info, tc.batch_size // info.world_size, amp_dtype, scaler, tc.grad_clip,
                   tc.label_smoothing, tc.num_workers)


def inference_runtime(device: torch.device, info: DistInfo, batch_size: int, amp: bool = True) -> Runtime:
    """A runtime for scoring only: bf16 autocast on CUDA when supported and ``amp`` is set
    (pass ``TrainConfig.amp`` to score as the model was trained), float32 otherwise."""
    use_bf16 = amp and device.type == "cuda" and torch.cuda.is_bf16_supported()
    return Runtime(device, info, batch_size, torch.bfloat16 if use_bf16 else None,
                   torch.amp.GradScaler("cpu", enabled=False))


def derive_seed(*keys: int) -> int:
    """A 63-bit seed from a tuple of integers (independent streams for different tuples)."""
    return int(np.random.SeedSequence(list(keys)).generate_state(1, dtype=np.uint64)[0] >> 1)


def seed_epoch(seed: int, rank: int, epoch: int, generators: list[torch.Generator]) -> None:
    """Re-seed every random stream of this process from (seed, rank, epoch)."""
    base = derive_seed(seed, rank, epoch, 0)
    random.seed(base)
    np.random.seed(base % 2**32)
    torch.manual_seed(base)  # CPU and every CUDA device
    for i, g in enumerate(generators, start=1):
        g.manual_seed(derive_seed(seed, rank, epoch, i))


def steps_per_epoch(n: int, rt: Runtime) -> int:
    """Optimizer steps per epoch for ``n`` training clips (see :func:`train_loader`)."""
    shard = math.ceil(n / rt.dist.world_size)
    return shard // rt.batch_size if shard >= rt.batch_size else 1


def train_loader(dataset: Dataset, rt: Runtime, seed: int, epoch: int, shuffle: bool = True) -> DataLoader:
    """This rank's share of epoch ``epoch``, shuffled by (seed, epoch) alike on every rank.

    The last incomplete batch is dropped (a batch of one clip breaks BatchNorm) unless
    the share is smaller than one batch. Calls ``dataset.set_epoch(epoch)`` if it exists.
    """
    if hasattr(dataset, "set_epoch"):
        dataset.set_epoch(epoch)
    sampler = DistributedSampler(dataset, num_replicas=rt.dist.world_size, rank=rt.dist.rank,
                                 shuffle=shuffle, seed=seed)
    sampler.set_epoch(epoch)
    generator = torch.Generator().manual_seed(derive_seed(seed, rt.dist.rank, epoch, 99))
    return DataLoader(dataset, batch_size=rt.batch_size, sampler=sampler,
                      drop_last=len(sampler) >= rt.batch_size, num_workers=rt.num_workers,
                      pin_memory=rt.device.type == "cuda", generator=generator)


def eval_loader(dataset: Dataset, rt: Runtime) -> DataLoader:
    """This rank's clips rank, rank + W, ... in order (all of them for one process)."""
    sampler = ShardSampler(len(dataset), rt.dist.rank, rt.dist.world_size)
    return DataLoader(dataset, batch_size=rt.batch_size, sampler=sampler,
                      num_workers=rt.num_workers, pin_memory=rt.device.type == "cuda")


def wrap_ddp(model: nn.Module, rt: Runtime) -> nn.Module:
    """DistributedDataParallel around ``model`` under torchrun; ``model`` itself otherwise."""
    if not rt.dist.enabled:
        return model
    ids = [rt.device.index] if rt.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids)


def sync_batchnorm(model: nn.Module) -> None:
    """Give every rank rank 0's BatchNorm statistics, so all evaluate the model rank 0 saves.

    (DDP broadcasts buffers at the start of each forward, but every rank then updates its
    own statistics on its own batch.)
    """
    stats = [t for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
             for t in (m.running_mean, m.running_var) if t is not None]
    broadcast_tensors(stats)


def tensorboard_writer(out_dir: Path):
    """A SummaryWriter in ``out_dir/tensorboard`` when tensorboard is installed, else None."""
    if importlib.util.find_spec("tensorboard") is None:
        return None
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(str(out_dir / "tensorboard"))
