"""Score a model bundle on any manifest and write the same kind of report as `audioclf cv`.

Each file is scored the way `audioclf predict` scores it, by the bundle's ensemble (every
fold model on every TTA view, averaged by the bundle's rule): a clip no longer than the
training clip is padded like training; a longer one is streamed through sliding windows
whose probabilities are averaged. Writes report.json, report.md (accuracy, macro-F1, log
loss, ECE), confusion.png and predictions.csv into --out (default: BUNDLE/eval-<manifest
name>). A file that cannot be read is reported on stderr and in the report, the others
are still scored, and the exit status is 1.
"""

from __future__ import annotations

import argparse

NAME = "evaluate"
HELP = "score a bundle on a manifest: accuracy, macro-F1, log loss, ECE, confusion matrix"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("bundle", metavar="BUNDLE", help="bundle folder (or the `audioclf cv` --out)")
    parser.add_argument("--manifest", required=True, help="manifest CSV (path,label[,...])")
    parser.add_argument("--data-root", default=None, help="folder the manifest's paths are relative to")
    parser.add_argument("--out", default=None, help="report folder (default: BUNDLE/eval-<manifest name>)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    parser.add_argument("--batch-size", type=int, default=16, help="windows per forward pass")


def run(args: argparse.Namespace) -> int:
    import shlex
    import sys
    from pathlib import Path

    from audioclf.bundle import read_bundle
    from audioclf.errors import ConfigError
    from audioclf.manifest import read_manifest
    from audioclf.report import evaluate_bundle, summary_text

    if args.batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1 ({args.batch_size} given)")
    bundle = read_bundle(args.bundle).path
    out = Path(args.out) if args.out else bundle / f"eval-{Path(args.manifest).stem}"
    manifest = read_manifest(args.manifest, root=args.data_root, check_files=False)  # a missing file: reported
    report = evaluate_bundle(bundle, manifest, out, device=args.device, batch_size=args.batch_size,
                             command=shlex.join(["audioclf", *sys.argv[1:]]))
    for failure in report["failed"]:
        print(f"audioclf evaluate: {failure['error']}", file=sys.stderr)
    print(summary_text(report))
    print(f"report: {out}")
    return 1 if report["n_failed"] else 0
