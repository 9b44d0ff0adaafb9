"""The model bundle: one folder that holds everything ``audioclf predict`` needs.

Layout of a cross-validation run folder ``OUT`` (``audioclf cv --out OUT``)::

    OUT/folds.csv                 every clip's path, label, group and fold (-1: not held out)
    OUT/test-clips.csv            the clips of the optional test set (group hold-out)
    OUT/fold-<k>/train/           fit()'s folder: metrics.csv, resume state, chosen model
    OUT/fold-<k>/predictions.npz  log-probs of the fold model, every TTA view, on the scoring
                                  windows of its held-out fold, its inner validation split and
                                  the test set ("heldout" (V, W, K) + "heldout_clip" (W,): the
                                  clip of each window; one window per clip unless it is longer
                                  than the training clip)
    OUT/fold-<k>/fold.json        the fold's summary; written last, so it marks the fold done
    OUT/bundle/                   the bundle (what you ship):
        fold-<k>.safetensors      the fold model's weights (+ fold-<k>.json: its checkpoint
                                  metadata, loadable by audioclf.checkpoint.load_checkpoint)
        config.json               written by the merge, last: format version, RunConfig, label
                                  names, sample rate, clip length, averaging rule, TTA shifts,
                                  fold files, versions and a training summary
        report.json, report.md, oof.csv, confusion.png, fold_scores.png, curves.png

Folds write only their own files; :func:`merge_folds` writes the shared ones. A bundle
without ``config.json`` is incomplete (its merge has not run). Every ``fold.json`` records
a hash of the ``folds.csv`` (and ``test-clips.csv``) rows it was trained on, and the merge
checks them, so a run folder whose inputs were rewritten by another run is refused.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from audioclf._io import atomic_open, write_json_atomic
from audioclf.errors import BundleError, ConfigError

__all__ = ["FORMAT_VERSION", "Bundle", "read_bundle", "load_models", "merge_folds", "resolve_bundle_dir",
           "versions", "run_entries"]

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


FOLD_COLUMNS = ["path", "label", "group", "fold"]
TEST_COLUMNS = ["path", "label"]


def run_input_rows(manifest, test_manifest, fold_ids: np.ndarray) -> tuple[list[list[str]], list[list[str]] | None]:
    """The rows of ``folds.csv`` (:data:`FOLD_COLUMNS`) and ``test-clips.csv`` (None without a test set)."""
    groups = manifest.groups() or [""] * len(manifest)
    folds = [[r.path, r.label, g or "", str(int(f))] for r, g, f in zip(manifest.records, groups, fold_ids)]
    test = None if test_manifest is None else [[r.path, r.label] for r in test_manifest.records]
    return folds, test


def rows_hash(rows: list[list[str]]) -> str:
    """A short SHA-256 of table rows: what a fold records of ``folds.csv`` to match it at merge time."""
    digest = hashlib.sha256()
    for row in rows:
        digest.update(json.dumps([str(cell) for cell in row]).encode() + b"\n")
    return digest.hexdigest()[:16]


def write_run_inputs(out_dir, manifest, test_manifest, fold_ids: np.ndarray) -> None:
    """``folds.csv`` and ``test-clips.csv`` (removed when there is no test set): the same from every fold job."""
    out_dir = Path(out_dir)
    folds, test = run_input_rows(manifest, test_manifest, fold_ids)
    _write_rows(out_dir / "folds.csv", FOLD_COLUMNS, folds)
    if test is not None:
        _write_rows(out_dir / "test-clips.csv", TEST_COLUMNS, test)
    else:
        (out_dir / "test-clips.csv").unlink(missing_ok=True)  # a previous run's test set is not this run's


_FOLD_DIR = re.compile(r"fold-(\d+)")


def run_entries(out_dir) -> list[Path]:
    """What a cross-validation run wrote at the top of ``out_dir``, sorted: ``folds.csv``,
    ``test-clips.csv`` (files), ``fold-<k>/`` (k digits only) and ``bundle/`` (folders).

    The one list of those names: :func:`clear_run` removes exactly these, and
    :mod:`audioclf.rundir` refuses a folder holding any of them. Anything else (a user's
    ``fold-notes/``, say) is not the run's.
    """
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        return []
    return sorted(p for p in out_dir.iterdir()
                  if (p.is_file() and p.name in ("folds.csv", "test-clips.csv"))
                  or (p.is_dir() and (p.name == "bundle" or _FOLD_DIR.fullmatch(p.name))))


def clear_run(out_dir) -> None:
    """Remove every file of a previous run from ``out_dir``: its inputs, fold folders and
    bundle (:func:`run_entries`); anything else in ``out_dir`` stays."""
    removed = run_entries(out_dir)
    for path in removed:
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()
    if removed:
        log.info("--overwrite: removed the previous run's %s from %s", ", ".join(p.name for p in removed), out_dir)


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


def _hash_of(rows: list[dict[str, str]], columns: list[str]) -> str:
    return rows_hash([[r.get(c, "") for c in columns] for r in rows])


def read_rows_hash(path, columns: list[str]) -> str:
    """:func:`rows_hash` of a CSV file written by :func:`write_run_inputs`."""
    return _hash_of(_read_rows(Path(path)), columns)


def fold_summary(plan, identity: dict, result, shifts: list[int], heldout_score: dict,
                 command: str | None = None) -> dict:
    """The JSON summary of a finished fold (see :func:`write_fold_summary`)."""
    return {
        "format_version": FORMAT_VERSION,
        "fold": plan.fold,
        "identity": identity,
        "command": command,
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


def finished_folds(out_dir) -> list[int]:
    """Fold numbers with a ``fold-<k>/fold.json`` in ``out_dir``, sorted."""
    return sorted(int(m[1]) for p in run_entries(out_dir)
                  if (m := _FOLD_DIR.fullmatch(p.name)) and (p / "fold.json").is_file())


# ---------------------------------------------------------------- merge


def merge_folds(out_dir, command: str | None = None) -> dict:
    """Check that every fold is done and alike, then write the bundle's shared files.

    The run is the one ``folds.csv`` describes: folds ``0 .. K-1`` where K comes from its
    fold column. Each of them must be finished and trained on exactly those rows (the
    hash in its ``fold.json``); a ``fold-<k>`` left from an earlier run with more folds is
    named, ignored, and its model removed from the bundle once every check has passed
    (a refused merge changes nothing).

    Returns:
        The report dict (also written as ``bundle/report.json``).

    Raises:
        BundleError: no ``folds.csv``, some folds missing (named), a fold's files missing,
            or a fold trained on other rows than ``folds.csv`` lists (named).
        ConfigError: folds trained with different configurations (the field is named).
    """
    from audioclf import report as reporting
    from audioclf._identity import run_differences

    out_dir = Path(out_dir)
    found = finished_folds(out_dir)
    if not found and not (out_dir / "folds.csv").is_file():
        raise BundleError(f"{out_dir}: no finished fold (no fold-<k>/fold.json); run `audioclf cv` first")
    rows = _read_rows(out_dir / "folds.csv")
    n_folds = max((int(r["fold"]) for r in rows), default=-1) + 1
    folds = _check_folds(out_dir, found, n_folds)
    summaries = {f: read_fold_summary(out_dir, f) for f in folds}
    first = summaries[folds[0]]
    for f in folds[1:]:
        try:
            diffs = run_differences(first["identity"], summaries[f]["identity"])
        except ConfigError as e:
            raise ConfigError(f"{out_dir}: {e}") from None
        if diffs:
            raise ConfigError(f"{out_dir}: fold {f} was trained differently from fold {folds[0]}: {diffs[0]}")
    test_rows = _read_rows(out_dir / "test-clips.csv") if first["identity"].get("test_manifest") else None
    _check_rows(out_dir, first["identity"], rows, test_rows)

    preds = {f: dict(np.load(out_dir / f"fold-{f}" / "predictions.npz")) for f in folds}
    report = reporting.build_cv_report(rows, preds, [summaries[f] for f in folds], first["identity"]["config"])
    if test_rows is not None:
        report["ensemble_test"] = reporting.score_ensemble_on_test(test_rows, preds, report["labels"])
        report["ensemble_test"]["chosen"] = reporting.chosen_key(report["selection"])  # what the bundle runs
    report["command"] = command
    report["fold_commands"] = {str(f): summaries[f].get("command") for f in folds}
    report["versions"] = versions()
    bundle = out_dir / "bundle"
    _write_oof(bundle / "oof.csv", rows, preds, report)
    reporting.write_report(bundle, report, curves={f: out_dir / f"fold-{f}" / "train" / "metrics.csv" for f in folds})
    _drop_leftovers(out_dir, [f for f in found if f >= n_folds], n_folds)
    write_json_atomic(bundle / "config.json", _bundle_config(report, first, folds))  # last: marks complete
    log.info("bundle written to %s", bundle)
    return report


def _check_folds(out_dir: Path, found: list[int], n_folds: int) -> list[int]:
    """The run's folds ``0 .. n_folds-1``, all finished with their model files (leftovers are not looked at)."""
    missing = sorted(set(range(n_folds)) - set(found))
    if missing:
        raise BundleError(f"{out_dir}: fold(s) {', '.join(map(str, missing))} of {n_folds} missing; "
                          f"run `audioclf cv ... --folds {','.join(map(str, missing))}` first")
    for f in range(n_folds):
        for suffix in (".safetensors", ".json"):
            path = out_dir / "bundle" / f"fold-{f}{suffix}"
            if not path.is_file():
                raise BundleError(f"{path}: missing; fold {f} did not finish writing its model")
    return list(range(n_folds))


