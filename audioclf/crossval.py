"""K-fold cross-validation without selection leakage, one fold at a time.

Folds come from the manifest's ``fold`` column when it has one (the official ESC-50 and
UrbanSound8K folds), else from stratified K-fold, grouped when the manifest has groups
(no speaker or source recording in two folds). For each fold:

    training folds --inner_split (stratified; grouped unless val_split="clips")--> fit part + inner validation
    fit(fit part, select on inner validation)  ->  one model per fold
    held-out fold  --score once, every TTA view-->  out-of-fold predictions

The best checkpoint, early stopping and the SWA-vs-best choice only ever see the inner
validation split; the held-out fold is scored once, at the end, and never feeds back.
Held-out, inner-validation and test clips are scored as ``audioclf predict`` scores a
file (:class:`ScoringWindows`): padded like training when short, in sliding windows
averaged per clip when longer than the training clip (GTZAN's 30 s tracks, say).

A run folder holds one run. Without ``overwrite``, a folder whose ``folds.csv`` or
finished folds belong to another run (other clips, seed, k or settings) is refused
before anything in it is written; with ``overwrite`` (and no ``folds``) the old run is
removed first.

Each fold writes only files it owns (``OUT/fold-<k>/...`` and ``OUT/bundle/fold-<k>.*``),
so ``audioclf cv --folds 2,4`` can run in several processes at once; the shared files
(the bundle's ``config.json``, the report, ``oof.csv``) are written by
:func:`audioclf.bundle.merge_folds` once every fold is done.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from audioclf import ensemble
from audioclf._io import atomic_open
from audioclf.config import RunConfig
from audioclf.errors import ConfigError, ManifestError

__all__ = ["assign_folds", "inner_split", "split_holdout_groups", "FoldPlan", "plan_folds",
           "cross_validate", "train_holdout", "CVResult", "ScoringWindows"]

log = logging.getLogger(__name__)


def assign_folds(manifest, k: int = 5, seed: int = 0) -> np.ndarray:
    """Fold index in ``[0, K)`` of every row of ``manifest``: (N,) int64.

    Args:
        manifest: a :class:`~audioclf.manifest.Manifest`.
        k: number of folds when the manifest has no fold column (ignored otherwise:
            K is then the number of distinct official folds).
        seed: shuffles the stratified split.

    Raises:
        ManifestError: fewer than two official folds, fewer groups than ``k``, or a class
            with fewer than ``k`` clips.
    """
    from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

    official = manifest.folds()
    if official is not None:
        values = np.unique(official)
        if len(values) < 2:
            raise ManifestError(f"the manifest's fold column holds a single fold ({values[0]}); "
                                "cross-validation needs at least 2 (or drop the column)")
        if k != len(values):
            log.info("using the manifest's %d official folds (k=%d ignored)", len(values), k)
        return np.searchsorted(values, official).astype(np.int64)  # official values -> 0..K-1

    targets = manifest.targets()
    counts = np.bincount(targets, minlength=len(manifest.labels))
    small = [f"label {manifest.labels.decode(c)!r}: {n} clips" for c, n in enumerate(counts) if 0 < n < k]
    if small:
        raise ManifestError(f"every label needs at least k={k} clips for {k}-fold cross-validation; "
                            "lower --k or add clips", small)
    groups = manifest.groups()
    fold_ids = np.full(len(manifest), -1, dtype=np.int64)
    x = np.zeros(len(manifest))
    if groups is not None:
        n_groups = len(set(groups))
        if n_groups < k:
            raise ManifestError(f"the manifest has {n_groups} groups, fewer than k={k} folds; "
                                "lower --k (a group never spans two folds)")
        splits = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed).split(x, targets, groups)
    else:
        splits = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed).split(x, targets)
    for fold, (_, test) in enumerate(splits):
        fold_ids[test] = fold
    empty = sorted(set(range(k)) - set(fold_ids.tolist()))
    if empty:
        raise ManifestError(f"folds {empty} came out empty; lower --k")
    return fold_ids


def inner_split(manifest, indices: np.ndarray, val_fraction: float, seed: int = 0,
                by: str = "groups") -> tuple[np.ndarray, np.ndarray]:
    """Split ``indices`` into (fit, validation) the way the folds are split.

    Grouped and stratified when the manifest has groups and ``by`` is ``"groups"``
    (``round(1 / val_fraction)`` group folds, at most one per group; the first is the
    validation part), else (no groups, or ``by="clips"``) a stratified shuffle split:
    ``round(val_fraction * n)`` of each label's n clips, at least one and at most n - 1,
    so a small label neither drags every label's share up nor goes unvalidated. Both
    returned arrays are sorted subsets of ``indices``.

    Raises:
        ManifestError: fewer than two groups among ``indices``, or (without groups) a label
            with a single clip.
    """
    from sklearn.model_selection import StratifiedGroupKFold

    indices = np.asarray(indices, dtype=np.int64)
    targets = manifest.targets()[indices]
    if by not in ("groups", "clips"):
        raise ValueError(f"inner_split: by must be 'groups' or 'clips' ({by!r} given)")
    groups = manifest.groups() if by == "groups" else None
    if groups is not None:
        sub_groups = [groups[i] for i in indices]
        n_groups = len(set(sub_groups))
        if n_groups < 2:
            raise ManifestError(f"the training folds hold a single group ({sub_groups[0]!r}); an inner "
                                "validation split needs at least 2 groups")
        n_splits = min(max(2, int(round(1 / val_fraction))), n_groups)
        splitter = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
        fit, val = next(splitter.split(np.zeros(len(indices)), targets, sub_groups))
    else:
        fit, val = _stratified_shuffle_split(manifest, targets, val_fraction, seed)
    if abs(len(val) / len(indices) - val_fraction) > 0.05:
        log.info("inner validation split: %d of %d clips (%.0f%%; %.0f%% asked, %s)", len(val), len(indices),
                 100 * len(val) / len(indices), 100 * val_fraction,
                 "whole groups only" if groups is not None else "at least one clip per label")
    return np.sort(indices[fit]), np.sort(indices[val])


def _stratified_shuffle_split(manifest, targets: np.ndarray, val_fraction: float, seed: int):
    """Positions (fit, val) into ``targets``: a shuffled ``val_fraction`` of every label."""
    rng = np.random.default_rng(seed)
    fit, val = [], []
    for label in np.unique(targets):
        members = rng.permutation(np.flatnonzero(targets == label))
        if len(members) < 2:
            raise ManifestError(f"label {manifest.labels.decode(int(label))!r} has a single clip in the training "
                                "folds; a stratified inner validation split needs at least 2 per label "
                                "(add clips or lower --k)")
        n_val = min(max(1, int(round(val_fraction * len(members)))), len(members) - 1)
        val.append(members[:n_val])
        fit.append(members[n_val:])
    return np.concatenate(fit), np.concatenate(val)


def split_holdout_groups(manifest, n_groups: int, seed: int = 0):
    """Set ``n_groups`` whole groups aside as a test set: returns (rest, holdout) manifests.

    Raises:
        ManifestError: the manifest has no groups, or too few to leave two for CV.
    """
    groups = manifest.groups()
    if groups is None:
        raise ManifestError("a group hold-out needs a group column in the manifest")
    names = sorted(set(groups))
    if n_groups >= len(names) - 1:
        raise ManifestError(f"cannot hold out {n_groups} of {len(names)} groups and still cross-validate")
    chosen = set(np.random.default_rng(seed).choice(names, size=n_groups, replace=False).tolist())
    held = [i for i, g in enumerate(groups) if g in chosen]
    rest = [i for i, g in enumerate(groups) if g not in chosen]
    log.info("holding out group(s) %s: %d clips", ", ".join(sorted(chosen)), len(held))
    return manifest.subset(rest), manifest.subset(held)


@dataclass(frozen=True)
class FoldPlan:
    """Row indices of one fold: ``fit`` trains, ``val`` selects, ``heldout`` is scored once."""

    fold: int
    fit: np.ndarray
    val: np.ndarray
    heldout: np.ndarray


def plan_folds(manifest, cfg: RunConfig) -> tuple[np.ndarray, list[FoldPlan]]:
    """Fold ids (N,) and every fold's (fit, val, heldout) indices; pure and deterministic."""
    fold_ids = assign_folds(manifest, cfg.cv.k, cfg.cv.seed)
    plans = []
    for fold in range(int(fold_ids.max()) + 1):
        heldout = np.flatnonzero(fold_ids == fold)
        fit, val = inner_split(manifest, np.flatnonzero(fold_ids != fold), cfg.train.val_fraction,
                               seed=cfg.cv.seed + fold, by=cfg.train.val_split)
        plans.append(FoldPlan(fold, fit, val, heldout))
    return fold_ids, plans


