"""K-fold cross-validation: one model per fold, out-of-fold scores, and a model bundle.

Folds come from the manifest's fold column when present, else stratified K-fold (grouped
by the group column when present). Each fold selects its checkpoint on an inner
validation split carved from its training folds and is scored once on its held-out fold.
Writes OUT/fold-<k>/ (work folders) and OUT/bundle/ (config.json, fold-<k>.safetensors,
report.json, report.md, oof.csv, plots). With --folds only those folds are trained and
nothing is merged: run several such jobs into the same OUT, then `audioclf cv-merge OUT`.
An OUT holding another run (other manifest, seed, k or settings) is refused before
anything in it is written; --overwrite (without --folds) removes that run first.
"""

from __future__ import annotations

import argparse

from audioclf.commands._options import add_run_options, run_config_from_args

NAME = "cv"
HELP = "K-fold cross-validation: fold models, out-of-fold report, model bundle"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_run_options(parser)
    cv = parser.add_argument_group("cross-validation")
    cv.add_argument("--k", type=int, default=None, help="number of folds (default 5; ignored for official folds)")
    cv.add_argument("--folds", default=None, metavar="LIST",
                    help="train only these folds, 0-based and comma-separated (e.g. 2,4), and do not merge")
    cv.add_argument("--test-manifest", default=None, metavar="CSV",
                    help="clips never trained on nor used for selection (paths relative to --data-root): "
                         "the fold ensemble is scored on them")
    cv.add_argument("--tta-shifts", type=int, default=None, help="time-shift views per clip at test time (1: no TTA)")
    cv.add_argument("--tta-max-shift", type=float, default=None, help="largest TTA shift, fraction of the clip")
    cv.add_argument("--tta-mode", default=None, help="circular | pad")


def parse_folds(text: str | None) -> list[int] | None:
    """``"2,4"`` -> [2, 4]; None stays None."""
    from audioclf.errors import ConfigError

    if text is None:
        return None
    try:
        folds = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ConfigError(f"--folds must be comma-separated fold numbers such as 2,4 ({text!r} given)") from None
    if not folds:
        raise ConfigError(f"--folds lists no fold ({text!r} given)")
    return folds


def run(args: argparse.Namespace) -> int:
    import shlex
    import sys

    from audioclf.crossval import cross_validate, is_main_process
    from audioclf.manifest import read_manifest

    cfg = run_config_from_args(args)
    cv = {name: value for name, value in (("k", args.k), ("tta_shifts", args.tta_shifts),
                                          ("tta_max_shift", args.tta_max_shift), ("tta_mode", args.tta_mode))
          if value is not None}
    if cv:
        cfg = cfg.replace(cv=cv)
    folds = parse_folds(args.folds)
    manifest = read_manifest(args.manifest, root=args.data_root)
    test = read_manifest(args.test_manifest, root=args.data_root) if args.test_manifest else None
    result = cross_validate(manifest, cfg, args.out, folds=folds, test_manifest=test, cache_dir=args.cache_dir,
                            resume=args.resume, overwrite=args.overwrite,
                            command=shlex.join(["audioclf", *sys.argv[1:]]))
    if not is_main_process():  # under torchrun only rank 0 reports
        return 0
    print(result.summary())
    if result.report is not None:
        print(f"bundle: {result.bundle_dir}")
    return 0
