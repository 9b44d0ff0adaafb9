"""Train one model: the best checkpoint (or SWA average) on a validation split, in RUN_DIR.

The validation clips are the manifest rows whose fold is --val-fold, or a stratified
fraction (--val-fraction, whole groups when the manifest has a group column, so no
speaker or source recording is on both sides). RUN_DIR receives model.safetensors +
model.json (load with audioclf.load_checkpoint), metrics.csv and the resume state.
Runs unchanged under torchrun --nproc_per_node=N -m audioclf train ...
"""

from __future__ import annotations

import argparse

from audioclf.commands._options import add_run_options, run_config_from_args

NAME = "train"
HELP = "train one model with a validation split (best checkpoint, SWA, resume)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_run_options(parser)
    split = parser.add_argument_group("validation split")
    split.add_argument("--val-fold", default=None, metavar="FOLD",
                       help="validate on the rows whose fold column equals FOLD (instead of --val-fraction)")


def run(args: argparse.Namespace) -> int:
    import os
    from pathlib import Path

    from audioclf.data import ClipDataset, WaveformCache
    from audioclf.distributed import destroy_distributed
    from audioclf.errors import ConfigError
    from audioclf.manifest import read_manifest
    from audioclf.model import build_model, check_model_config
    from audioclf.rundir import check_out_dir
    from audioclf.train import fit

    cfg = run_config_from_args(args)
    if args.val_fold is not None and args.val_fraction is not None:
        raise ConfigError("give --val-fold or --val-fraction, not both")
    check_model_config(cfg.model)  # fail before decoding any audio
    check_out_dir(Path(args.out), args.resume, args.overwrite)
    manifest = read_manifest(args.manifest, root=args.data_root)
    train_idx, val_idx = split_indices(manifest, args.val_fold, cfg.train.val_fraction, cfg.train.seed,
                                       source=args.manifest, by=cfg.train.val_split)
    cache = WaveformCache(manifest, cfg.audio.sample_rate, args.cache_dir,
                          num_workers=cfg.train.num_workers).build()
    targets = manifest.targets()

    def dataset(indices, train: bool):
        return ClipDataset(cache, indices, targets[indices], cfg.audio.clip_samples, train=train,
                           pad_mode=cfg.audio.pad_mode, seed=cfg.train.seed)

    model = build_model(cfg, len(manifest.labels))
    try:
        result = fit(model, dataset(train_idx, True), dataset(val_idx, False), cfg, args.out,
                     label_names=manifest.labels.names, resume=args.resume, overwrite=args.overwrite)
    finally:
        destroy_distributed()
    if int(os.environ.get("RANK", "0")) == 0:
        swa = "" if result.swa_metric is None else f", SWA {result.swa_metric:.4f}"
        print(f"model: {result.model_path} ({result.chosen}: "
              f"{'SWA average' if result.chosen == 'swa' else f'epoch {result.best_epoch}'})")
        print(f"validation accuracy: {max(result.best_metric, result.swa_metric or 0.0):.4f} "
              f"(best epoch {result.best_epoch}: {result.best_metric:.4f}{swa}; "
              f"{len(manifest.labels)} classes, {len(train_idx)} training / {len(val_idx)} validation clips)")
    return 0


def split_indices(manifest, val_fold: str | None, val_fraction: float, seed: int, source: str = "manifest",
                  by: str = "groups"):
    """(train, validation) row indices: rows of fold ``val_fold``, or a stratified (grouped) fraction.

    Raises:
        ManifestError: fewer than two classes; no fold column, or no row in ``val_fold``.
        ConfigError: an empty training or validation split.
    """
    import numpy as np

    from audioclf.crossval import inner_split
    from audioclf.errors import ConfigError, ManifestError

    names = manifest.labels.names
    if len(names) < 2:
        raise ManifestError(f"{source}: every row has label {names[0] if names else None!r}; "
                            "a classifier needs at least 2 classes")
    everything = np.arange(len(manifest))
    if val_fold is None:
        train, val = inner_split(manifest, everything, val_fraction, seed, by=by)
    else:
        folds = manifest.folds()
        if folds is None:
            raise ManifestError(f"{source}: --val-fold {val_fold} needs a fold column in the manifest")
        present = sorted(set(folds.tolist()))
        try:
            wanted = int(val_fold)
        except ValueError:
            raise ConfigError(f"--val-fold must be one of the manifest's folds {present} ({val_fold!r} given)") from None
        if wanted not in present:
            raise ManifestError(f"{source}: no row has fold {wanted}; the folds are {present}")
        val, train = everything[folds == wanted], everything[folds != wanted]
    if len(train) == 0:
        raise ConfigError(f"{source}: the training split is empty (all {len(val)} rows are validation)")
    if len(val) == 0:
        raise ConfigError(f"{source}: the validation split is empty")
    return train, val
