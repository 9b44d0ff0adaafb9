"""Training: :func:`fit` runs the recipe, one small function per step.

    before:   dataset normalization statistics (FeatureConfig.normalize == "dataset")
    each epoch:
      train_one_epoch   train mode; MixUp + SpecAugment; soft-target loss; AdamW
      update_swa        average the weights once epoch >= TrainConfig.resolved_swa_start()
      evaluate          eval mode; the whole validation set (sharded over ranks, gathered)
      LR schedule       plateau on validation accuracy, or cosine per batch; SWALR once averaging
      keep_best         copy the weights when validation accuracy improves (ties: lower loss)
      resume point      state.safetensors and metrics.csv, atomically (rank 0)
      early stopping    after resolved_early_stopping_patience() epochs without improvement
    after:    restore the best weights; SWA: update_bn_stats then evaluate; keep the better

The same code runs on one CPU, one GPU (bf16 autocast, channels_last, optional
torch.compile), and under ``torchrun`` with DistributedDataParallel (see
:mod:`audioclf.distributed`).

Every random stream (Python, NumPy, torch on CPU and CUDA, MixUp, SpecAugment, time
shift, DataLoader workers, shuffling) is re-seeded at the start of each epoch from
(seed, rank, epoch). A run's state at an epoch boundary is therefore its weights,
optimizer, schedule, SWA and selection bookkeeping alone, which is what the resume point
stores; on CPU a resumed run ends with exactly the weights of an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import math
import random
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.optim.swa_utils import AveragedModel
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset
from tqdm.auto import tqdm

from audioclf._state import load_state, save_state
from audioclf.augment import MixUp, soft_target_cross_entropy
from audioclf.checkpoint import save_checkpoint, unwrap_model
from audioclf.config import RunConfig, TrainConfig
from audioclf.distributed import (DistInfo, ShardSampler, all_agree, all_reduce_mean,
                                  average_batchnorm_stats, barrier, broadcast_object,
                                  broadcast_tensors, current_info, gather_shards,
                                  init_distributed, resolve_device)
from audioclf.errors import AudioclfError, ConfigError
from audioclf.features import compute_normalization_stats
from audioclf.optim import LRSchedule, build_optimizer
from audioclf.rundir import STATE_FILE, check_same_run, claim_out_dir, write_metrics_csv

__all__ = ["fit", "TrainResult", "train_one_epoch", "evaluate", "update_swa", "update_bn_stats",
           "keep_best", "predict_proba"]

logger = logging.getLogger(__name__)

NORM_STATS_MAX_CLIPS = 5000  # evenly spaced training clips for the normalization statistics
STATE_VERSION = 1


@dataclass
class TrainResult:
    """What :func:`fit` returns (and records in ``model.json`` under ``extra.training``).

    Attributes:
        best_metric: the best validation accuracy of the trained model (over epochs).
        best_epoch: the 1-based epoch it was reached at.
        swa_metric: validation accuracy of the SWA model, or None without SWA.
        chosen: "best" or "swa": the model saved in ``model.safetensors``.
        history: one dict per epoch (the columns of metrics.csv).
        model_path: ``out_dir/model.safetensors`` (``model.json`` lies beside it).
    """

    best_metric: float
    best_epoch: int
    swa_metric: float | None
    chosen: str
    history: list[dict[str, Any]]
    model_path: Path


@dataclass
class _Progress:
    """Selection bookkeeping; with the weights and optimizer, all a resume point needs."""

    epoch: int = 0  # last complete epoch
    history: list[dict[str, Any]] = field(default_factory=list)
    best_metric: float = -math.inf
    best_loss: float = math.inf
    best_epoch: int = 0
    since_best: int = 0
    best_state: dict[str, Tensor] | None = None


@dataclass
class _Env:
    """Where and how this process computes."""

    device: torch.device
    dist: DistInfo
    batch_size: int  # per process
    amp_dtype: torch.dtype | None
    scaler: torch.amp.GradScaler
    grad_clip: float | None
    label_smoothing: float
    num_workers: int

    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)


def fit(model: nn.Module, train_set: Dataset, val_set: Dataset, cfg: RunConfig,
        out_dir: str | Path, *, label_names: list[str], resume: bool = False,
        overwrite: bool = False) -> TrainResult:
    """Train ``model`` on ``train_set``, select on ``val_set``, save the chosen model in ``out_dir``.

    Args:
        model: an :class:`~audioclf.model.AudioClassifier` (from :func:`build_model`).
        train_set, val_set: datasets of (waveform (N,) float tensor, int label); a
            ``set_epoch(epoch)`` method, if present, is called before each epoch.
        cfg: the run's configuration (``cfg.train`` drives this function).
        out_dir: output folder (layout in :mod:`audioclf.rundir`).
        label_names: class names in the order of the model's outputs.
        resume: continue the run in ``out_dir`` from its last complete epoch; the options
            in ``rundir.RESUMABLE_CHANGES`` (e.g. ``epochs``) may differ, nothing else.
        overwrite: replace a run found in ``out_dir``.

    Returns:
        A :class:`TrainResult`; ``model`` holds the chosen weights, in eval mode.

    Raises:
        ConfigError: empty or too small datasets, a batch size the number of processes
            does not divide, labels that do not match the model, an ``out_dir`` holding
            another run, a diverged loss, or a distributed rendezvous that failed.
    """
    tc = cfg.train
    device = resolve_device(tc.device)
    info = init_distributed(device)
    env = _make_env(tc, device, info)
    _check_inputs(model, train_set, val_set, label_names, tc, info)
    out_dir = Path(out_dir)
    identity = {"config": cfg.to_dict(), "label_names": list(label_names),
                "n_train": len(train_set), "n_val": len(val_set)}
    state = _claim_out_dir(out_dir, resume, overwrite, identity, env)

    generators = [torch.Generator() for _ in range(3)]  # MixUp, SpecAugment, time shift
    _seed_epoch(tc.seed, info.rank, 0, generators)
    model.to(device)
    model.set_generators(generators[1], generators[2])
    mixup = (MixUp.from_config(cfg.augment, model.num_classes, generator=generators[0])
             if cfg.augment.mixup_alpha > 0 else None)
    if state is None and cfg.features.normalize == "dataset":
        fit_normalization(model, train_set, env)
    if device.type == "cuda" and tc.channels_last:
        model.to(memory_format=torch.channels_last)
    if tc.compile:
        model.backbone.compile()  # in place: the state dict keeps its keys

    optimizer = build_optimizer(model, tc)
    schedule = LRSchedule(optimizer, tc, _steps_per_epoch(len(train_set), env))
    progress = _Progress()
    swa_start = tc.resolved_swa_start()
    if state is not None:
        _restore(state, model, optimizer, schedule, env, progress)
    swa_model = AveragedModel(model) if swa_start is not None else None
    if state is not None and swa_model is not None and state["swa"] is not None:
        swa_model.load_state_dict(state["swa"])
    train_model = _wrap_ddp(model, env)
    val_loader = _eval_loader(val_set, env)
    writer = _tensorboard(out_dir) if info.is_main else None
    patience = tc.resolved_early_stopping_patience()
    try:
        for epoch in range(progress.epoch + 1, tc.epochs + 1):
            if progress.since_best >= patience:
                break  # a resumed run that had already stopped early
            _seed_epoch(tc.seed, info.rank, epoch, generators)
            averaging = swa_model is not None and epoch >= swa_start
            schedule.begin_epoch(averaging)
            started = time.perf_counter()
            loader = _train_loader(train_set, env, tc.seed, epoch)
            bar = tqdm(total=len(loader), desc=f"epoch {epoch}/{tc.epochs}", unit="batch",
                       disable=not info.is_main, leave=True, dynamic_ncols=True)
            train_loss = train_one_epoch(train_model, loader, optimizer, schedule, mixup, env, bar)
            if not math.isfinite(train_loss):
                raise ConfigError(f"training diverged: the loss is {train_loss} in epoch {epoch}; "
                                  "lower the learning rate or set grad_clip")
            if averaging:
                update_swa(swa_model, model)
            _sync_batchnorm(model)
            lr = schedule.lr
            val = evaluate(model, val_loader, env)
            schedule.after_epoch(val["accuracy"], averaging)
            improved = keep_best(progress, epoch, val, model)
            bar.set_postfix(loss=f"{train_loss:.3f}", val_acc=f"{val['accuracy']:.3f}",
                            best=f"{progress.best_metric:.3f}")
            bar.close()
            progress.epoch = epoch
            progress.history.append({
                "epoch": epoch, "lr": lr, "train_loss": train_loss, "val_loss": val["loss"],
                "val_accuracy": val["accuracy"], "improved": improved, "swa": averaging,
                "seconds": round(time.perf_counter() - started, 3)})
            if info.is_main:
                _save_epoch(out_dir, progress, model, optimizer, schedule, swa_model, env,
                            identity, writer)
            if progress.since_best >= patience:
                logger.info("early stopping after epoch %d: no improvement for %d epochs "
                            "(best %.4f at epoch %d)", epoch, patience, progress.best_metric,
                            progress.best_epoch)
    finally:
        if writer is not None:
            writer.close()
    return _finish(model, swa_model, progress, train_set, val_loader, env, cfg, out_dir,
                   label_names)


# --- the steps -------------------------------------------------------------------------


def train_one_epoch(model: nn.Module, loader: DataLoader, optimizer: torch.optim.Optimizer,
                    schedule: LRSchedule, mixup: MixUp | None, env: _Env, bar=None) -> float:
    """One pass over ``loader`` in training mode; returns the mean loss over all ranks.

    ``model`` may be wrapped in DistributedDataParallel; MixUp reaches the spectrogram
    through ``forward(..., mix=...)`` so the wrapper sees one ordinary call.
    """
    model.train()
    num_classes = unwrap_model(model).num_classes
    total = torch.zeros((), dtype=torch.float64, device=env.device)
    count = 0
    for step, (x, y) in enumerate(loader):
        x = x.to(env.device, non_blocking=True)  # (B, N)
        y = y.to(env.device, non_blocking=True)  # (B,)
        targets = F.one_hot(y.long(), num_classes).float()  # (B, K)
        mix = None
        if mixup is not None:
            params = mixup.draw(x.shape[0], env.device)
            targets = mixup.mix_targets(y.long(), params, num_classes)
            mix = partial(mixup.apply, params=params)
        if env.label_smoothing:
            targets = targets * (1 - env.label_smoothing) + env.label_smoothing / num_classes
        with env.autocast():
            logits = model(x, mix=mix)  # (B, K)
        loss = soft_target_cross_entropy(logits, targets)
        optimizer.zero_grad(set_to_none=True)
        env.scaler.scale(loss).backward()
        if env.grad_clip is not None:
            env.scaler.unscale_(optimizer)
            nn.utils.clip_grad_norm_(model.parameters(), env.grad_clip)
        env.scaler.step(optimizer)
        env.scaler.update()
        schedule.after_batch()
        total += loss.detach().double() * x.shape[0]
        count += x.shape[0]
        if bar is not None:
            bar.update()
            if step % 10 == 0:  # .item() waits for the device: not every step
                bar.set_postfix(loss=f"{loss.item():.3f}")
    return all_reduce_mean([float(total) / max(count, 1)], env.device)[0]


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, env: _Env) -> dict[str, float]:
    """Validation loss (cross-entropy) and accuracy over the whole dataset, in eval mode.

    Every rank gets the same numbers: they come from the gathered predictions.
    """
    logits, targets = _predict_logits(model, loader, env)
    return {"loss": F.cross_entropy(logits, targets).item(),
            "accuracy": (logits.argmax(1) == targets).double().mean().item()}


def update_swa(swa_model: AveragedModel, model: nn.Module) -> None:
    """Add the current weights to the running average (equal weight per call)."""
    swa_model.update_parameters(model)


def keep_best(progress: _Progress, epoch: int, val: dict[str, float], model: nn.Module) -> bool:
    """Copy the weights if this epoch validates better than every earlier one.

    Better means a higher accuracy, or the same accuracy with a lower loss; an exact tie
    keeps the earlier epoch. The copy is never replaced by a worse one.
    """
    if not _better(val, {"accuracy": progress.best_metric, "loss": progress.best_loss}):
        progress.since_best += 1
        return False
    progress.best_metric, progress.best_loss = val["accuracy"], val["loss"]
    progress.best_epoch, progress.since_best = epoch, 0
    progress.best_state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
    return True


@torch.no_grad()
def update_bn_stats(model: nn.Module, loader: DataLoader, env: _Env) -> None:
    """Recompute BatchNorm running statistics with one pass over ``loader``.

    Unlike ``torch.optim.swa_utils.update_bn`` this runs the model's own forward (the
    front end included) with the BatchNorms in training mode but the augmentations
    (time shift, SpecAugment) in eval mode, so the statistics describe the inputs the
    model will see at test time. Each BatchNorm averages the batch statistics with equal
    weight (momentum None); under DDP the ranks' averages are averaged.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return
    momenta = {}
    for bn in norms:
        bn.reset_running_stats()
        momenta[bn] = bn.momentum
        bn.momentum = None
    model.train()
    for module in model.augmentations():
        module.eval()
    for x, _ in loader:
        with env.autocast():
            model(x.to(env.device, non_blocking=True))
    for bn in norms:
        bn.momentum = momenta[bn]
    average_batchnorm_stats(model)
    model.eval()


