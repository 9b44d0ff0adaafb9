"""Read audio files into float32 waveforms, resample them, and cut them to a fixed length.

Decoding goes through soundfile (libsndfile): WAV, FLAC, OGG/Vorbis, and MP3 where the
installed libsndfile reads it (>= 1.1), any PCM subtype. Integer PCM becomes float32 in
[-1, 1]; float files are returned as stored (values outside [-1, 1] are logged, not
clipped). Every problem with a file raises :class:`~audioclf.errors.AudioError` naming
the file, never a raw libsndfile or numpy error.

Resampling uses soxr (libsoxr "HQ") on CPU: in a measurement on this project's machine
it was 3-4x faster than ``torchaudio.functional.resample`` with its defaults, flat to 0.9
of the Nyquist frequency where torchaudio's default kernel had already lost 2.2-2.4 dB, and
it left no measurable alias of a tone at 1.1x the new Nyquist frequency (torchaudio's
default passed it at -14 dB). Tensors on an accelerator are resampled with torchaudio, which runs there.
"""

from __future__ import annotations

import logging
import math
import os
import re
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr
import torch

from audioclf.errors import AudioError

__all__ = ["load_audio", "resample", "resampled_length", "fix_length", "placement", "check_sample_rate",
           "MAX_SAMPLE_RATE", "DECODER_ID"]

logger = logging.getLogger(__name__)

MAX_SAMPLE_RATE = 1_000_000
"""Highest sample rate (Hz) accepted anywhere; higher values are almost always a typo."""

_SOXR_QUALITY = "HQ"
DECODER_ID = f"libsndfile {sf.__libsndfile_version__}, soxr {soxr.__version__} {_SOXR_QUALITY}"
"""What decodes and resamples on CPU: waveforms cached by another version are not reused."""

# libsndfile's parse log for a file whose header promises more data bytes than it holds:
# WAV "data : 16000 (should be 7978)", AIFF " SSND : 16008 (should be 7981)", AU
# "  Data Size   : 16000 (should be 7988)", W64 "riff : 16104 (should be 8052)".
_SHORT_CHUNK = re.compile(r"^\s*(?:data|SSND|Data Size|riff)\s*:\s*(\d+)\s*\(should be (\d+)\)", re.MULTILINE)
# ... and for one whose header promises more sample frames than its data holds.
_SHORT_FRAMES = (
    re.compile(r"'COMM' chunk \((?P<declared>\d+)\) not equal.*?'SSND' chunk \((?P<present>\d+)\)", re.DOTALL),
    re.compile(r"frame count (?P<present>\d+) does not match value from 'ds64' chunk of (?P<declared>\d+)"),
)
# Data sizes a writer streaming to a pipe leaves in the header: "length unknown", not truncation.
_UNKNOWN_SIZES = frozenset({0xFFFFFFFF, 0x7FFFFFFF})
# An MP3's frame count may be estimated from its bit rate: this much of it must decode.
_MP3_TOLERANCE = 0.9


def load_audio(
    path: str | bytes | os.PathLike, sample_rate: int | None = None, mono: bool = True
) -> tuple[torch.Tensor, int]:
    """Read an audio file as a float32 waveform, optionally resampled and mixed to mono.

    Args:
        path: a WAV, FLAC, OGG/Vorbis or MP3 file.
        sample_rate: resample to this rate (Hz); None keeps the file's rate.
        mono: average all channels into one.

    Returns:
        ``(waveform, rate)``: waveform of shape (N,) when ``mono`` else (C, N), float32;
        ``rate`` is ``sample_rate`` if given, else the file's rate.

    Raises:
        AudioError: the path is missing, a directory, empty, not audio, truncated, has no
            samples or non-finite samples, is too short to resample to ``sample_rate``,
            or ``sample_rate`` is out of (0, 1 MHz].
    """
    path = Path(os.fsdecode(path)) if isinstance(path, bytes) else Path(path)
    if sample_rate is not None:
        check_sample_rate(sample_rate, f"{path}: requested sample_rate")
    data, file_rate = _decode(path)  # (N, C)
    waveform = torch.from_numpy(np.ascontiguousarray(data.T))  # (N, C) -> (C, N)
    if mono:
        waveform = waveform.mean(dim=0)  # (C, N) -> (N,)
    if sample_rate is not None and sample_rate != file_rate:
        check_resampled_length(path, waveform.shape[-1], file_rate, sample_rate)
        return resample(waveform, file_rate, sample_rate), sample_rate
    return waveform, file_rate


