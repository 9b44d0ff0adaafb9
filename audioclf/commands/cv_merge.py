"""Assemble the bundle and report of a cross-validation run whose folds ran as separate jobs.

Checks that every fold of OUT's folds.csv is done and that all were trained with the same
configuration on the clips and folds folds.csv lists (a difference is named; a fold left
from an earlier run with more folds is named and ignored), then writes OUT/bundle/
config.json, report.json, report.md, oof.csv and the plots; the report names the commands
that trained the folds. Safe to run again.
"""

from __future__ import annotations

import argparse

NAME = "cv-merge"
HELP = "assemble the bundle once every fold of `audioclf cv --folds ...` jobs is done"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("out", metavar="OUT", help="the --out folder the fold jobs wrote to")


def run(args: argparse.Namespace) -> int:
    import shlex

    from audioclf.bundle import merge_folds
    from audioclf.report import summary_text

    report = merge_folds(args.out, command=shlex.join(["audioclf", "cv-merge", args.out]))
    print(summary_text(report))
    print(f"bundle: {args.out}/bundle")
    return 0