def fit_normalization(model: nn.Module, dataset: Dataset, env: _Env) -> None:
    """Set the front end's per-band mean and std from (up to 5000 evenly spaced) training clips.

    Rank 0 computes them and every rank receives the same values.
    """
    frontend = model.frontend
    n = len(dataset)
    index = np.unique(np.linspace(0, n - 1, min(n, NORM_STATS_MAX_CLIPS)).round().astype(int))
    if env.dist.is_main:
        loader = DataLoader(Subset(dataset, index.tolist()), batch_size=env.batch_size,
                            num_workers=env.num_workers)
        mean, std = compute_normalization_stats(frontend, (x for x, _ in loader))
    else:
        mean = torch.zeros(frontend.n_mels, device=env.device)
        std = torch.ones(frontend.n_mels, device=env.device)
    broadcast_tensors([mean, std])
    frontend.set_normalization(mean, std)
    logger.info("normalization statistics from %d training clips: mean %.1f dB, std %.1f dB",
                len(index), float(mean.mean()), float(std.mean()))


def predict_proba(model: nn.Module, dataset: Dataset, batch_size: int = 64,
                  device: str | torch.device = "cpu") -> np.ndarray:
    """Class probabilities (N, K) float32 for every item of ``dataset``, in eval mode.

    Items are (waveform (N,), label) pairs or bare waveforms. ``model`` is moved to
    ``device``. Under torchrun the clips are shared among the ranks and every rank
    returns the full array.
    """
    device = torch.device(device)
    model.to(device)
    info = current_info()
    amp = torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else None
    env = _Env(device, info, batch_size, amp, torch.amp.GradScaler("cpu", enabled=False), None, 0.0, 0)
    logits, _ = _predict_logits(model, _eval_loader(dataset, env), env)
    return torch.softmax(logits, dim=1).cpu().numpy().astype(np.float32)


