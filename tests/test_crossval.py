import csv
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from synth import write_tone_dataset

from audioclf.bundle import merge_folds
from audioclf.config import RunConfig
from audioclf.crossval import assign_folds, inner_split, plan_folds, split_holdout_groups
from audioclf.errors import ManifestError
from audioclf.manifest import Manifest, Record, write_manifest
from audioclf.predict import window_starts


def make_manifest(n_per_label=12, labels=("a", "b", "c"), n_groups=None, folds=None):
    records = []
    for li, label in enumerate(labels):
        for i in range(n_per_label):
            j = li * n_per_label + i
            records.append(Record(f"{label}/{i}.wav", label,
                                  fold=None if folds is None else folds[j],
                                  group=None if n_groups is None else f"g{(i * 7 + li) % n_groups}"))
    return Manifest(records, "/nowhere")


def check_partition(fold_ids, n, k):
    assert fold_ids.shape == (n,)
    assert sorted(set(fold_ids.tolist())) == list(range(k))  # every row in exactly one fold 0..K-1


def test_stratified_folds_cover_every_row_once_and_stratify():
    m = make_manifest(n_per_label=10)
    fold_ids = assign_folds(m, k=5, seed=0)
    check_partition(fold_ids, len(m), 5)
    targets = m.targets()
    for f in range(5):
        # 10 clips per label over 5 folds: exactly 2 of each label in every fold.
        np.testing.assert_array_equal(np.bincount(targets[fold_ids == f], minlength=3), [2, 2, 2])


def test_grouped_folds_never_split_a_group():
    m = make_manifest(n_per_label=12, n_groups=6)
    fold_ids = assign_folds(m, k=3, seed=0)
    check_partition(fold_ids, len(m), 3)
    groups = np.array(m.groups())
    for g in set(groups):
        assert len(set(fold_ids[groups == g])) == 1, f"group {g} spans folds"
    for f in range(3):  # every label still appears in every fold
        assert set(m.targets()[fold_ids == f]) == {0, 1, 2}


def test_seed_changes_folds_and_same_seed_replays():
    m = make_manifest(n_per_label=10)
    a, b, c = assign_folds(m, 5, seed=0), assign_folds(m, 5, seed=0), assign_folds(m, 5, seed=1)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_official_folds_are_used_and_renumbered():
    folds = [1, 3, 5] * 12  # 36 rows, official fold numbers 1, 3, 5
    m = make_manifest(n_per_label=12, folds=folds)
    fold_ids = assign_folds(m, k=5)  # k is ignored: K comes from the data
    np.testing.assert_array_equal(fold_ids, np.searchsorted([1, 3, 5], folds))


def test_too_few_groups_is_a_clear_error():
    with pytest.raises(ManifestError, match="2 groups, fewer than k=3"):
        assign_folds(make_manifest(n_groups=2), k=3)


def test_too_small_class_is_named():
    m = Manifest(make_manifest(n_per_label=6).records + [Record("rare/0.wav", "rare")], "/nowhere")
    with pytest.raises(ManifestError, match="'rare': 1 clips"):
        assign_folds(m, k=5)


def test_single_official_fold_is_refused():
    with pytest.raises(ManifestError, match="single fold"):
        assign_folds(make_manifest(folds=[1] * 36))


def test_inner_split_is_grouped_and_inside_the_training_folds():
    m = make_manifest(n_per_label=12, n_groups=6)
    train = np.arange(24)  # labels a and b only
    fit, val = inner_split(m, train, val_fraction=0.25, seed=0)
    assert set(fit) | set(val) == set(train) and not set(fit) & set(val)
    groups = np.array(m.groups())
    assert not set(groups[fit]) & set(groups[val])
    assert set(m.targets()[val]) == {0, 1}