@dataclass
class CVResult:
    """What :func:`cross_validate` produced: the bundle folder and, once merged, the report."""

    out_dir: Path
    bundle_dir: Path
    folds_done: list[int]
    report: dict | None = None

    def summary(self) -> str:
        if self.report is None:
            return (f"folds {', '.join(map(str, self.folds_done))} done in {self.out_dir}; "
                    f"run `audioclf cv-merge {self.out_dir}` once every fold is done")
        from audioclf.report import summary_text

        return summary_text(self.report)


RUNTIME_ONLY = ("device", "num_workers")
"""TrainConfig fields that do not change the model: fold jobs may differ in them."""


def _model_config(cfg: RunConfig) -> dict:
    """``cfg.to_dict()`` without :data:`RUNTIME_ONLY`: what fold jobs must agree on."""
    data = cfg.to_dict()
    for name in RUNTIME_ONLY:
        data["train"].pop(name)
    return data


def _identity(cfg: RunConfig, manifest, fold_ids: np.ndarray, n_folds: int, test_manifest) -> dict:
    """What every fold of one run shares; the merge refuses folds whose identities differ.

    ``rows`` and ``test_rows`` hash the ``folds.csv`` and ``test-clips.csv`` rows, so the
    merge can tell that those files are still the ones the folds were trained on.
    """
    from audioclf.bundle import rows_hash, run_input_rows

    fold_rows, test_rows = run_input_rows(manifest, test_manifest, fold_ids)
    return {"config": _model_config(cfg), "manifest": manifest.content_hash(), "labels": manifest.labels.names,
            "folds": hashlib.sha256(np.ascontiguousarray(fold_ids, dtype=np.int64).tobytes()).hexdigest()[:16],
            "n_folds": n_folds,
            "test_manifest": test_manifest.content_hash() if test_manifest is not None else None,
            "rows": rows_hash(fold_rows), "test_rows": rows_hash(test_rows) if test_rows is not None else None}


