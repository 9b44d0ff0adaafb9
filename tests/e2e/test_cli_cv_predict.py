"""End to end through the real command line: `audioclf cv` on an FSDD slice, then `audioclf predict`."""

import json
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf

from synth import write_fsdd_slice

CLI = [sys.executable, "-m", "audioclf"]


def audioclf(*args, timeout=300):
    return subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def fsdd_bundle(fsdd_dir, tmp_path_factory):
    """A 3-fold speaker-grouped CV of 30 clips (3 speakers x 10 digits x 1 take), 1 epoch."""
    tmp = tmp_path_factory.mktemp("e2e")
    manifest = write_fsdd_slice(fsdd_dir, tmp / "slice.csv", speakers=["george", "jackson", "lucas"], takes=range(1))
    out = tmp / "run"
    config = tmp / "quick.toml"
    config.write_text("[train]\nwarmup_epochs = 0\n")  # 1 epoch: no warm-up (no CLI flag for it)
    done = audioclf("cv", "--manifest", manifest, "--data-root", fsdd_dir, "--out", out, "--k", 3, "--config", config,
                    "--backbone", "test_resnet", "--epochs", 1, "--batch-size", 16, "--sample-rate", 8000,
                    "--clip-seconds", 0.8, "--n-fft", 256, "--hop-length", 80, "--n-mels", 32, "--no-swa",
                    "--mixup-alpha", 0, "--device", "cpu", "--tta-shifts", 3)
    assert done.returncode == 0, done.stderr
    return out, done.stdout


def test_cv_writes_a_complete_bundle(fsdd_bundle):
    out, stdout = fsdd_bundle
    bundle = out / "bundle"
    assert "out-of-fold" in stdout and str(bundle) in stdout
    names = {p.name for p in bundle.iterdir()}
    assert {"config.json", "report.json", "report.md", "oof.csv", "confusion.png", "fold_scores.png",
            "curves.png"} <= names
    assert {f"fold-{k}.safetensors" for k in range(3)} <= names
    config = json.loads((bundle / "config.json").read_text())
    assert config["labels"] == [str(d) for d in range(10)]
    assert config["ensemble"]["rule"] in ("arithmetic", "geometric")
    report = json.loads((bundle / "report.json").read_text())
    assert report["n_clips"] == 30 and len(report["folds"]) == 3


def test_predict_json_gives_normalised_probabilities(fsdd_bundle, fsdd_dir, tmp_path):
    out, _ = fsdd_bundle
    short = fsdd_dir / "recordings" / "7_nicolas_10.wav"  # a speaker the bundle never heard
    stereo = tmp_path / "long_stereo_44k.wav"  # 3 s, two channels, another rate: sliding windows
    mono, rate = sf.read(short, dtype="float32")
    clip = np.tile(mono, int(np.ceil(3 * rate / len(mono))))[: 3 * rate]
    import soxr

    sf.write(stereo, np.stack([soxr.resample(clip, rate, 44100)] * 2, axis=1), 44100)
    done = audioclf("predict", short, stereo, tmp_path / "missing.wav", "--bundle", out, "--json", "--top-k", 2)
    assert done.returncode == 1  # the missing file
    assert "missing.wav" in done.stderr
    results = json.loads(done.stdout)
    assert [r["source"] for r in results] == [str(short), str(stereo), str(tmp_path / "missing.wav")]
    for r in results[:2]:
        assert sum(r["probs"].values()) == pytest.approx(1.0, abs=1e-6)
        assert len(r["top"]) == 2 and r["top"][0]["prob"] >= r["top"][1]["prob"]
        assert set(r["probs"]) == {str(d) for d in range(10)}
    assert results[0]["windows"] == []
    windows = results[1]["windows"]
    assert len(windows) >= 6 and windows[-1]["end"] == pytest.approx(results[1]["duration"], abs=1e-3)
    for w in windows:
        assert sum(w["probs"]) == pytest.approx(1.0, abs=1e-6)
    assert "error" in results[2]


def test_predict_names_an_incomplete_bundle(fsdd_bundle, tmp_path, fsdd_dir):
    import shutil

    out, _ = fsdd_bundle
    broken = tmp_path / "broken"
    shutil.copytree(out / "bundle", broken)
    (broken / "fold-1.safetensors").unlink()
    done = audioclf("predict", fsdd_dir / "recordings" / "0_george_0.wav", "--bundle", broken)
    assert done.returncode == 2
    assert "fold-1.safetensors" in done.stderr and "Traceback" not in done.stderr


def test_a_refused_cv_leaves_the_run_mergeable_and_commands_are_quoted(fsdd_bundle, fsdd_dir, tmp_path):
    import shlex
    import shutil

    out, _ = fsdd_bundle
    run = tmp_path / "run copy"  # a space: the recorded command must stay one argument
    shutil.copytree(out, run)
    before = (run / "folds.csv").read_bytes()
    manifest = shlex.split(json.loads((run / "bundle" / "report.json").read_text())["command"])
    manifest = manifest[manifest.index("--manifest") + 1]
    done = audioclf("cv", "--manifest", manifest, "--data-root", fsdd_dir, "--out", run, "--k", 3, "--seed", 1,
                    "--backbone", "test_resnet")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    [error] = [line for line in done.stderr.splitlines() if line.startswith("audioclf cv: error:")]
    assert "use --overwrite to replace that run" in error
    assert (run / "folds.csv").read_bytes() == before
    merged = audioclf("cv-merge", run)
    assert merged.returncode == 0, merged.stderr
    report = json.loads((run / "bundle" / "report.json").read_text())
    assert shlex.split(report["command"]) == ["audioclf", "cv-merge", str(run)]
    assert report["n_clips"] == 30 and set(report["fold_commands"]) == {"0", "1", "2"}
