"""recipes/*.py end to end on tiny official-layout fixtures, and the recipe's bad-input messages.

Each dataset's quick run happens once per module (a fixture) and several tests read what it
left: the bundle, the headline it printed, and the split files the run recorded. FSDD runs
through its script in a subprocess, the others in-process through ``audioclf.recipe.main``.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import shlex
import subprocess
import sys
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import numpy as np
import pytest

import layout_fixtures as fx
from audioclf import recipe
from audioclf.errors import ConfigError
from audioclf.manifest import Manifest, Record

REPO = Path(__file__).resolve().parents[1]
QUICK = ["--quick", "--backbone", "test_resnet", "--preset", "cpu"]


def run_main(name: str, argv: list[str]) -> tuple[int, str, str]:
    """``recipes/<name>.py argv`` in this process: (exit status, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = recipe.main(REPO / "recipes" / f"{name}.toml", argv)
    return code, out.getvalue(), err.getvalue()


def quick_run(tmp_path_factory, name: str, write) -> dict:
    """Write the fixture, run the recipe's quick path on it; what a test needs to check it."""
    base = tmp_path_factory.mktemp(name)
    data, out = write(base / "data"), base / "out"
    argv = ["--data-dir", str(data), "--out", str(out), "--cache-dir", str(base / "cache"), *QUICK]
    code, stdout, stderr = run_main(name, argv)
    assert code == 0, stderr[-3000:]
    return {"data": data, "out": out, "stdout": stdout, "argv": argv, "name": name}


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def fold_arrays(out: Path, fold: int) -> dict[str, np.ndarray]:
    return dict(np.load(out / f"fold-{fold}" / "predictions.npz"))


def check_bundle_and_headline(run: dict, n_folds: int) -> dict:
    """The bundle holds exactly ``n_folds`` fold models; the headline's numbers are the report's."""
    bundle, stdout = run["out"] / "bundle", run["stdout"]
    config = json.loads((bundle / "config.json").read_text())
    assert config["folds"] == [f"fold-{k}.safetensors" for k in range(n_folds)]
    assert sorted(p.name for p in bundle.glob("fold-*")) == sorted(
        f"fold-{k}{s}" for k in range(n_folds) for s in (".json", ".safetensors"))
    report = json.loads((bundle / "report.json").read_text())
    single = report["oof"]["single"]
    if report["protocol"] == "k-fold":
        assert (f"accuracy {single['mean']['accuracy']:.4f} ± {single['std']['accuracy']:.4f}, "
                f"macro-F1 {single['mean']['macro_f1']:.4f} ± {single['std']['macro_f1']:.4f} "
                f"(mean ± sample std over {n_folds} folds)") in stdout
    else:
        assert f"accuracy {single['mean']['accuracy']:.4f}, macro-F1 {single['mean']['macro_f1']:.4f}" in stdout
    assert stdout.rstrip().splitlines()[-1] == f"bundle: {bundle}"
    md = (bundle / "report.md").read_text()
    assert shlex.join(["python", str(REPO / "recipes" / f"{run['name']}.py"), *run["argv"]]) in md
    assert report["versions"]["torch"] in md
    return report


# --- ESC-50 and UrbanSound8K: the official folds -----------------------------------------


@pytest.fixture(scope="module")
def esc50_run(tmp_path_factory):
    return quick_run(tmp_path_factory, "esc50", fx.write_esc50)


@pytest.fixture(scope="module")
def us8k_run(tmp_path_factory):
    return quick_run(tmp_path_factory, "urbansound8k", fx.write_urbansound8k)


def check_whole_official_folds(rows: list[dict], official_of, n_official: int, k: int) -> None:
    """Every official fold is kept whole inside one of the ``k`` folds, and all are used."""
    joined: dict[int, set[int]] = {}
    for row in rows:
        joined.setdefault(official_of(row["path"]), set()).add(int(row["fold"]))
    assert sorted(joined) == list(range(1, n_official + 1))
    assert all(len(folds) == 1 for folds in joined.values())  # no official fold is split
    assert {f for folds in joined.values() for f in folds} == set(range(k))


def test_esc50_quick_keeps_the_five_official_folds_whole(esc50_run):
    report = check_bundle_and_headline(esc50_run, n_folds=2)
    rows = read_csv(esc50_run["out"] / "folds.csv")
    check_whole_official_folds(rows, lambda p: int(Path(p).name.split("-")[0]), 5, 2)
    # The two takes of one source recording (one group) stay in one fold.
    takes = {row["fold"] for row in rows if row["group"] == "100100"}
    assert len(takes) <= 1
    assert report["ensemble_test"] is None and "ensemble: not scored" in esc50_run["stdout"]


def test_urbansound8k_quick_keeps_the_ten_official_folds_whole(us8k_run):
    check_bundle_and_headline(us8k_run, n_folds=2)
    rows = read_csv(us8k_run["out"] / "folds.csv")
    check_whole_official_folds(rows, lambda p: int(re.match(r"audio/fold(\d+)/", p)[1]), 10, 2)


def test_official_folds_are_held_out_once_and_never_selected_on(us8k_run):
    rows = read_csv(us8k_run["out"] / "folds.csv")
    for fold in (0, 1):
        arrays = fold_arrays(us8k_run["out"], fold)
        assert {int(rows[i]["fold"]) for i in arrays["heldout_idx"]} == {fold}
        assert {int(rows[i]["fold"]) for i in arrays["val_idx"]} == {1 - fold}


# --- Speech Commands: the official split ---------------------------------------------------


@pytest.fixture(scope="module")
def sc_run(tmp_path_factory):
    return quick_run(tmp_path_factory, "speechcommands", fx.write_speechcommands)


def test_speechcommands_scores_the_official_test_list_and_selects_on_validation(sc_run):
    report = check_bundle_and_headline(sc_run, n_folds=1)
    data, out = sc_run["data"], sc_run["out"]
    rows = read_csv(out / "folds.csv")
    testing = set((data / "testing_list.txt").read_text().split())
    validation = set((data / "validation_list.txt").read_text().split())
    arrays = fold_arrays(out, 0)
    assert {rows[i]["path"] for i in arrays["heldout_idx"]} == testing
    assert {rows[i]["path"] for i in arrays["val_idx"]} == validation
    # Training used the rest: no test or validation clip, no background noise.
    n_train = sum(r["path"] not in testing | validation for r in rows)
    assert report["folds"][0]["n_fit"] == n_train == len(rows) - len(testing) - len(validation)
    assert not any(r["path"].startswith("_background_noise_") for r in rows)
    assert "model on the official test split (no TTA)" in sc_run["stdout"]


# --- GTZAN: stratified K-fold --------------------------------------------------------------


@pytest.fixture(scope="module")
def gtzan_run(tmp_path_factory):
    return quick_run(tmp_path_factory, "gtzan", fx.write_gtzan)


def test_gtzan_quick_is_stratified_two_fold(gtzan_run):
    check_bundle_and_headline(gtzan_run, n_folds=2)
    rows = read_csv(gtzan_run["out"] / "folds.csv")
    per_fold = {(r["label"], r["fold"]) for r in rows}
    assert per_fold == {(g, f) for g in fx.GTZAN_GENRES for f in ("0", "1")}  # every genre in both folds
    assert len(rows) == 4 * len(fx.GTZAN_GENRES)


# --- FSDD: the script itself, in a subprocess, on a real slice ---------------------------


@pytest.fixture(scope="module")
def fsdd_run(tmp_path_factory, fsdd_dir):
    base = tmp_path_factory.mktemp("fsdd")
    data = fx.write_fsdd_slice(fsdd_dir, base / "data")
    out = base / "out"
    argv = ["--data-dir", str(data), "--out", str(out), "--cache-dir", str(base / "cache"),
            "--quick", "--backbone", "test_resnet", "--preset", "cpu"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, str(REPO / "recipes" / "fsdd.py"), *argv], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {"data": data, "out": out, "stdout": proc.stdout, "argv": argv, "name": "fsdd"}


def test_fsdd_script_writes_the_bundle_and_the_ensemble_headline(fsdd_run):
    report = check_bundle_and_headline(fsdd_run, n_folds=2)
    test = report["ensemble_test"]
    chosen = test["chosen"]
    assert chosen == ("tta-" if len(report["selection"]["tta_shifts"]) > 1 else "") + report["selection"]["rule"]
    scores = test["scores"][chosen]
    assert f"ensemble of 2 models on {test['n_clips']} held-out test clips" in fsdd_run["stdout"]
    assert (f"accuracy {scores['accuracy']:.4f}, macro-F1 {scores['macro_f1']:.4f}") in fsdd_run["stdout"]
    for key, other in test["scores"].items():  # every rule is reported on the same clips
        assert f"{other['accuracy']:.4f}" in fsdd_run["stdout"], key
    assert (fsdd_run["out"] / "bundle" / "confusion.png").stat().st_size > 0


def test_fsdd_holdout_speaker_is_never_trained_or_selected_on(fsdd_run):
    out = fsdd_run["out"]
    speaker = lambda path: Path(path).stem.split("_")[1]  # noqa: E731
    held = {speaker(r["path"]) for r in read_csv(out / "test-clips.csv")}
    rows = read_csv(out / "folds.csv")
    assert len(held) == 1 and not held & {r["group"] for r in rows}
    assert {speaker(r["path"]) for r in rows} == {r["group"] for r in rows}
    for fold in (0, 1):  # speaker-independent folds: selection and held-out speakers differ
        arrays = fold_arrays(out, fold)
        val = {rows[i]["group"] for i in arrays["val_idx"]}
        heldout = {rows[i]["group"] for i in arrays["heldout_idx"]}
        assert val and heldout and not val & heldout and not (val | heldout) & held


# --- the quick slice and joined folds, unit level ------------------------------------------


def _manifest(folds, labels, groups) -> Manifest:
    return Manifest([Record(f"{i}.wav", lab, f, g) for i, (f, lab, g) in enumerate(zip(folds, labels, groups))],
                    "/data")


def test_quick_slice_spreads_every_label_over_the_official_folds():
    folds = [f for f in range(1, 6) for _ in range(4)] * 2  # 5 folds x 4 clips, two labels
    labels = ["a"] * 20 + ["b"] * 20
    m = _manifest(folds, labels, [f"s{i}" for i in range(40)])
    sliced = recipe.quick_slice(m, per_class=5, seed=3)
    for label in "ab":
        assert sorted(r.fold for r in sliced.records if r.label == label) == [1, 2, 3, 4, 5]
    assert recipe.quick_slice(m, 5, seed=3).records == sliced.records  # replayable


def test_join_official_folds_maps_each_official_fold_to_one():
    m = _manifest([1, 2, 3, 4, 5, 5], list("aaabbb"), list("uvwxyz"))
    joined = recipe.join_official_folds(m, 2)
    assert [r.fold for r in joined.records] == [1, 2, 1, 2, 1, 1]
    assert joined.labels == m.labels and [r.group for r in joined.records] == list("uvwxyz")
    with pytest.raises(ConfigError, match=r"cannot join 5 official folds into 6; --k must be in \[2, 5\]"):
        recipe.join_official_folds(m, 6)


# --- bad input ------------------------------------------------------------------------------


def _error(name: str, argv: list[str]) -> str:
    code, stdout, stderr = run_main(name, [*argv, "--preset", "cpu"])
    assert code == 2 and stdout == ""
    lines = [line for line in stderr.splitlines() if line.startswith(f"{name}: error:")]
    assert len(lines) == 1 and "Traceback" not in stderr
    return lines[0]


def test_missing_data_dir(tmp_path):
    msg = _error("esc50", ["--data-dir", str(tmp_path / "nowhere"), "--out", str(tmp_path / "out")])
    assert "nowhere: does not exist; expected ESC-50 in its official layout" in msg
    assert str(tmp_path / "nowhere" / "meta" / "esc50.csv") in msg and "--download" in msg
    assert not (tmp_path / "out").exists()


def test_empty_data_dir(tmp_path):
    (tmp_path / "empty").mkdir()
    msg = _error("urbansound8k", ["--data-dir", str(tmp_path / "empty"), "--out", str(tmp_path / "out")])
    assert "empty: is empty; expected UrbanSound8K" in msg and "metadata/UrbanSound8K.csv" in msg


def test_no_data_dir_and_no_fsdd_copy(tmp_path, monkeypatch):
    monkeypatch.setattr("audioclf.datasets.default_fsdd_dir", lambda: None)
    assert "--data-dir is required for Free Spoken Digit Dataset" in _error("fsdd", ["--out", str(tmp_path)])


@pytest.mark.parametrize("name, layout, expected", [
    ("esc50", fx.write_gtzan, "meta/esc50.csv: not found; expected the official ESC-50 metadata file"),
    ("speechcommands", fx.write_esc50, "validation_list.txt: not found; expected the official validation_list"),
    ("gtzan", fx.write_speechcommands, "expected genres_original/<genre>/<genre>.000NN.wav"),
    ("fsdd", fx.write_gtzan, "recordings: not found; expected recordings/"),
])
def test_wrong_layout_names_what_was_expected(tmp_path, name, layout, expected):
    layout(tmp_path / "data")
    assert expected in _error(name, ["--data-dir", str(tmp_path / "data"), "--out", str(tmp_path / "out")])


def test_missing_files_are_counted_and_the_first_named(tmp_path):
    data = fx.write_esc50(tmp_path / "data")
    rows = read_csv(data / "meta" / "esc50.csv")
    gone = [rows[i]["filename"] for i in (2, 5, 7)]
    for name in gone:
        (data / "audio" / name).unlink()
    msg = _error("esc50", ["--data-dir", str(data), "--out", str(tmp_path / "out")])
    assert f"3 of {len(rows)} files listed in meta/esc50.csv are missing: {', '.join(gone)}" in msg


def test_k_does_not_apply_to_official_folds_outside_quick(tmp_path):
    msg = _error("esc50", ["--data-dir", str(tmp_path), "--k", "3"])
    assert "--k does not apply to esc50: it is evaluated on its official folds" in msg


def test_download_never_replaces_an_existing_copy(tmp_path, monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("a download was attempted")

    monkeypatch.setattr("urllib.request.urlopen", no_network)
    data = fx.write_gtzan(tmp_path / "data")  # present, but not ESC-50
    before = sorted(p.relative_to(data) for p in data.rglob("*"))
    msg = _error("esc50", ["--data-dir", str(data), "--download", "--out", str(tmp_path / "out")])
    assert "meta/esc50.csv: not found" in msg
    assert sorted(p.relative_to(data) for p in data.rglob("*")) == before


def test_url_without_download(tmp_path):
    msg = _error("gtzan", ["--data-dir", str(tmp_path), "--url", "file:///x.zip"])
    assert "--url is the address to --download from; pass --download with it" in msg


def test_settings_come_from_the_preset_then_quick_then_the_options():
    spec, presets, quick = recipe.load_recipe(REPO / "recipes" / "esc50.toml")
    argv = ["--preset", "gpu", "--quick", "--backbone", "test_resnet", "--pretrained", "none", "--seed", "7"]
    cfg = recipe._run_config(spec, presets, quick, recipe._parser(spec, "").parse_args(argv))
    assert cfg.audio.sample_rate == presets["gpu"]["audio"]["sample_rate"]  # preset
    assert cfg.audio.clip_seconds == quick["audio"]["clip_seconds"] != presets["gpu"]["audio"]["clip_seconds"]
    assert (cfg.train.epochs, cfg.cv.k) == (spec.quick_epochs, spec.quick_k)  # [quick]
    assert (cfg.model.backbone, cfg.model.pretrained) == ("test_resnet", None)  # options
    assert cfg.train.seed == cfg.cv.seed == 7


def test_data_dir_that_is_a_file(tmp_path):
    (tmp_path / "gtzan.zip").write_bytes(b"PK")
    msg = _error("gtzan", ["--data-dir", str(tmp_path / "gtzan.zip")])
    assert "gtzan.zip: is not a folder; expected GTZAN genre collection in its official layout" in msg
    assert "Download it by hand from http://marsyas.info" in msg and "--download" not in msg


def test_demo_clip_prints_a_held_out_path_and_its_true_label(tmp_path):
    (tmp_path / "recipe.json").write_text(json.dumps({"data_dir": str(tmp_path / "fsdd")}))
    (tmp_path / "test-clips.csv").write_text("path,label\nrecordings/3_theo_0.wav,3\nrecordings/7_theo_1.wav,7\n")
    done = subprocess.run([sys.executable, str(REPO / "scripts" / "demo_clip.py"), str(tmp_path)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0
    assert done.stdout == f"{tmp_path / 'fsdd' / 'recordings' / '7_theo_1.wav'}\n"  # what `make demo` captures
    assert "true label: 7" in done.stderr
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "recipe.json").write_text(json.dumps({"data_dir": "x"}))
    (empty / "test-clips.csv").write_text("path,label\n")
    done = subprocess.run([sys.executable, str(REPO / "scripts" / "demo_clip.py"), str(empty)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and done.stdout == "" and "not a finished recipe run" in done.stderr
