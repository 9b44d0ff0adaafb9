"""A training run's output folder: what it holds, when it may be reused, its metrics file.

Layout written by :func:`audioclf.train.fit` (rank 0 only)::

    out_dir/
      model.safetensors, model.json   the chosen model (best epoch or SWA), see checkpoint.py
      metrics.csv                     one row per epoch, rewritten atomically after each
      state.safetensors               resume point after the last complete epoch
      tensorboard/                    event files, when tensorboard is installed

A folder holding any of these belongs to a run: a new run refuses it unless asked to
resume it or to overwrite it, so nothing is replaced by accident.
"""

from __future__ import annotations

import csv
import io
import logging
import shutil
from pathlib import Path
from typing import Any

from audioclf._io import write_text_atomic
from audioclf.errors import ConfigError

__all__ = ["RUN_FILES", "STATE_FILE", "check_out_dir", "claim_out_dir", "check_same_run", "write_metrics_csv",
           "METRIC_COLUMNS"]

logger = logging.getLogger(__name__)

STATE_FILE = "state.safetensors"
RUN_FILES = ("model.safetensors", "model.json", "metrics.csv", STATE_FILE)
METRIC_COLUMNS = ("epoch", "lr", "train_loss", "val_loss", "val_accuracy", "improved", "swa",
                  "seconds")

# Options a resumed run may change: they extend the budget or move the run, not its course.
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
    found = [name for name in RUN_FILES if (out_dir / name).exists()]
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
    found = [name for name in RUN_FILES if (out_dir / name).exists()]
    if found:  # only reachable with overwrite
        logger.info("%s: replacing the run found there (--overwrite)", out_dir)
        for name in found:
            (out_dir / name).unlink()
        shutil.rmtree(out_dir / "tensorboard", ignore_errors=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    return None


def check_same_run(saved: dict[str, Any], current: dict[str, Any], source: Path) -> None:
    """Refuse to resume a run with a different configuration, dataset or label set.

    Args:
        saved, current: {"config": RunConfig.to_dict(), "label_names": [...],
            "n_train": int, "n_val": int}. The number of processes may change: the global
            batch size is part of the config, and every random stream is re-derived from
            (seed, rank, epoch) at each epoch.

    Raises:
        ConfigError: naming every field that differs (with both values).
    """
    diffs = []
    for section, values in current["config"].items():
        for name, value in values.items():
            old = saved["config"].get(section, {}).get(name)
            if (section, name) not in RESUMABLE_CHANGES and old != value:
                diffs.append(f"{section}.{name}: {old!r} in the saved run, {value!r} now")
    for key in ("label_names", "n_train", "n_val"):
        if saved.get(key) != current[key]:
            diffs.append(f"{key}: {_short(saved.get(key))} in the saved run, {_short(current[key])} now")
    if diffs:
        raise ConfigError(f"{source}: cannot resume a different run: " + "; ".join(diffs))


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def write_metrics_csv(path: Path, history: list[dict[str, Any]]) -> None:
    """Rewrite the per-epoch metrics file atomically (a killed run leaves the previous one)."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=METRIC_COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in history:
        writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
    write_text_atomic(path, buf.getvalue())