# --- helpers ---------------------------------------------------------------------------


@torch.no_grad()
def _predict_logits(model: nn.Module, loader: DataLoader, env: _Env) -> tuple[Tensor, Tensor | None]:
    """(N, K) float32 logits and (N,) targets (None for bare waveforms), gathered in dataset order."""
    model.eval()
    n = len(loader.dataset)
    logits, targets = [], []
    for batch in loader:
        x, y = (batch[0], batch[1]) if isinstance(batch, (list, tuple)) else (batch, None)
        with env.autocast():
            logits.append(model(x.to(env.device, non_blocking=True)).float())  # (B, K)
        # bare waveforms get target -1, so every rank takes part in the same gathers
        targets.append(torch.full((x.shape[0],), -1) if y is None else y.long())
    k = unwrap_model(model).num_classes
    local = torch.cat(logits) if logits else torch.zeros(0, k, device=env.device)
    local_y = torch.cat(targets).to(env.device) if targets else torch.zeros(0, dtype=torch.long, device=env.device)
    all_logits, all_y = gather_shards(local, n).cpu(), gather_shards(local_y, n).cpu()
    return all_logits, (None if bool((all_y < 0).all()) else all_y)


def _better(a: dict[str, float], b: dict[str, float]) -> bool:
    return a["accuracy"] > b["accuracy"] or (a["accuracy"] == b["accuracy"] and a["loss"] < b["loss"])


