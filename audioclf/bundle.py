"""The model bundle: one folder that holds everything ``audioclf predict`` needs.

Layout of a cross-validation run folder ``OUT`` (``audioclf cv --out OUT``)::

    OUT/folds.csv                 every clip's path, label, group and fold (-1: not held out)
    OUT/test-clips.csv            the clips of the optional test set (group hold-out)
    OUT/fold-<k>/train/           fit()'s folder: metrics.csv, resume state, chosen model
    OUT/fold-<k>/predictions.npz  log-probs of the fold model, every TTA view, on its
                                  held-out fold, its inner validation split and the test set
    OUT/fold-<k>/fold.json        the fold's summary; written last, so it marks the fold done
    OUT/bundle/                   the bundle (what you ship):
        fold-<k>.safetensors      the fold model's weights (+ fold-<k>.json: its checkpoint
                                  metadata, loadable by audioclf.checkpoint.load_checkpoint)
        config.json               written by the merge, last: format version, RunConfig, label
                                  names, sample rate, clip length, averaging rule, TTA shifts,
                                  fold files, versions and a training summary
        report.json, report.md, oof.csv, confusion.png, fold_scores.png, curves.png

Folds write only their own files; :func:`merge_folds` writes the shared ones. A bundle
without ``config.json`` is incomplete (its merge has not run).
"""

from __future__ import annotations

import csv
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from audioclf._io import atomic_open, write_json_atomic
from audioclf.errors import BundleError, ConfigError

__all__ = ["FORMAT_VERSION", "Bundle", "read_bundle", "load_models", "merge_folds", "first_difference",
           "resolve_bundle_dir", "versions"]

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
VARIANTS = ("single", "tta-arithmetic", "tta-geometric")
"""Ways one fold model scores a clip: its centre view only, or all TTA views averaged."""


def versions() -> dict[str, str]:
    """Versions of the packages that shape a model's numbers."""
    import importlib.metadata as md
    import platform

    out = {"python": platform.python_version()}
    for name in ("audioclf", "torch", "torchaudio", "timm", "numpy"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = "not installed"
    return out


# ---------------------------------------------------------------- per-fold files


def write_run_inputs(out_dir, manifest, test_manifest, fold_ids: np.ndarray) -> None:
    """``folds.csv`` (and ``test-clips.csv``): identical content from every fold process."""
    out_dir = Path(out_dir)
    groups = manifest.groups() or [""] * len(manifest)
    _write_rows(out_dir / "folds.csv", ["path", "label", "group", "fold"],
                [[r.path, r.label, g or "", int(f)] for r, g, f in zip(manifest.records, groups, fold_ids)])
    if test_manifest is not None:
        _write_rows(out_dir / "test-clips.csv", ["path", "label"], [[r.path, r.label] for r in test_manifest.records])


def _write_rows(path: Path, header: list[str], rows: list[list]) -> None:
    with atomic_open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)


def _read_rows(path: Path) -> list[dict[str, str]]:
    if not path.is_file():
        raise BundleError(f"{path}: missing; the run folder is incomplete (rerun `audioclf cv`)")
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def fold_summary(plan, identity: dict, result, shifts: list[int], heldout_score: dict) -> dict:
    """The JSON summary of a finished fold (see :func:`write_fold_summary`)."""
    return {
        "format_version": FORMAT_VERSION,
        "fold": plan.fold,
        "identity": identity,
        "n_fit": len(plan.fit), "n_val": len(plan.val), "n_heldout": len(plan.heldout),
        "tta_shifts": [int(s) for s in shifts],
        "train": {"best_epoch": result.best_epoch, "best_metric": result.best_metric,
                  "swa_metric": result.swa_metric, "chosen": result.chosen,
                  "epochs_run": len(result.history)},
        "heldout_single": heldout_score,
        "versions": versions(),
    }


def write_fold_summary(out_dir, fold: int, summary: dict) -> None:
    write_json_atomic(Path(out_dir) / f"fold-{fold}" / "fold.json", summary)


def read_fold_summary(out_dir, fold: int, missing_ok: bool = False) -> dict | None:
    path = Path(out_dir) / f"fold-{fold}" / "fold.json"
    if not path.is_file():
        if missing_ok:
            return None
        raise BundleError(f"{path}: missing; fold {fold} has not finished")
    return json.loads(path.read_text())


