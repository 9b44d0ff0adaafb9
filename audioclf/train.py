"""Training: :func:`fit` runs the recipe, one small function per step.

    before:   dataset normalization statistics (FeatureConfig.normalize == "dataset")
    each epoch:
      train_one_epoch    train mode; MixUp + SpecAugment; soft-target loss; AdamW
      update_swa         average the weights once the SWA phase has begun
      evaluate           eval mode; the whole validation set (sharded over ranks, gathered)
      LR schedule        plateau on validation accuracy, or cosine per batch; SWALR once averaging
      keep_best          copy the weights when validation accuracy improves (ties: lower loss)
      bring_swa_forward  early stopping would come before SWA: begin SWA at the next epoch
      resume point       state.safetensors and metrics.csv, atomically (rank 0)
      early_stopping     without SWA: stop after the patience without improvement
    after:    SWA: update_bn_stats on the average, evaluate; save the better of it and the
              best epoch (never replacing a better model this run saved before)

Early stopping and SWA. Early stopping fires after ``stop_patience`` epochs in a row
without improvement (:meth:`TrainConfig.resolved_early_stopping_patience`). Without SWA
the run ends there and the best epoch's weights are restored. With SWA the average is
never given up: when early stopping fires before the SWA phase has begun, the phase
begins at the next epoch instead (SWALR takes over from the current weights) and runs its
planned length, ``epochs - swa_start + 1`` epochs, so the run ends as many epochs before
its budget as SWA was brought forward. Once averaging has begun, early stopping does not
cut it short. For example, with 20 epochs, ``swa_start`` 0.7 (epoch 15, 6 SWA epochs)
and patience 6, a run whose last improvement was epoch 5 averages epochs 12-17 and ends.

The plan. What derives from the epoch budget (the SWA start, the last epoch, the cosine
length, both patiences) is resolved once, at the run's first start, and kept in the
resume point (:class:`~audioclf.rundir.RunPlan`, with the SWA start actually used; the
plateau patience in the LR schedule's own state). A run
resumed with another ``epochs`` keeps its plan, and the change only moves its end by as
many epochs: a plateau run continues at its current learning rate; an SWA run averages
the extra epochs too, at the SWA learning rate; a cosine run without SWA has annealed to
zero at the end of its planned epochs and is refused (start a new run). An
``early_stopping_patience`` given explicitly on resume replaces the planned one.

The saved model. ``model.safetensors`` is written when the run finishes and is never
replaced by one that validates worse: a finished run resumed with more epochs keeps its
earlier model (and that model's summary) unless its new best epoch or SWA average beats it.
The earlier model's scores are read from the training summary saved beside it in
``model.json``, so nothing written after the model can be lost to a kill.

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

import logging
import math
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.optim.swa_utils import AveragedModel
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm.auto import tqdm

from audioclf.augment import MixUp, soft_target_cross_entropy
from audioclf.checkpoint import load_checkpoint, save_checkpoint, unwrap_model
from audioclf.config import RunConfig, TrainConfig
from audioclf.distributed import (DistInfo, all_reduce_mean, average_batchnorm_stats, barrier,
                                  broadcast_tensors, current_info, gather_shards, init_distributed,
                                  resolve_device)
from audioclf.errors import BundleError, ConfigError
from audioclf.features import compute_normalization_stats
from audioclf.optim import LRSchedule, build_optimizer
from audioclf.rundir import (STATE_FILE, Progress, RunPlan, open_run, restore_progress,
                             restore_resume_point, save_resume_point, write_metrics_csv)
from audioclf.runtime import (Runtime, eval_loader, inference_runtime, make_runtime, seed_epoch,
                              steps_per_epoch, sync_batchnorm, tensorboard_writer, train_loader,
                              wrap_ddp)

__all__ = ["fit", "TrainResult", "train_one_epoch", "evaluate", "update_swa", "update_bn_stats",
           "keep_best", "bring_swa_forward", "early_stopping", "fit_normalization", "predict_proba"]

logger = logging.getLogger(__name__)

NORM_STATS_MAX_CLIPS = 5000  # evenly spaced training clips for the normalization statistics


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

    When a resumed run keeps the model an earlier finish saved (see the module
    docstring), the scores are those recorded with it.
    """

    best_metric: float
    best_epoch: int
    swa_metric: float | None
    chosen: str
    history: list[dict[str, Any]]
    model_path: Path


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
            A different ``epochs`` moves the run's end and nothing else (the plan, in the
            module docstring).
        overwrite: replace a run found in ``out_dir``.

    The plateau and early-stopping patiences default to values derived from the epoch
    budget (:meth:`TrainConfig.resolved_plateau_patience`, explained in
    :mod:`audioclf.optim`); an epoch counts as an improvement when :func:`keep_best`
    keeps it. Early stopping ends a run without SWA; with SWA, when it fires before the
    SWA phase, that phase begins at once and runs its planned length, and once averaging
    has begun nothing stops it early (:func:`bring_swa_forward`). Under torchrun,
    ``cfg.train.batch_size`` is the global batch.

    Returns:
        A :class:`TrainResult`; ``model`` holds the chosen weights, in eval mode.

    Raises:
        ConfigError: empty or too small datasets, a batch size the number of processes
            does not divide, labels that do not match the model, an ``out_dir`` holding
            another run, a cosine run without SWA resumed with more epochs, a diverged
            loss, or a distributed rendezvous that failed.
    """
    run = _prepare(model, train_set, val_set, cfg, Path(out_dir), label_names, resume, overwrite)
    try:
        while not _over(run):
            _run_epoch(run, run.progress.epoch + 1)
    finally:
        if run.writer is not None:
            run.writer.close()
    return _finish(run)


@dataclass
class _Run:
    """Everything one call of :func:`fit` works with."""

    cfg: RunConfig
    rt: Runtime
    out_dir: Path
    identity: dict[str, Any]
    label_names: list[str]
    model: nn.Module  # the plain model: saved, averaged, evaluated
    train_model: nn.Module  # the same, wrapped in DDP under torchrun
    optimizer: torch.optim.Optimizer
    schedule: LRSchedule
    swa_model: AveragedModel | None
    mixup: MixUp | None
    generators: list[torch.Generator]
    train_set: Dataset
    val_loader: DataLoader
    progress: Progress  # with progress.plan: the SWA start, the end, the early-stopping patience
    writer: Any


def _prepare(model, train_set, val_set, cfg: RunConfig, out_dir: Path, label_names, resume: bool,
             overwrite: bool) -> _Run:
    """Join the process group, claim out_dir, place and normalize the model, and set up the
    plan, optimizer, schedule and SWA average, from the resume point when there is one."""
    tc = cfg.train
    device = resolve_device(tc.device)
    info = init_distributed(device)
    rt = make_runtime(tc, device, info)
    _check_inputs(model, train_set, val_set, label_names, info)
    identity = {"config": cfg.to_dict(), "label_names": list(label_names),
                "n_train": len(train_set), "n_val": len(val_set)}
    state = open_run(out_dir, resume, overwrite, identity, device, info.is_main)
    progress = _progress(state, tc)

    generators = [torch.Generator() for _ in range(5)]  # MixUp, SpecAugment, time, freq shift, speed
    seed_epoch(tc.seed, info.rank, 0, generators)
    model.to(device)
    model.set_generators(*generators[1:])
    mixup = (MixUp.from_config(cfg.augment, model.num_classes, generator=generators[0])
             if cfg.augment.mixup_alpha > 0 else None)
    if state is None and cfg.features.normalize == "dataset":
        fit_normalization(model, train_set, rt)
    if device.type == "cuda" and tc.channels_last:
        model.to(memory_format=torch.channels_last)
    if tc.compile:
        model.backbone.compile()  # in place: the state dict keeps its keys

    optimizer = build_optimizer(model, tc)
    schedule = LRSchedule(optimizer, tc, steps_per_epoch(len(train_set), rt), verbose=info.is_main,
                          epochs=progress.plan.budget)
    if state is not None:
        restore_resume_point(state, model, optimizer, schedule, rt.scaler)
    # AveragedModel copies the model: after the restore
    swa_model = AveragedModel(model) if progress.plan.swa_start is not None else None
    if swa_model is not None and state is not None and state["swa"] is not None:
        swa_model.load_state_dict(state["swa"])
    return _Run(cfg, rt, out_dir, identity, list(label_names), model, wrap_ddp(model, rt), optimizer,
                schedule, swa_model, mixup, generators, train_set, eval_loader(val_set, rt), progress,
                tensorboard_writer(out_dir) if info.is_main else None)


def _progress(state: dict | None, tc: TrainConfig) -> Progress:
    """A new run's plan, resolved from ``tc``; or the resumed run's progress, with its own plan.

    Raises:
        ConfigError: a cosine run without SWA resumed with more epochs than it was planned
            for (its learning rate has annealed to zero: the extra epochs would not train).
    """
    if state is None:
        return Progress(plan=RunPlan.from_config(tc))
    progress = restore_progress(state)
    plan = progress.plan
    if tc.early_stopping_patience is not None:
        plan.stop_patience = tc.early_stopping_patience  # given explicitly now: it applies
        bring_swa_forward(progress, progress.epoch)  # a shorter one may already have run out
    if tc.scheduler == "cosine" and plan.swa_start is None and tc.epochs > plan.budget:
        raise ConfigError(f"epochs {tc.epochs}: this run's cosine schedule was planned for "
                          f"{plan.budget} epochs and anneals the learning rate to 0 there, so more "
                          "epochs would not train; start a new run (--overwrite) with the budget "
                          "you want, or use the plateau scheduler or SWA")
    return progress


def _over(run: _Run) -> bool:
    """The run's last epoch is done, or early stopping ended it (a resumed run may be over already)."""
    progress = run.progress
    return progress.epoch >= progress.plan.last_epoch(run.cfg.train.epochs) or early_stopping(progress)