def test_inner_split_without_groups_adapts_to_small_classes_and_names_a_single_clip():
    m = make_manifest(n_per_label=4)
    rows = np.array([0, 1, 4, 5, 8, 9])  # two clips of each label: at most 2 stratified splits
    fit, val = inner_split(m, rows, val_fraction=0.15, seed=0)
    assert sorted(m.targets()[val].tolist()) == [0, 1, 2]  # one clip per label held out
    with pytest.raises(ManifestError, match="label 'c' has a single clip"):
        inner_split(m, np.array([0, 1, 4, 5, 8]), val_fraction=0.15)


def test_inner_split_without_groups_honours_val_fraction_per_label():
    # One label with 2 clips must not push the other labels' validation share to 50%.
    m = Manifest(make_manifest(n_per_label=40, labels=("b", "c")).records
                 + [Record("a/0.wav", "a"), Record("a/1.wav", "a")], "/nowhere")
    fit, val = inner_split(m, np.arange(len(m)), val_fraction=0.2, seed=3)
    assert set(fit) | set(val) == set(range(len(m))) and not set(fit) & set(val)
    counts = {m.labels.decode(t): n for t, n in zip(*np.unique(m.targets()[val], return_counts=True))}
    assert counts == {"a": 1, "b": 8, "c": 8}  # round(0.2 * 40) each; at least one of the small label
    assert len(val) / len(m) == pytest.approx(17 / 82)
    again = inner_split(m, np.arange(len(m)), val_fraction=0.2, seed=3)
    np.testing.assert_array_equal(again[1], val)  # seeded


def test_inner_split_by_clips_fits_on_every_group_and_stratifies():
    m = make_manifest(n_per_label=20, n_groups=4)
    rows = np.arange(len(m))
    fit, val = inner_split(m, rows, val_fraction=0.2, seed=0, by="clips")
    assert set(fit) | set(val) == set(rows) and not set(fit) & set(val)
    groups = np.array(m.groups())
    assert set(groups[fit]) == set(groups) and set(groups[val]) & set(groups[fit])  # no group set aside
    np.testing.assert_array_equal(np.bincount(m.targets()[val]), [4, 4, 4])  # round(0.2 * 20) per label
    by_groups = inner_split(m, rows, val_fraction=0.2, seed=0)[1]
    assert not set(groups[by_groups]) & set(groups[np.setdiff1d(rows, by_groups)])  # the default is grouped
    with pytest.raises(ValueError, match="by must be 'groups' or 'clips'"):
        inner_split(m, rows, val_fraction=0.2, by="speakers")


def test_fold_plans_follow_val_split_and_still_hold_whole_groups_out():
    m = make_manifest(n_per_label=12, n_groups=6)
    cfg = RunConfig().replace(cv={"k": 3}, train={"val_fraction": 0.2, "val_split": "clips"})
    fold_ids, plans = plan_folds(m, cfg)
    groups = np.array(m.groups())
    for plan in plans:
        training_groups = set(groups) - set(groups[plan.heldout])
        assert set(groups[plan.fit]) == training_groups and set(groups[plan.val]) <= training_groups
        assert not set(groups[plan.heldout]) & set(groups[plan.fit])


def test_fold_plans_never_select_on_the_held_out_fold():
    m = make_manifest(n_per_label=12, n_groups=6)
    cfg = RunConfig().replace(cv={"k": 3}, train={"val_fraction": 0.2})
    fold_ids, plans = plan_folds(m, cfg)
    assert len(plans) == 3
    for p in plans:
        np.testing.assert_array_equal(p.heldout, np.flatnonzero(fold_ids == p.fold))
        assert not set(p.heldout) & (set(p.fit) | set(p.val))
        assert not set(p.fit) & set(p.val)
        assert len(p.fit) + len(p.val) + len(p.heldout) == len(m)
    assert sorted(np.concatenate([p.heldout for p in plans]).tolist()) == list(range(len(m)))


def test_split_holdout_groups_sets_whole_groups_aside():
    m = make_manifest(n_per_label=12, n_groups=6)
    rest, held = split_holdout_groups(m, 1, seed=0)
    assert len(rest) + len(held) == len(m)
    assert len(set(held.groups())) == 1 and not set(held.groups()) & set(rest.groups())


