"""Measure the throughput of pipeline stages on this machine and print a table.

Each stage is compared with a reference measured in the same run (for ``logmel``:
librosa, clip by clip, with the mel basis built once; librosa's own ``melspectrogram``,
which rebuilds it per clip, has its own row), so the ratio column means something on a
shared or busy machine where absolute figures drift. Times are medians over ``--repeats``
runs. CUDA rows (when a GPU is present) are shown without and with the host->device copy.
"""

from __future__ import annotations

import argparse

NAME = "bench"
HELP = "measure the throughput of pipeline stages (log-mel front end, ...) against references"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--stage", action="append", dest="stages", metavar="NAME",
                        help="stage to measure (repeatable; default: all). Stages: logmel")
    parser.add_argument("--batch-size", type=int, default=64, help="clips per batch (default 64)")
    parser.add_argument("--seconds", type=float, default=5.0, help="clip length in seconds (default 5)")
    parser.add_argument("--sample-rate", type=int, default=32000, help="Hz (default 32000)")
    parser.add_argument("--repeats", type=int, default=5,
                        help="timed rounds (each method once per round); medians are shown")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="'auto' adds CUDA rows when a GPU is present")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's)")
    parser.add_argument("--json", metavar="OUT.json", help="also write the rows to this JSON file")


def run(args: argparse.Namespace) -> int:
    import dataclasses

    import torch

    from audioclf._io import write_json_atomic
    from audioclf.bench import BenchSettings, format_table, run_benchmarks
    from audioclf.errors import ConfigError

    if args.threads is not None:
        if args.threads < 1:
            raise ConfigError(f"--threads must be >= 1 ({args.threads} given)")
        torch.set_num_threads(args.threads)
    settings = BenchSettings(batch_size=args.batch_size, seconds=args.seconds,
                             sample_rate=args.sample_rate, repeats=args.repeats, device=args.device)
    rows = run_benchmarks(args.stages, settings)
    print(f"{settings.batch_size} clips of {settings.seconds:g} s at {settings.sample_rate} Hz, "
          f"median of {settings.repeats} runs")
    print(format_table(rows))
    if args.json:
        payload = {"settings": dataclasses.asdict(settings),
                   "rows": [dict(dataclasses.asdict(r), throughput=r.throughput) for r in rows]}
        write_json_atomic(args.json, payload)
    return 0
