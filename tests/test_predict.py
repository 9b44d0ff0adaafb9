import json
import tracemalloc

import numpy as np
import pytest
import soundfile as sf
import torch

from audioclf.audio import fix_length, resample
from audioclf.bundle import FORMAT_VERSION, read_bundle
from audioclf.errors import BundleError
from audioclf.predict import Predictor, _FileReader, window_starts

SR = 8000


class Loudness(torch.nn.Module):
    """A stand-in model: class 1 ("loud") when the RMS is above 0.1. Counts batch sizes."""

    def __init__(self):
        super().__init__()
        self.batch_sizes = []

    def forward(self, x):  # (B, N) -> (B, 2)
        self.batch_sizes.append(x.shape[0])
        rms = x.pow(2).mean(-1).sqrt()
        return torch.stack([torch.zeros_like(rms), 50 * (rms - 0.1)], dim=-1)


def predictor(**kw):
    args = dict(models=[Loudness()], labels=["quiet", "loud"], sample_rate=SR, clip_samples=SR)
    args.update(kw)
    return Predictor(**args)


def test_window_starts_cover_the_clip_and_end_at_its_end():
    assert window_starts(10, 4, 2) == [0, 2, 4, 6]
    assert window_starts(11, 4, 2) == [0, 2, 4, 6, 7]
    assert window_starts(3, 4, 2) == [0]


def test_short_clip_is_padded_like_training():
    p = predictor(pad_mode="repeat")
    x = torch.full((SR // 4,), 0.5)
    [result] = p.predict([x])
    expected = p.predict_batch(fix_length(x, SR, "repeat")[None])[0]
    np.testing.assert_allclose(result.probs, expected)
    assert result.top[0][0] == "loud" and result.windows == []


def test_long_clip_gets_windows_with_timestamps_and_a_mean():
    x = torch.cat([torch.full((2 * SR,), 0.5), torch.zeros(2 * SR)])  # 2 s loud, 2 s silence
    [result] = predictor().predict([x], window=1.0, hop=0.5)
    assert [(w.start, w.end) for w in result.windows] == [(s / 2, s / 2 + 1) for s in range(7)]
    labels = [int(np.argmax(w.probs)) for w in result.windows]
    assert labels[:3] == [1, 1, 1] and labels[-2:] == [0, 0]
    np.testing.assert_allclose(result.probs, np.mean([w.probs for w in result.windows], axis=0))
    assert result.probs.sum() == pytest.approx(1.0)
    assert result.duration == 4.0


def test_any_rate_and_channels_are_accepted():
    stereo = np.stack([np.full(16000, 0.5), np.full(16000, 0.3)]).astype(np.float32)  # 1 s at 16 kHz
    [result] = predictor().predict([stereo], sample_rate=16000)
    assert result.duration == pytest.approx(1.0)
    assert result.top[0][0] == "loud"


def test_bad_files_are_reported_and_the_others_still_predicted(tmp_path):
    good = tmp_path / "good.wav"
    sf.write(good, np.full(SR, 0.5, dtype=np.float32), SR)
    empty = tmp_path / "empty.wav"
    empty.write_bytes(b"")
    text = tmp_path / "notes.wav"
    text.write_text("not audio")
    truncated = tmp_path / "truncated.wav"
    sf.write(truncated, np.full(3 * SR, 0.5, dtype=np.float32), SR, subtype="PCM_16")
    truncated.write_bytes(truncated.read_bytes()[: 44 + 2 * SR])  # header + 1 s of the 3 s it declares
    results = predictor().predict([tmp_path / "missing.wav", good, empty, text, truncated])
    assert "no such file" in results[0].error
    assert results[1].error is None and results[1].top[0][0] == "loud"
    assert "empty file" in results[2].error
    assert "cannot decode" in results[3].error
    assert "truncated" in results[4].error
    assert results[0].to_dict() == {"source": str(tmp_path / "missing.wav"), "error": results[0].error}


def test_streamed_spans_match_whole_file_resampling(tmp_path):
    rate = 11025
    x = (0.3 * np.sin(2 * np.pi * 440 * np.arange(3 * rate) / rate)).astype(np.float32)
    path = tmp_path / "tone.wav"
    sf.write(path, x, rate, subtype="FLOAT")
    reader = _FileReader(path, SR)
    whole = resample(torch.from_numpy(x), rate, SR)
    assert reader.n_samples == len(whole)
    for start, stop in [(0, 800), (5000, 13000), (len(whole) - 900, len(whole))]:
        np.testing.assert_allclose(reader.read(start, stop).numpy(), whole[start:stop].numpy(), atol=2e-4)


def test_long_file_streams_in_bounded_memory(tmp_path, monkeypatch):
    rate, seconds = 16000, 240  # 4 minutes: 15 MB as float32, never decoded at once
    decoded_bytes = 4 * rate * seconds
    path = tmp_path / "long.wav"
    with sf.SoundFile(path, "w", samplerate=rate, channels=1, subtype="PCM_16") as f:
        block = (0.5 * np.sin(np.arange(60 * rate) * 0.3)).astype(np.float32)
        for _ in range(seconds // 60):
            f.write(block)
    reads = []
    original = _FileReader._read_frames
    monkeypatch.setattr(_FileReader, "_read_frames",
                        lambda self, a, b: reads.append(b - a) or original(self, a, b))
    p = predictor(batch_size=8)
    tracemalloc.start()
    [result] = p.predict([path], window=1.0, hop=0.5)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert len(result.windows) == 2 * seconds - 1
    assert max(p.models[0].batch_sizes) <= 8
    # Each read spans one batch of windows (7 hops + 1 window = 4.5 s, plus two 50 ms margins).
    assert max(reads) <= (4.5 + 0.1) * rate + 2 * 2
    assert peak < decoded_bytes / 4, f"peak traced memory {peak / 1e6:.1f} MB"


def write_fake_bundle(folder, **changes):
    folder.mkdir()
    cfg = {"format_version": FORMAT_VERSION, "labels": ["a", "b"], "sample_rate": SR, "clip_samples": SR,
           "pad_mode": "zeros", "ensemble": {"rule": "geometric", "tta_shifts": [0], "tta_mode": "circular"},
           "folds": ["fold-0.safetensors"]}
    cfg.update(changes)
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder


def test_incomplete_bundles_name_what_is_missing(tmp_path):
    with pytest.raises(BundleError, match="config.json: missing"):
        read_bundle(tmp_path)
    with pytest.raises(BundleError, match="fold-0.safetensors: missing"):
        read_bundle(write_fake_bundle(tmp_path / "b1"))
    with pytest.raises(BundleError, match="format_version 99"):
        read_bundle(write_fake_bundle(tmp_path / "b2", format_version=99))
    with pytest.raises(BundleError, match="field 'labels' missing"):
        cfg = write_fake_bundle(tmp_path / "b3")
        data = json.loads((cfg / "config.json").read_text())
        del data["labels"]
        (cfg / "config.json").write_text(json.dumps(data))
        read_bundle(cfg)


def test_command_modules_import_only_the_standard_library():
    import subprocess
    import sys

    code = ("import sys, argparse\n"
            "for name in ('cv', 'cv_merge', 'evaluate', 'predict'):\n"
            "    m = __import__('audioclf.commands.' + name, fromlist=['run'])\n"
            "    m.add_arguments(argparse.ArgumentParser())\n"
            "print(sorted({k.split('.')[0] for k in sys.modules} & {'torch', 'timm', 'numpy', 'soundfile'}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