# ---------------------------------------------------------------- with training (tiny)

TINY = {"audio": {"sample_rate": 8000, "clip_seconds": 0.5},
        "features": {"n_fft": 256, "hop_length": 80, "n_mels": 32},
        "augment": {"mixup_alpha": 0.0},
        "model": {"backbone": "test_resnet", "drop_rate": 0.0},
        "train": {"epochs": 1, "batch_size": 8, "swa_start": None, "warmup_epochs": 0, "device": "cpu",
                  "amp": False, "channels_last": False},
        "cv": {"k": 2, "tta_shifts": 3, "tta_max_shift": 0.1}}


@pytest.fixture(scope="module")
def tone_run(tmp_path_factory):
    """One in-process 2-fold cross_validate on three tones (4 groups), every fit() call's datasets recorded."""
    import audioclf.train
    from audioclf.crossval import cross_validate
    from audioclf.manifest import read_manifest

    root = tmp_path_factory.mktemp("tones")
    full = read_manifest(write_tone_dataset(root / "data", n_per_class=10, n_groups=5))
    manifest, holdout = split_holdout_groups(full, 1, seed=0)  # 4 groups for 2 folds, 1 for the ensemble
    write_manifest(manifest, root / "data" / "cv.csv")
    write_manifest(holdout, root / "data" / "test.csv")
    calls = []
    real_fit = audioclf.train.fit

    def spy(model, train_set, val_set, *args, **kwargs):
        calls.append((np.array(train_set.indices), np.array(val_set.indices)))
        return real_fit(model, train_set, val_set, *args, **kwargs)

    audioclf.train.fit = spy
    try:
        result = cross_validate(manifest, RunConfig.from_dict(TINY), root / "run", test_manifest=holdout)
    finally:
        audioclf.train.fit = real_fit
    return manifest, result, calls, holdout


def _fold_column(run_dir: Path) -> np.ndarray:
    with open(run_dir / "folds.csv") as f:
        return np.array([int(r["fold"]) for r in csv.DictReader(f)])


def test_no_held_out_clip_is_used_for_fitting_or_selection(tone_run):
    manifest, result, calls, _ = tone_run
    fold_ids = _fold_column(result.out_dir)
    assert len(calls) == 2
    groups = np.array(manifest.groups())
    for fold, (fit_idx, val_idx) in enumerate(calls):
        heldout = set(np.flatnonzero(fold_ids == fold))
        assert not heldout & set(fit_idx), "a held-out clip was trained on"
        assert not heldout & set(val_idx), "a held-out clip was used for selection"
        assert not set(fit_idx) & set(val_idx)
        assert not set(groups[fit_idx]) & set(groups[val_idx])  # the inner split is grouped too
    with np.load(result.out_dir / "fold-0" / "predictions.npz") as p:
        np.testing.assert_array_equal(p["heldout_idx"], np.flatnonzero(fold_ids == 0))
        assert p["heldout"].shape == (3, len(p["heldout_clip"]), 3)  # (views, windows, classes)
        # Clips longer than the 0.5 s training clip are scored in windows, as predict scores them.
        lengths = [sf.info(manifest.abspath(int(i))).frames for i in p["heldout_idx"]]
        expected = [len(window_starts(n, 4000, 2000)) for n in lengths]
        assert np.bincount(p["heldout_clip"]).tolist() == expected and max(expected) > 1