def cross_validate(manifest, cfg: RunConfig, out_dir, folds: Sequence[int] | None = None, *,
                   test_manifest=None, cache_dir=None, resume: bool = False, overwrite: bool = False,
                   command: str | None = None) -> CVResult:
    """Train and score one model per fold; with ``folds=None`` also assemble the bundle.

    Args:
        manifest: the clips to cross-validate.
        cfg: the run configuration (``cfg.cv.k`` folds unless the manifest has official
            ones; then ``cv.k`` is recorded as their number).
        out_dir: run folder: ``fold-<k>/`` work folders and the ``bundle/``.
        folds: train only these folds (0-based) and do not merge: for fan-out jobs.
        test_manifest: optional clips never used for training or selection, on which
            the ensemble of all fold models is scored (the only honest ensemble score).
        cache_dir: waveform cache folder (default: see :class:`~audioclf.data.WaveformCache`).
        resume: continue interrupted folds; finished folds with the same configuration
            are always kept.
        overwrite: with ``folds=None``, first remove everything of a previous run in
            ``out_dir`` (folds, bundle); with ``folds``, retrain those folds only.
        command: the command line, recorded in the fold summaries and the report.

    Raises:
        ConfigError: an unknown backbone or a missing pretrained file, a fold outside
            [0, K), or (without ``overwrite``) ``out_dir`` holds another run: all checked
            before any audio is decoded or anything written, so that run stays intact.
        ManifestError: see :func:`assign_folds`.
    """
    from audioclf.bundle import clear_run, merge_folds, read_fold_summary, write_run_inputs
    from audioclf.model import check_model_config

    check_model_config(cfg.model)  # a misspelt backbone fails now, not after decoding the audio
    out_dir = Path(out_dir)
    fold_ids, plans = plan_folds(manifest, cfg)
    n_folds = len(plans)
    if manifest.folds() is not None and cfg.cv.k != n_folds:
        cfg = cfg.replace(cv={"k": n_folds})  # record the official folds' count, not the k that was ignored
    chosen = list(range(n_folds)) if folds is None else sorted(set(int(f) for f in folds))
    bad = [f for f in chosen if not 0 <= f < n_folds]
    if bad:
        raise ConfigError(f"--folds {bad} outside [0, {n_folds}) for this {n_folds}-fold manifest")
    if test_manifest is not None:
        unknown = sorted({r.label for r in test_manifest.records} - set(manifest.labels.names))
        if unknown:
            raise ManifestError(f"the test manifest has labels the cross-validation manifest lacks: "
                                f"{', '.join(unknown)}")
    identity = _identity(cfg, manifest, fold_ids, n_folds, test_manifest)
    if not overwrite:
        _require_same_run(out_dir, identity)  # on every rank: see its docstring
    if is_main_process():
        if overwrite and folds is None:
            clear_run(out_dir)  # a whole new run: no fold, model or report of the old one survives
        write_run_inputs(out_dir, manifest, test_manifest, fold_ids)
    for fold in chosen:
        if not overwrite and read_fold_summary(out_dir, fold, missing_ok=True) is not None:
            log.info("fold %d already done in %s; kept (--overwrite retrains it)", fold, out_dir)
            continue
        _run_fold(manifest, cfg, out_dir, plans[fold], identity, test_manifest, cache_dir, resume, overwrite,
                  command)
    if folds is not None or not is_main_process():
        return CVResult(out_dir, out_dir / "bundle", chosen)
    report = merge_folds(out_dir, command=command)
    return CVResult(out_dir, out_dir / "bundle", chosen, report)