def _finish(model, swa_model, progress, train_set, val_loader, env, cfg, out_dir, label_names):
    """Restore the best weights, validate the SWA model, save whichever is better."""
    swa_val = None
    if swa_model is not None and int(swa_model.n_averaged) > 0:
        bn_loader = _train_loader(train_set, env, cfg.train.seed, progress.epoch, shuffle=False)
        update_bn_stats(swa_model.module, bn_loader, env)
        swa_val = evaluate(swa_model.module, val_loader, env)
        logger.info("SWA over %d epochs: validation accuracy %.4f (best epoch %d: %.4f)",
                    int(swa_model.n_averaged), swa_val["accuracy"], progress.best_epoch,
                    progress.best_metric)
    best = {"accuracy": progress.best_metric, "loss": progress.best_loss}
    chosen = "swa" if swa_val is not None and _better(swa_val, best) else "best"
    source = swa_model.module.state_dict() if chosen == "swa" else progress.best_state
    model.load_state_dict(source)
    model.eval()
    summary = {"metric": "val_accuracy", "best_metric": progress.best_metric,
               "best_val_loss": progress.best_loss, "best_epoch": progress.best_epoch,
               "swa_metric": swa_val["accuracy"] if swa_val else None,
               "swa_val_loss": swa_val["loss"] if swa_val else None,
               "swa_epochs": int(swa_model.n_averaged) if swa_model is not None else 0,
               "chosen": chosen, "epochs_run": progress.epoch,
               "world_size": env.dist.world_size}
    if env.dist.is_main:
        save_checkpoint(model, out_dir / "model", cfg, label_names, extra={"training": summary})
    barrier()
    return TrainResult(best_metric=progress.best_metric, best_epoch=progress.best_epoch,
                       swa_metric=summary["swa_metric"], chosen=chosen,
                       history=progress.history, model_path=out_dir / "model.safetensors")