def _run_epoch(run: _Run, epoch: int) -> None:
    """Train, average, validate, schedule, select, plan, and leave a resume point."""
    tc, rt, progress, plan = run.cfg.train, run.rt, run.progress, run.progress.plan
    seed_epoch(tc.seed, rt.dist.rank, epoch, run.generators)
    averaging = plan.swa_start is not None and epoch >= plan.swa_start
    run.schedule.begin_epoch(averaging)
    started, lr = time.perf_counter(), run.schedule.lr
    loader = train_loader(run.train_set, rt, tc.seed, epoch)
    bar = tqdm(total=len(loader), desc=f"epoch {epoch}/{plan.last_epoch(tc.epochs)}", unit="batch",
               disable=not rt.dist.is_main, leave=True, dynamic_ncols=True)
    train_loss = train_one_epoch(run.train_model, loader, run.optimizer, run.schedule, run.mixup, rt, bar)
    if not math.isfinite(train_loss):
        raise ConfigError(f"training diverged: the loss is {train_loss} in epoch {epoch}; "
                          "lower the learning rate or set grad_clip")
    if averaging:
        update_swa(run.swa_model, run.model)
    sync_batchnorm(run.model)
    val = evaluate(run.model, run.val_loader, rt)
    run.schedule.after_epoch(val["accuracy"], averaging)
    improved = keep_best(progress, epoch, val, run.model)
    planned_swa = plan.swa_start
    brought_forward = bring_swa_forward(progress, epoch)  # before the resume point: it keeps the plan
    bar.set_postfix(loss=f"{train_loss:.3f}", val_acc=f"{val['accuracy']:.3f}",
                    best=f"{progress.best_metric:.3f}")
    bar.close()
    progress.epoch = epoch
    progress.history.append({
        "epoch": epoch, "lr": lr, "train_loss": train_loss, "val_loss": val["loss"],
        "val_accuracy": val["accuracy"], "improved": improved, "swa": averaging,
        "seconds": round(time.perf_counter() - started, 3)})
    if rt.dist.is_main:
        save_resume_point(run.out_dir / STATE_FILE, progress, run.identity, run.model, run.optimizer,
                          run.schedule, run.swa_model, rt.scaler)
        write_metrics_csv(run.out_dir / "metrics.csv", progress.history)
        _log_scalars(run.writer, progress.history[-1])
        if brought_forward:
            logger.info("no improvement for %d epochs: SWA begins at epoch %d instead of %d and "
                        "averages epochs %d-%d", plan.stop_patience, plan.swa_start, planned_swa,
                        plan.swa_start, plan.last_epoch(tc.epochs))
        elif early_stopping(progress):
            logger.info("early stopping after epoch %d: no improvement for %d epochs (best %.4f at "
                        "epoch %d)", epoch, plan.stop_patience, progress.best_metric, progress.best_epoch)