def train_holdout(manifest, cfg: RunConfig, out_dir, split_column: str = "split", *, cache_dir=None,
                  resume: bool = False, overwrite: bool = False, command: str | None = None) -> CVResult:
    """An official train / validation / test split instead of folds: one model, one bundle.

    Rows whose ``extra[split_column]`` is ``train`` are fitted, ``validation`` selects,
    ``test`` is scored once. The bundle has a single fold model, ``fold-0``.

    Raises:
        ManifestError: the column is missing or a split is empty.
        ConfigError: (without ``overwrite``) ``out_dir`` holds another run.
    """
    from audioclf.bundle import clear_run, merge_folds, write_run_inputs
    from audioclf.model import check_model_config

    check_model_config(cfg.model)
    out_dir = Path(out_dir)
    splits = [r.extra.get(split_column) for r in manifest.records]
    parts = {name: np.flatnonzero([s == name for s in splits]) for name in ("train", "validation", "test")}
    empty = [name for name, idx in parts.items() if len(idx) == 0]
    if empty:
        raise ManifestError(f"column {split_column!r}: no rows in split(s) {', '.join(empty)} "
                            "(expected train, validation and test)")
    fold_ids = np.full(len(manifest), -1, dtype=np.int64)
    fold_ids[parts["test"]] = 0
    plan = FoldPlan(0, parts["train"], parts["validation"], parts["test"])
    identity = _identity(cfg, manifest, fold_ids, 1, None)
    if not overwrite:
        _require_same_run(out_dir, identity)
    if is_main_process():
        if overwrite:
            clear_run(out_dir)
        write_run_inputs(out_dir, manifest, None, fold_ids)
    _run_fold(manifest, cfg, out_dir, plan, identity, None, cache_dir, resume, overwrite, command)
    if not is_main_process():
        return CVResult(out_dir, out_dir / "bundle", [0])
    report = merge_folds(out_dir, command=command)
    return CVResult(out_dir, out_dir / "bundle", [0], report)