def first_difference(a: Any, b: Any, where: str = "") -> str | None:
    """The first field (dotted path) where two JSON-like values differ, with both values."""
    if isinstance(a, dict) and isinstance(b, dict):
        for key in list(a) + [k for k in b if k not in a]:
            diff = first_difference(a.get(key), b.get(key), f"{where}.{key}" if where else str(key))
            if diff:
                return diff
        return None
    return None if a == b else f"{where or 'value'} ({a!r} vs {b!r})"


# ---------------------------------------------------------------- merge


def merge_folds(out_dir, command: str | None = None) -> dict:
    """Check that every fold is done and alike, then write the bundle's shared files.

    Returns:
        The report dict (also written as ``bundle/report.json``).

    Raises:
        BundleError: no fold, or some folds missing (named), or a fold's files missing.
        ConfigError: folds trained with different configurations (the field is named).
    """
    from audioclf import report as reporting

    out_dir = Path(out_dir)
    found = sorted(int(p.parent.name.split("-")[1]) for p in out_dir.glob("fold-*/fold.json"))
    if not found:
        raise BundleError(f"{out_dir}: no finished fold (no fold-<k>/fold.json); run `audioclf cv` first")
    summaries = {f: read_fold_summary(out_dir, f) for f in found}
    n_folds = summaries[found[0]]["identity"]["n_folds"]
    missing = sorted(set(range(n_folds)) - set(found))
    if missing:
        raise BundleError(f"{out_dir}: fold(s) {', '.join(map(str, missing))} of {n_folds} missing; "
                          f"run `audioclf cv ... --folds {','.join(map(str, missing))}` first")
    for f in found[1:]:
        diff = first_difference(summaries[found[0]]["identity"], summaries[f]["identity"])
        if diff:
            raise ConfigError(f"{out_dir}: fold {f} was trained differently from fold {found[0]}: {diff}")
    for f in found:
        for suffix in (".safetensors", ".json"):
            path = out_dir / "bundle" / f"fold-{f}{suffix}"
            if not path.is_file():
                raise BundleError(f"{path}: missing; fold {f} did not finish writing its model")

    rows = _read_rows(out_dir / "folds.csv")
    preds = {f: dict(np.load(out_dir / f"fold-{f}" / "predictions.npz")) for f in found}
    first = summaries[found[0]]
    report = reporting.build_cv_report(rows, preds, [summaries[f] for f in found], first["identity"]["config"])
    test_rows = _read_rows(out_dir / "test-clips.csv") if "test" in preds[found[0]] else None
    if test_rows is not None:
        report["ensemble_test"] = reporting.score_ensemble_on_test(test_rows, preds, report["labels"])
        report["ensemble_test"]["chosen"] = reporting.chosen_key(report["selection"])  # what the bundle runs
    report["command"] = command
    report["versions"] = versions()
    bundle = out_dir / "bundle"
    _write_oof(bundle / "oof.csv", rows, preds, report)
    reporting.write_report(bundle, report, curves={f: out_dir / f"fold-{f}" / "train" / "metrics.csv" for f in found})
    write_json_atomic(bundle / "config.json", _bundle_config(report, first, found))  # last: marks complete
    log.info("bundle written to %s", bundle)
    return report


def _write_oof(path: Path, rows: list[dict], preds: dict, report: dict) -> None:
    """Out-of-fold probabilities of the chosen single-model variant, one row per held-out clip."""
    labels = report["labels"]
    variant = report["selection"]["variant"]
    out = []
    for f, p in sorted(preds.items()):
        probs = variant_probs(p["heldout"], variant)
        for i, row_probs in zip(p["heldout_idx"], probs):
            row = rows[int(i)]
            out.append([row["path"], row["label"], f, labels[int(row_probs.argmax())],
                        *(f"{x:.6f}" for x in row_probs)])
    out.sort(key=lambda r: r[0])
    _write_rows(path, ["path", "label", "fold", "predicted", *(f"p_{name}" for name in labels)], out)


def variant_probs(log_probs: np.ndarray, variant: str) -> np.ndarray:
    """One fold model's probabilities under a variant: (V, N, K) log-probs -> (N, K)."""
    if variant == "single":
        return np.exp(log_probs[0].astype(np.float64))
    from audioclf.ensemble import combine_log_probs

    return combine_log_probs(log_probs, variant.removeprefix("tta-"))