def _drop_leftovers(out_dir: Path, extra: list[int], n_folds: int) -> None:
    """Remove from the bundle the models of folds left by an earlier run with more folds."""
    if extra:
        log.warning("%s: fold(s) %s are not part of this %d-fold run (folds.csv); left from an earlier run, "
                    "ignored", out_dir, ", ".join(map(str, extra)), n_folds)
    for f in extra:  # never ship a model of another run
        for suffix in (".safetensors", ".json"):
            (out_dir / "bundle" / f"fold-{f}{suffix}").unlink(missing_ok=True)


def _check_rows(out_dir: Path, identity: dict, rows: list[dict], test_rows: list[dict] | None) -> None:
    """``folds.csv`` (and ``test-clips.csv``) are the rows the folds were trained and scored on."""
    for name, table, columns, key in (("folds.csv", rows, FOLD_COLUMNS, "rows"),
                                      ("test-clips.csv", test_rows, TEST_COLUMNS, "test_rows")):
        expected = identity.get(key)
        if table is not None and expected is not None and _hash_of(table, columns) != expected:
            raise BundleError(f"{out_dir / name}: not the clips or folds the fold models were trained and scored "
                              "on (another run wrote it); rerun `audioclf cv` with the fold models' settings, "
                              "or with --overwrite")