def check_resampled_length(path: Path, n: int, orig_sr: int, new_sr: int) -> None:
    """Raise AudioError when ``n`` samples of ``path`` are none at the new rate."""
    if resampled_length(n, orig_sr, new_sr) == 0:
        raise AudioError(f"{path}: too short to resample: {n} samples at {orig_sr} Hz are none at {new_sr} Hz")


def check_sample_rate(rate: int, what: str = "sample_rate") -> None:
    """Raise AudioError unless ``rate`` is an integer in (0, MAX_SAMPLE_RATE] Hz."""
    if isinstance(rate, bool) or not isinstance(rate, (int, np.integer)) or not 0 < rate <= MAX_SAMPLE_RATE:
        raise AudioError(f"{what} must be an integer in (0, {MAX_SAMPLE_RATE}] Hz ({rate!r} given)")


def check_file(path: Path) -> None:
    """Raise AudioError unless ``path`` is a non-empty file (before any decoder sees it)."""
    if not path.exists():
        raise AudioError(f"{path}: no such file")
    if path.is_dir():
        raise AudioError(f"{path}: is a directory, expected an audio file")
    if path.stat().st_size == 0:
        raise AudioError(f"{path}: empty file (0 bytes)")


def _decode(path: Path) -> tuple[np.ndarray, int]:
    """Decode a whole file to float32 of shape (N, C); every failure becomes an AudioError."""
    check_file(path)
    if path.suffix.lower() == ".raw":  # soundfile would ask for the rate, channels and subtype
        raise AudioError(f"{path}: headerless RAW audio does not say its sample rate, channels or "
                         "sample format; convert it to WAV or FLAC")
    try:
        with sf.SoundFile(path) as f:
            declared, rate, log, fmt = f.frames, f.samplerate, f.extra_info, f.format
            data = f.read(dtype="float32", always_2d=True)  # (N, C)
    except (sf.LibsndfileError, RuntimeError) as e:
        reason = getattr(e, "error_string", None) or str(e)
        raise AudioError(f"{path}: cannot decode audio ({reason}); is it truncated or not audio?") from None
    except OSError as e:
        raise AudioError(f"{path}: cannot read file ({e.strerror or e})") from None

    _check_complete(path, len(data), declared, log, fmt)
    if len(data) == 0:
        raise AudioError(f"{path}: contains no samples (header only)")
    if rate <= 0 or rate > MAX_SAMPLE_RATE:
        raise AudioError(f"{path}: file declares an implausible sample rate of {rate} Hz")
    _check_finite(data, path)
    return data, rate


def _check_complete(path: Path, decoded: int, declared: int, log: str, fmt: str) -> None:
    """Raise AudioError when the file holds less audio than its header declares.

    ``declared`` is the frame count soundfile reports; for WAV, AIFF and AU it is already
    cut to what is present, so the header's own claim is read from libsndfile's ``log``.
    """
    for m in _SHORT_CHUNK.finditer(log):
        size, present = int(m[1]), int(m[2])
        if size > present and size not in _UNKNOWN_SIZES:
            raise AudioError(f"{path}: truncated file: header declares {size} data bytes, "
                             f"only {present} present")
    for pattern in _SHORT_FRAMES:
        m = pattern.search(log)
        if m and int(m["declared"]) > int(m["present"]):
            raise AudioError(f"{path}: truncated file: header declares {m['declared']} sample frames, "
                             f"only {m['present']} present")
    if "ended unexpectedly" in log:  # Ogg without its end-of-stream page
        raise AudioError(f"{path}: truncated file: the stream ends without its final page")
    if decoded < frames_required(declared, fmt):
        raise AudioError(f"{path}: truncated file: header declares {declared} samples, "
                         f"only {decoded} could be decoded")


def frames_required(declared: int, fmt: str) -> int:
    """How many of the ``declared`` frames must decode for a file to count as complete: all,
    or 90% for an MP3 (soundfile's ``format`` "MP3"), whose count may be an estimate from its bit rate."""
    return int(_MP3_TOLERANCE * declared) if fmt == "MP3" else declared


def _check_finite(data: np.ndarray, path: Path) -> None:
    finite = np.isfinite(data)
    if not finite.all():
        bad = np.flatnonzero(~finite.all(axis=1))
        raise AudioError(f"{path}: {len(bad)} sample frames are NaN or Inf "
                         f"(first at sample {bad[0]}); the file is corrupt")
    peak = float(np.abs(data).max())
    if peak > 1.0:
        logger.warning("%s: float samples reach %.3g, outside [-1, 1]; kept as stored", path, peak)