def _bundle_config(report: dict, first: dict, folds: list[int]) -> dict:
    from audioclf.config import RunConfig

    cfg = RunConfig.from_dict(first["identity"]["config"])
    selection = report["selection"]
    return {
        "format_version": FORMAT_VERSION,
        "labels": report["labels"],
        "sample_rate": cfg.audio.sample_rate,
        "clip_seconds": cfg.audio.clip_seconds,
        "clip_samples": cfg.audio.clip_samples,
        "pad_mode": cfg.audio.pad_mode,
        "ensemble": {"rule": selection["rule"], "tta_shifts": selection["tta_shifts"],
                     "tta_mode": cfg.cv.tta_mode, "tta_max_shift": cfg.cv.tta_max_shift,
                     "chosen_by": selection["criterion"]},
        "folds": [f"fold-{f}.safetensors" for f in folds],
        "run_config": cfg.to_dict(),
        "versions": versions(),
        "training_summary": {"protocol": report["protocol"], "n_clips": report["n_clips"],
                             "oof": report["oof"][selection["variant"]]["mean"],
                             "folds": report["folds"]},
    }


# ---------------------------------------------------------------- reading


@dataclass(frozen=True)
class Bundle:
    """A bundle's ``config.json``, checked; see the module docstring for the layout."""

    path: Path
    labels: list[str]
    sample_rate: int
    clip_samples: int
    pad_mode: str
    rule: str
    tta_shifts: list[int]
    tta_mode: str
    fold_files: list[Path]
    config: dict


def resolve_bundle_dir(path) -> Path:
    """A bundle folder, or a ``cv`` run folder holding ``bundle/``."""
    path = Path(path)
    if not (path / "config.json").exists() and (path / "bundle" / "config.json").exists():
        return path / "bundle"
    return path


def read_bundle(path) -> Bundle:
    """Read and check a bundle's ``config.json`` and that every fold file exists.

    Raises:
        BundleError: the folder or a file is missing (named), the format version is not
            :data:`FORMAT_VERSION`, or a field is missing or malformed (named).
    """
    path = resolve_bundle_dir(path)
    if not path.is_dir():
        raise BundleError(f"{path}: no such bundle folder")
    cfg_path = path / "config.json"
    if not cfg_path.is_file():
        raise BundleError(f"{cfg_path}: missing; not a complete bundle (did `audioclf cv-merge` run?)")
    try:
        cfg = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BundleError(f"{cfg_path}: not valid JSON ({e})") from None
    version = cfg.get("format_version")
    if version != FORMAT_VERSION:
        raise BundleError(f"{cfg_path}: format_version {version!r} is not supported by this audioclf "
                          f"(reads {FORMAT_VERSION}); re-export the bundle or install a matching audioclf")
    try:
        ens = cfg["ensemble"]
        bundle = Bundle(path=path, labels=list(cfg["labels"]), sample_rate=int(cfg["sample_rate"]),
                        clip_samples=int(cfg["clip_samples"]), pad_mode=str(cfg["pad_mode"]),
                        rule=str(ens["rule"]), tta_shifts=[int(s) for s in ens["tta_shifts"]],
                        tta_mode=str(ens["tta_mode"]), fold_files=[path / name for name in cfg["folds"]],
                        config=cfg)
    except KeyError as e:
        raise BundleError(f"{cfg_path}: field {e.args[0]!r} missing") from None
    except (TypeError, ValueError) as e:
        raise BundleError(f"{cfg_path}: malformed field ({e})") from None
    if not bundle.fold_files:
        raise BundleError(f"{cfg_path}: field 'folds' lists no model")
    for file in bundle.fold_files:
        for needed in (file, file.with_suffix(".json")):
            if not needed.is_file():
                raise BundleError(f"{needed}: missing from the bundle")
    return bundle


def load_models(bundle: Bundle, device="cpu") -> list:
    """The bundle's fold models, in eval mode on ``device``."""
    from audioclf.checkpoint import load_checkpoint

    models = []
    for file in bundle.fold_files:
        model, _meta = load_checkpoint(file)
        models.append(model.to(device).eval())
    return models