def _write_oof(path: Path, rows: list[dict], preds: dict, report: dict) -> None:
    """Out-of-fold probabilities of the chosen single-model variant, one row per held-out clip."""
    labels = report["labels"]
    variant = report["selection"]["variant"]
    out = []
    for f, p in sorted(preds.items()):
        for i, row_probs in zip(p["heldout_idx"], part_probs(p, "heldout", variant)):
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


def part_probs(arrays: dict, part: str, variant: str) -> np.ndarray:
    """One fold model's clip probabilities on ``part`` ("heldout", "val", "test"): -> (n, K).

    ``arrays[part]`` holds (V, W, K) log-probs of W scoring windows and ``arrays[part +
    "_clip"]`` the clip of each window: the windows are combined under ``variant``, then
    averaged per clip, as ``audioclf predict`` does.
    """
    return window_mean(variant_probs(arrays[part], variant), arrays.get(f"{part}_clip"))


def window_mean(probs: np.ndarray, clip_of: np.ndarray | None) -> np.ndarray:
    """Clip-level probabilities: the mean of each clip's windows, (W, K) -> (n, K).

    ``clip_of`` (W,) gives each window's clip in ``0 .. n-1``; None means one window per
    clip (run folders from before windowed scoring).
    """
    if clip_of is None:
        return probs
    clip_of = np.asarray(clip_of, dtype=np.int64)
    n = int(clip_of.max()) + 1
    sums = np.zeros((n, probs.shape[1]))
    np.add.at(sums, clip_of, probs)
    return sums / np.bincount(clip_of, minlength=n)[:, None]


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
    if not isinstance(cfg, dict):
        raise BundleError(f"{cfg_path}: expected a JSON object, found {type(cfg).__name__}")
    version = cfg.get("format_version")
    if version != FORMAT_VERSION:
        raise BundleError(f"{cfg_path}: format_version {version!r} is not supported by this audioclf "
                          f"(reads {FORMAT_VERSION}); re-export the bundle or install a matching audioclf")
    try:
        ens = cfg["ensemble"]
        fields = {"labels": cfg["labels"], "sample_rate": cfg["sample_rate"], "clip_samples": cfg["clip_samples"],
                  "pad_mode": cfg["pad_mode"], "folds": cfg["folds"], "ensemble.rule": ens["rule"],
                  "ensemble.tta_shifts": ens["tta_shifts"], "ensemble.tta_mode": ens["tta_mode"]}
    except KeyError as e:
        raise BundleError(f"{cfg_path}: field {e.args[0]!r} missing") from None
    except TypeError:
        raise BundleError(f"{cfg_path}: field 'ensemble' must be an object ({cfg['ensemble']!r} given)") from None
    _check_fields(fields, cfg_path)
    bundle = Bundle(path=path, labels=list(fields["labels"]), sample_rate=fields["sample_rate"],
                    clip_samples=fields["clip_samples"], pad_mode=fields["pad_mode"], rule=fields["ensemble.rule"],
                    tta_shifts=list(fields["ensemble.tta_shifts"]), tta_mode=fields["ensemble.tta_mode"],
                    fold_files=[path / name for name in fields["folds"]], config=cfg)
    for file in bundle.fold_files:
        for needed in (file, file.with_suffix(".json")):
            if not needed.is_file():
                raise BundleError(f"{needed}: missing from the bundle")
    return bundle


