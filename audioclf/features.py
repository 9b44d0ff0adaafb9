"""Log-mel spectrograms on any device: ``LogMel`` turns (B, N) waveforms into (B, 1, n_mels, T).

The output equals ``librosa.power_to_db(librosa.feature.melspectrogram(...), ref=1.0,
amin=amin, top_db=top_db)`` computed clip by clip with the same parameters (Hann window,
zero padding when ``center``), up to float32 rounding; the tests state the tolerance.

On CPU the batch is processed a few clips at a time so the spectra stay in cache, the
power comes from the real and imaginary parts without a complex ``abs``, and the mel
projection only touches the non-zero band of each filter (a dense mel matrix is ~99%
zeros). On CUDA (and whenever gradients to the waveform are needed) the whole batch goes
through at once with a dense projection; both paths give the same values.
"""

from __future__ import annotations

import math
import os
import queue
import threading
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor

import torch
from torch import Tensor, nn
from tqdm import tqdm

from audioclf._checks import is_int, is_real, require
from audioclf.config import FeatureConfig

__all__ = ["LogMel", "compute_normalization_stats", "mel_filterbank"]

_NORMALIZE = ("none", "dataset", "instance")
_EPS = 1e-5  # keeps instance / dataset normalization finite on silent input


def _hz_to_mel(f: Tensor, scale: str) -> Tensor:
    if scale == "htk":
        return 2595.0 * torch.log10(1.0 + f / 700.0)
    # Slaney: linear below 1 kHz (3 bins per 200 Hz), logarithmic above.
    f_sp, min_log_hz, logstep = 200.0 / 3, 1000.0, math.log(6.4) / 27.0
    linear = f / f_sp
    log = min_log_hz / f_sp + torch.log(torch.clamp(f, min=min_log_hz) / min_log_hz) / logstep
    return torch.where(f >= min_log_hz, log, linear)


def _mel_to_hz(m: Tensor, scale: str) -> Tensor:
    if scale == "htk":
        return 700.0 * (10.0 ** (m / 2595.0) - 1.0)
    f_sp, min_log_hz, logstep = 200.0 / 3, 1000.0, math.log(6.4) / 27.0
    min_log_mel = min_log_hz / f_sp
    log = min_log_hz * torch.exp(logstep * (m - min_log_mel))
    return torch.where(m >= min_log_mel, log, f_sp * m)


def mel_filterbank(sample_rate: int, n_fft: int, n_mels: int, f_min: float = 0.0,
                   f_max: float | None = None, scale: str = "slaney",
                   norm: str | None = "slaney") -> Tensor:
    """Triangular mel filters as a (n_fft // 2 + 1, n_mels) float32 matrix.

    Filter i rises from mel point i to i + 1 and falls to i + 2, where the n_mels + 2
    points are equally spaced on the mel scale between ``f_min`` and ``f_max``
    (default ``sample_rate / 2``). ``norm="slaney"`` scales each filter to unit area
    (constant energy per band); None leaves peaks at 1.
    """
    f_max = sample_rate / 2 if f_max is None else f_max
    # Bin k is at k * sample_rate / n_fft (for odd n_fft the last bin is below sample_rate / 2).
    fft_freqs = torch.fft.rfftfreq(n_fft, 1.0 / sample_rate, dtype=torch.float64)
    mel_lo, mel_hi = _hz_to_mel(torch.tensor([f_min, f_max], dtype=torch.float64), scale)
    hz = _mel_to_hz(torch.linspace(mel_lo, mel_hi, n_mels + 2, dtype=torch.float64), scale)
    width = hz.diff()  # (n_mels + 1,)
    offset = hz[:, None] - fft_freqs[None, :]  # (n_mels + 2, n_freqs)
    rising = -offset[:-2] / width[:-1, None]
    falling = offset[2:] / width[1:, None]
    fb = torch.clamp(torch.minimum(rising, falling), min=0.0)  # (n_mels, n_freqs)
    if norm == "slaney":
        fb = fb * (2.0 / (hz[2:] - hz[:-2]))[:, None]
    return fb.T.contiguous().float()