def test_cv_report_and_oof_cover_every_clip(tone_run):
    manifest, result, *_ = tone_run
    report = result.report
    assert report["n_clips"] == len(manifest) and report["n_folds"] == 2
    assert all(len(report["oof"][v]["per_fold"]) == 2 for v in ("single", "tta-arithmetic", "tta-geometric"))
    with open(result.bundle_dir / "oof.csv") as f:
        rows = list(csv.DictReader(f))
    assert sorted(r["path"] for r in rows) == sorted(r.path for r in manifest.records)
    # The chosen variant's per-fold scores, recomputed from oof.csv alone: accuracy and log loss.
    chosen = report["oof"][report["selection"]["variant"]]
    accuracy, loss = [], []
    for fold in ("0", "1"):
        part = [r for r in rows if r["fold"] == fold]
        accuracy.append(np.mean([r["predicted"] == r["label"] for r in part]))
        loss.append(-np.mean([np.log(max(float(r[f"p_{r['label']}"]), 1e-15)) for r in part]))
    assert [s["accuracy"] for s in chosen["per_fold"]] == pytest.approx(accuracy)
    assert chosen["mean"]["accuracy"] == pytest.approx(np.mean(accuracy))
    assert chosen["std"]["accuracy"] == pytest.approx(np.std(accuracy, ddof=1))
    assert chosen["mean"]["log_loss"] == pytest.approx(np.mean(loss), abs=1e-4)  # oof.csv keeps 6 decimals
    test = report["ensemble_test"]  # the fold ensemble, scored only on the held-out group
    assert test["n_clips"] == len(tone_run[3]) and test["n_models"] == 2
    assert set(test["scores"]) == {"arithmetic", "geometric", "tta-arithmetic", "tta-geometric"}
    assert "out-of-fold" in result.summary() and report["selection"]["rule"] in result.summary()


def test_bundle_predicts_and_evaluates(tone_run, tmp_path):
    from audioclf.predict import Predictor
    from audioclf.report import evaluate_bundle

    manifest, result, *_ = tone_run
    p = Predictor.from_bundle(result.out_dir, device="cpu")  # the run folder resolves to bundle/
    assert len(p.models) == 2 and p.labels == manifest.labels.names
    [r] = p.predict([manifest.abspath(0)])
    assert r.error is None and r.probs.sum() == pytest.approx(1.0)
    report = evaluate_bundle(result.bundle_dir, manifest, tmp_path / "eval", device="cpu")
    assert np.array(report["confusion_matrix"]).sum() == len(manifest) and report["n_failed"] == 0
    assert (tmp_path / "eval" / "report.md").is_file() and (tmp_path / "eval" / "confusion.png").is_file()


@pytest.fixture(scope="module")
def resampled_run(tmp_path_factory):
    """tone_run's kind of run on clips written at 11025 Hz for 8 kHz models: the CV caches
    whole files resampled, evaluate and predict stream them."""
    from audioclf.crossval import cross_validate
    from audioclf.manifest import read_manifest

    root = tmp_path_factory.mktemp("tones-11k")
    full = read_manifest(write_tone_dataset(root / "data", n_per_class=10, n_groups=5, sample_rate=11025))
    manifest, holdout = split_holdout_groups(full, 1, seed=0)
    return manifest, cross_validate(manifest, RunConfig.from_dict(TINY), root / "run", test_manifest=holdout), holdout


@pytest.mark.parametrize("run", ["tone_run", "resampled_run"])
def test_evaluate_on_the_test_set_reproduces_the_cv_ensemble_scores(run, request, tmp_path):
    from audioclf.report import evaluate_bundle

    _, result, *_, holdout = request.getfixturevalue(run)
    test = result.report["ensemble_test"]
    report = evaluate_bundle(result.bundle_dir, holdout, tmp_path / "eval", device="cpu")
    # Same clips, windows, TTA shifts, rule and aggregate: predict's path and the CV's agree.
    assert report["n_clips"] == test["n_clips"]
    for metric, value in test["scores"][test["chosen"]].items():
        assert report["scores"][metric] == pytest.approx(value, abs=1e-6), metric


def _layout(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and not p.name.startswith("."))


