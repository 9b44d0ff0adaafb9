"""The machinery behind ``recipes/<dataset>.py``: official layout in, bundle and report out.

A recipe is a TOML file plus a three-line script. The TOML says which dataset and which
evaluation protocol (``[recipe]``), what ``--quick`` changes (``[quick]``, whose sub-tables
such as ``[quick.audio]`` override the preset), and holds two presets of
:class:`~audioclf.config.RunConfig` sections: ``[preset.gpu.*]`` (ImageNet-pretrained
backbones at full resolution; chosen when CUDA is present) and ``[preset.cpu.*]`` (small
enough for a 2-core machine). This module only wires library calls together:

    data folder --layouts--> manifest --crossval / holdout--> bundle + report --> headline

Protocols:
    ``official-folds``  the manifest's own fold column (ESC-50: 5, UrbanSound8K: 10)
    ``grouped-cv``      stratified K-fold grouped by the manifest's group (FSDD: speakers)
    ``stratified-cv``   stratified K-fold (GTZAN: 10)
    ``official-split``  the dataset's own train / validation / test lists (Speech Commands)

``--quick`` keeps a few clips per label and trains a few epochs. With official folds it
joins them into ``quick_k`` folds (the i-th official fold goes to fold ``i mod quick_k``):
an official fold is never split, so the quick run keeps the protocol's guarantees.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from audioclf._io import write_json_atomic
from audioclf.config import RunConfig, load_config_file
from audioclf.errors import AudioclfError, ConfigError, ManifestError

__all__ = ["RecipeSpec", "load_recipe", "main", "run_recipe", "quick_slice", "join_official_folds", "headline"]

log = logging.getLogger(__name__)

PROTOCOLS = ("official-folds", "grouped-cv", "stratified-cv", "official-split")


@dataclass(frozen=True)
class RecipeSpec:
    """The ``[recipe]`` and ``[quick]`` tables of a recipe file.

    Attributes:
        dataset: manifest format and dataset name (see :data:`audioclf.datasets.DATASETS`).
        protocol: one of :data:`PROTOCOLS`.
        k: folds for the CV protocols that make their own (ignored for official folds).
        holdout_groups: groups (e.g. speakers) set aside before cross-validation, never
            used for training or selection, on which the fold ensemble is scored.
        quick_per_class: clips kept per label by ``--quick``.
        quick_epochs: epochs with ``--quick``.
        quick_k: folds with ``--quick`` (official folds are joined into this many).
    """

    dataset: str
    protocol: str
    k: int = 5
    holdout_groups: int = 0
    quick_per_class: int = 12
    quick_epochs: int = 2
    quick_k: int = 2

    def __post_init__(self):
        if self.protocol not in PROTOCOLS:
            raise ConfigError(f"recipe protocol must be one of {', '.join(PROTOCOLS)} ({self.protocol!r} given)")


def load_recipe(path: str | Path) -> tuple[RecipeSpec, dict[str, Any], dict[str, Any]]:
    """Read a recipe TOML: (spec, presets {name: RunConfig sections}, quick overrides).

    Raises:
        ConfigError: the file is missing or not TOML, or a table is malformed or missing.
    """
    data = load_config_file(path)
    try:
        quick = dict(data.get("quick", {}))
        spec = RecipeSpec(**data["recipe"],
                          **{f"quick_{k}": quick.pop(k) for k in ("per_class", "epochs", "k") if k in quick})
    except (KeyError, TypeError) as e:
        raise ConfigError(f"{path}: bad [recipe] or [quick] table ({e})") from None
    presets = data.get("preset", {})
    for name in ("cpu", "gpu"):
        if name not in presets:
            raise ConfigError(f"{path}: missing [preset.{name}] tables")
    return spec, presets, quick


def _parser(spec: RecipeSpec, doc: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"recipes/{spec.dataset}.py", description=doc,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", type=Path, default=None,
                   help="the dataset in its official layout (FSDD: $AUDIOCLF_FSDD_DIR or ../shared/datasets/fsdd)")
    p.add_argument("--download", action="store_true",
                   help="download the dataset into --data-dir when it is not there (never overwrites)")
    p.add_argument("--url", default=None, help="archive address for --download (a mirror, or a file:// URL)")
    p.add_argument("--out", type=Path, default=Path(f"runs/{spec.dataset}"), help="output folder")
    p.add_argument("--preset", choices=("auto", "cpu", "gpu"), default="auto",
                   help="auto: gpu when CUDA is available, else cpu")
    p.add_argument("--quick", action="store_true", help="a few epochs on a slice: a smoke run")
    p.add_argument("--k", type=int, default=None,
                   help="number of folds (with official folds: only with --quick, folds to join them into)")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--backbone", default=None, help="override the preset's timm backbone")
    p.add_argument("--pretrained", default=None,
                   help="'timm' (downloads ImageNet weights), a local weights file, or 'none' (random init)")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--device", default=None)
    p.add_argument("--num-workers", type=int, default=None)
    p.add_argument("--cache-dir", type=Path, default=None)
    p.add_argument("--overwrite", action="store_true", help="replace a previous run in --out")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def main(recipe_file: str | Path, argv: list[str] | None = None, doc: str = "") -> int:
    """Entry point of a recipe script: parse ``argv``, run, print the headline.

    Args:
        recipe_file: the recipe's TOML file.
        argv: command-line arguments (default ``sys.argv[1:]``).
        doc: the script's docstring, shown by ``--help``.

    Returns:
        The process exit status: 0, 2 for bad input (one line on stderr), 130 if interrupted.
    """
    recipe_file = Path(recipe_file)
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        spec, presets, quick = load_recipe(recipe_file)
    except AudioclfError as e:
        print(f"{recipe_file.name}: error: {e}", file=sys.stderr)
        return 2
    args = _parser(spec, doc).parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s")
    command = shlex.join(["python", str(recipe_file.with_suffix(".py")), *argv])
    try:
        text = run_recipe(spec, presets, quick, args, command=command)
    except AudioclfError as e:
        print(f"{recipe_file.stem}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{recipe_file.stem}: interrupted", file=sys.stderr)
        return 130
    if text:
        print(text)
    return 0


def run_recipe(spec: RecipeSpec, presets: dict, quick: dict, args: argparse.Namespace,
               command: str | None = None) -> str:
    """Prepare the data, run the protocol, and return the headline text ("" off rank 0).

    Raises:
        ManifestError: the data folder is missing, empty, in the wrong layout or incomplete,
            or a download failed (the message says where to put a manual copy).
        ConfigError: an option does not fit the preset or the protocol.
    """
    from audioclf.layouts import build_manifest

    started = time.time()
    if args.url and not args.download:
        raise ConfigError("--url is the address to --download from; pass --download with it")
    cfg = _run_config(spec, presets, quick, args)
    data_dir = _resolve_data_dir(spec, args)
    manifest = build_manifest(spec.dataset, data_dir)
    if args.quick:
        manifest = quick_slice(manifest, spec.quick_per_class, seed=cfg.cv.seed)
    log.info("%s: %s, preset %s%s", spec.dataset, manifest.summary(), _preset_name(args),
             " (quick)" if args.quick else "")
    result = _run_protocol(spec, manifest, cfg, args, command)
    if result.report is None:  # under torchrun, rank 0 merges and reports; the others stay quiet
        return ""
    write_json_atomic(Path(args.out) / "recipe.json", {
        "dataset": spec.dataset, "protocol": spec.protocol, "data_dir": str(Path(data_dir).resolve()),
        "preset": _preset_name(args), "quick": bool(args.quick), "command": command})
    return headline(spec.dataset, result.report, result.bundle_dir, (time.time() - started) / 60)


def _preset_name(args) -> str:
    if args.preset != "auto":
        return args.preset
    import torch

    return "gpu" if torch.cuda.is_available() else "cpu"


def _resolve_data_dir(spec: RecipeSpec, args) -> Path:
    """``--data-dir`` (FSDD: its default location), downloaded first if asked and absent."""
    from audioclf.datasets import DATASETS, default_fsdd_dir, download_dataset

    dataset = DATASETS[spec.dataset]
    data_dir = args.data_dir
    if data_dir is None and spec.dataset == "fsdd":
        data_dir = default_fsdd_dir()
    if data_dir is None:
        raise ManifestError(f"--data-dir is required for {dataset.title} (the folder holding {dataset.marker})")
    data_dir = Path(data_dir)
    if data_dir.is_dir() and any(data_dir.iterdir()):
        if args.download:
            log.info("%s already holds data; using it (--download never overwrites)", data_dir)
        return data_dir
    if args.download:
        return download_dataset(dataset, data_dir, url=args.url)
    state = "does not exist" if not data_dir.exists() else "is empty" if data_dir.is_dir() else "is not a folder"
    fetch = (f"Pass --download to fetch it, or get it from {dataset.url}" if dataset.url
             else f"Download it by hand from {dataset.homepage}")
    raise ManifestError(f"{data_dir}: {state}; expected {dataset.title} in its official layout "
                        f"({data_dir / dataset.marker}). {fetch}")


def _run_config(spec: RecipeSpec, presets: dict, quick: dict, args) -> RunConfig:
    """The preset, then ``[quick.*]`` (with --quick), then the command-line overrides."""
    sections: dict[str, dict] = {s: dict(v) for s, v in presets[_preset_name(args)].items()}
    if args.quick:
        for section, values in quick.items():
            sections.setdefault(section, {}).update(values)
        sections.setdefault("train", {})["epochs"] = spec.quick_epochs
    overrides = {
        ("train", "epochs"): args.epochs, ("model", "backbone"): args.backbone,
        ("model", "pretrained"): args.pretrained, ("train", "batch_size"): args.batch_size,
        ("train", "seed"): args.seed, ("train", "device"): args.device,
        ("train", "num_workers"): args.num_workers, ("cv", "seed"): args.seed,
    }
    for (section, name), value in overrides.items():
        if value is not None:
            sections.setdefault(section, {})[name] = value
    if args.pretrained == "none":
        sections["model"]["pretrained"] = None
    if args.k is not None and spec.protocol == "official-split":
        raise ConfigError(f"--k does not apply to {spec.dataset}: its protocol is the official train/validation/"
                          "test split")
    if args.k is not None and spec.protocol == "official-folds" and not args.quick:
        raise ConfigError(f"--k does not apply to {spec.dataset}: it is evaluated on its official folds "
                          "(with --quick, --k sets how many folds they are joined into)")
    sections.setdefault("cv", {})["k"] = args.k or (spec.quick_k if args.quick else spec.k)
    return RunConfig.from_dict(sections, source=f"{spec.dataset} recipe")


def quick_slice(manifest, per_class: int, seed: int = 0):
    """Keep ``per_class`` clips of every label, spread evenly over folds, splits and groups.

    Clips are taken round-robin over the (official fold, split) buckets of each label and,
    inside a bucket, over its groups, so every official fold, split and speaker stays
    represented as long as ``per_class`` allows. Deterministic for a given ``seed``.
    """
    import numpy as np

    rng = np.random.default_rng(seed)
    by_label: dict[str, list[int]] = {}
    for i, record in enumerate(manifest.records):
        by_label.setdefault(record.label, []).append(i)
    keep: list[int] = []
    for j, label in enumerate(sorted(by_label)):
        buckets: dict[tuple, dict[str, list[int]]] = {}
        for i in rng.permutation(by_label[label]).tolist():
            r = manifest.records[i]
            buckets.setdefault((r.fold, r.extra.get("split")), {}).setdefault(str(r.group), []).append(i)
        queues = [_round_robin(list(buckets[key].values())) for key in sorted(buckets, key=str)]
        start = j * per_class % len(queues)  # labels start at different folds: all folds stay in use
        keep.extend(_round_robin(queues[start:] + queues[:start])[:per_class])
    return manifest.subset(sorted(keep))


def _round_robin(queues: list[list[int]]) -> list[int]:
    """[[a1, a2], [b1], [c1, c2]] -> [a1, b1, c1, a2, c2]."""
    out, depth = [], max(map(len, queues), default=0)
    for j in range(depth):
        out.extend(q[j] for q in queues if j < len(q))
    return out


def join_official_folds(manifest, k: int):
    """Join the official folds into ``k`` folds: the i-th official fold (sorted) goes to ``i mod k``.

    Raises:
        ConfigError: ``k`` < 2 or more than the number of official folds.
    """
    from audioclf.manifest import Manifest

    official = sorted(set(manifest.folds().tolist()))
    if not 2 <= k <= len(official):
        raise ConfigError(f"cannot join {len(official)} official folds into {k}; --k must be in "
                          f"[2, {len(official)}]")
    joined = {f: i % k + 1 for i, f in enumerate(official)}
    log.info("quick: official folds joined into %d: %s", k,
             "; ".join(f"{j}: {sorted(f for f in official if joined[f] == j)}" for j in range(1, k + 1)))
    records = [dataclasses.replace(r, fold=joined[r.fold]) for r in manifest.records]
    return Manifest(records, manifest.root, manifest.labels)


def _run_protocol(spec: RecipeSpec, manifest, cfg: RunConfig, args, command: str | None):
    from audioclf import crossval

    cache_dir = args.cache_dir
    if spec.protocol == "official-split":
        return crossval.train_holdout(manifest, cfg, args.out, split_column="split",
                                      cache_dir=cache_dir, overwrite=args.overwrite, command=command)
    if spec.protocol == "official-folds":
        if manifest.folds() is None:
            raise ManifestError(f"{spec.dataset}: the manifest has no fold column; the official folds are missing")
        if args.quick:
            manifest = join_official_folds(manifest, cfg.cv.k)
    elif manifest.folds() is not None:
        manifest = manifest.without_folds()
    if spec.protocol == "stratified-cv" and manifest.groups() is not None:
        manifest = manifest.without_groups()
    holdout = None
    if spec.holdout_groups:
        manifest, holdout = crossval.split_holdout_groups(manifest, spec.holdout_groups, seed=cfg.cv.seed)
    return crossval.cross_validate(manifest, cfg, args.out, test_manifest=holdout, cache_dir=cache_dir,
                                   overwrite=args.overwrite, command=command)


def headline(dataset: str, report: dict, bundle_dir: Path, minutes: float) -> str:
    """The lines a recipe ends with: single-model and ensemble scores, report and bundle paths.

    Single fold models are scored on their held-out folds (mean ± std over folds); the
    ensemble of the fold models only on a held-out test set, when the protocol has one.
    """
    oof = report["oof"]
    lines = [f"{dataset}: done in {minutes:.1f} min ({report['n_folds']} fold model(s), "
             f"{report['n_clips']} scored clips, {len(report['labels'])} labels)"]
    for variant, scores in oof.items():
        name = "no TTA" if variant == "single" else _variant_name(variant)
        m, s = scores["mean"], scores["std"]
        if report["protocol"] == "k-fold":
            lines.append(f"single fold models, out-of-fold ({name}): accuracy {m['accuracy']:.4f} ± "
                         f"{s['accuracy']:.4f}, macro-F1 {m['macro_f1']:.4f} ± {s['macro_f1']:.4f} "
                         f"(mean ± sample std over {report['n_folds']} folds)")
        else:
            lines.append(f"model on the official test split ({name}): accuracy {m['accuracy']:.4f}, "
                         f"macro-F1 {m['macro_f1']:.4f}")
    test = report.get("ensemble_test")
    if test:
        chosen = test["chosen"]
        t = test["scores"][chosen]
        lines.append(f"ensemble of {test['n_models']} models on {test['n_clips']} held-out test clips "
                     f"(bundle runs {_variant_name(chosen)}): accuracy {t['accuracy']:.4f}, "
                     f"macro-F1 {t['macro_f1']:.4f}")
        others = [f"{_variant_name(k)} {v['accuracy']:.4f}" for k, v in test["scores"].items() if k != chosen]
        if others:
            lines.append("  other averaging rules on the same clips (accuracy): " + ", ".join(others))
    elif report["protocol"] == "k-fold":
        lines.append("ensemble: not scored (this protocol has no held-out test set; every clip trained all "
                     "fold models but one); score it with `audioclf evaluate` on other clips")
    lines += [f"report: {Path(bundle_dir) / 'report.md'}", f"bundle: {bundle_dir}"]
    return "\n".join(lines)


def _variant_name(key: str) -> str:
    """'tta-geometric' -> 'TTA, geometric mean'; 'arithmetic' -> 'arithmetic mean, no TTA'."""
    if key.startswith("tta-"):
        return f"TTA, {key.removeprefix('tta-')} mean"
    return "no TTA" if key == "single" else f"{key} mean, no TTA"