def _require_same_run(out_dir: Path, identity: dict) -> None:
    """Refuse an ``out_dir`` that holds another run, before anything in it is written.

    Every finished fold (``fold-<k>/fold.json``, whatever k) and ``folds.csv`` must belong
    to the run ``identity`` describes. Under torchrun every rank checks (it only reads), so
    a refused folder stops them all before any decodes audio or waits in ``fit``. The
    verdict is the same on every rank even when rank 0 has begun writing: it writes
    nothing before a passed check, then only a ``folds.csv`` with the same rows, and no
    ``fold.json`` before the ranks meet in ``fit``.
    """
    from audioclf._identity import run_differences
    from audioclf.bundle import FOLD_COLUMNS, finished_folds, read_fold_summary, read_rows_hash

    hint = "use --overwrite to replace that run, or another --out"
    for fold in finished_folds(out_dir):
        try:
            diffs = run_differences(read_fold_summary(out_dir, fold)["identity"], identity)
        except ConfigError as e:
            raise ConfigError(f"{out_dir}: fold {fold}: {e}") from None
        if diffs:
            raise ConfigError(f"{out_dir}: fold {fold} differs from this run in {diffs[0]}; {hint}")
    folds_csv = out_dir / "folds.csv"
    if folds_csv.is_file() and read_rows_hash(folds_csv, FOLD_COLUMNS) != identity["rows"]:
        raise ConfigError(f"{folds_csv}: lists another run's clips or folds (a different manifest, seed or k); "
                          f"{hint}")


def _run_fold(manifest, cfg: RunConfig, out_dir: Path, plan: FoldPlan, identity: dict, test_manifest,
              cache_dir, resume: bool, overwrite: bool, command: str | None = None) -> None:
    """Fit one fold, score its held-out part (and the test set), write the fold's files."""
    from audioclf.bundle import fold_summary, part_probs, write_fold_summary
    from audioclf.checkpoint import load_checkpoint, save_checkpoint
    from audioclf.data import ClipDataset, WaveformCache
    from audioclf.metrics import score_all
    from audioclf.model import build_model
    from audioclf.train import fit

    fold_dir = out_dir / f"fold-{plan.fold}"
    if is_main_process():
        log.info("fold %d: fit %d clips, select on %d, hold out %d",
                 plan.fold, len(plan.fit), len(plan.val), len(plan.heldout))
        _mark_unfinished(out_dir, plan.fold)
    cache = WaveformCache(manifest, cfg.audio.sample_rate, cache_dir, num_workers=cfg.train.num_workers).build()
    targets = manifest.targets()

    def dataset(indices, train):
        return ClipDataset(cache, indices, targets[indices], cfg.audio.clip_samples, train=train,
                           pad_mode=cfg.audio.pad_mode, seed=cfg.train.seed)

    model = build_model(cfg, len(manifest.labels))
    result = fit(model, dataset(plan.fit, True), dataset(plan.val, False), cfg, fold_dir / "train",
                 label_names=manifest.labels.names, resume=resume, overwrite=overwrite)
    if not is_main_process():  # under torchrun, rank 0 scores and writes; the others move on
        return
    model, _ = load_checkpoint(result.model_path)  # the chosen (best or SWA) model
    parts = {"heldout": ScoringWindows(cache, plan.heldout, cfg.audio.clip_samples, cfg.audio.pad_mode),
             "val": ScoringWindows(cache, plan.val, cfg.audio.clip_samples, cfg.audio.pad_mode)}
    if test_manifest is not None:
        test_cache = WaveformCache(test_manifest, cfg.audio.sample_rate, cache_dir).build()
        parts["test"] = ScoringWindows(test_cache, np.arange(len(test_manifest)), cfg.audio.clip_samples,
                                       cfg.audio.pad_mode)
    shifts, arrays = _score_views(model, parts, cfg)
    with atomic_open(fold_dir / "predictions.npz", "wb") as f:
        np.savez(f, heldout_idx=plan.heldout, val_idx=plan.val, **arrays)
    save_checkpoint(model, out_dir / "bundle" / f"fold-{plan.fold}", cfg, manifest.labels.names,
                    extra={"fold": plan.fold, "chosen": result.chosen, "best_epoch": result.best_epoch})
    heldout_score = score_all(targets[plan.heldout], part_probs(arrays, "heldout", "single"))
    log.info("fold %d: held-out accuracy %.4f, log loss %.4f (no TTA)",
             plan.fold, heldout_score["accuracy"], heldout_score["log_loss"])
    write_fold_summary(out_dir, plan.fold, fold_summary(plan, identity, result, shifts, heldout_score, command))