def test_fold_fan_out_in_two_processes_then_merge_matches_one_run(tone_run, tmp_path):
    manifest, result, *_ = tone_run
    config = tmp_path / "tiny.toml"
    config.write_text("\n".join(
        f"[{section}]\n" + "\n".join(f"{k} = {_toml(v)}" for k, v in values.items() if v is not None)
        for section, values in TINY.items()) + "\n")
    out = tmp_path / "run"
    data = result.out_dir.parent / "data"
    base = [sys.executable, "-m", "audioclf", "cv", "--manifest", str(data / "cv.csv"), "--data-root", str(data),
            "--test-manifest", str(data / "test.csv"), "--out", str(out), "--config", str(config), "--no-swa"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # two jobs side by side: one thread each
    jobs = [subprocess.Popen(base + ["--folds", folds], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env=env) for folds in ("0", "1")]
    for job in jobs:
        _, err = job.communicate(timeout=300)
        assert job.returncode == 0, err
    assert not (out / "bundle" / "config.json").exists()  # fold jobs never merge
    report = merge_folds(out, command="audioclf cv-merge run")  # what `audioclf cv-merge` runs, in-process
    assert _layout(out) == _layout(result.out_dir)
    for fold in ("0", "1"):  # the report names the commands that trained the folds
        assert shlex.split(report["fold_commands"][fold])[-2:] == ["--folds", fold]
    assert "--folds 0" in (out / "bundle" / "report.md").read_text()
    one = json.loads((result.bundle_dir / "config.json").read_text())
    fanned = json.loads((out / "bundle" / "config.json").read_text())
    assert fanned["run_config"] == one["run_config"] and fanned["folds"] == one["folds"]


def _toml(v):
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return f'"{v}"'
    return repr(v)


def test_cv_refuses_to_mix_configurations_in_one_folder(tone_run):
    from audioclf.crossval import cross_validate
    from audioclf.errors import ConfigError

    manifest, result, *_ = tone_run
    other = RunConfig.from_dict(TINY).replace(train={"lr": 0.5})
    with pytest.raises(ConfigError, match=r"fold 0 differs from this run in config\.train\.lr \(0\.001 vs 0\.5\)"):
        cross_validate(manifest, other, result.out_dir, folds=[0])


def test_every_rank_refuses_another_run_before_decoding_any_audio(tone_run, monkeypatch):
    """Under torchrun (this process plays rank 1) every rank checks the folder: a rank that
    went on would decode and wait in fit() until torchrun killed it."""
    from audioclf.crossval import cross_validate
    from audioclf.data import WaveformCache
    from audioclf.errors import ConfigError

    def decoded(self):
        raise AssertionError("rank 1 decoded audio for a run folder rank 0 refuses")

    monkeypatch.setattr(WaveformCache, "build", decoded)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    manifest, result, *_ = tone_run
    other = RunConfig.from_dict(TINY).replace(train={"lr": 0.5})
    with pytest.raises(ConfigError, match=r"fold 0 differs from this run in config\.train\.lr"):
        cross_validate(manifest, other, result.out_dir, folds=[0])


def test_a_cv_folder_from_before_a_config_field_existed_resumes(tone_run, tmp_path):
    """Fold 0 saved before augment.speed_perturb existed: its config takes the default, as
    loading it would, in the resume check and in the merge (fold 1 against fold 0)."""
    import shutil

    from audioclf.crossval import cross_validate
    from audioclf.errors import ConfigError

    manifest, result, _, holdout = tone_run
    copy = tmp_path / "run"
    shutil.copytree(result.out_dir, copy)
    path = copy / "fold-0" / "fold.json"
    summary = json.loads(path.read_text())
    del summary["identity"]["config"]["augment"]["speed_perturb"]
    path.write_text(json.dumps(summary))
    again = cross_validate(manifest, RunConfig.from_dict(TINY), copy, test_manifest=holdout, resume=True)
    assert again.report["oof"] == result.report["oof"]
    # A record an older audioclf did not keep cannot be checked: said so, not "(None vs ...)".
    del summary["identity"]["rows"]
    path.write_text(json.dumps(summary))
    with pytest.raises(ConfigError, match=r"fold 0 differs from this run in rows \(not recorded vs '[0-9a-f]+': "
                                          r"made by an older audioclf; rerun with --overwrite\)"):
        cross_validate(manifest, RunConfig.from_dict(TINY), copy, test_manifest=holdout, resume=True)


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("change", ["seed", "k", "manifest", "no test set"])
def test_a_refused_cv_run_leaves_the_previous_run_intact_and_mergeable(tone_run, tmp_path, change):
    import dataclasses
    import shutil

    from audioclf.crossval import cross_validate
    from audioclf.errors import ConfigError

    manifest, result, _, holdout = tone_run
    copy = tmp_path / "run"
    shutil.copytree(result.out_dir, copy)
    before = _snapshot(copy)
    cfg, test = RunConfig.from_dict(TINY), holdout
    if change == "seed":
        cfg = cfg.replace(cv={"seed": 1})
    elif change == "k":
        cfg = cfg.replace(cv={"k": 3})
    elif change == "manifest":  # another manifest: one label renamed
        manifest = Manifest([dataclasses.replace(r, label="LOW" if r.label == "low" else r.label)
                             for r in manifest.records], manifest.root)
        test = Manifest([dataclasses.replace(r, label="LOW" if r.label == "low" else r.label)
                         for r in holdout.records], holdout.root)
    else:
        test = None
    with pytest.raises(ConfigError, match="use --overwrite to replace that run, or another --out"):
        cross_validate(manifest, cfg, copy, test_manifest=test)
    assert _snapshot(copy) == before  # nothing written: folds.csv and test-clips.csv included
    report = merge_folds(copy)
    assert report["oof"] == result.report["oof"] and report["ensemble_test"] == result.report["ensemble_test"]


def test_a_folds_csv_of_another_run_is_refused_even_before_any_fold_finished(tone_run, tmp_path):
    from audioclf.crossval import cross_validate
    from audioclf.errors import ConfigError

    manifest, result, _, holdout = tone_run
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "folds.csv").write_bytes((result.out_dir / "folds.csv").read_bytes())
    with pytest.raises(ConfigError, match=r"folds\.csv: lists another run's clips or folds"):
        cross_validate(manifest, RunConfig.from_dict(TINY).replace(cv={"seed": 7}), tmp_path / "run",
                       test_manifest=holdout)


