import json
import re
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


@pytest.mark.parametrize("declared, readable", [(26000, True), (32000, False)])
def test_an_mp3_frame_count_is_an_estimate_as_load_audio_allows(tmp_path, monkeypatch, declared, readable):
    """24000 frames decode: an MP3 header's estimate of 26000 is within load_audio's 10%, so
    the file is scored (the missing end padded); 32000 is not, so it is truncated."""
    path = tmp_path / "x.wav"
    sf.write(path, np.full(3 * SR, 0.5, dtype=np.float32), SR)
    real_info = sf.info

    def mp3_estimate(file):
        info = real_info(file)
        info.frames, info.format = declared, "MP3"
        return info

    monkeypatch.setattr(sf, "info", mp3_estimate)
    [result] = predictor().predict([path])
    if readable:
        assert result.error is None and result.top[0][0] == "loud"
    else:
        assert "truncated file: the header declares 32000 samples, decoding stopped at 24000" in result.error


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


# ---------------------------------------------------------------- saved TTA shifts, bad arrays


def test_the_saved_tta_shifts_are_used_and_scaled_to_the_window():
    p = predictor(tta_shifts=[0, 300, -700])  # not what tta_shifts(3, ...) would rebuild
    assert p.shifts_for(SR) == [0, 300, -700]
    assert p.shifts_for(2 * SR) == [0, 600, -1400]  # the same fractions of a window twice as long
    calls = []
    original = p.models[0].forward
    p.models[0].forward = lambda x: calls.append(x.clone()) or original(x)
    x = torch.linspace(-1, 1, SR)
    p.predict_batch(x[None])
    [views] = calls  # one forward over (views x batch)
    for view, s in zip(views, [0, 300, -700]):
        assert torch.equal(view, torch.roll(x, s))


def test_bad_waveforms_are_per_item_errors_and_frames_channels_is_named():
    good = np.full(SR, 0.5, dtype=np.float32)
    frames_channels = np.stack([good, good], axis=1)  # (N, 2): soundfile's layout, not (C, N)
    results = predictor().predict([np.zeros(0, dtype=np.float32), good, frames_channels])
    assert "N > 0" in results[0].error
    assert results[1].error is None and results[1].top[0][0] == "loud"
    assert "(channels, frames)" in results[2].error and "(8000, 2)" in results[2].error
    for rate in (0, -5, 16000.5):
        [r] = predictor().predict([good], sample_rate=rate)
        assert r.error == f"sample_rate must be an integer in (0, 1000000] Hz ({rate} given)"


# ---------------------------------------------------------------- a real (untrained) bundle

TINY_CFG = {"audio": {"sample_rate": SR, "clip_seconds": 0.5},
            "features": {"n_fft": 256, "hop_length": 80, "n_mels": 32},
            "model": {"backbone": "test_resnet", "drop_rate": 0.0}}
LABELS = ["low", "mid", "high"]


def save_fold(folder, name, labels=LABELS, **audio):
    from audioclf.checkpoint import save_checkpoint
    from audioclf.config import RunConfig
    from audioclf.model import build_model

    cfg = RunConfig.from_dict({**TINY_CFG, "audio": {**TINY_CFG["audio"], **audio}})
    save_checkpoint(build_model(cfg, len(labels)), folder / name, cfg, labels)


@pytest.fixture(scope="module")
def tiny_bundle(tmp_path_factory):
    """Two untrained test_resnet fold models and a hand-written config.json: a bundle in < 1 s."""
    folder = tmp_path_factory.mktemp("bundle")
    for k in range(2):
        save_fold(folder, f"fold-{k}")
    config = {"format_version": FORMAT_VERSION, "labels": LABELS, "sample_rate": SR, "clip_samples": SR // 2,
              "pad_mode": "zeros", "ensemble": {"rule": "geometric", "tta_shifts": [0, 120, -120],
                                                "tta_mode": "circular"},
              "folds": ["fold-0.safetensors", "fold-1.safetensors"]}
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def copy_bundle(bundle, dest, **changes):
    import shutil

    shutil.copytree(bundle, dest)
    config = json.loads((dest / "config.json").read_text())
    for key, value in changes.items():
        section, _, field = key.partition("__")
        (config[section] if field else config)[field or section] = value
    (dest / "config.json").write_text(json.dumps(config))
    return dest


def test_from_bundle_uses_its_saved_shifts(tiny_bundle):
    p = Predictor.from_bundle(tiny_bundle, device="cpu")
    assert p.tta_shifts == [0, 120, -120] and p.rule == "geometric" and len(p.models) == 2


