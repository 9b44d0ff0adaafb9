"""Score a model bundle on any manifest and write the same kind of report as `audioclf cv`.

Each clip is centre-cropped or padded to the training clip length (as the held-out folds
were scored) and scored by the bundle's ensemble: every fold model on every TTA view,
averaged by the bundle's rule. Writes report.json, report.md, confusion.png and
predictions.csv into --out (default: BUNDLE/eval-<manifest name>).
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
    parser.add_argument("--cache-dir", default=None, help="waveform cache folder")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    parser.add_argument("--batch-size", type=int, default=32, help="clips per forward pass")


def run(args: argparse.Namespace) -> int:
    import sys
    from pathlib import Path

    from audioclf.bundle import resolve_bundle_dir
    from audioclf.manifest import read_manifest
    from audioclf.report import evaluate_bundle, summary_text

    bundle = resolve_bundle_dir(args.bundle)
    out = Path(args.out) if args.out else bundle / f"eval-{Path(args.manifest).stem}"
    manifest = read_manifest(args.manifest, root=args.data_root)
    report = evaluate_bundle(bundle, manifest, out, cache_dir=args.cache_dir, device=args.device,
                             batch_size=args.batch_size, command=" ".join(["audioclf", *sys.argv[1:]]))
    print(summary_text(report))
    print(f"report: {out}")
    return 0
