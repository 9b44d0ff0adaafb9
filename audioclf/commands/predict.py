"""Predict the labels of audio files with a model bundle.

Files of any sample rate and channel count are resampled and mixed down to the bundle's;
a file longer than the training clip is scored in sliding windows (per-window lines with
timestamps, and a clip-level average of the window probabilities). A file that cannot be
read is reported on stderr; the others are still predicted, and the exit status is 1.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys

NAME = "predict"
HELP = "top-k labels of audio files (any rate, any length) from a model bundle"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("files", nargs="+", metavar="FILE", help="audio files")
    parser.add_argument("--bundle", required=True, metavar="DIR", help="bundle folder (or the `audioclf cv` --out)")
    parser.add_argument("--top-k", type=int, default=3, help="labels shown per file (default 3)")
    fmt = parser.add_mutually_exclusive_group()
    fmt.add_argument("--json", action="store_true", help="one JSON list on stdout")
    fmt.add_argument("--csv", action="store_true", help="CSV on stdout: one row per file and per window")
    parser.add_argument("--window", type=float, default=None, metavar="S",
                        help="window length in seconds (default: the training clip length)")
    parser.add_argument("--hop", type=float, default=None, metavar="S", help="hop in seconds (default: half a window)")
    parser.add_argument("--aggregate", choices=("arithmetic", "geometric"), default="arithmetic",
                        help="clip-level average of window probabilities (default arithmetic)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    parser.add_argument("--batch-size", type=int, default=16, help="windows per forward pass")


def run(args: argparse.Namespace) -> int:
    from audioclf.bundle import read_bundle
    from audioclf.errors import ConfigError

    if args.top_k < 1:
        raise ConfigError(f"--top-k must be >= 1 ({args.top_k} given)")
    if args.batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1 ({args.batch_size} given)")
    bundle = read_bundle(args.bundle)  # a broken bundle is named before torch is even imported
    from audioclf.predict import Predictor, window_sizes

    try:  # in samples at the bundle's rate, before any model is loaded
        window_sizes(bundle.sample_rate, bundle.clip_samples, args.window, args.hop)
    except ValueError as e:
        raise ConfigError(f"--{e}") from None  # the message starts with "window" or "hop"

    predictor = Predictor.from_bundle(args.bundle, device=args.device, batch_size=args.batch_size)
    results = predictor.predict(args.files, top_k=args.top_k, window=args.window, hop=args.hop,
                                aggregate=args.aggregate)
    for r in results:
        if r.error:
            print(f"audioclf predict: {r.error}", file=sys.stderr)
    if args.json:
        json.dump([r.to_dict() for r in results], sys.stdout, indent=2)
        print()
    elif args.csv:
        _write_csv(results, args.top_k)
    else:
        _write_text(results)
    return 1 if any(r.error for r in results) else 0


def _write_text(results) -> None:
    for r in results:
        if r.error:
            continue
        top = ", ".join(f"{label} ({p:.3f})" for label, p in r.top)
        extra = f" [{r.duration:.2f} s, {len(r.windows)} windows]" if r.windows else ""
        print(f"{r.source}{extra}: {top}")
        for w in r.windows:
            best = max(range(len(w.probs)), key=lambda i: w.probs[i])
            print(f"  {w.start:.2f}-{w.end:.2f} s: {r.labels[best]} ({w.probs[best]:.3f})")


def _write_csv(results, top_k: int) -> None:
    writer = csv.writer(sys.stdout, lineterminator="\n")
    ranks = [c for i in range(1, top_k + 1) for c in (f"label_{i}", f"prob_{i}")]
    writer.writerow(["source", "start", "end", *ranks, "error"])
    for r in results:
        if r.error:
            writer.writerow([r.source, "", "", *[""] * len(ranks), r.error])
            continue
        writer.writerow([r.source, "", "", *_ranked(r.labels, r.probs, top_k), ""])
        for w in r.windows:
            writer.writerow([r.source, f"{w.start:.3f}", f"{w.end:.3f}", *_ranked(r.labels, w.probs, top_k), ""])


def _ranked(labels, probs, top_k: int) -> list:
    order = sorted(range(len(probs)), key=lambda i: -probs[i])[:top_k]
    cells = [c for i in order for c in (labels[i], f"{probs[i]:.6f}")]
    return cells + [""] * (2 * top_k - len(cells))