def test_overwrite_removes_the_whole_previous_run_first(tone_run, tmp_path, monkeypatch):
    import shutil

    import audioclf.train
    from audioclf.crossval import cross_validate

    manifest, result, *_ = tone_run
    copy = tmp_path / "run"
    shutil.copytree(result.out_dir, copy)
    shutil.copytree(copy / "fold-1", copy / "fold-2")  # left by an earlier 3-fold run
    for suffix in (".safetensors", ".json"):
        shutil.copy(copy / "bundle" / f"fold-1{suffix}", copy / "bundle" / f"fold-2{suffix}")
    (copy / "notes.txt").write_text("the user's own file")

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(audioclf.train, "fit", interrupted)
    with pytest.raises(KeyboardInterrupt):  # retraining fold 0 of a 2-fold run without a test set
        cross_validate(manifest, RunConfig.from_dict(TINY), copy, overwrite=True)
    assert sorted(p.name for p in copy.iterdir()) == ["folds.csv", "notes.txt"]  # fold-0 was not started yet


def test_official_folds_record_their_count_as_k(tone_run, tmp_path, monkeypatch):
    import dataclasses

    import audioclf.train
    from audioclf.crossval import cross_validate

    manifest, *_ = tone_run
    official = Manifest([dataclasses.replace(r, fold=int(r.group[1:]) + 1) for r in manifest.records], manifest.root)
    seen = []

    def spy(model, train_set, val_set, cfg, *args, **kwargs):
        seen.append(cfg)
        raise KeyboardInterrupt

    monkeypatch.setattr(audioclf.train, "fit", spy)
    with pytest.raises(KeyboardInterrupt):
        cross_validate(official, RunConfig.from_dict(TINY), tmp_path / "run", folds=[0])  # TINY says k=2
    assert seen[0].cv.k == 4 == len(set(official.folds().tolist()))


