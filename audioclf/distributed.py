"""Data-parallel training across processes, as launched by ``torchrun``.

torchrun starts one process per GPU (or per CPU worker) and gives each RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR and MASTER_PORT in its environment; :func:`init_distributed`
reads them and joins the process group (NCCL on CUDA, gloo on CPU). Without those
variables everything here is a no-op for a single process, so the trainer has one code
path.

Evaluation is sharded without losing or repeating a clip: rank r scores clips
r, r + W, r + 2W, ... (:class:`ShardSampler`), and :func:`gather_shards` puts the rows
back in dataset order on every rank, so every rank computes the same metrics from the
same predictions and takes the same scheduling and stopping decisions.
"""

from __future__ import annotations

import datetime
import logging
import math
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.data import Sampler

from audioclf.errors import ConfigError

__all__ = ["DistInfo", "env_info", "current_info", "init_distributed", "destroy_distributed",
           "resolve_device", "all_agree",
           "ShardSampler", "gather_shards", "all_reduce_mean", "broadcast_tensors",
           "average_batchnorm_stats", "broadcast_object", "barrier"]

logger = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 600.0  # rendezvous and collectives; AUDIOCLF_DIST_TIMEOUT overrides


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands: rank in [0, world_size), local_rank on its machine."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0 alone writes files, logs progress bars and reports."""
        return self.rank == 0


def env_info() -> DistInfo:
    """Read RANK, WORLD_SIZE, LOCAL_RANK (as torchrun sets them); defaults for one process.

    Raises:
        ConfigError: a variable is not an integer, or RANK is outside [0, WORLD_SIZE).
    """
    values = {}
    for name, default in (("RANK", 0), ("WORLD_SIZE", 1), ("LOCAL_RANK", None)):
        raw = os.environ.get(name)
        try:
            values[name] = default if raw in (None, "") else int(raw)
        except ValueError:
            raise ConfigError(f"environment variable {name} must be an integer ({raw!r} given)") from None
    rank, world = values["RANK"], values["WORLD_SIZE"]
    if world < 1 or not 0 <= rank < world:
        raise ConfigError(f"RANK={rank} and WORLD_SIZE={world}: need WORLD_SIZE >= 1 and "
                          "0 <= RANK < WORLD_SIZE (launch with torchrun)")
    local = values["LOCAL_RANK"] if values["LOCAL_RANK"] is not None else rank
    return DistInfo(rank, world, local)


def resolve_device(name: str, info: DistInfo | None = None) -> torch.device:
    """``TrainConfig.device`` to a torch.device; under torchrun each process takes cuda:LOCAL_RANK.

    Raises:
        ConfigError: CUDA asked for but not available, or an unknown device name.
    """
    info = info or env_info()
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"device must be auto, cpu, cuda or cuda:N ({name!r} given)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device {name!r} asked for, but CUDA is not available here")
        if info.enabled:
            if device.index not in (None, info.local_rank):
                logger.warning("ignoring device %s under torchrun: rank %d uses cuda:%d",
                               name, info.rank, info.local_rank)
            device = torch.device("cuda", info.local_rank)
    elif device.type != "cpu":
        raise ConfigError(f"device must be auto, cpu, cuda or cuda:N ({name!r} given)")
    return device