def _make_env(tc: TrainConfig, device: torch.device, info: DistInfo) -> _Env:
    if tc.batch_size % info.world_size:
        raise ConfigError(f"batch_size {tc.batch_size} (global) is not divisible by the "
                          f"{info.world_size} processes; use a multiple of {info.world_size}")
    amp_dtype = None
    if device.type == "cuda" and tc.amp:
        amp_dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    return _Env(device, info, tc.batch_size // info.world_size, amp_dtype, scaler, tc.grad_clip,
                tc.label_smoothing, tc.num_workers)


def _check_inputs(model, train_set, val_set, label_names, tc: TrainConfig, info: DistInfo) -> None:
    k = getattr(model, "num_classes", None)
    if k is None:
        raise ConfigError(f"fit expects an AudioClassifier (from build_model), got {type(model).__name__}")
    if len(label_names) != k:
        raise ConfigError(f"label_names has {len(label_names)} names but the model has {k} outputs")
    if len(train_set) < 2 * info.world_size:
        raise ConfigError(f"the training set has {len(train_set)} clips; need at least "
                          f"{2 * info.world_size} (2 per process) to train with BatchNorm")
    if val_set is None or len(val_set) == 0:
        raise ConfigError("the validation set is empty; the best epoch is chosen on it")


def _claim_out_dir(out_dir: Path, resume: bool, overwrite: bool, identity: dict, env: _Env):
    """Rank 0 decides what to do with ``out_dir``; every rank then reads the same resume state."""
    decision = None
    if env.dist.is_main:
        try:
            found = claim_out_dir(out_dir, resume, overwrite)
            decision = ("ok", None if found is None else str(found))
        except ConfigError as e:
            decision = ("error", str(e))
    kind, value = broadcast_object(decision)  # sent once rank 0 has finished with the folder
    if kind == "error":
        raise ConfigError(value)
    if value is None:
        return None
    state, error = None, None
    try:  # every rank reads the file: out_dir must be on a filesystem they share
        state = load_state(value)
        check_same_run(state["run"], identity, Path(value))
    except AudioclfError as e:
        error = e
    if not all_agree(error is None, env.device):
        raise error or ConfigError(f"{value}: another process could not read this resume state; "
                                   "out_dir must be on a filesystem every node shares")
    logger.info("resuming %s after epoch %d", out_dir, state["epoch"])
    return state