def resample(waveform: torch.Tensor, orig_sr: int, new_sr: int) -> torch.Tensor:
    """Resample along the last dimension.

    Args:
        waveform: (..., N) float tensor.
        orig_sr: its sample rate (Hz).
        new_sr: the wanted rate (Hz).

    Returns:
        (..., M) float32 tensor: on CPU (soxr) ``M = resampled_length(N, orig_sr, new_sr)``,
        ``N * new_sr / orig_sr`` rounded to the nearest; on other devices (torchaudio) rounded up.
        A few samples taken to a much lower rate can give ``M = 0``; :func:`load_audio`
        reports that as an AudioError.

    Raises:
        AudioError: a rate outside (0, 1 MHz].
    """
    check_sample_rate(orig_sr, "orig_sr")
    check_sample_rate(new_sr, "new_sr")
    if orig_sr == new_sr:
        return waveform
    if waveform.device.type != "cpu" or waveform.requires_grad:
        import torchaudio.functional as AF  # noqa: PLC0415

        return AF.resample(waveform, orig_sr, new_sr)
    lead = waveform.shape[:-1]
    x = waveform.detach().to(torch.float32).reshape(-1, waveform.shape[-1]).numpy()  # (..., N) -> (C, N)
    y = soxr.resample(np.ascontiguousarray(x.T), orig_sr, new_sr, quality=_SOXR_QUALITY)  # (N, C) -> (M, C)
    return torch.from_numpy(np.ascontiguousarray(y.T)).reshape(*lead, -1)  # (C, M) -> (..., M)


def resampled_length(n: int, orig_sr: int, new_sr: int) -> int:
    """How many samples :func:`resample` returns on CPU for ``n`` samples: ``n * new_sr /
    orig_sr`` rounded to the nearest (1001 samples at 44.1 kHz are 363 at 16 kHz, not the
    364 of rounding up).

    Computed as soxr computes it, in floating point through the rate ratio, so an exact
    half goes whichever way that rounding takes it (240 samples at 48 kHz are 220 at
    44.1 kHz, 80 are 74). What a file streamed in spans (:mod:`audioclf.predict`) must
    have to match the same file resampled whole (:func:`load_audio`, the waveform cache).
    """
    return math.floor(n / (orig_sr / new_sr) + 0.5)


def fix_length(
    waveform: torch.Tensor,
    n: int,
    mode: str = "zeros",
    random: bool = False,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Crop or pad the last dimension to exactly ``n`` samples.

    Deterministic (``random=False``): a longer clip is centre-cropped; a shorter one is
    placed in the centre and padded on both sides. ``random=True``: the crop offset (or
    the clip's placement within the padded output) is drawn from ``generator``.

    Args:
        waveform: (..., N) tensor.
        n: output length in samples (> 0).
        mode: ``"zeros"`` pads with silence; ``"repeat"`` tiles the clip (a shorter clip
            repeats periodically around its placement).
        random: draw the offset instead of centring.
        generator: the ``torch.Generator`` to draw from (None: torch's global one).

    Returns:
        (..., n) tensor of the input's dtype.

    Raises:
        ValueError: ``n`` not positive, unknown ``mode``, or ``"repeat"`` of an empty clip.
    """
    if mode not in ("zeros", "repeat"):
        raise ValueError(f"mode must be 'zeros' or 'repeat' ({mode!r} given)")
    if n <= 0:
        raise ValueError(f"n must be a positive number of samples ({n!r} given)")
    length = waveform.shape[-1]
    if length == n:
        return waveform
    offset = placement(length, n, random, generator)
    if length > n:
        return waveform[..., offset:offset + n]
    if mode == "repeat":
        if length == 0:
            raise ValueError("cannot repeat an empty waveform; use mode='zeros'")
        index = (torch.arange(n) - offset) % length  # out[i] = x[(i - offset) mod N]
        return waveform[..., index]
    out = waveform.new_zeros(*waveform.shape[:-1], n)
    out[..., offset:offset + length] = waveform
    return out


def placement(length: int, n: int, random: bool, generator: torch.Generator | None = None) -> int:
    """Where a clip of ``length`` samples meets a window of ``n`` samples.

    Returns the crop start within the clip when ``length > n``, else the clip's start
    within the padded window. Centred unless ``random``; random offsets are uniform over
    every position where one fully contains the other.
    """
    room = abs(length - n)
    if not random:
        return room // 2
    return int(torch.randint(0, room + 1, (1,), generator=generator))