def test_write_run_inputs_removes_a_stale_test_set(tmp_path):
    from audioclf.bundle import write_run_inputs

    m = make_manifest(n_per_label=4)
    (tmp_path / "test-clips.csv").write_text("path,label\nold.wav,a\n")
    write_run_inputs(tmp_path, m, None, assign_folds(m, k=2))
    assert not (tmp_path / "test-clips.csv").exists() and (tmp_path / "folds.csv").is_file()


def test_train_holdout_uses_the_official_split(tone_run):
    import dataclasses

    import audioclf.train
    from audioclf.crossval import train_holdout

    manifest, result, *_ = tone_run
    split = {"g0": "train", "g1": "train", "g2": "validation", "g3": "test"}
    records = [dataclasses.replace(r, extra={"split": split[r.group]}) for r in manifest.records]
    official = Manifest(records, manifest.root)
    seen = []
    real_fit = audioclf.train.fit
    audioclf.train.fit = lambda m, tr, va, *a, **k: seen.append((tr.indices, va.indices)) or real_fit(m, tr, va, *a, **k)
    try:
        out = train_holdout(official, RunConfig.from_dict(TINY), result.out_dir.parent / "holdout")
    finally:
        audioclf.train.fit = real_fit
    [(fit_idx, val_idx)] = seen
    kinds = np.array([r.extra["split"] for r in records])
    assert set(kinds[fit_idx]) == {"train"} and set(kinds[val_idx]) == {"validation"}
    assert out.report["protocol"] == "holdout" and out.report["n_clips"] == int((kinds == "test").sum())
    assert json.loads((out.bundle_dir / "config.json").read_text())["folds"] == ["fold-0.safetensors"]


def test_train_holdout_names_a_missing_split():
    from audioclf.crossval import train_holdout

    with pytest.raises(ManifestError, match="no rows in split"):
        train_holdout(make_manifest(), RunConfig(), "/nonexistent")


def test_retraining_a_fold_marks_the_merged_bundle_incomplete(tone_run, tmp_path, monkeypatch):
    import shutil

    import audioclf.train
    from audioclf.crossval import cross_validate
    from audioclf.errors import BundleError
    from audioclf.predict import Predictor

    manifest, result, *_ = tone_run
    copy = tmp_path / "run"
    shutil.copytree(result.out_dir, copy)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(audioclf.train, "fit", interrupted)
    with pytest.raises(KeyboardInterrupt):
        cross_validate(manifest, RunConfig.from_dict(TINY), copy, folds=[1], overwrite=True)
    assert not (copy / "fold-1" / "fold.json").exists()
    with pytest.raises(BundleError, match="config.json: missing"):
        Predictor.from_bundle(copy / "bundle")
    with pytest.raises(BundleError, match=r"fold\(s\) 1 of 2 missing"):
        merge_folds(copy)


@pytest.mark.parametrize("model, match", [
    ({"backbone": "resnet_18"}, "unknown backbone 'resnet_18'"),
    ({"backbone": "test_resnet", "pretrained": "/nowhere/weights.safetensors"}, "pretrained weights file not found"),
])
def test_a_bad_model_config_fails_before_any_audio_is_decoded(tone_run, tmp_path, monkeypatch, model, match):
    from audioclf.crossval import cross_validate
    from audioclf.data import WaveformCache
    from audioclf.errors import ConfigError

    def decoded(self):
        raise AssertionError("audio decoded before the model configuration was checked")

    monkeypatch.setattr(WaveformCache, "build", decoded)
    manifest, *_ = tone_run
    with pytest.raises(ConfigError, match=match):
        cross_validate(manifest, RunConfig.from_dict(TINY).replace(model=model), tmp_path / "run")
    assert not (tmp_path / "run").exists()
