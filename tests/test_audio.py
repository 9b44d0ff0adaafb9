"""audioclf.audio: decoding, channel mixing, resampling, fix_length, and every bad input."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from audioclf.audio import _check_complete, fix_length, load_audio, resample, resampled_length
from audioclf.errors import AudioError

RAMP = np.array([-1.0, -0.5, 0.0, 0.5], dtype=np.float32)


def _write(path, data, rate=8000, **kwargs):
    sf.write(path, data, rate, **kwargs)
    return path


# --- decoding -------------------------------------------------------------------------


@pytest.mark.parametrize("subtype, tol", [("PCM_U8", 1 / 128), ("PCM_16", 1 / 2**15),
                                          ("PCM_24", 1 / 2**23), ("PCM_32", 1 / 2**31),
                                          ("FLOAT", 0.0), ("DOUBLE", 0.0)])
def test_wav_subtypes_decode_to_float32_in_range(tmp_path, subtype, tol):
    path = _write(tmp_path / "x.wav", RAMP, subtype=subtype)
    wav, rate = load_audio(path)
    assert wav.dtype == torch.float32 and rate == 8000
    np.testing.assert_allclose(wav.numpy(), RAMP, atol=tol)


@pytest.mark.parametrize("fmt, ext, subtype, tol", [("FLAC", "flac", "PCM_16", 1e-4),
                                                    ("OGG", "ogg", "VORBIS", 0.05),
                                                    ("MP3", "mp3", "MPEG_LAYER_III", 0.1)])
def test_compressed_formats_round_trip(tmp_path, fmt, ext, subtype, tol):
    if fmt not in sf.available_formats():
        pytest.skip(f"this libsndfile ({sf.__libsndfile_version__}) cannot handle {fmt}")
    t = np.arange(8000) / 8000
    x = (0.5 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    path = _write(tmp_path / f"x.{ext}", x, format=fmt, subtype=subtype)
    wav, rate = load_audio(path)
    assert rate == 8000 and wav.shape == (8000,)
    # Lossy codecs shift phase a little: compare loudness, not samples.
    assert abs(float(wav.pow(2).mean().sqrt()) - 0.5 / np.sqrt(2)) < tol


def test_stereo_to_mono_averages_channels(tmp_path):
    stereo = np.stack([RAMP, np.zeros(4, np.float32)], axis=1)  # (N, C)
    path = _write(tmp_path / "s.wav", stereo, subtype="FLOAT")
    mono, _ = load_audio(path)
    both, _ = load_audio(path, mono=False)
    np.testing.assert_allclose(mono.numpy(), RAMP / 2)
    assert both.shape == (2, 4)
    np.testing.assert_allclose(both[0].numpy(), RAMP)


def test_load_with_resampling_keeps_a_tone(tmp_path):
    t = np.arange(8000) / 8000
    path = _write(tmp_path / "x.wav", (0.5 * np.sin(2 * np.pi * 1000 * t)).astype(np.float32), subtype="FLOAT")
    wav, rate = load_audio(path, sample_rate=16000)
    assert rate == 16000 and wav.shape == (16000,)
    spectrum = np.abs(np.fft.rfft(wav.numpy()))  # 1 Hz per bin over one second
    assert int(spectrum.argmax()) == 1000
    assert abs(float(wav[200:-200].pow(2).mean().sqrt()) - 0.5 / np.sqrt(2)) < 1e-3


def test_real_fsdd_file_matches_soundfile(fsdd_dir):
    path = fsdd_dir / "recordings" / "0_george_0.wav"
    expected, file_rate = sf.read(path, dtype="float32")
    wav, rate = load_audio(path)
    assert rate == file_rate == 8000
    np.testing.assert_array_equal(wav.numpy(), expected)


# --- resampling -----------------------------------------------------------------------


def test_resample_preserves_a_tone_below_nyquist():
    t = np.arange(8000) / 8000
    x = torch.from_numpy(np.sin(2 * np.pi * 1000 * t).astype(np.float32))
    y = resample(x, 8000, 16000)
    assert y.shape == (16000,)
    t2 = np.arange(16000) / 16000
    ref = np.sin(2 * np.pi * 1000 * t2)
    np.testing.assert_allclose(y.numpy()[200:-200], ref[200:-200], atol=1e-2)


def test_resample_removes_a_tone_above_new_nyquist():
    t = np.arange(16000) / 16000
    x = torch.from_numpy(np.sin(2 * np.pi * 6000 * t).astype(np.float32))
    y = resample(x, 16000, 8000)  # new Nyquist 4 kHz: 6 kHz must not alias to 2 kHz
    assert float(y[500:-500].abs().max()) < 1e-2


def test_resample_is_batch_consistent():
    x = torch.randn(3, 2, 1000, generator=torch.Generator().manual_seed(0))
    y = resample(x, 8000, 11025)
    assert y.shape[:2] == (3, 2)
    torch.testing.assert_close(y[1, 0], resample(x[1, 0], 8000, 11025))


@pytest.mark.parametrize("orig, new", [(44100, 16000), (16000, 8000), (8000, 16000), (11025, 8000),
                                       (48000, 44100), (22050, 32000), (8000, 44100), (3, 7)])
def test_resampled_length_is_what_resample_returns(orig, new):
    """Rounded to the nearest as soxr rounds, halves included (48 kHz -> 44.1 kHz: 240 samples
    give 220, 80 give 74), not up."""
    for n in [*range(1, 400), 1001, 1040, 1200, 4321, 44101, 123457]:
        assert resampled_length(n, orig, new) == resample(torch.zeros(n), orig, new).shape[-1], n
    assert resampled_length(1001, 44100, 16000) == 363  # ceil would say 364
    assert (resampled_length(240, 48000, 44100), resampled_length(80, 48000, 44100)) == (220, 74)


# --- bad inputs: one test each ----------------------------------------------------------


def test_missing_path(tmp_path):
    with pytest.raises(AudioError, match=r"nope\.wav: no such file"):
        load_audio(tmp_path / "nope.wav")


def test_bytes_and_str_paths_read_as_paths(tmp_path):
    path = _write(tmp_path / "a.wav", np.linspace(-0.5, 0.5, 800, dtype=np.float32), subtype="FLOAT")
    expected, _ = load_audio(path)
    for given in (str(path), bytes(path)):
        torch.testing.assert_close(load_audio(given)[0], expected, rtol=0, atol=0)
    with pytest.raises(AudioError, match=r"nope\.wav: no such file"):
        load_audio(bytes(tmp_path / "nope.wav"))


def test_directory(tmp_path):
    with pytest.raises(AudioError, match="is a directory"):
        load_audio(tmp_path)


def test_empty_file(tmp_path):
    (tmp_path / "e.wav").touch()
    with pytest.raises(AudioError, match=r"e\.wav: empty file \(0 bytes\)"):
        load_audio(tmp_path / "e.wav")


def test_header_only_file(tmp_path):
    path = _write(tmp_path / "h.wav", np.zeros(0, np.float32))
    with pytest.raises(AudioError, match=r"h\.wav: contains no samples"):
        load_audio(path)


@pytest.mark.parametrize("fmt, ext", [("WAV", "wav"), ("FLAC", "flac"), ("OGG", "ogg"), ("MP3", "mp3"),
                                      ("AU", "au"), ("AIFF", "aiff"), ("RF64", "rf64"), ("W64", "w64")])
def test_truncated_file(tmp_path, fmt, ext):
    if fmt not in sf.available_formats():
        pytest.skip(f"this libsndfile ({sf.__libsndfile_version__}) cannot handle {fmt}")
    full = _write(tmp_path / f"full.{ext}", np.random.default_rng(0).uniform(-0.5, 0.5, 8000), format=fmt)
    data = full.read_bytes()
    cut = tmp_path / f"cut.{ext}"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(AudioError, match=rf"cut\.{ext}: (truncated|cannot decode)"):
        load_audio(cut)


def test_aiff_declaring_more_frames_than_its_data(tmp_path):
    path = _write(tmp_path / "x.aiff", RAMP, format="AIFF", subtype="PCM_16")
    data = bytearray(path.read_bytes())
    comm = data.find(b"COMM")
    data[comm + 10:comm + 14] = struct.pack(">I", 9)  # numSampleFrames: 9, the data holds 4
    path.write_bytes(data)
    with pytest.raises(AudioError, match=r"x\.aiff: truncated file: header declares 9 sample frames, only 4"):
        load_audio(path)


@pytest.mark.parametrize("size", [0xFFFFFFFF, 0x7FFFFFFF])
def test_streamed_wav_of_unknown_length_loads(tmp_path, size):
    """A WAV written to a pipe cannot seek back to fill in its sizes: they mean "unknown"."""
    path = _write(tmp_path / "s.wav", RAMP, subtype="FLOAT")
    data = bytearray(path.read_bytes())
    chunk = data.find(b"data")
    data[4:8] = data[chunk + 4:chunk + 8] = struct.pack("<I", size)
    path.write_bytes(data)
    wav, _ = load_audio(path)
    np.testing.assert_array_equal(wav.numpy(), RAMP)


def test_mp3_frame_count_is_an_estimate():
    """An MP3's frame count may be 10% off (estimated from its bit rate); other formats' may not."""
    _check_complete(Path("x.mp3"), 950, 1000, "", "MP3")
    with pytest.raises(AudioError, match=r"x\.mp3: truncated file: header declares 1000 samples, only 899"):
        _check_complete(Path("x.mp3"), 899, 1000, "", "MP3")
    with pytest.raises(AudioError, match="only 950 could be decoded"):
        _check_complete(Path("x.wav"), 950, 1000, "", "WAV")


def test_soundfile_names_the_mp3_format_as_checked(tmp_path):
    if "MP3" not in sf.available_formats():
        pytest.skip(f"this libsndfile ({sf.__libsndfile_version__}) cannot handle MP3")
    path = _write(tmp_path / "x.mp3", np.zeros(8000, np.float32), format="MP3")
    assert sf.info(path).format == "MP3"  # the name _check_complete allows for


def test_raw_file(tmp_path):
    path = tmp_path / "x.raw"
    path.write_bytes(bytes(100))
    with pytest.raises(AudioError, match=r"x\.raw: headerless RAW audio does not say its sample rate"):
        load_audio(path)


def test_too_short_to_resample(tmp_path):
    path = _write(tmp_path / "one.wav", np.array([0.5], np.float32), rate=44100)
    with pytest.raises(AudioError, match=r"one\.wav: too short to resample: 1 samples at 44100 Hz are none at 8000"):
        load_audio(path, sample_rate=8000)


def test_text_file_named_wav(tmp_path):
    path = tmp_path / "notes.wav"
    path.write_text("these are my notes, not audio\n" * 20)
    with pytest.raises(AudioError, match=r"notes\.wav: cannot decode audio \(Format not recognised"):
        load_audio(path)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_samples_in_float_file(tmp_path, bad):
    x = np.zeros(10, np.float32)
    x[3] = bad
    path = _write(tmp_path / "f.wav", x, subtype="FLOAT")
    with pytest.raises(AudioError, match=r"f\.wav: 1 sample frames are NaN or Inf \(first at sample 3\)"):
        load_audio(path)


@pytest.mark.parametrize("rate", [0, -8000, 1_000_001, 16000.0])
def test_requested_rate_out_of_range(tmp_path, rate):
    path = _write(tmp_path / "x.wav", RAMP)
    with pytest.raises(AudioError, match=r"x\.wav: requested sample_rate must be an integer in \(0, 1000000\]"):
        load_audio(path, sample_rate=rate)


# --- fix_length -----------------------------------------------------------------------


def test_fix_length_centre_crop_and_centre_pad():
    x = torch.arange(1.0, 6.0)  # [1, 2, 3, 4, 5]
    assert fix_length(x, 3).tolist() == [2, 3, 4]
    assert fix_length(x, 8).tolist() == [0, 1, 2, 3, 4, 5, 0, 0]
    assert fix_length(x, 5) is x


def test_fix_length_repeat_tiles_around_the_centred_clip():
    x = torch.tensor([1.0, 2.0, 3.0])
    assert fix_length(x, 7, mode="repeat").tolist() == [2, 3, 1, 2, 3, 1, 2]


def test_fix_length_random_is_replayable_and_covers_all_offsets():
    x = torch.arange(10.0)
    draws = [fix_length(x, 4, random=True, generator=torch.Generator().manual_seed(s)) for s in range(60)]
    again = [fix_length(x, 4, random=True, generator=torch.Generator().manual_seed(s)) for s in range(60)]
    assert all(torch.equal(a, b) for a, b in zip(draws, again))
    starts = {int(d[0]) for d in draws}
    assert starts == set(range(7))  # every crop that fits, and nothing else
    assert all(torch.equal(d, torch.arange(d[0], d[0] + 4)) for d in draws)


def test_fix_length_random_pad_keeps_the_whole_clip():
    x = torch.tensor([1.0, 2.0])
    g = torch.Generator().manual_seed(1)
    for _ in range(10):
        y = fix_length(x, 5, random=True, generator=g)
        start = int(torch.nonzero(y)[0])
        assert y[start:start + 2].tolist() == [1, 2] and float(y.sum()) == 3


def test_fix_length_works_on_the_last_dim_of_a_batch():
    x = torch.arange(12.0).reshape(2, 6)
    assert fix_length(x, 2).tolist() == [[2, 3], [8, 9]]


@pytest.mark.parametrize("kwargs, message", [({"n": 0}, "positive"), ({"n": 3, "mode": "reflect"}, "'zeros' or 'repeat'")])
def test_fix_length_rejects_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        fix_length(torch.zeros(4), **kwargs)