RULES = ("arithmetic", "geometric")
"""The averaging rules of :mod:`audioclf.ensemble`, repeated so that reading a bundle needs no torch."""


def _check_fields(fields: dict[str, Any], cfg_path: Path) -> None:
    """Every value ``predict`` will use, checked now: a bad one is named here, not a traceback later."""

    def is_int(x) -> bool:
        return isinstance(x, int) and not isinstance(x, bool)

    def is_list(x, item_ok) -> bool:
        return isinstance(x, list) and all(item_ok(v) for v in x)

    clip = fields["clip_samples"]
    checks = [
        ("labels", is_list(fields["labels"], lambda v: isinstance(v, str)) and len(fields["labels"]) >= 2,
         "a list of at least 2 class names"),
        ("sample_rate", is_int(fields["sample_rate"]) and 0 < fields["sample_rate"] <= 1_000_000,
         "an integer in (0, 1000000] Hz"),
        ("clip_samples", is_int(clip) and clip > 0, "a positive integer"),
        ("pad_mode", fields["pad_mode"] in ("zeros", "repeat"), "'zeros' or 'repeat'"),
        ("folds", is_list(fields["folds"], lambda v: isinstance(v, str)) and len(fields["folds"]) > 0,
         "a non-empty list of fold file names"),
        ("ensemble.rule", fields["ensemble.rule"] in RULES, "one of " + ", ".join(map(repr, RULES))),
        ("ensemble.tta_shifts", is_list(fields["ensemble.tta_shifts"], is_int) and len(fields["ensemble.tta_shifts"]) > 0
         and is_int(clip) and all(abs(v) < clip for v in fields["ensemble.tta_shifts"]),
         "a non-empty list of integer shifts in samples, each shorter than clip_samples"),
        ("ensemble.tta_mode", fields["ensemble.tta_mode"] in ("circular", "pad"), "'circular' or 'pad'"),
    ]
    for name, ok, allowed in checks:
        if not ok:
            raise BundleError(f"{cfg_path}: field {name!r} must be {allowed} ({fields[name]!r} given)")


def load_models(bundle: Bundle, device="cpu") -> list:
    """The bundle's fold models, in eval mode on ``device``.

    Raises:
        BundleError: a fold file is unreadable, or was trained for other labels, another
            sample rate or another clip length than ``config.json`` says (file and field named).
    """
    from audioclf.checkpoint import load_checkpoint

    expected = {"label_names": bundle.labels, "sample_rate": bundle.sample_rate,
                "clip_samples": bundle.clip_samples}
    models = []
    for file in bundle.fold_files:
        model, meta = load_checkpoint(file)
        for name, value in expected.items():
            if meta.get(name) != value:
                raise BundleError(f"{file.with_suffix('.json')}: field {name!r} is {meta.get(name)!r} but the "
                                  f"bundle's config.json says {value!r}; this fold model belongs to another run "
                                  "(rerun `audioclf cv-merge` or replace the file)")
        models.append(model.to(device).eval())
    return models