# --- the steps -------------------------------------------------------------------------


def train_one_epoch(model: nn.Module, loader: DataLoader, optimizer: torch.optim.Optimizer,
                    schedule: LRSchedule, mixup: MixUp | None, rt: Runtime, bar=None) -> float:
    """One pass over ``loader`` in training mode; returns the mean loss over all ranks.

    ``model`` may be wrapped in DistributedDataParallel; MixUp reaches the spectrogram
    through ``forward(..., mix=...)`` so the wrapper sees one ordinary call.
    """
    model.train()
    num_classes = unwrap_model(model).num_classes
    total = torch.zeros((), dtype=torch.float64, device=rt.device)
    count = 0
    for step, (x, y) in enumerate(loader):
        x = x.to(rt.device, non_blocking=True)  # (B, N)
        y = y.to(rt.device, non_blocking=True)  # (B,)
        targets = F.one_hot(y.long(), num_classes).float()  # (B, K)
        mix = None
        if mixup is not None:
            params = mixup.draw(x.shape[0], rt.device)
            targets = mixup.mix_targets(y.long(), params, num_classes)
            mix = partial(mixup.apply, params=params)
        if rt.label_smoothing:
            targets = targets * (1 - rt.label_smoothing) + rt.label_smoothing / num_classes
        with rt.autocast():
            logits = model(x, mix=mix)  # (B, K)
        loss = soft_target_cross_entropy(logits, targets)
        optimizer.zero_grad(set_to_none=True)
        rt.scaler.scale(loss).backward()
        if rt.grad_clip is not None:
            rt.scaler.unscale_(optimizer)
            nn.utils.clip_grad_norm_(model.parameters(), rt.grad_clip)
        rt.scaler.step(optimizer)
        rt.scaler.update()
        schedule.after_batch()
        total += loss.detach().double() * x.shape[0]
        count += x.shape[0]
        if bar is not None:
            bar.update()
            if step % 10 == 0:  # .item() waits for the device: not every step
                bar.set_postfix(loss=f"{loss.item():.3f}")
    return all_reduce_mean([float(total) / max(count, 1)], rt.device)[0]


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, rt: Runtime) -> dict[str, float]:
    """Validation loss (cross-entropy) and accuracy over the whole dataset, in eval mode.

    Every rank gets the same numbers: they come from the gathered predictions.
    """
    logits, targets = _predict_logits(model, loader, rt)
    return {"loss": F.cross_entropy(logits, targets).item(),
            "accuracy": (logits.argmax(1) == targets).double().mean().item()}


