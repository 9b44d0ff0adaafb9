"""``Predictor``: a bundle plus audio files (any rate, channels, length) -> labels.

Every clip is read at the bundle's sample rate and mixed to mono. A clip no longer than
the window (by default the training clip length) is padded the way training padded
(centred, ``pad_mode``) and scored once. A longer one is scored in sliding windows
(``hop`` defaults to half a window; the last window is aligned to the end, so every
sample is covered) and gets per-window predictions with timestamps plus a clip-level
aggregate: the **arithmetic mean of the window probabilities** (the chance a random
window shows each class), so a sound present in only part of a recording still counts;
``aggregate="geometric"`` is the alternative.

Long files stream: blocks of a batch of windows are read with soundfile and resampled
block by block (aligned to the resampling period, with a margin so block edges match
whole-file resampling), so memory stays bounded whatever the file's length.

Each window is scored by every fold model on every TTA view and averaged by the
bundle's rule (see :mod:`audioclf.ensemble`). The TTA views are the bundle's saved
``tta_shifts``, in samples of a training clip (``clip_samples``); a window of another
length gets the same shifts as fractions of the window (``round(s * window / clip_samples)``),
which is how the shifts were defined (``tta_max_shift`` is a fraction of the clip).

Cross-validation scores its held-out clips the same way (same windows, hop and
aggregate; :mod:`audioclf.crossval`), so ``audioclf evaluate`` on a test set reproduces
the CV report's ensemble scores.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch

from audioclf.errors import AudioError

__all__ = ["Predictor", "Prediction", "WindowPrediction", "window_starts", "window_sizes", "default_hop"]

log = logging.getLogger(__name__)

AGGREGATES = ("arithmetic", "geometric")
MIN_WINDOW_SAMPLES = 16


@dataclass
class WindowPrediction:
    """One window of a long clip: start and end in seconds, class probabilities (K,)."""

    start: float
    end: float
    probs: np.ndarray


@dataclass
class Prediction:
    """The result for one input. ``error`` is set (and the rest empty) when it failed."""

    source: str
    labels: list[str]
    probs: np.ndarray | None = None
    duration: float | None = None
    windows: list[WindowPrediction] = field(default_factory=list)
    error: str | None = None
    top_k: int = 3

    @property
    def top(self) -> list[tuple[str, float]]:
        """The ``top_k`` most probable (label, probability) pairs, best first."""
        if self.probs is None:
            return []
        order = np.argsort(-self.probs, kind="stable")[: self.top_k]
        return [(self.labels[i], float(self.probs[i])) for i in order]

    def to_dict(self) -> dict:
        """JSON-ready: source, duration, top, probabilities by label, windows, error."""
        if self.error is not None:
            return {"source": self.source, "error": self.error}
        return {
            "source": self.source,
            "duration": self.duration,
            "top": [{"label": name, "prob": p} for name, p in self.top],
            "probs": {name: float(p) for name, p in zip(self.labels, self.probs)},
            "windows": [{"start": w.start, "end": w.end, "label": self.labels[int(np.argmax(w.probs))],
                         "probs": [float(p) for p in w.probs]} for w in self.windows],
        }


def default_hop(window: int) -> int:
    """Half a window (in samples): every sample is seen by two windows."""
    return max(1, window // 2)


def window_sizes(sample_rate: int, clip_samples: int, window: float | None = None,
                 hop: float | None = None) -> tuple[int, int]:
    """Window and hop in samples from seconds (defaults: the training clip, half a window).

    Raises:
        ValueError: a window under 16 samples or a hop under one sample; the message
            starts with the argument's name and quotes the value.
    """
    for name, value in (("window", window), ("hop", hop)):
        if value is not None and not 0 < value < math.inf:
            raise ValueError(f"{name} must be a positive number of seconds ({value!r} given)")
    win = clip_samples if window is None else int(round(window * sample_rate))
    if win < MIN_WINDOW_SAMPLES:
        raise ValueError(f"window must be at least {MIN_WINDOW_SAMPLES} samples "
                         f"({MIN_WINDOW_SAMPLES / sample_rate:.4g} s at {sample_rate} Hz; {window!r} s given)")
    hop_n = default_hop(win) if hop is None else int(round(hop * sample_rate))
    if hop_n < 1:
        raise ValueError(f"hop must be at least one sample ({1 / sample_rate:.4g} s at {sample_rate} Hz; "
                         f"{hop!r} s given)")
    return win, hop_n


def window_starts(n: int, window: int, hop: int) -> list[int]:
    """Start samples of windows covering ``n`` samples; the last one ends at ``n``."""
    if n <= window:
        return [0]
    starts = list(range(0, n - window + 1, hop))
    if starts[-1] + window < n:
        starts.append(n - window)
    return starts


class Predictor:
    """Score waveforms with an ensemble of fold models and time-shift TTA.

    Args:
        models: fold models, (B, N) waveforms -> (B, K) logits, in eval mode on ``device``.
        labels: class names in output order.
        sample_rate: the models' sample rate (Hz).
        clip_samples: training clip length in samples (the default window).
        pad_mode: how a short clip is padded: ``"zeros"`` or ``"repeat"``.
        rule: ``"geometric"`` or ``"arithmetic"`` average over models x views.
        tta_shifts: time shifts of the TTA views in samples of a ``clip_samples`` window
            (``[0]``: no TTA); scaled to the window's length for other windows.
        tta_mode: ``"circular"`` or ``"pad"``.
        device: where the models run.
        batch_size: windows scored per forward pass (bounds memory for long files).

    Example:
        >>> p = Predictor.from_bundle("runs/fsdd/bundle")
        >>> p.predict(["seven.wav"])[0].top
        [('7', 0.97), ('1', 0.01), ('9', 0.005)]
    """

    def __init__(self, models: Sequence[torch.nn.Module], labels: Sequence[str], sample_rate: int,
                 clip_samples: int, pad_mode: str = "zeros", rule: str = "geometric",
                 tta_shifts: Sequence[int] = (0,), tta_mode: str = "circular", device: str | torch.device = "cpu",
                 batch_size: int = 16):
        if not models:
            raise ValueError("a Predictor needs at least one model (0 given)")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1 ({batch_size!r} given)")
        if len(tta_shifts) == 0:
            raise ValueError("tta_shifts must hold at least one shift ([0] for no TTA)")
        self.models = list(models)
        self.labels = list(labels)
        self.sample_rate = sample_rate
        self.clip_samples = clip_samples
        self.pad_mode = pad_mode
        self.rule = rule
        self.tta_shifts = [int(s) for s in tta_shifts]
        self.tta_mode = tta_mode
        self.device = torch.device(device)
        self.batch_size = batch_size

    @classmethod
    def from_bundle(cls, path: str | os.PathLike, device: str = "auto", batch_size: int = 16) -> "Predictor":
        """Load a bundle folder (or a ``cv`` run folder holding ``bundle/``).

        Raises:
            BundleError: a missing file or an incompatible format (named).
        """
        from audioclf.bundle import load_models, read_bundle

        bundle = read_bundle(path)
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        return cls(load_models(bundle, device), bundle.labels, bundle.sample_rate, bundle.clip_samples,
                   bundle.pad_mode, bundle.rule, bundle.tta_shifts, bundle.tta_mode, device, batch_size)

    # ------------------------------------------------------------ public API

    def predict(self, items: Sequence, top_k: int = 3, window: float | None = None, hop: float | None = None,
                aggregate: str = "arithmetic", sample_rate: int | None = None) -> list[Prediction]:
        """Predict every item; a failing file gives a Prediction with ``error`` set, not an exception.

        Args:
            items: file paths, or waveforms ((N,) or (C, N) arrays or tensors).
            top_k: how many labels :attr:`Prediction.top` lists.
            window: window length in seconds (default: the training clip length).
            hop: hop between windows in seconds (default: half the window).
            aggregate: clip-level average of the windows: ``"arithmetic"`` or ``"geometric"``.
            sample_rate: rate of waveform items (default: the bundle's).

        A waveform item that cannot be read (empty, a bad ``sample_rate``, or a 2-D array
        laid out as (frames, channels) instead of (channels, frames)) gets ``error`` set
        like a bad file.

        Raises:
            ValueError: a bad ``top_k``, ``window``, ``hop`` or ``aggregate`` (quoted).
        """
        win, hop_n = window_sizes(self.sample_rate, self.clip_samples, window, hop)
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1 ({top_k!r} given)")
        if aggregate not in AGGREGATES:
            raise ValueError(f"aggregate must be one of {', '.join(AGGREGATES)} ({aggregate!r} given)")
        results = []
        for i, item in enumerate(items):
            is_file = isinstance(item, (str, os.PathLike))
            source = str(item) if is_file else f"waveform[{i}]"
            try:
                if is_file:
                    reader = _FileReader(Path(item), self.sample_rate)
                else:
                    reader = _ArrayReader(item, self.sample_rate if sample_rate is None else sample_rate,
                                          self.sample_rate)
            except (AudioError, ValueError) as e:  # _ArrayReader: a malformed array is that item's error
                log.debug("%s", e)
                results.append(Prediction(source, self.labels, error=str(e), top_k=top_k))
                continue
            try:
                results.append(self._predict_reader(reader, source, win, hop_n, aggregate, top_k))
            except AudioError as e:
                results.append(Prediction(source, self.labels, error=str(e), top_k=top_k))
        return results

    def predict_batch(self, waveforms: torch.Tensor) -> np.ndarray:
        """Ensemble probabilities of fixed-length windows: (B, N) -> (B, K) float64."""
        from audioclf.ensemble import predict_members

        shifts = self.shifts_for(waveforms.shape[-1])
        return predict_members(self.models, waveforms.to(self.device), shifts, self.tta_mode, self.rule)

    def shifts_for(self, window: int) -> list[int]:
        """The TTA shifts for a window of ``window`` samples: the saved ones, scaled to its length."""
        if window == self.clip_samples:
            return list(self.tta_shifts)
        return [int(round(s * window / self.clip_samples)) for s in self.tta_shifts]

    # ------------------------------------------------------------ internals

    def _predict_reader(self, reader, source: str, win: int, hop: int, aggregate: str, top_k: int) -> Prediction:
        from audioclf.audio import fix_length

        n = reader.n_samples
        duration = n / self.sample_rate
        if n <= win:  # one window, padded like training
            clip = fix_length(reader.read(0, n), win, self.pad_mode)  # (n,) -> (win,)
            probs = self.predict_batch(clip[None])[0]  # (1, win) -> (K,)
            return Prediction(source, self.labels, probs, duration, top_k=top_k)
        windows = []
        for starts, batch in _batches(reader, window_starts(n, win, hop), win, self.batch_size):
            probs = self.predict_batch(batch)  # (B, win) -> (B, K)
            windows += [WindowPrediction(s / self.sample_rate, (s + win) / self.sample_rate, p)
                        for s, p in zip(starts, probs)]
        stacked = np.stack([w.probs for w in windows])  # (W, K)
        if aggregate == "arithmetic":
            clip_probs = stacked.mean(axis=0)
        else:
            from audioclf.ensemble import geometric_mean

            clip_probs = geometric_mean(stacked[:, None, :])[0]  # (W, 1, K) -> (K,)
        return Prediction(source, self.labels, clip_probs, duration, windows, top_k=top_k)


def _batches(reader, starts: list[int], win: int, batch_size: int) -> Iterator[tuple[list[int], torch.Tensor]]:
    """Windows in batches: only one batch's span of audio is in memory at a time."""
    for b in range(0, len(starts), batch_size):
        chunk = starts[b:b + batch_size]
        span = reader.read(chunk[0], chunk[-1] + win)  # (span,)
        yield chunk, torch.stack([span[s - chunk[0]: s - chunk[0] + win] for s in chunk])  # (B, win)


class _ArrayReader:
    """An in-memory waveform ((N,) or (C, N), array or tensor) at the model's rate."""

    def __init__(self, waveform, rate: int, target_rate: int):
        from audioclf.audio import check_sample_rate, resample

        check_sample_rate(rate, "sample_rate")

        x = torch.as_tensor(np.asarray(waveform, dtype=np.float32) if not torch.is_tensor(waveform) else waveform)
        x = x.float()
        if x.ndim == 2 and x.shape[0] > x.shape[1]:
            raise ValueError(f"a 2-D waveform must be laid out (channels, frames); shape {tuple(x.shape)} looks "
                             "like (frames, channels): pass its transpose (soundfile reads (frames, channels))")
        if x.ndim == 2:
            x = x.mean(dim=0)  # (C, N) -> (N,)
        if x.ndim != 1 or x.numel() == 0:
            raise ValueError(f"a waveform must have shape (N,) or (C, N) with N > 0 (shape {tuple(x.shape)} given)")
        self.waveform = resample(x, rate, target_rate) if rate != target_rate else x
        self.n_samples = len(self.waveform)

    def read(self, start: int, stop: int) -> torch.Tensor:
        return self.waveform[start:stop]


class _FileReader:
    """Reads spans of a file at ``rate`` (mono), decoding and resampling only that span.

    Spans are widened to whole resampling periods (``orig/gcd`` input samples map to
    exactly ``rate/gcd`` output samples) plus a margin of 50 ms each side, resampled, and
    cut back, so a span equals the same samples of a whole-file resampling (up to the
    resampler's tiny edge effects inside the margin, which are discarded).
    """

    MARGIN_SECONDS = 0.05

    def __init__(self, path: Path, rate: int):
        import soundfile as sf

        from audioclf.audio import (_check_complete, check_file, check_resampled_length, frames_required,
                                    resampled_length)

        check_file(path)
        try:
            info = sf.info(str(path))
        except (sf.LibsndfileError, RuntimeError) as e:
            raise AudioError(f"{path}: cannot decode audio ({getattr(e, 'error_string', e)}); "
                             "is it truncated or not audio?") from None
        if info.frames <= 0:
            raise AudioError(f"{path}: contains no samples (header only)")
        # The header's own account of missing data (libsndfile's log), as load_audio checks it;
        # spans read later are checked against the declared length in _read_frames.
        _check_complete(path, info.frames, info.frames, info.extra_info, info.format)
        self.path, self.rate, self.file_rate, self.frames = path, rate, info.samplerate, info.frames
        self.required = frames_required(info.frames, info.format)  # an MP3's count may be an estimate
        g = math.gcd(self.file_rate, rate)
        self.p_in, self.p_out = self.file_rate // g, rate // g  # samples per resampling period
        check_resampled_length(path, self.frames, self.file_rate, rate)
        self.n_samples = resampled_length(self.frames, self.file_rate, rate)  # as whole-file resampling
        self.margin = math.ceil(self.MARGIN_SECONDS * self.file_rate / self.p_in)  # in periods

    def _read_frames(self, start: int, stop: int) -> np.ndarray:
        import soundfile as sf

        try:
            data = sf.read(str(self.path), start=start, stop=stop, dtype="float32", always_2d=True)[0]
        except (sf.LibsndfileError, RuntimeError) as e:
            raise AudioError(f"{self.path}: cannot decode audio at samples {start}-{stop} "
                             f"({getattr(e, 'error_string', e)})") from None
        if len(data) < stop - start and start + len(data) < self.required:  # as load_audio allows
            raise AudioError(f"{self.path}: truncated file: the header declares {self.frames} samples, "
                             f"decoding stopped at {start + len(data)}")
        return data.mean(axis=1)  # (n, C) -> (n,)

    def read(self, start: int, stop: int) -> torch.Tensor:
        """Samples ``[start, stop)`` at the model's rate: (stop - start,) float32."""
        from audioclf.audio import resample

        if self.file_rate == self.rate:
            out = torch.from_numpy(self._read_frames(start, min(stop, self.frames)))
        else:
            first = max(0, start // self.p_out - self.margin)  # in periods
            last = -(-stop // self.p_out) + self.margin
            x = torch.from_numpy(self._read_frames(first * self.p_in, min(last * self.p_in, self.frames)))
            y = resample(x, self.file_rate, self.rate)  # output sample 0 is sample first*p_out overall
            offset = start - first * self.p_out
            out = y[offset:offset + (stop - start)]
        if len(out) < stop - start:  # past the end of an MP3 whose frame count was an estimate
            out = torch.cat([out, out.new_zeros(stop - start - len(out))])
        return out