@pytest.mark.parametrize("change, field", [
    ({"ensemble__rule": "median"}, "ensemble.rule"),
    ({"ensemble__tta_mode": "mirror"}, "ensemble.tta_mode"),
    ({"ensemble__tta_shifts": []}, "ensemble.tta_shifts"),
    ({"ensemble__tta_shifts": [0, 4000]}, "ensemble.tta_shifts"),  # a whole clip
    ({"pad_mode": "reflect"}, "pad_mode"),
    ({"clip_samples": 0}, "clip_samples"),
    ({"clip_samples": 2.5}, "clip_samples"),
    ({"sample_rate": -8000}, "sample_rate"),
    ({"sample_rate": "8k"}, "sample_rate"),
    ({"labels": "ab"}, "labels"),
    ({"folds": []}, "folds"),
    ({"ensemble": "geometric"}, "ensemble"),
])
def test_bad_config_values_are_named_when_the_bundle_is_read(tiny_bundle, tmp_path, change, field):
    bad = copy_bundle(tiny_bundle, tmp_path / "bad", **change)
    with pytest.raises(BundleError, match=rf"config\.json: field '{field}' must be"):
        read_bundle(bad)


@pytest.mark.parametrize("labels, audio, field", [
    (["low", "high"], {}, "label_names"),              # a fold of a 2-class run: other K
    (["low", "high", "mid"], {}, "label_names"),       # same K, other order
    (LABELS, {"sample_rate": 16000}, "sample_rate"),
    (LABELS, {"clip_seconds": 0.25}, "clip_samples"),
])
def test_a_fold_file_of_another_run_is_named(tiny_bundle, tmp_path, labels, audio, field):
    from audioclf.bundle import load_models

    mixed = copy_bundle(tiny_bundle, tmp_path / "mixed")
    save_fold(mixed, "fold-1", labels, **audio)
    with pytest.raises(BundleError, match=rf"fold-1\.json: field '{field}' is .* config\.json says"):
        load_models(read_bundle(mixed))


# ---------------------------------------------------------------- the CLI, in-process


def cli(capsys, *args):
    from audioclf.cli import main

    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    """A short clip (one window) and a 2 s stereo 16 kHz clip (sliding windows)."""
    folder = tmp_path_factory.mktemp("clips")
    t = np.arange(16000) / 16000
    mono = np.concatenate([np.sin(2 * np.pi * 440 * t), np.random.default_rng(0).uniform(-1, 1, 16000)])
    sf.write(folder / "long.wav", np.stack([mono, 0.5 * mono], axis=1).astype(np.float32), 16000)
    sf.write(folder / "short.wav", (0.3 * np.sin(2 * np.pi * 300 * np.arange(3000) / SR)).astype(np.float32), SR)
    return folder


def test_cli_text_output_lists_top_labels_and_windows(tiny_bundle, clips, capsys):
    code, out, err = cli(capsys, "predict", clips / "short.wav", clips / "long.wav", "--bundle", tiny_bundle,
                         "--top-k", 2, "--device", "cpu")
    assert code == 0, err
    lines = out.splitlines()
    assert re.fullmatch(rf"{re.escape(str(clips / 'short.wav'))}: (\w+) \([01]\.\d{{3}}\), (\w+) \([01]\.\d{{3}}\)", lines[0])
    # 2 s at a 0.5 s window and 0.25 s hop: 7 windows, one line each after the clip's line.
    assert lines[1].startswith(f"{clips / 'long.wav'} [2.00 s, 7 windows]: ")
    assert [line.split(":")[0] for line in lines[2:]] == [f"  {s / 4:.2f}-{s / 4 + 0.5:.2f} s" for s in range(7)]


def test_cli_csv_has_a_row_per_file_and_window_and_names_errors(tiny_bundle, clips, capsys, tmp_path):
    import csv
    import io

    code, out, err = cli(capsys, "predict", clips / "long.wav", tmp_path / "missing.wav", "--bundle", tiny_bundle,
                         "--csv", "--top-k", 3, "--device", "cpu")
    assert code == 1 and "missing.wav: no such file" in err
    rows = list(csv.DictReader(io.StringIO(out)))
    assert list(rows[0]) == ["source", "start", "end", "label_1", "prob_1", "label_2", "prob_2", "label_3",
                             "prob_3", "error"]
    clip, windows, missing = rows[0], rows[1:8], rows[8]
    assert clip["start"] == "" and [w["start"] for w in windows] == [f"{s / 4:.3f}" for s in range(7)]
    for r in [clip, *windows]:
        assert sum(float(r[f"prob_{i}"]) for i in (1, 2, 3)) == pytest.approx(1.0, abs=1e-5)
        assert {r["label_1"], r["label_2"], r["label_3"]} == set(LABELS) and r["error"] == ""
    assert missing["source"].endswith("missing.wav") and "no such file" in missing["error"]


