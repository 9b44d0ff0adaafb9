"""Throughput of each pipeline stage on this machine, against a reference measured in the same run.

Each stage is a function ``bench_<stage>(settings) -> list[BenchRow]`` registered in
:data:`STAGES`; it lists :class:`Method` s, the first being the reference, and hands them
to :func:`measure`. To add a stage (data loading, model forward), write one such function
and add it to ``STAGES``: :func:`run_benchmarks` and :func:`format_table` need no change.

The machine is usually shared, so :func:`measure` times the methods in rounds (each
method once per round, after one warm-up run) and reports the median over rounds of the
per-round ratio to the reference, which is far steadier than absolute figures.
"""

from __future__ import annotations

import contextlib
import logging
import math
import statistics
import time
from collections.abc import Callable, Iterator
from typing import Any
from dataclasses import dataclass

import numpy as np
import torch

from audioclf.errors import ConfigError
from audioclf.features import LogMel

__all__ = ["BenchSettings", "BenchRow", "Method", "measure", "STAGES", "run_benchmarks", "format_table",
           "bench_logmel"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BenchSettings:
    """What to measure. Defaults: 64 five-second clips at 32 kHz, the front end's defaults."""

    batch_size: int = 64
    seconds: float = 5.0
    sample_rate: int = 32000
    n_fft: int = 1024
    hop_length: int = 320
    n_mels: int = 128
    repeats: int = 5
    device: str = "auto"  # "auto" adds CUDA rows when a GPU is present; "cpu" never does
    seed: int = 0

    def __post_init__(self):
        checks = [
            (self.batch_size >= 1, "batch_size", ">= 1"),
            (self.seconds > 0, "seconds", "positive"),
            (self.sample_rate > 0, "sample_rate", "positive"),
            (self.repeats >= 1, "repeats", ">= 1"),
            (self.device in ("auto", "cpu", "cuda"), "device", "'auto', 'cpu' or 'cuda'"),
        ]
        for ok, name, allowed in checks:
            if not ok:
                raise ConfigError(f"bench {name} must be {allowed} ({getattr(self, name)!r} given)")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ConfigError("bench device 'cuda' was asked for but no CUDA device is available")
        n = int(self.seconds * self.sample_rate)
        if n < self.n_fft:
            raise ConfigError(f"bench clips of {n} samples are shorter than n_fft={self.n_fft}; "
                              "raise seconds or sample_rate")

    @property
    def clip_samples(self) -> int:
        return int(self.seconds * self.sample_rate)

    def use_cuda(self) -> bool:
        return self.device == "cuda" or (self.device == "auto" and torch.cuda.is_available())


@dataclass(frozen=True)
class BenchRow:
    """One measured method of one stage.

    ``ratio`` is this method's throughput over the stage's reference (first row);
    ``max_abs_diff`` is its largest output difference from the reference (None when not
    comparable), so a fast but wrong method shows.
    """

    stage: str
    method: str
    seconds: float  # median wall time of one run over the whole batch
    items: int
    unit: str = "clips/s"
    ratio: float = 1.0
    max_abs_diff: float | None = None
    note: str = ""

    @property
    def throughput(self) -> float:
        return self.items / self.seconds if self.seconds > 0 else math.inf


@dataclass(frozen=True)
class Method:
    """One way to compute a stage: ``run()`` does the whole batch and returns its output."""

    name: str
    run: Callable[[], Any]
    note: str = ""
    sync: Callable[[], None] = lambda: None  # e.g. torch.cuda.synchronize


def measure(stage: str, methods: list[Method], items: int, repeats: int,
            difference: Callable[[Any, Any], float] | None = None) -> list[BenchRow]:
    """Time ``methods`` (the first is the reference) and compare their outputs with it.

    Each round times every method once, so all of them see the same machine load; a
    method's ratio is the median over rounds of (reference time / its time), and its
    ``seconds`` the median of its times. ``difference(output, reference_output)`` fills
    ``max_abs_diff``.
    """
    outputs = []
    for method in methods:  # warm-up: allocations, caches, lazy initialisation
        outputs.append(method.run())
        method.sync()
    times: list[list[float]] = [[] for _ in methods]
    for _ in range(repeats):
        for method, spent in zip(methods, times):
            start = time.perf_counter()
            method.run()
            method.sync()
            spent.append(time.perf_counter() - start)
    rows = []
    for i, (method, spent) in enumerate(zip(methods, times)):
        ratio = statistics.median(ref / t for ref, t in zip(times[0], spent))
        diff = difference(outputs[i], outputs[0]) if difference and i > 0 else None
        rows.append(BenchRow(stage, method.name, statistics.median(spent), items, ratio=ratio,
                             max_abs_diff=diff, note=method.note))
    return rows


@contextlib.contextmanager
def _torch_threads(n: int) -> Iterator[None]:
    saved = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


def _with_torch_threads(n: int, fn: Callable[[], Any]) -> Callable[[], Any]:
    def run():
        with _torch_threads(n):
            return fn()
    return run


def _blas_threads(n: int) -> contextlib.AbstractContextManager:
    try:
        from threadpoolctl import threadpool_limits  # installed with scikit-learn
    except ImportError:
        return contextlib.nullcontext()
    return threadpool_limits(n, user_api="blas")


def _test_batch(s: BenchSettings) -> torch.Tensor:
    """(B, N) noise with an amplitude envelope and silent gaps: float32 in [-1, 1].

    Each clip has ten segments, each at its own level (0 to -60 dB) or silent (every
    fourth, from the second), so a clip spans more than top_db = 80 dB: the floor at each
    clip's peak - top_db changes real entries, as in recordings with pauses.
    """
    gen = torch.Generator().manual_seed(s.seed)
    x = torch.randn(s.batch_size, s.clip_samples, generator=gen)
    levels = 10 ** (-3 * torch.rand(s.batch_size, 10, generator=gen))  # (B, 10): 0 to -60 dB
    levels[:, 1::4] = 0.0  # segments 1, 5, 9: silence
    envelope = levels.repeat_interleave(math.ceil(s.clip_samples / 10), dim=1)[:, :s.clip_samples]
    return (0.1 * envelope * x).clamp_(-1, 1)


def bench_logmel(s: BenchSettings) -> list[BenchRow]:
    """LogMel on one batch: librosa clip by clip (reference), torchaudio batched, audioclf.

    The reference is librosa used well for this job: the mel basis built once, then per
    clip ``stft`` -> power -> basis product -> ``power_to_db``, the same features as
    ``melspectrogram`` + ``power_to_db``. ``melspectrogram`` itself rebuilds the basis for
    every clip (~19% of its time on 5 s clips at 32 kHz, more on shorter ones); it has its
    own row.
    """
    import librosa
    import torchaudio

    x = _test_batch(s)
    kw = dict(n_fft=s.n_fft, hop_length=s.hop_length, n_mels=s.n_mels)
    basis = librosa.filters.mel(sr=s.sample_rate, n_fft=s.n_fft, n_mels=s.n_mels)  # (n_mels, n_freqs)

    def run_librosa() -> np.ndarray:  # (B, n_mels, T)
        out = []
        for clip in x.numpy():
            spec = librosa.stft(clip, n_fft=s.n_fft, hop_length=s.hop_length, pad_mode="constant")
            power = spec.real ** 2 + spec.imag ** 2  # |X|^2, (n_freqs, T)
            out.append(librosa.power_to_db(basis @ power, ref=1.0, top_db=80.0))
        return np.stack(out)

    def run_melspectrogram() -> np.ndarray:  # (B, n_mels, T)
        return np.stack([librosa.power_to_db(librosa.feature.melspectrogram(
            y=clip, sr=s.sample_rate, pad_mode="constant", **kw), ref=1.0, top_db=80.0)
            for clip in x.numpy()])

    mel = torchaudio.transforms.MelSpectrogram(s.sample_rate, norm="slaney", mel_scale="slaney",
                                               pad_mode="constant", **kw)
    to_db = torchaudio.transforms.AmplitudeToDB("power", top_db=80.0)
    logmel = LogMel(s.sample_rate, **kw)
    threads = f"{torch.get_num_threads()} torch threads"
    # librosa runs on one thread: numpy's FFT is single-threaded, and its mel product gets
    # one BLAS thread, as fast as two on a quiet machine and far steadier on a busy one (an
    # extra BLAS thread fighting for a busy core would slow the reference and inflate every ratio).
    one_thread = "1 thread: numpy's FFT is serial; BLAS held at 1 (steadier on a busy machine)"
    methods = [
        Method("librosa, clip by clip, mel basis built once (reference)", run_librosa, one_thread),
        Method("librosa melspectrogram, clip by clip (rebuilds the mel basis per clip)",
               run_melspectrogram, one_thread),
        Method("torchaudio MelSpectrogram + AmplitudeToDB, batched", lambda: to_db(mel(x[:, None])),
               threads),
        Method("audioclf LogMel, CPU", lambda: logmel(x), threads),
    ]
    if torch.get_num_threads() > 1:
        single = _with_torch_threads(1, lambda: logmel(x))
        methods.append(Method("audioclf LogMel, CPU, one thread", single, "1 torch thread"))
    if s.use_cuda():
        gpu, xg = LogMel(s.sample_rate, **kw).to("cuda"), x.to("cuda")
        name = torch.cuda.get_device_name()
        methods.append(Method("audioclf LogMel, CUDA, input already on the GPU", lambda: gpu(xg),
                              f"{name}; excludes the host->device copy", torch.cuda.synchronize))
        methods.append(Method("audioclf LogMel, CUDA, with the host->device copy",
                              lambda: gpu(x.to("cuda")), f"{name}; copies from pageable memory",
                              torch.cuda.synchronize))

    def difference(out, ref: np.ndarray) -> float:  # dB
        if isinstance(out, torch.Tensor):
            out = out[:, 0].float().cpu().numpy()  # (B, 1, n_mels, T) -> (B, n_mels, T)
        return float(np.abs(out - ref).max())

    with _blas_threads(1), torch.inference_mode():
        return measure("logmel", methods, s.batch_size, s.repeats, difference)


STAGES: dict[str, Callable[[BenchSettings], list[BenchRow]]] = {
    "logmel": bench_logmel,
}


def run_benchmarks(stages: list[str] | None = None,
                   settings: BenchSettings | None = None) -> list[BenchRow]:
    """Run the named stages (default: all) and return their rows, stage by stage.

    Raises:
        ConfigError: an unknown stage name (the message lists the known ones).
    """
    settings = settings or BenchSettings()
    stages = list(STAGES) if stages is None else stages
    for name in stages:
        if name not in STAGES:
            raise ConfigError(f"unknown bench stage {name!r}; known stages: {', '.join(STAGES)}")
    rows = []
    for name in stages:
        log.debug("bench stage %s with %s", name, settings)
        rows += STAGES[name](settings)
    return rows


def format_table(rows: list[BenchRow]) -> str:
    """A plain-text table, one line per row: stage, method, throughput, ratio, difference."""
    header = ("stage", "method", "throughput", "x ref", "max |diff|", "note")
    lines = [header] + [
        (r.stage, r.method, f"{r.throughput:,.1f} {r.unit}", f"{r.ratio:.2f}",
         "-" if r.max_abs_diff is None else f"{r.max_abs_diff:.2g}", r.note)
        for r in rows
    ]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip()
                     for line in lines)