def _mark_unfinished(out_dir: Path, fold: int) -> None:
    """A fold being (re)trained is not done, and a bundle merged from its old model is stale."""
    (out_dir / f"fold-{fold}" / "fold.json").unlink(missing_ok=True)
    stale = out_dir / "bundle" / "config.json"
    if stale.exists():
        stale.unlink(missing_ok=True)
        log.info("%s removed: the bundle is incomplete until `audioclf cv-merge %s`", stale, out_dir)


class ScoringWindows:
    """The windows ``audioclf predict`` scores, over clips of a waveform cache: item j -> (window, clip).

    A clip no longer than ``window`` samples is one window, centred and padded like
    training; a longer one is cut every :func:`~audioclf.predict.default_hop` samples, the
    last window ending at the clip's end. ``clip`` is the clip's position in ``indices``.
    """

    def __init__(self, cache, indices: Sequence[int], window: int, pad_mode: str):
        from audioclf.predict import default_hop, window_starts

        lengths = cache.lengths
        self.cache, self.window, self.pad_mode = cache, window, pad_mode
        self.items = [(int(i), start, pos) for pos, i in enumerate(indices)
                      for start in window_starts(int(lengths[i]), window, default_hop(window))]
        self.clip_of = np.array([pos for _, _, pos in self.items], dtype=np.int64)  # (W,)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, j: int):
        import torch

        from audioclf.audio import fix_length

        i, start, pos = self.items[j]
        waveform = self.cache[i]
        if len(waveform) <= self.window:  # centred and padded, as training and predict pad
            return fix_length(torch.from_numpy(np.array(waveform)), self.window, self.pad_mode), pos
        return torch.from_numpy(np.array(waveform[start:start + self.window])), pos  # (window,)


def _score_views(model, parts: dict, cfg: RunConfig) -> tuple[list[int], dict[str, np.ndarray]]:
    """Every TTA view of every window of each part, scored by one model.

    Returns the shifts and, per part ``name``, ``name`` -> (V, W, K) log-probs of its W
    windows and ``name_clip`` -> (W,) the clip of each window.
    """
    from audioclf.augment import tta_shifts

    device = _device(cfg.train.device)
    model.to(device).eval()
    shifts = tta_shifts(cfg.cv.tta_shifts, cfg.audio.clip_samples, cfg.cv.tta_max_shift)
    arrays = {}
    for name, windows in parts.items():
        arrays[name] = ensemble.score_dataset([model], windows, shifts, cfg.cv.tta_mode, cfg.train.batch_size,
                                              device, cfg.train.num_workers)[0]
        arrays[f"{name}_clip"] = windows.clip_of
    return shifts, arrays


def is_main_process() -> bool:
    """Rank 0 under torchrun (RANK is set before the process group exists), else True."""
    return int(os.environ.get("RANK", "0")) == 0


def _device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name

