"""The machinery behind ``recipes/<dataset>.py``: official layout in, bundle and report out.

A recipe is a TOML file plus a three-line script. The TOML says which dataset and which
evaluation protocol (``[recipe]``), what ``--quick`` changes (``[quick]``), and holds two
presets of :class:`~audioclf.config.RunConfig` sections: ``[preset.gpu.*]`` (ImageNet-
pretrained backbones at full resolution; chosen when CUDA is present) and ``[preset.cpu.*]``
(small enough for a 2-core machine). This module only wires library calls together:

    data folder --layouts--> manifest --crossval / holdout--> bundle + report --> headline

Protocols:
    ``official-folds``  the manifest's own fold column (ESC-50: 5, UrbanSound8K: 10)
    ``grouped-cv``      stratified K-fold grouped by the manifest's group (FSDD: speakers)
    ``stratified-cv``   stratified K-fold (GTZAN: 10)
    ``official-split``  the dataset's own train / validation / test lists (Speech Commands)
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from audioclf.config import RunConfig, load_config_file
from audioclf.errors import AudioclfError, ConfigError, ManifestError

__all__ = ["RecipeSpec", "main", "run_recipe", "quick_slice"]

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
        quick_k: folds with ``--quick`` (for the CV protocols that make their own).
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
    """Read a recipe TOML: (spec, presets {name: RunConfig sections}, quick overrides)."""
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
    p.add_argument("--out", type=Path, default=Path(f"runs/{spec.dataset}"), help="output folder")
    p.add_argument("--preset", choices=("auto", "cpu", "gpu"), default="auto",
                   help="auto: gpu when CUDA is available, else cpu")
    p.add_argument("--quick", action="store_true", help="a few epochs on a slice: a smoke run")
    p.add_argument("--k", type=int, default=None, help="number of folds (CV protocols that make their own)")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--backbone", default=None, help="override the preset's timm backbone")
    p.add_argument("--pretrained", default=None, help="'timm' or a local weights file")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--device", default=None)
    p.add_argument("--num-workers", type=int, default=None)
    p.add_argument("--cache-dir", type=Path, default=None)
    p.add_argument("--overwrite", action="store_true", help="replace a previous run in --out")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def main(recipe_file: str | Path, argv: list[str] | None = None, doc: str = "") -> int:
    """Entry point of a recipe script. Returns the process exit status."""
    recipe_file = Path(recipe_file)
    try:
        spec, presets, quick = load_recipe(recipe_file)
    except AudioclfError as e:
        print(f"{recipe_file.name}: error: {e}", file=sys.stderr)
        return 2
    args = _parser(spec, doc).parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s")
    try:
        summary = run_recipe(spec, presets, quick, args, recipe_file=recipe_file)
    except AudioclfError as e:
        print(f"{recipe_file.stem}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{recipe_file.stem}: interrupted", file=sys.stderr)
        return 130
    print(summary)
    return 0


def run_recipe(spec: RecipeSpec, presets: dict, quick: dict, args: argparse.Namespace,
               recipe_file: Path | None = None) -> str:
    """Prepare the data, run the protocol, and return the headline text."""
    from audioclf.layouts import build_manifest

    started = time.time()
    data_dir = _resolve_data_dir(spec, args)
    manifest = build_manifest(spec.dataset, data_dir)
    if args.quick:
        manifest = quick_slice(manifest, spec.quick_per_class, seed=0)
    cfg = _run_config(spec, presets, quick, args)
    command = " ".join([sys.executable, str(recipe_file or spec.dataset), *(sys.argv[1:] if sys.argv else [])])
    log.info("%s: %d clips, %d labels, preset %s%s", spec.dataset, len(manifest), len(manifest.labels),
             _preset_name(args), " (quick)" if args.quick else "")
    result = _run_protocol(spec, manifest, cfg, args, command)
    minutes = (time.time() - started) / 60
    return _headline(spec, result, minutes)


def _preset_name(args) -> str:
    if args.preset != "auto":
        return args.preset
    try:
        import torch

        return "gpu" if torch.cuda.is_available() else "cpu"
    except ImportError:
        return "cpu"


def _resolve_data_dir(spec: RecipeSpec, args) -> Path:
    from audioclf.datasets import DATASETS, default_fsdd_dir, download_dataset

    dataset = DATASETS[spec.dataset]
    data_dir = args.data_dir
    if data_dir is None and spec.dataset == "fsdd":
        data_dir = default_fsdd_dir()
    if data_dir is None:
        raise ManifestError(f"--data-dir is required for {dataset.title} (the folder holding {dataset.marker})")
    data_dir = Path(data_dir)
    present = data_dir.is_dir() and any(data_dir.iterdir())
    if not present:
        if args.download:
            return download_dataset(dataset, data_dir)
        state = "does not exist" if not data_dir.exists() else "is empty" if data_dir.is_dir() else "is not a folder"
        raise ManifestError(f"{data_dir}: {state}; expected {dataset.title} in its official layout "
                            f"({data_dir / dataset.marker}). Pass --download to fetch it, or get it from "
                            f"{dataset.url or dataset.homepage}")
    return data_dir


def _run_config(spec: RecipeSpec, presets: dict, quick: dict, args) -> RunConfig:
    sections: dict[str, dict] = {s: dict(v) for s, v in presets[_preset_name(args)].items()}
    if args.quick:
        for section, values in quick.items():
            sections.setdefault(section, {}).update(values)
        sections.setdefault("train", {})["epochs"] = spec.quick_epochs
    overrides = {
        ("train", "epochs"): args.epochs, ("model", "backbone"): args.backbone,
        ("model", "pretrained"): args.pretrained, ("train", "batch_size"): args.batch_size,
        ("train", "seed"): args.seed, ("train", "device"): args.device,
        ("train", "num_workers"): args.num_workers,
    }
    for (section, name), value in overrides.items():
        if value is not None:
            sections.setdefault(section, {})[name] = value
    k = args.k or (spec.quick_k if args.quick else spec.k)
    sections.setdefault("cv", {})["k"] = k
    if args.seed is not None:
        sections["cv"]["seed"] = args.seed
    return RunConfig.from_dict(sections, source=f"{spec.dataset} recipe")


def quick_slice(manifest, per_class: int, seed: int = 0):
    """Keep ``per_class`` clips of every label, spread evenly over groups and folds."""
    import numpy as np

    rng = np.random.default_rng(seed)
    by_label: dict[str, list[int]] = {}
    for i, record in enumerate(manifest.records):
        by_label.setdefault(record.label, []).append(i)
    keep: list[int] = []
    for label in sorted(by_label):
        indices = by_label[label]
        # Round-robin over (group, fold) so every speaker / official fold stays represented.
        buckets: dict[tuple, list[int]] = {}
        for i in rng.permutation(indices):
            r = manifest.records[int(i)]
            buckets.setdefault((r.group, r.fold, r.extra.get("split")), []).append(int(i))
        queues = [buckets[key] for key in sorted(buckets, key=str)]
        chosen: list[int] = []
        while len(chosen) < per_class and any(queues):
            for q in queues:
                if q and len(chosen) < per_class:
                    chosen.append(q.pop())
        keep.extend(chosen)
    return manifest.subset(sorted(keep))


def _run_protocol(spec: RecipeSpec, manifest, cfg: RunConfig, args, command: str):
    from audioclf import crossval

    cache_dir = args.cache_dir
    if spec.protocol == "official-split":
        return crossval.train_holdout(manifest, cfg, args.out, split_column="split",
                                      cache_dir=cache_dir, overwrite=args.overwrite, command=command)
    if spec.protocol == "official-folds" and manifest.folds() is None:
        raise ManifestError(f"{spec.dataset}: the manifest has no fold column; the official folds are missing")
    if spec.protocol != "official-folds":
        manifest = manifest.without_folds() if manifest.folds() is not None else manifest
    if spec.protocol == "stratified-cv":
        manifest = manifest.without_groups() if manifest.groups() is not None else manifest
    holdout = None
    if spec.holdout_groups:
        manifest, holdout = crossval.split_holdout_groups(manifest, spec.holdout_groups, seed=cfg.cv.seed)
    return crossval.cross_validate(manifest, cfg, args.out, test_manifest=holdout, cache_dir=cache_dir,
                                   overwrite=args.overwrite, command=command)


def _headline(spec: RecipeSpec, result, minutes: float) -> str:
    return "\n".join([f"{spec.dataset}: done in {minutes:.1f} min", result.summary(),
                      f"bundle: {result.bundle_dir}"])