def _save_epoch(out_dir, progress, model, optimizer, schedule, swa_model, env, identity, writer):
    """The resume point and the metrics of the epoch just finished (rank 0)."""
    best_weights = None if progress.best_epoch == progress.epoch else progress.best_state
    save_state(out_dir / STATE_FILE, {
        "version": STATE_VERSION, "run": identity, "epoch": progress.epoch,
        "history": progress.history, "best_metric": progress.best_metric,
        "best_loss": progress.best_loss, "best_epoch": progress.best_epoch,
        "since_best": progress.since_best, "best_weights": best_weights,
        "model": model.state_dict(), "optimizer": optimizer.state_dict(),
        "schedule": schedule.state_dict(), "scaler": env.scaler.state_dict(),
        "swa": swa_model.state_dict() if swa_model is not None else None})
    write_metrics_csv(out_dir / "metrics.csv", progress.history)
    if writer is not None:
        row = progress.history[-1]
        for key in ("lr", "train_loss", "val_loss", "val_accuracy"):
            writer.add_scalar(key, row[key], row["epoch"])


def _restore(state, model, optimizer, schedule, env, progress) -> None:
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    schedule.load_state_dict(state["schedule"])
    if state["scaler"]:
        env.scaler.load_state_dict(state["scaler"])
    progress.epoch, progress.history = state["epoch"], state["history"]
    progress.best_metric, progress.best_loss = state["best_metric"], state["best_loss"]
    progress.best_epoch, progress.since_best = state["best_epoch"], state["since_best"]
    progress.best_state = state["best_weights"] or state["model"]


def _seed_epoch(seed: int, rank: int, epoch: int, generators: list[torch.Generator]) -> None:
    """Re-seed every random stream of this process from (seed, rank, epoch)."""
    base = _derive_seed(seed, rank, epoch, 0)
    random.seed(base)
    np.random.seed(base % 2**32)
    torch.manual_seed(base)  # CPU and every CUDA device
    for i, g in enumerate(generators, start=1):
        g.manual_seed(_derive_seed(seed, rank, epoch, i))


def _derive_seed(*keys: int) -> int:
    return int(np.random.SeedSequence(list(keys)).generate_state(1, dtype=np.uint64)[0] >> 1)


def _steps_per_epoch(n: int, env: _Env) -> int:
    shard = math.ceil(n / env.dist.world_size)
    return shard // env.batch_size if shard >= env.batch_size else 1


def _train_loader(dataset, env: _Env, seed: int, epoch: int, shuffle: bool = True) -> DataLoader:
    """This rank's share of a shuffled epoch; the last incomplete batch is dropped (a batch of
    one would break BatchNorm) unless the share is smaller than one batch."""
    if hasattr(dataset, "set_epoch"):
        dataset.set_epoch(epoch)
    sampler = DistributedSampler(dataset, num_replicas=env.dist.world_size, rank=env.dist.rank,
                                 shuffle=shuffle, seed=seed)
    sampler.set_epoch(epoch)
    generator = torch.Generator().manual_seed(_derive_seed(seed, env.dist.rank, epoch, 99))
    return DataLoader(dataset, batch_size=env.batch_size, sampler=sampler,
                      drop_last=len(sampler) >= env.batch_size, num_workers=env.num_workers,
                      pin_memory=env.device.type == "cuda", generator=generator)


def _eval_loader(dataset, env: _Env) -> DataLoader:
    sampler = ShardSampler(len(dataset), env.dist.rank, env.dist.world_size)
    return DataLoader(dataset, batch_size=env.batch_size, sampler=sampler,
                      num_workers=env.num_workers, pin_memory=env.device.type == "cuda")


def _wrap_ddp(model: nn.Module, env: _Env) -> nn.Module:
    if not env.dist.enabled:
        return model
    ids = [env.device.index] if env.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids)


def _sync_batchnorm(model: nn.Module) -> None:
    """Give every rank rank 0's BatchNorm statistics, so all evaluate the model rank 0 saves."""
    stats = [t for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
             for t in (m.running_mean, m.running_var) if t is not None]
    broadcast_tensors(stats)


def _tensorboard(out_dir: Path):
    if importlib.util.find_spec("tensorboard") is None:
        return None
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(str(out_dir / "tensorboard"))