def init_distributed(device: torch.device, timeout_s: float | None = None) -> DistInfo:
    """Join the process group torchrun prepared (idempotent); a no-op for one process.

    Args:
        device: this process's device; CUDA selects NCCL, CPU gloo.
        timeout_s: how long to wait for the other processes at the rendezvous and in
            every collective (default ``$AUDIOCLF_DIST_TIMEOUT`` or 600 s).

    Raises:
        ConfigError: MASTER_ADDR / MASTER_PORT missing, or the rendezvous not reached in
            time (the message says where it waited and for how long).
    """
    info = env_info()
    if not info.enabled or dist.is_initialized():
        return info
    missing = [v for v in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(v)]
    if missing:
        raise ConfigError(f"WORLD_SIZE={info.world_size} asks for distributed training but "
                          f"{' and '.join(missing)} is not set; launch with "
                          "torchrun --nproc_per_node=N -m audioclf ...")
    timeout_s = timeout_s or float(os.environ.get("AUDIOCLF_DIST_TIMEOUT", DEFAULT_TIMEOUT_S))
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    where = f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}"
    try:
        dist.init_process_group(backend, init_method="env://", rank=info.rank,
                                world_size=info.world_size,
                                timeout=datetime.timedelta(seconds=timeout_s))
    except (RuntimeError, ValueError) as e:  # DistStoreError, DistNetworkError are RuntimeErrors
        raise ConfigError(f"rank {info.rank}: could not meet the other {info.world_size - 1} "
                          f"process(es) at {where} within {timeout_s:g} s ({type(e).__name__}: "
                          f"{str(e).splitlines()[0] if str(e) else ''}); check that every "
                          "process was launched and can reach MASTER_ADDR") from None
    logger.info("rank %d of %d joined the %s process group at %s", info.rank, info.world_size,
                backend, where)
    return info


def current_info() -> DistInfo:
    """Rank and world size of the joined process group (one process when none is joined)."""
    if not _active():
        return DistInfo()
    return DistInfo(dist.get_rank(), dist.get_world_size(), env_info().local_rank)


def all_agree(ok: bool, device: torch.device) -> bool:
    """True on every rank when ``ok`` is True on every rank (so all raise, or none)."""
    if not _active():
        return ok
    t = torch.tensor([1 if ok else 0], dtype=torch.int32, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


def destroy_distributed() -> None:
    """Leave the process group, if joined (call once at the end of a command)."""
    if dist.is_initialized():
        dist.destroy_process_group()


def _active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class ShardSampler(Sampler[int]):
    """Indices rank, rank + W, rank + 2W, ... of a dataset of ``n``: every clip on exactly one rank."""

    def __init__(self, n: int, rank: int = 0, world_size: int = 1):
        self.n, self.rank, self.world_size = n, rank, world_size

    def __iter__(self):
        return iter(range(self.rank, self.n, self.world_size))

    def __len__(self) -> int:
        return len(range(self.rank, self.n, self.world_size))


def gather_shards(local: Tensor, n: int) -> Tensor:
    """Reassemble rows sharded by :class:`ShardSampler`: (n_r, ...) per rank -> (n, ...) everywhere.

    Shards are padded to the same length for ``all_gather`` and the padding is trimmed,
    so no row is lost or repeated.
    """
    if not _active():
        return local
    world = dist.get_world_size()
    per_rank = math.ceil(n / world)
    padded = local.new_zeros((per_rank,) + tuple(local.shape[1:]))
    padded[: local.shape[0]] = local
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    # row j of rank r is clip j * W + r: interleave the shards
    return torch.stack(parts, dim=1).reshape((per_rank * world,) + tuple(local.shape[1:]))[:n]


def all_reduce_mean(values: list[float], device: torch.device) -> list[float]:
    """Average a few numbers over ranks (identity for one process)."""
    if not _active():
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return (t / dist.get_world_size()).tolist()


def broadcast_tensors(tensors: list[Tensor], src: int = 0) -> None:
    """Overwrite ``tensors`` on every rank with rank ``src``'s values, in place."""
    if _active():
        for t in tensors:
            dist.broadcast(t, src)


@torch.no_grad()
def average_batchnorm_stats(module: nn.Module) -> None:
    """Average BatchNorm running means and variances over ranks, in place.

    After :func:`audioclf.train.update_bn_stats` with ``momentum=None`` each rank holds
    the mean over its own batches of the per-batch statistics; every rank ran the same
    number of equally sized batches (DistributedSampler pads), so the average over ranks
    is the mean over all batches of the epoch, as one process would compute it.
    """
    if not _active():
        return
    world = dist.get_world_size()
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
            for t in (m.running_mean, m.running_var):
                dist.all_reduce(t)
                t.div_(world)


def broadcast_object(obj, src: int = 0):
    """Rank ``src``'s picklable object on every rank (for small decisions, never for files)."""
    if not _active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src)
    return box[0]


def barrier() -> None:
    if _active():
        dist.barrier()
