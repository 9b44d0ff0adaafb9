"""The benchmark runs on tiny sizes and returns sane rows; the fast LogMel equals the reference."""

from __future__ import annotations

import argparse
import json
import math

import pytest
import torch

from audioclf.bench import (STAGES, BenchRow, BenchSettings, Method, _test_batch, format_table,
                            measure, run_benchmarks)
from audioclf.commands import bench as bench_command
from audioclf.errors import ConfigError
from audioclf.features import LogMel

TINY = BenchSettings(batch_size=3, seconds=0.25, sample_rate=8000, n_fft=256, hop_length=80,
                     n_mels=32, repeats=1, device="cpu")


def test_logmel_rows_are_sane():
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        rows = run_benchmarks(["logmel"], TINY)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)
    assert [r.stage for r in rows] == ["logmel"] * 5
    ref, naive, *others = rows
    assert "librosa" in ref.method and "basis built once" in ref.method
    assert ref.ratio == 1.0 and ref.max_abs_diff is None and "1 thread" in ref.note
    # librosa's own melspectrogram gives the same features as the reference, basis and all
    assert "melspectrogram" in naive.method and naive.max_abs_diff < 1e-3
    for r in [naive, *others]:
        assert r.items == 3 and r.seconds > 0 and math.isfinite(r.throughput)
        assert 0 < r.ratio < math.inf
        assert r.max_abs_diff < 0.05  # dB: every method computes the same features
    assert any("torchaudio" in r.method for r in others)
    assert any("audioclf" in r.method for r in others)
    assert any("one thread" in r.method for r in others)


def test_bench_input_has_dynamics_beyond_top_db():
    # Silent gaps and a level envelope: the top_db floor changes entries of every clip, so
    # the benchmark measures (and compares) the floor too.
    s = BenchSettings(batch_size=4, seconds=1.0, sample_rate=8000, n_fft=256, hop_length=80,
                      n_mels=32, device="cpu")
    x = _test_batch(s)
    assert x.shape == (4, 8000) and x.abs().max() <= 1
    floored = LogMel(8000, n_fft=256, hop_length=80, n_mels=32, top_db=80.0)(x)
    raw = LogMel(8000, n_fft=256, hop_length=80, n_mels=32, top_db=None)(x)
    changed = (floored != raw).flatten(1).float().mean(1)  # (B,)
    assert (changed > 0.05).all()


def test_measure_times_every_method_per_round_and_compares_outputs():
    calls = []
    methods = [Method("ref", lambda: calls.append("ref") or 1.0),
               Method("other", lambda: calls.append("other") or 1.5)]
    rows = measure("stage", methods, items=4, repeats=3, difference=lambda out, ref: out - ref)
    assert calls == ["ref", "other"] * 4  # warm-up, then 3 interleaved rounds
    assert [(r.method, r.items, r.max_abs_diff) for r in rows] == [("ref", 4, None), ("other", 4, 0.5)]
    assert rows[0].ratio == 1.0


def test_table_has_one_line_per_row_and_every_method():
    rows = [BenchRow("logmel", "reference", 2.0, 10), BenchRow("logmel", "fast", 0.5, 10, ratio=4.0,
                                                              max_abs_diff=1e-4)]
    table = format_table(rows).splitlines()
    assert len(table) == 3
    assert "5.0 clips/s" in table[1] and "20.0 clips/s" in table[2] and "4.00" in table[2]


def test_unknown_stage_and_bad_settings_are_config_errors():
    with pytest.raises(ConfigError, match="unknown bench stage 'gpu'.*logmel"):
        run_benchmarks(["gpu"], TINY)
    with pytest.raises(ConfigError, match=r"batch_size must be >= 1 \(0 given\)"):
        BenchSettings(batch_size=0)
    with pytest.raises(ConfigError, match="shorter than n_fft"):
        BenchSettings(seconds=0.01, sample_rate=8000)
    assert set(STAGES) >= {"logmel"}


def test_bench_command_prints_the_table_and_writes_json(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    bench_command.add_arguments(parser)
    out = tmp_path / "bench.json"
    args = parser.parse_args(["--batch-size", "2", "--seconds", "0.2", "--sample-rate", "8000",
                              "--repeats", "1", "--device", "cpu", "--json", str(out)])
    assert bench_command.run(args) == 0
    printed = capsys.readouterr().out
    assert "librosa" in printed and "audioclf LogMel, CPU" in printed
    saved = json.loads(out.read_text())
    assert saved["settings"]["batch_size"] == 2 and len(saved["rows"]) >= 3
    assert [r["method"] for r in saved["rows"]][:4] == [
        "librosa, clip by clip, mel basis built once (reference)",
        "librosa melspectrogram, clip by clip (rebuilds the mel basis per clip)",
        "torchaudio MelSpectrogram + AmplitudeToDB, batched", "audioclf LogMel, CPU"]


@pytest.mark.parametrize("power", [1.0, 2.0])
def test_fast_logmel_equals_plain_torchaudio(power):
    # The reference computation: torchaudio's dense STFT -> |X|^power -> dense mel -> dB.
    import torchaudio

    torch.manual_seed(0)
    sr = 16000
    x = torch.randn(5, sr) * torch.logspace(-3, 0, 5)[:, None]  # levels 60 dB apart
    logmel = LogMel(sr, n_fft=512, hop_length=160, n_mels=64, power=power, top_db=80.0)
    mel = torchaudio.transforms.MelSpectrogram(sr, n_fft=512, hop_length=160, n_mels=64, power=power,
                                               norm="slaney", mel_scale="slaney", pad_mode="constant")
    # AmplitudeToDB("power") takes 10 log10 whatever the exponent, like LogMel and power_to_db.
    reference = torchaudio.transforms.AmplitudeToDB("power", top_db=80.0)(mel(x[:, None]))
    torch.testing.assert_close(logmel(x), reference, atol=2e-3, rtol=0)


@pytest.mark.cuda
def test_cuda_rows_say_whether_they_include_the_copy():
    settings = BenchSettings(batch_size=2, seconds=0.25, sample_rate=8000, n_fft=256, hop_length=80,
                             n_mels=32, repeats=1, device="cuda")
    cuda = [r for r in run_benchmarks(["logmel"], settings) if "CUDA" in r.method]
    assert len(cuda) == 2 and all(r.max_abs_diff < 0.05 for r in cuda)
    assert "excludes the host->device copy" in cuda[0].note and "with the host->device copy" in cuda[1].method


def test_bench_command_module_imports_no_heavy_package():
    import subprocess
    import sys

    code = "import sys, audioclf.commands.bench; print(sorted({'torch', 'librosa'} & set(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