def update_swa(swa_model: AveragedModel, model: nn.Module) -> None:
    """Add the current weights to the running average (equal weight per call)."""
    swa_model.update_parameters(model)


def keep_best(progress: Progress, epoch: int, val: dict[str, float], model: nn.Module) -> bool:
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


def bring_swa_forward(progress: Progress, epoch: int) -> bool:
    """Begin the SWA phase after ``epoch`` when early stopping would otherwise end the run first.

    When ``plan.stop_patience`` epochs in a row brought no improvement and averaging is
    planned to begin later than the next epoch, the planned SWA start and the run's last
    epoch move earlier by the same number of epochs: SWA begins at the next epoch and
    averages as many epochs as planned. Returns whether the plan moved.
    """
    plan = progress.plan
    if plan.swa_start is None or progress.since_best < plan.stop_patience or plan.swa_start <= epoch + 1:
        return False
    shift = plan.swa_start - (epoch + 1)
    plan.swa_start -= shift
    plan.end_epoch -= shift
    return True


def early_stopping(progress: Progress) -> bool:
    """Whether the run ends now: ``plan.stop_patience`` epochs in a row without improvement,
    and no SWA planned (with SWA, :func:`bring_swa_forward` applies instead)."""
    return progress.plan.swa_start is None and progress.since_best >= progress.plan.stop_patience


