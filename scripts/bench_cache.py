"""Benchmark: first decode of every FSDD clip into a fresh WaveformCache vs a second pass through it.

Not a test: it prints the two times and their ratio (the target is >= 10x). The first pass
decodes and resamples every file and writes the cache; the second opens the finished cache
as a new run would (hashing the manifest, checking the cache) and reads every waveform.

    python scripts/bench_cache.py [--fsdd DIR] [--sample-rate 16000] [--workers 0]

FSDD is found as the recipes find it (``$AUDIOCLF_FSDD_DIR``, else ``../shared/datasets/fsdd``).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from audioclf.data import WaveformCache
from audioclf.datasets import default_fsdd_dir
from audioclf.manifest import build_manifest


def read_all(cache: WaveformCache) -> float:
    total = 0.0
    for i in range(len(cache)):
        total += float(cache[i].sum())  # touch every sample, as a training epoch would
    return total


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fsdd", type=Path, default=default_fsdd_dir(),
                        help="FSDD folder (default: $AUDIOCLF_FSDD_DIR, else ../shared/datasets/fsdd)")
    parser.add_argument("--sample-rate", type=int, default=16000, help="cache rate (FSDD is 8 kHz)")
    parser.add_argument("--workers", type=int, default=0, help="decoding processes for the first pass")
    args = parser.parse_args()
    if args.fsdd is None:
        parser.error("FSDD not found: pass --fsdd DIR or set AUDIOCLF_FSDD_DIR")

    manifest = build_manifest("fsdd", args.fsdd)
    with tempfile.TemporaryDirectory() as cache_dir:
        t0 = time.perf_counter()
        first = WaveformCache(manifest, args.sample_rate, cache_dir, num_workers=args.workers).build()
        sum_first = read_all(first)
        t1 = time.perf_counter()
        second = WaveformCache(manifest, args.sample_rate, cache_dir).build()
        sum_second = read_all(second)
        t2 = time.perf_counter()
    if sum_first != sum_second:
        print("error: the second pass read different samples", file=sys.stderr)
        return 1
    decode, cached = t1 - t0, t2 - t1
    print(f"{len(manifest)} FSDD clips at {args.sample_rate} Hz, {args.workers} workers")
    print(f"first pass (decode + resample + write cache): {decode:.2f} s")
    print(f"second pass (open cache + read every clip):   {cached:.3f} s")
    print(f"ratio: {decode / cached:.0f}x (target >= 10x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