def test_cli_geometric_aggregate_is_the_renormalised_geometric_mean_of_windows(tiny_bundle, clips, capsys):
    code, out, _ = cli(capsys, "predict", clips / "long.wav", "--bundle", tiny_bundle, "--json",
                       "--aggregate", "geometric", "--device", "cpu")
    assert code == 0
    [result] = json.loads(out)
    windows = np.array([w["probs"] for w in result["windows"]])  # (W, K)
    expected = np.exp(np.log(windows).mean(axis=0))
    expected /= expected.sum()
    np.testing.assert_allclose([result["probs"][name] for name in LABELS], expected, rtol=1e-6)
    assert not np.allclose(expected, windows.mean(axis=0), rtol=1e-6, atol=0)  # not the arithmetic default


@pytest.mark.parametrize("option, message", [
    (["--window", "0.001"], "--window must be at least 16 samples"),
    (["--hop", "0.00001"], "--hop must be at least one sample"),
    (["--window", "nan"], "--window must be a positive number of seconds"),
    (["--batch-size", "0"], "--batch-size must be >= 1"),
])
def test_cli_window_hop_and_batch_size_are_checked_in_one_line(tiny_bundle, clips, capsys, option, message):
    code, out, err = cli(capsys, "predict", clips / "short.wav", "--bundle", tiny_bundle, *option)
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and message in err and "Traceback" not in err


def test_cli_evaluate_reports_unreadable_files_scores_the_rest_and_exits_1(tiny_bundle, clips, capsys, tmp_path,
                                                                          monkeypatch):
    import csv

    from audioclf.data import WaveformCache

    def whole_files_in_memory(self):
        raise AssertionError("evaluate must stream files through the Predictor, not decode them whole")

    monkeypatch.setattr(WaveformCache, "build", whole_files_in_memory)
    (tmp_path / "broken.wav").write_text("not audio")
    manifest = tmp_path / "m.csv"
    manifest.write_text(f"path,label\n{clips / 'short.wav'},low\n{clips / 'long.wav'},mid\n"
                        f"{tmp_path / 'gone.wav'},high\n{tmp_path / 'broken.wav'},low\n")
    code, out, err = cli(capsys, "evaluate", tiny_bundle, "--manifest", manifest, "--out", tmp_path / "eval",
                         "--device", "cpu")
    assert code == 1
    assert "gone.wav: no such file" in err and "broken.wav: cannot decode" in err
    assert "2 clips: accuracy" in out and "2 file(s) could not be read" in out
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    assert report["n_clips"] == 2 and report["n_failed"] == 2
    assert [f["path"] for f in report["failed"]] == [str(tmp_path / "gone.wav"), str(tmp_path / "broken.wav")]
    assert np.array(report["confusion_matrix"]).sum() == 2
    # The long clip is scored as `audioclf predict` scores it: the mean of its 0.5 s windows
    # every 0.25 s (each window: the fold models x TTA views), not one centre crop.
    from audioclf.audio import load_audio

    with open(tmp_path / "eval" / "predictions.csv") as f:
        rows = list(csv.DictReader(f))
    scored = np.array([float(rows[1][f"p_{n}"]) for n in LABELS])
    p = Predictor.from_bundle(tiny_bundle, device="cpu")
    wave, _ = load_audio(clips / "long.wav", SR)  # 2 s, mixed to mono, at the bundle's rate
    win = SR // 2
    windows = torch.stack([wave[s:s + win] for s in window_starts(len(wave), win, win // 2)])  # (7, win)
    np.testing.assert_allclose(scored, p.predict_batch(windows).mean(axis=0), rtol=0, atol=1e-5)
    centre = p.predict_batch(fix_length(wave, win)[None])[0]
    assert np.abs(scored - centre).max() > 1e-3
    assert rows[2]["predicted"] == "" and "no such file" in rows[2]["error"]
    md = (tmp_path / "eval" / "report.md").read_text()
    assert "2 file(s) could not be read" in md and "sliding windows" in md
    assert (tmp_path / "eval" / "confusion.png").is_file()