@torch.no_grad()
def update_bn_stats(model: nn.Module, loader: DataLoader, rt: Runtime) -> None:
    """Recompute BatchNorm running statistics with one pass over ``loader``.

    Unlike ``torch.optim.swa_utils.update_bn`` this runs the model's own forward (the
    front end included) in eval mode with only the BatchNorms in training mode: dropout,
    drop-path and the augmentations (time shift, SpecAugment) are off, so the statistics
    describe the activations the model will see at test time. Each BatchNorm averages the
    batch statistics with equal weight (momentum None); under DDP the ranks' averages are
    averaged.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return
    momenta = {}
    for bn in norms:
        bn.reset_running_stats()
        momenta[bn] = bn.momentum
        bn.momentum = None
    model.eval()
    for bn in norms:
        bn.train()
    for x, _ in loader:
        with rt.autocast():
            model(x.to(rt.device, non_blocking=True))
    for bn in norms:
        bn.momentum = momenta[bn]
    average_batchnorm_stats(model)
    model.eval()


def fit_normalization(model: nn.Module, dataset: Dataset, rt: Runtime) -> None:
    """Set the front end's per-band mean and std from (up to 5000 evenly spaced) training clips.

    Rank 0 computes them and every rank receives the same values.
    """
    frontend = model.frontend
    n = len(dataset)
    index = np.unique(np.linspace(0, n - 1, min(n, NORM_STATS_MAX_CLIPS)).round().astype(int))
    if rt.dist.is_main:
        loader = DataLoader(Subset(dataset, index.tolist()), batch_size=rt.batch_size,
                            num_workers=rt.num_workers)
        mean, std = compute_normalization_stats(frontend, (x for x, _ in loader))
    else:
        mean = torch.zeros(frontend.n_mels, device=rt.device)
        std = torch.ones(frontend.n_mels, device=rt.device)
    broadcast_tensors([mean, std])
    frontend.set_normalization(mean, std)
    if rt.dist.is_main:
        logger.info("normalization statistics from %d training clips: mean %.1f dB, std %.1f dB",
                    len(index), float(mean.mean()), float(std.mean()))


def predict_proba(model: nn.Module, dataset: Dataset, batch_size: int = 64,
                  device: str | torch.device = "cpu", amp: bool = True) -> np.ndarray:
    """Class probabilities (N, K) float32 for every item of ``dataset``, in eval mode.

    Items are (waveform (N,), label) pairs or bare waveforms. ``model`` is moved to
    ``device``. On CUDA ``amp`` scores under bf16 autocast (pass the run's
    ``TrainConfig.amp``); elsewhere it has no effect. Under torchrun the clips are shared
    among the ranks and every rank returns the full array.
    """
    device = torch.device(device)
    model.to(device)
    rt = inference_runtime(device, current_info(), batch_size, amp=amp)
    logits, _ = _predict_logits(model, eval_loader(dataset, rt), rt)
    return torch.softmax(logits, dim=1).cpu().numpy().astype(np.float32)


# --- helpers ---------------------------------------------------------------------------


@torch.no_grad()
def _predict_logits(model: nn.Module, loader: DataLoader, rt: Runtime) -> tuple[Tensor, Tensor | None]:
    """(N, K) float32 logits and (N,) targets (None for bare waveforms), gathered in dataset order."""
    model.eval()
    n = len(loader.dataset)
    logits, targets = [], []
    for batch in loader:
        x, y = (batch[0], batch[1]) if isinstance(batch, (list, tuple)) else (batch, None)
        with rt.autocast():
            logits.append(model(x.to(rt.device, non_blocking=True)).float())  # (B, K)
        # bare waveforms get target -1, so every rank takes part in the same gathers
        targets.append(torch.full((x.shape[0],), -1) if y is None else y.long())
    k = unwrap_model(model).num_classes
    local = torch.cat(logits) if logits else torch.zeros(0, k, device=rt.device)
    local_y = torch.cat(targets).to(rt.device) if targets else torch.zeros(0, dtype=torch.long, device=rt.device)
    all_logits, all_y = gather_shards(local, n).cpu(), gather_shards(local_y, n).cpu()
    return all_logits, (None if bool((all_y < 0).all()) else all_y)


def _better(a: dict[str, float], b: dict[str, float]) -> bool:
    return a["accuracy"] > b["accuracy"] or (a["accuracy"] == b["accuracy"] and a["loss"] < b["loss"])


def _finish(run: _Run) -> TrainResult:
    """Score the SWA average and save the better of it and the best epoch, unless the model
    an earlier finish of this run saved validates at least as well (then keep that one)."""
    progress, rt = run.progress, run.rt
    earlier = _saved_model(run.out_dir, rt)  # read before rank 0 may write: the ranks meet in scoring first
    swa_val = _score_swa(run)  # leaves the SWA average in run.model
    best = {"accuracy": progress.best_metric, "loss": progress.best_loss}
    chosen = "swa" if swa_val is not None and _better(swa_val, best) else "best"
    if chosen == "best":
        run.model.load_state_dict(progress.best_state)
    summary = _summary(run, swa_val, chosen)
    if earlier is not None and not _better(_score(summary), _score(earlier[1])):
        summary = _keep_saved(run, *earlier, summary)
    elif rt.dist.is_main:
        save_checkpoint(run.model, run.out_dir / "model", run.cfg, run.label_names, extra={"training": summary})
    run.model.eval()
    barrier()
    return TrainResult(best_metric=summary["best_metric"], best_epoch=summary["best_epoch"],
                       swa_metric=summary["swa_metric"], chosen=summary["chosen"],
                       history=progress.history, model_path=run.out_dir / "model.safetensors")


def _saved_model(out_dir: Path, rt: Runtime) -> tuple[dict[str, Tensor], dict[str, Any]] | None:
    """The weights and training summary (``model.json``: ``extra.training``) of the model an
    earlier finish of this run saved in ``out_dir``; None when there is none, or when the
    pair is not whole (a finish killed between its two writes: this one writes it again)."""
    if not (out_dir / "model.safetensors").is_file():
        return None
    try:
        model, meta = load_checkpoint(out_dir)
    except BundleError as e:
        if rt.dist.is_main:
            logger.warning("%s; it will be replaced", e)
        return None
    summary = meta.get("extra", {}).get("training")
    return (model.state_dict(), summary) if summary else None


def _score_swa(run: _Run) -> dict[str, float] | None:
    """Validation scores of the SWA average, its BatchNorm statistics recomputed on the
    training clips; the average is left in ``run.model``. None when nothing was averaged.

    (The average is scored in the model itself rather than in the AveragedModel's copy,
    whose compiled backbone would still run the original's weights.)
    """
    swa_model, progress, rt = run.swa_model, run.progress, run.rt
    if swa_model is None or int(swa_model.n_averaged) == 0:
        return None
    run.model.load_state_dict(swa_model.module.state_dict())
    update_bn_stats(run.model, train_loader(run.train_set, rt, run.cfg.train.seed, progress.epoch,
                                            shuffle=False), rt)
    val = evaluate(run.model, run.val_loader, rt)
    if rt.dist.is_main:
        logger.info("SWA over %d epochs from epoch %d: validation accuracy %.4f (best epoch %d: %.4f)",
                    int(swa_model.n_averaged), progress.plan.swa_start, val["accuracy"],
                    progress.best_epoch, progress.best_metric)
    return val


def _summary(run: _Run, swa_val: dict[str, float] | None, chosen: str) -> dict[str, Any]:
    """The training summary saved in model.json (``extra.training``)."""
    progress, swa_model = run.progress, run.swa_model
    swa_epochs = int(swa_model.n_averaged) if swa_model is not None else 0
    return {"metric": "val_accuracy", "best_metric": progress.best_metric,
            "best_val_loss": progress.best_loss, "best_epoch": progress.best_epoch,
            "swa_metric": swa_val["accuracy"] if swa_val else None,
            "swa_val_loss": swa_val["loss"] if swa_val else None,
            "swa_start": progress.plan.swa_start if swa_epochs else None, "swa_epochs": swa_epochs,
            "chosen": chosen, "epochs_run": progress.epoch, "world_size": run.rt.dist.world_size}


def _score(summary: dict[str, Any]) -> dict[str, float]:
    """Validation accuracy and loss of the model a summary chose."""
    if summary["chosen"] == "swa":
        return {"accuracy": summary["swa_metric"], "loss": summary["swa_val_loss"]}
    return {"accuracy": summary["best_metric"], "loss": summary["best_val_loss"]}


def _keep_saved(run: _Run, weights: dict[str, Tensor], saved: dict[str, Any],
                candidate: dict[str, Any]) -> dict[str, Any]:
    """Load the model saved before back into ``run.model``; returns its summary."""
    run.model.load_state_dict(weights)
    if run.rt.dist.is_main:
        old, new = _score(saved), _score(candidate)
        logger.info("kept the model saved before (%s, validation accuracy %.4f, loss %.4f): this "
                    "run's choice (%s, %.4f, loss %.4f) does not beat it", saved["chosen"],
                    old["accuracy"], old["loss"], candidate["chosen"], new["accuracy"], new["loss"])
    return saved


def _check_inputs(model, train_set, val_set, label_names, info: DistInfo) -> None:
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


def _log_scalars(writer, row: dict[str, Any]) -> None:
    if writer is not None:
        for key in ("lr", "train_loss", "val_loss", "val_accuracy"):
            writer.add_scalar(key, row[key], row["epoch"])