def _mel_bands(fb: Tensor, group: int = 16) -> list[tuple[int, int, int, int]]:
    """Split the filters into groups of ``group`` neighbours and the FFT bins each group touches.

    Returns (bin_lo, bin_hi, mel_lo, mel_hi) tuples, one per group; projecting only
    ``power[..., bin_lo:bin_hi]`` onto ``fb[bin_lo:bin_hi, mel_lo:mel_hi]`` skips the zeros
    of the dense matrix. A group whose filters are all zero (more mel bands than the FFT
    resolves, e.g. n_fft=256 with 512 mels) has bin_lo == bin_hi: its energies are 0.
    """
    n_freqs, n_mels = fb.shape
    bands = []
    for m0 in range(0, n_mels, group):
        m1 = min(n_mels, m0 + group)
        rows = torch.nonzero(fb[:, m0:m1].abs().sum(1)).flatten()
        lo, hi = (int(rows[0]), int(rows[-1]) + 1) if len(rows) else (0, 0)
        bands.append((lo, hi, m0, m1))
    return bands


class LogMel(nn.Module):
    """Waveforms to log-mel spectrograms in dB: (B, N) -> (B, 1, n_mels, T).

    Args:
        sample_rate: sampling rate of the input (Hz).
        n_fft: FFT size; the spectrum has ``n_fft // 2 + 1`` bins.
        win_length: Hann window length (<= n_fft, centred in the frame); default n_fft.
        hop_length: samples between frames.
        n_mels: number of mel bands.
        f_min, f_max: frequency range of the filters (Hz); f_max defaults to sample_rate / 2.
        power: 2.0 for the power spectrum, 1.0 for the magnitude.
        mel_scale: "slaney" or "htk".
        mel_norm: "slaney" (unit-area filters) or None.
        top_db: floor each clip at (its maximum - top_db) dB; None disables.
        amin: floor of the mel energies before the log (dB = 10 log10(max(amin, S))).
        center: zero-pad n_fft // 2 on both sides so frame t is centred at t * hop_length.
        normalize: "none"; "dataset" (subtract ``norm_mean``, divide by ``norm_std``, per mel
            band, set by :meth:`set_normalization`); "instance" (each clip to zero mean and
            unit variance).

    Raises:
        ValueError: an argument is out of range (the message quotes it).

    Example:
        >>> logmel = LogMel(32000)
        >>> logmel(torch.randn(4, 32000)).shape
        torch.Size([4, 1, 128, 101])
    """

    def __init__(self, sample_rate: int, n_fft: int = 1024, win_length: int | None = None,
                 hop_length: int = 320, n_mels: int = 128, f_min: float = 0.0,
                 f_max: float | None = None, power: float = 2.0, mel_scale: str = "slaney",
                 mel_norm: str | None = "slaney", top_db: float | None = 80.0, amin: float = 1e-10,
                 center: bool = True, normalize: str = "none"):
        super().__init__()
        win_length = n_fft if win_length is None else win_length
        require(is_int(sample_rate) and sample_rate > 0, "sample_rate", sample_rate,
                 "a positive integer (Hz)")
        require(is_int(n_fft) and n_fft >= 2, "n_fft", n_fft, "an integer >= 2")
        require(is_int(win_length) and 0 < win_length <= n_fft, "win_length", win_length,
                 f"an integer in [1, n_fft={n_fft}]")
        require(is_int(hop_length) and hop_length > 0, "hop_length", hop_length,
                 "a positive integer")
        require(is_int(n_mels) and n_mels > 0, "n_mels", n_mels, "a positive integer")
        nyquist = sample_rate / 2
        require(is_real(f_min) and 0 <= f_min < nyquist, "f_min", f_min,
                 f"a number in [0, sample_rate / 2 = {nyquist}) Hz")
        require(f_max is None or (is_real(f_max) and f_min < f_max <= nyquist), "f_max", f_max,
                 f"a number in (f_min={f_min}, sample_rate / 2 = {nyquist}] Hz or None")
        require(is_real(power) and power in (1.0, 2.0), "power", power,
                 "1.0 (magnitude) or 2.0 (power)")
        require(mel_scale in ("slaney", "htk"), "mel_scale", mel_scale, "'slaney' or 'htk'")
        require(mel_norm in ("slaney", None), "mel_norm", mel_norm, "'slaney' or None")
        require(top_db is None or (is_real(top_db) and top_db > 0), "top_db", top_db,
                 "a positive number or None")
        require(is_real(amin) and amin > 0, "amin", amin, "a positive number")
        require(normalize in _NORMALIZE, "normalize", normalize,
                 "one of 'none', 'dataset', 'instance'")
        sample_rate, n_fft, win_length = int(sample_rate), int(n_fft), int(win_length)
        hop_length, n_mels = int(hop_length), int(n_mels)
        f_min, f_max = float(f_min), None if f_max is None else float(f_max)
        top_db, amin = None if top_db is None else float(top_db), float(amin)
        self.sample_rate, self.n_fft, self.win_length = sample_rate, n_fft, win_length
        self.hop_length, self.n_mels, self.f_min, self.f_max = hop_length, n_mels, f_min, f_max
        self.power, self.mel_scale, self.mel_norm = float(power), mel_scale, mel_norm
        self.top_db, self.amin, self.center, self.normalize = top_db, amin, center, normalize

        # Periodic Hann of win_length, zero-padded to n_fft with the window in the middle.
        window = torch.zeros(n_fft)
        left = (n_fft - win_length) // 2
        window[left:left + win_length] = torch.hann_window(win_length, periodic=True,
                                                            dtype=torch.float64).float()
        fb = mel_filterbank(sample_rate, n_fft, n_mels, f_min, f_max, mel_scale, mel_norm)
        # Derived from the arguments, so not saved; the normalization statistics are.
        self.register_buffer("window", window, persistent=False)
        self.register_buffer("mel_fb", fb, persistent=False)  # (n_freqs, n_mels)
        self.register_buffer("norm_mean", torch.zeros(n_mels))
        self.register_buffer("norm_std", torch.ones(n_mels))
        self._bands = _mel_bands(fb)
        # CPU chunks hold about this many spectrum values (b * T * n_freqs): 256k complex
        # values are 2 MB, the L2 cache of one core; a 5 s clip at 32 kHz is one chunk.
        self.chunk_values = 1 << 18

    @classmethod
    def from_config(cls, sample_rate: int, cfg: FeatureConfig) -> "LogMel":
        """Build from a :class:`~audioclf.config.FeatureConfig` (all fields map one to one)."""
        return cls(sample_rate, n_fft=cfg.n_fft, win_length=cfg.win_length,
                   hop_length=cfg.hop_length, n_mels=cfg.n_mels, f_min=cfg.f_min, f_max=cfg.f_max,
                   power=cfg.power, mel_scale=cfg.mel_scale, mel_norm=cfg.mel_norm,
                   top_db=cfg.top_db, amin=cfg.amin, center=cfg.center, normalize=cfg.normalize)

    def extra_repr(self) -> str:
        return (f"sample_rate={self.sample_rate}, n_fft={self.n_fft}, hop_length={self.hop_length}, "
                f"n_mels={self.n_mels}, normalize={self.normalize!r}")

    def _apply(self, fn, recurse=True):
        """Move buffers as asked (``.to``, ``.cuda``) but keep them float32.

        The front end computes in float32 whatever the model around it is cast to
        (``model.half()``, ``.bfloat16()``, ``.double()``): half-precision filters would
        cost ~0.05 dB, and the input is cast to float32 anyway.
        """
        float32 = {name: buffer for name, buffer in self._buffers.items()
                   if buffer is not None and buffer.dtype == torch.float32}
        super()._apply(fn, recurse)
        for name, original in float32.items():
            moved = self._buffers[name]
            if moved.dtype != torch.float32:  # cast: move the original instead (no rounding)
                self._buffers[name] = original.to(moved.device)
        return self

    def num_frames(self, n_samples: int) -> int:
        """Number of frames T for a clip of ``n_samples`` samples (as librosa counts them)."""
        padded = n_samples + 2 * (self.n_fft // 2) if self.center else n_samples
        return 1 + (padded - self.n_fft) // self.hop_length

    def min_samples(self) -> int:
        """Shortest clip accepted: one full frame of ``n_fft`` samples."""
        return self.n_fft

    def chunk_size(self, n_samples: int) -> int:
        """Clips per CPU chunk for clips of ``n_samples``: about ``chunk_values`` spectrum values."""
        return max(1, self.chunk_values // (self.num_frames(n_samples) * (self.n_fft // 2 + 1)))

    def set_normalization(self, mean: Tensor, std: Tensor) -> None:
        """Set the per-band statistics used by ``normalize="dataset"``; both of shape (n_mels,).

        Raises:
            ValueError: wrong shape, non-finite values, or a std that is not positive.
        """
        mean = torch.as_tensor(mean, dtype=torch.float32)
        std = torch.as_tensor(std, dtype=torch.float32)
        for name, t in (("mean", mean), ("std", std)):
            if t.shape != (self.n_mels,):
                raise ValueError(f"{name} must have shape ({self.n_mels},) (one value per mel band), "
                                 f"got {tuple(t.shape)}")
            if not torch.isfinite(t).all():
                raise ValueError(f"{name} contains NaN or Inf")
        if not (std > 0).all():
            raise ValueError(f"std must be positive in every band (min {float(std.min())} given)")
        self.norm_mean.copy_(mean)
        self.norm_std.copy_(std)

    def forward(self, waveforms: Tensor) -> Tensor:
        """Log-mel spectrogram in dB, optionally normalized.

        Args:
            waveforms: (B, N) floating-point waveforms, N >= n_fft.

        Returns:
            (B, 1, n_mels, T) float32, T = ``self.num_frames(N)``.

        Raises:
            ValueError: wrong rank or dtype, empty batch, a clip shorter than one frame,
                NaN or Inf samples.
        """
        self._check_input(waveforms)
        db = self._normalize(self.log_mel(waveforms))  # (B, n_mels, T), float32
        return db.unsqueeze(1)  # (B, n_mels, T) -> (B, 1, n_mels, T)

    def log_mel(self, waveforms: Tensor) -> Tensor:
        """Un-normalized log-mel in dB: (B, N) floating point -> (B, n_mels, T) float32 (no checks).

        Always float32 math, even under an ambient autocast (which would run the dense mel
        product in bfloat16 or float16, ~0.1 dB off).
        """
        with torch.autocast(waveforms.device.type, enabled=False):
            waveforms = waveforms.float()
            differentiable = waveforms.requires_grad and torch.is_grad_enabled()
            if waveforms.device.type == "cpu" and not differentiable:  # in place, chunk by chunk
                return self._mel_banded(waveforms, finish=lambda mel: self._to_db(mel, inplace=True))
            return self._to_db(self._mel_dense(waveforms))

    def _mel_dense(self, x: Tensor) -> Tensor:
        """(B, N) -> (B, n_mels, T) mel energies: the whole batch at once (for accelerators).

        A float32 matmul: on CUDA it follows ``torch.backends.cuda.matmul.allow_tf32``
        (off by default); TF32 would cost ~1e-3 relative, ~0.005 dB.
        """
        return self.mel_fb.T @ self._power(x).mT  # (n_mels, F) @ (B, F, T) -> (B, n_mels, T)

    def _frames(self, x: Tensor) -> Tensor:
        """(B, N) -> (B, T, n_fft) windowed frames (the only copy of the signal)."""
        if self.center:
            x = nn.functional.pad(x, (self.n_fft // 2, self.n_fft // 2))
        return x.unfold(-1, self.n_fft, self.hop_length) * self.window

    def _power(self, x: Tensor) -> Tensor:
        """(B, N) -> (B, T, n_freqs): |X|^2 (or |X| for power=1) from the real and imaginary parts."""
        spec = torch.view_as_real(torch.fft.rfft(self._frames(x), dim=-1))  # (B, T, n_freqs, 2)
        re, im = spec[..., 0], spec[..., 1]
        power = torch.addcmul(re * re, im, im)
        return power.sqrt_() if self.power == 1.0 else power

    def _mel_banded(self, x: Tensor, finish: Callable[[Tensor], Tensor] | None = None) -> Tensor:
        """(B, N) -> (B, n_mels, T) mel energies, a few clips at a time so they stay in cache.

        ``finish`` (e.g. :meth:`_to_db`) is applied in place to each chunk's (b, n_mels, T)
        energies while they are still in cache. Chunks run in parallel, one thread each
        (see :func:`_run_chunks`).
        """
        # For power 2 the mel weights are repeated for the real and imaginary halves, so
        # squaring the interleaved spectrum in place and one projection also do the sum.
        interleaved = self.power == 2.0
        blocks = self._band_blocks(interleaved)
        n_frames = self.num_frames(x.shape[1])
        out = x.new_empty(x.shape[0], self.n_mels, n_frames)
        chunk_size = self.chunk_size(x.shape[1])

        def one_chunk(start: int) -> None:
            chunk = x[start:start + chunk_size]
            if interleaved:
                spec = torch.view_as_real(torch.fft.rfft(self._frames(chunk), dim=-1))
                power = spec.square_().flatten(-2)  # (b, T, n_freqs, 2) -> (b, T, 2 n_freqs)
            else:
                power = self._power(chunk)  # (b, T, n_freqs)
            mel = out[start:start + chunk_size]  # (b, n_mels, T): written in place, no transpose
            for lo, hi, m0, m1, weights in blocks:  # (g, k) @ (b, k, T) -> (b, g, T)
                if lo == hi:  # filters that cover no FFT bin: zero energy, as in the dense product
                    mel[:, m0:m1].zero_()
                else:
                    torch.matmul(weights, power[..., lo:hi].mT, out=mel[:, m0:m1])
            if finish is not None:
                finish(mel)

        _run_chunks(one_chunk, range(0, x.shape[0], chunk_size))
        return out

    def _band_blocks(self, interleaved: bool) -> list[tuple[int, int, int, int, Tensor]]:
        """The non-zero blocks of the mel matrix: (bin_lo, bin_hi, mel_lo, mel_hi, weights (g, k))."""
        fb = self.mel_fb.repeat_interleave(2, dim=0) if interleaved else self.mel_fb
        k = 2 if interleaved else 1
        return [(k * lo, k * hi, m0, m1, fb[k * lo:k * hi, m0:m1].T.contiguous())
                for lo, hi, m0, m1 in self._bands]

    def _to_db(self, mel: Tensor, inplace: bool = False) -> Tensor:
        """(B, n_mels, T) or (B, T, n_mels) energies -> dB, floored at each clip's peak - top_db."""
        if inplace:
            db = mel.clamp_(min=self.amin).log10_().mul_(10.0)
        else:
            db = 10.0 * torch.clamp(mel, min=self.amin).log10()
        if self.top_db is not None:
            peak = db.amax(dim=(1, 2), keepdim=True)  # per clip, not per batch
            db = torch.maximum(db, peak - self.top_db, out=db if inplace else None)
        return db

    def _normalize(self, db: Tensor) -> Tensor:
        if self.normalize == "dataset":
            return (db - self.norm_mean[:, None]) / self.norm_std[:, None]
        if self.normalize == "instance":
            mean = db.mean(dim=(1, 2), keepdim=True)
            std = db.std(dim=(1, 2), keepdim=True)
            return (db - mean) / (std + _EPS)
        return db

    def _check_input(self, x: Tensor) -> None:
        if not isinstance(x, Tensor):
            raise ValueError(f"waveforms must be a torch.Tensor of shape (B, N), "
                             f"got {type(x).__name__}")
        if x.ndim != 2:
            raise ValueError(f"waveforms must have shape (B, N) (batch, samples), got shape "
                             f"{tuple(x.shape)}; use x.unsqueeze(0) for one clip")
        if not x.is_floating_point():
            raise ValueError(f"waveforms must be floating point (float32 in [-1, 1]), got {x.dtype}")
        if x.shape[0] == 0:
            raise ValueError("waveforms is an empty batch (B = 0); expected at least one clip")
        if x.shape[1] < self.min_samples():
            raise ValueError(f"clips of {x.shape[1]} samples are shorter than one frame "
                             f"(n_fft={self.n_fft} samples); pad or use a smaller n_fft")
        # A NaN or Inf makes its clip's sum non-finite; one sum is ~10x cheaper than isfinite.
        if not torch.isfinite(x.sum(dim=1, dtype=torch.float32)).all():
            bad = (~torch.isfinite(x)).any(1).nonzero().flatten().tolist()
            if bad:  # else only the sum overflowed
                raise ValueError(f"waveforms contain NaN or Inf (clips {bad[:10]}); "
                                 "expected finite samples")


_pool: tuple[int, ThreadPoolExecutor] | None = None  # (pid, pool): a forked child makes its own
_pool_lock = threading.Lock()
_POOL_SIZE = os.cpu_count() or 1


def _run_chunks(fn: Callable[[int], None], starts: range) -> None:
    """Call ``fn(start)`` for every chunk, spreading chunks over torch's CPU threads.

    Each chunk runs single-threaded and the threads take chunks as they become free.
    Per-op parallelism would split every small op over all cores and wait for the
    slowest at each op; on a shared machine that costs up to 10x (measured), while
    chunk-level parallelism only slows by the share of the busy core. The chunks run on
    a pool of worker threads that each keep one intra-op thread (see :func:`_chunk_pool`);
    the caller's and every other thread's torch thread count are left alone.
    """
    workers = min(torch.get_num_threads(), len(starts), _POOL_SIZE)
    if workers <= 1:
        for start in starts:
            fn(start)
        return
    todo = queue.SimpleQueue()
    for start in starts:
        todo.put(start)

    def worker() -> None:
        with torch.inference_mode():  # grad mode is per thread; these ops need none
            while True:
                try:
                    start = todo.get_nowait()
                except queue.Empty:
                    return
                fn(start)

    pool = _chunk_pool()
    for job in [pool.submit(worker) for _ in range(workers)]:
        job.result()


def _chunk_pool() -> ThreadPoolExecutor:
    """The process's chunk workers, one per core, each with one intra-op thread; started on first use.

    ``torch.set_num_threads`` sets the calling thread's count and also the process-wide
    value that any thread takes on its first torch call. So each worker sets 1 for
    itself, once, and then the process-wide value is put back (the caller's own count
    does not change): threads started later get the usual count, not the workers' 1.
    """
    global _pool
    with _pool_lock:
        if _pool is None or _pool[0] != os.getpid():
            threads = torch.get_num_threads()
            pool = ThreadPoolExecutor(_POOL_SIZE, "audioclf-logmel", initializer=_one_intra_op_thread)
            started = threading.Barrier(_POOL_SIZE + 1)
            for _ in range(_POOL_SIZE):  # each waits here, so each submit starts a new worker
                pool.submit(started.wait)
            started.wait()  # every worker has run its initializer
            torch.set_num_threads(threads)
            _pool = (os.getpid(), pool)
        return _pool[1]


def _one_intra_op_thread() -> None:
    """Pool initializer: this worker thread runs torch ops on one thread."""
    torch.get_num_threads()  # torch's lazy per-thread set-up first, else it would undo the next line
    torch.set_num_threads(1)


@torch.no_grad()
def compute_normalization_stats(logmel: LogMel, batches: Iterable[Tensor | Sequence[Tensor]],
                                progress: bool = False) -> tuple[Tensor, Tensor]:
    """Per-mel-band mean and std of the un-normalized log-mel over a training set.

    Args:
        logmel: the front end (its own ``normalize`` setting is ignored here).
        batches: iterable of (B, N) waveform tensors, or of (waveforms, targets) pairs as a
            DataLoader over :class:`~audioclf.data.ClipDataset` yields; moved to the front
            end's device.
        progress: show a tqdm bar.

    Returns:
        (mean, std): two float32 tensors of shape (n_mels,), on the front end's device,
        over every frame of every clip; pass them to :meth:`LogMel.set_normalization`.

    Raises:
        ValueError: no batches, or a batch :class:`LogMel` rejects.
    """
    device = logmel.window.device
    total = torch.zeros(logmel.n_mels, dtype=torch.float64, device=device)
    total_sq = torch.zeros_like(total)
    count = 0
    for batch in tqdm(batches, desc="normalization statistics", unit="batch", disable=not progress):
        if isinstance(batch, (tuple, list)):
            batch = batch[0]  # (waveforms, targets)
        batch = batch.to(device)
        logmel._check_input(batch)
        db = logmel.log_mel(batch).double()  # (B, n_mels, T)
        total += db.sum(dim=(0, 2))
        total_sq += db.square().sum(dim=(0, 2))
        count += db.shape[0] * db.shape[2]
    if count == 0:
        raise ValueError("compute_normalization_stats got no batches; "
                         "expected at least one (B, N) batch")
    mean = total / count
    var = torch.clamp(total_sq / count - mean.square(), min=0.0)
    std = torch.clamp(var.sqrt(), min=_EPS)
    return mean.float(), std.float()
