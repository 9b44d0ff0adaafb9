"""A training run's output folder: what it holds, when it may be reused, its metrics file.

Layout written by :func:`audioclf.train.fit` (rank 0 only)::

    out_dir/
      model.safetensors, model.json   the chosen model (best epoch or SWA), see checkpoint.py
      metrics.csv                     one row per epoch, rewritten atomically after each
      state.safetensors               resume point after the last complete epoch
      tensorboard/                    event files, when tensorboard is installed

A folder holding any of these belongs to a run, and so does one holding a
cross-validation run (``folds.csv``, ``fold-<k>/``, ``bundle/``): a new run refuses it
unless asked to resume it or to overwrite it, so nothing is replaced by accident.

The resume point (:func:`save_resume_point`) holds what an epoch boundary needs: the
weights, the optimizer, the LR schedule, the SWA average and its count, the loss scaler,
the selection bookkeeping (:class:`Progress`: best score, its weights, epochs since), the
run's plan (:class:`RunPlan`: what was derived from the epoch budget at the first start)
and the history. (The model saved when the run finished describes itself, scores
included, in ``model.json``.) Random streams are not stored:
:mod:`audioclf.runtime` re-derives them from (seed, rank, epoch) at every epoch.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import logging
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from audioclf._identity import run_differences
from audioclf._io import write_text_atomic
from audioclf._state import load_state, save_state
from audioclf.bundle import run_entries
from audioclf.config import RunConfig, TrainConfig
from audioclf.distributed import all_agree, broadcast_object
from audioclf.errors import AudioclfError, ConfigError

__all__ = ["RUN_FILES", "STATE_FILE", "RunPlan", "Progress", "check_out_dir", "claim_out_dir", "open_run",
           "check_same_run", "save_resume_point", "restore_progress", "restore_resume_point",
           "write_metrics_csv", "METRIC_COLUMNS"]

logger = logging.getLogger(__name__)

STATE_FILE = "state.safetensors"
RUN_FILES = ("model.safetensors", "model.json", "metrics.csv", STATE_FILE)
# lr: at the start of the epoch; improved: a new best (keep_best); swa: weights averaged this epoch
METRIC_COLUMNS = ("epoch", "lr", "train_loss", "val_loss", "val_accuracy", "improved", "swa",
                  "seconds")

STATE_VERSION = 2  # 2: the plan (an earlier version 2 also kept the saved model's summary: ignored)

# Options a resumed run may change: they extend the budget or move the run, not its course
# (what the budget decides is kept in the run's RunPlan; see audioclf.train).
RESUMABLE_CHANGES = {("train", "epochs"), ("train", "early_stopping_patience"),
                     ("train", "num_workers"), ("train", "device"), ("train", "compile")}


def check_out_dir(out_dir: Path, resume: bool, overwrite: bool) -> Path | None:
    """Whether ``out_dir`` may be used, without touching it; returns the state file to resume from.

    Raises:
        ConfigError: the folder holds a run and neither ``resume`` nor ``overwrite`` is
            set; or ``resume`` is set, the folder holds a run, but it has no resume state.
    """
    out_dir = Path(out_dir)
    if resume and overwrite:
        raise ConfigError("resume and overwrite exclude each other: pick one")
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"{out_dir}: output path exists and is not a folder")
    found = [p.name for p in _run_files(out_dir)]
    state = out_dir / STATE_FILE
    if resume:
        if state.exists():
            return state
        if found:
            raise ConfigError(f"{out_dir}: holds a run ({', '.join(found)}) without a resume state "
                              f"({STATE_FILE}); pass --overwrite to replace it")
        return None
    if found and not overwrite:
        raise ConfigError(f"{out_dir}: already holds a run ({', '.join(found)}); pass --resume to "
                          "continue it or --overwrite to replace it")
    return None


def claim_out_dir(out_dir: Path, resume: bool, overwrite: bool) -> Path | None:
    """:func:`check_out_dir`, then make the folder ready: removes an old run's files when
    ``overwrite`` is set. Returns the state file to resume from, or None."""
    state = check_out_dir(out_dir, resume, overwrite)
    if state is not None:
        return state
    if resume:
        logger.info("%s: nothing to resume; starting a new run", out_dir)
    found = _run_files(out_dir)
    if found:  # only reachable with overwrite
        logger.info("%s: replacing the run found there (--overwrite)", out_dir)
        for path in found:
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink()
        shutil.rmtree(out_dir / "tensorboard", ignore_errors=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    return None


def _run_files(out_dir: Path) -> list[Path]:
    """The files of a run found in ``out_dir``, and those of a cross-validation run
    (:func:`audioclf.bundle.run_entries`: a train run there would mix with it)."""
    found = [out_dir / name for name in RUN_FILES if (out_dir / name).exists()]
    return found + run_entries(out_dir)


def check_same_run(saved: dict[str, Any], current: dict[str, Any], source: Path) -> None:
    """Refuse to resume a run with a different configuration, dataset or label set.

    Args:
        saved, current: {"config": RunConfig.to_dict(), "label_names": [...],
            "n_train": int, "n_val": int}, compared by :func:`audioclf._identity.run_differences`
            (a field the saved config lacks, from an older audioclf, takes its default).
            The number of processes may change: the global batch size is part of the
            config, and every random stream is re-derived from (seed, rank, epoch) at each
            epoch.

    Raises:
        ConfigError: naming every field that differs (with both values).
    """
    try:
        diffs = run_differences(saved, current, ignore={f"config.{s}.{n}" for s, n in RESUMABLE_CHANGES})
    except ConfigError as e:
        raise ConfigError(f"{source}: cannot resume: {e}") from None
    if diffs:
        raise ConfigError(f"{source}: cannot resume a different run (saved vs now): " + "; ".join(diffs))


def write_metrics_csv(path: Path, history: list[dict[str, Any]]) -> None:
    """Rewrite the per-epoch metrics file atomically (a killed run leaves the previous one)."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=METRIC_COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in history:
        writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
    write_text_atomic(path, buf.getvalue())


@dataclass
class RunPlan:
    """What a run derives from its epoch budget, resolved once at its first start.

    A resumed run keeps its plan whatever ``epochs`` it is given now: a larger budget only
    extends the loop (see :mod:`audioclf.train`), so the SWA start, the cosine length and
    the early-stopping patience do not drift (the plateau patience is kept by the LR
    schedule's own state). Early stopping may move ``swa_start`` and ``end_epoch``
    earlier, by the same number of epochs (:func:`audioclf.train.bring_swa_forward`).
    """

    budget: int  # TrainConfig.epochs at the first start: the cosine schedule spans it
    end_epoch: int  # the last epoch for that budget
    swa_start: int | None  # the first averaged epoch; None: no SWA
    stop_patience: int  # early stopping; an explicit early_stopping_patience on resume replaces it

    @classmethod
    def from_config(cls, tc: TrainConfig) -> "RunPlan":
        return cls(budget=tc.epochs, end_epoch=tc.epochs, swa_start=tc.resolved_swa_start(),
                   stop_patience=tc.resolved_early_stopping_patience())

    def last_epoch(self, epochs: int) -> int:
        """The last epoch to train when the budget is now ``epochs``: the planned end, moved
        by as many epochs as the budget was changed."""
        return self.end_epoch + epochs - self.budget


@dataclass
class Progress:
    """Where a run stands: with the weights and optimizer, all a resume point needs."""

    plan: RunPlan
    epoch: int = 0  # last complete epoch
    history: list[dict[str, Any]] = field(default_factory=list)
    best_metric: float = -math.inf
    best_loss: float = math.inf
    best_epoch: int = 0
    since_best: int = 0
    best_state: dict[str, Tensor] | None = None


def open_run(out_dir: Path, resume: bool, overwrite: bool, identity: dict[str, Any],
             device: torch.device, is_main: bool) -> dict | None:
    """Rank 0 claims ``out_dir`` (:func:`claim_out_dir`); then every rank reads the same resume state.

    Returns:
        The resume state (see :func:`save_resume_point`), or None for a new run.

    Raises:
        ConfigError: on every rank, when rank 0 refuses the folder, when the saved run
            differs (:func:`check_same_run`), or when a rank cannot read the state (under
            torchrun, ``out_dir`` must be on a filesystem every node shares).
    """
    decision = None
    if is_main:
        try:
            found = claim_out_dir(out_dir, resume, overwrite)
            decision = ("ok", None if found is None else str(found))
        except ConfigError as e:
            decision = ("error", str(e))
    kind, value = broadcast_object(decision)  # sent once rank 0 is done with the folder
    if kind == "error":
        raise ConfigError(value)
    if value is None:
        return None
    state, error = None, None
    try:
        state = load_state(value)
        check_same_run(state["run"], identity, Path(value))
    except AudioclfError as e:
        error = e
    if not all_agree(error is None, device):
        raise error or ConfigError(f"{value}: another process could not read this resume state; "
                                   "out_dir must be on a filesystem every node shares")
    logger.info("resuming %s after epoch %d", out_dir, state["epoch"])
    return state


def save_resume_point(path: Path, progress: Progress, identity: dict[str, Any], model, optimizer,
                      schedule, swa_model, scaler) -> None:
    """Write the state after ``progress.epoch`` atomically (one file, no pickle)."""
    best_weights = None if progress.best_epoch == progress.epoch else progress.best_state
    save_state(path, {
        "version": STATE_VERSION, "run": identity, "epoch": progress.epoch,
        "plan": dataclasses.asdict(progress.plan),
        "history": progress.history, "best_metric": progress.best_metric,
        "best_loss": progress.best_loss, "best_epoch": progress.best_epoch,
        "since_best": progress.since_best, "best_weights": best_weights,
        "model": model.state_dict(), "optimizer": optimizer.state_dict(),
        "schedule": schedule.state_dict(), "scaler": scaler.state_dict(),
        "swa": swa_model.state_dict() if swa_model is not None else None})


def restore_progress(state: dict) -> Progress:
    """The progress (and plan) stored in a state from :func:`open_run`.

    A version-1 state (no plan) gets the plan its saved configuration resolves to.
    """
    version = state.get("version")
    if version not in (1, STATE_VERSION):
        raise ConfigError(f"resume state version {version!r} is not one this audioclf reads "
                          f"(1 to {STATE_VERSION}); start a new run (--overwrite)")
    if version == 1:
        plan = RunPlan.from_config(RunConfig.from_dict(state["run"]["config"]).train)
    else:  # an earlier version 2 also kept the plateau patience, which the schedule's state holds
        plan = RunPlan(**{k: v for k, v in state["plan"].items() if k != "plateau_patience"})
    return Progress(plan=plan, epoch=state["epoch"], history=state["history"],
                    best_metric=state["best_metric"], best_loss=state["best_loss"],
                    best_epoch=state["best_epoch"], since_best=state["since_best"],
                    best_state=state["best_weights"] or state["model"])


def restore_resume_point(state: dict, model, optimizer, schedule, scaler) -> None:
    """Load a state from :func:`open_run` into the run's objects (see :func:`restore_progress`).

    The SWA average is restored by the caller once it has built it (``state["swa"]``).
    """
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    schedule.load_state_dict(state["schedule"])
    if state["scaler"]:
        scaler.load_state_dict(state["scaler"])
