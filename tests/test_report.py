"""Merging fold outputs into a bundle and its report, on hand-made fold predictions (no training)."""

import csv
import json

import numpy as np
import pytest

from audioclf.bundle import FORMAT_VERSION, merge_folds, rows_hash, window_mean
from audioclf.config import RunConfig
from audioclf.errors import BundleError, ConfigError

LABELS = ["a", "b", "c"]
N, K, SHIFTS = 12, 3, [0, 2, -2]
RIGHT = [0.98, 0.01, 0.01]  # confident and right about class 0 (rolled for other classes)
WRONG = [0.05, 0.90, 0.05]
MILD = [0.90, 0.05, 0.05]


def views(target, first, rest):
    """(V, K) log-probs for one clip: view 0 = ``first``, the others ``rest``, rolled to ``target``."""
    rows = [np.roll(first, target)] + [np.roll(rest, target)] * (len(SHIFTS) - 1)
    return np.log(np.array(rows))


def make_run(root, n_folds=2, lr=1e-3, skip_fold=None, with_test=False, commands=None):
    """A run folder as cross_validate leaves it, with predictions chosen by hand.

    Held-out folds: view 0 right, TTA views wrong -> "single" wins there.
    Inner validation: view 0 confidently wrong, TTA views mildly right -> "tta-arithmetic"
    wins there (geometric is dragged down by the wrong view). The merge must follow the
    inner validation.
    """
    targets = np.arange(N) % K
    fold_ids = np.arange(N) % n_folds
    rows = [[f"c{i}.wav", LABELS[t], "", str(fi)] for i, (t, fi) in enumerate(zip(targets, fold_ids))]
    test_rows = [["t0.wav", "a"], ["t1.wav", "b"]]
    with open(root / "folds.csv", "w", newline="") as f:
        csv.writer(f).writerows([["path", "label", "group", "fold"], *rows])
    if with_test:
        with open(root / "test-clips.csv", "w", newline="") as f:
            csv.writer(f).writerows([["path", "label"], *test_rows])
    cfg = RunConfig().replace(train={"lr": lr}).to_dict()
    for fold in range(n_folds):
        if fold == skip_fold:
            continue
        held = np.flatnonzero(fold_ids == fold)
        val = np.flatnonzero(fold_ids != fold)[:3]
        arrays = {"heldout_idx": held, "val_idx": val,
                  "heldout": np.stack([views(targets[i], RIGHT, WRONG) for i in held], axis=1),
                  "val": np.stack([views(targets[i], [0.01, 0.98, 0.01], MILD) for i in val], axis=1)}
        if with_test:
            arrays["test"] = np.stack([views(t, RIGHT, MILD) for t in (0, 1)], axis=1)
        d = root / f"fold-{fold}"
        (d / "train").mkdir(parents=True)
        np.savez(d / "predictions.npz", **arrays)
        (d / "train" / "metrics.csv").write_text("epoch,train_loss,val_loss,val_accuracy,lr\n"
                                                 "1,1.0,0.9,0.5,0.001\n2,0.7,0.6,0.8,0.001\n")
        identity = {"config": cfg, "manifest": "m", "labels": LABELS, "folds": "f", "n_folds": n_folds,
                    "test_manifest": "t" if with_test else None, "rows": rows_hash(rows),
                    "test_rows": rows_hash(test_rows) if with_test else None}
        summary = {"format_version": FORMAT_VERSION, "fold": fold, "identity": identity, "n_fit": 3,
                   "command": (commands or {}).get(fold),
                   "n_val": len(val), "n_heldout": len(held), "tta_shifts": SHIFTS,
                   "train": {"best_epoch": 2, "best_metric": 0.8, "swa_metric": None, "chosen": "best",
                             "epochs_run": 2}}
        (d / "fold.json").write_text(json.dumps(summary))
        (root / "bundle").mkdir(exist_ok=True)
        for suffix in (".safetensors", ".json"):
            (root / "bundle" / f"fold-{fold}{suffix}").write_text("stand-in")
    return root


def test_merge_writes_the_bundle_and_chooses_on_inner_validation(tmp_path):
    report = merge_folds(make_run(tmp_path))
    bundle = tmp_path / "bundle"
    # The held-out folds favour "single", the inner validation "tta-arithmetic": selection
    # must never look at the held-out folds.
    assert report["oof"]["single"]["mean"]["accuracy"] == 1.0
    assert report["oof"]["tta-arithmetic"]["mean"]["accuracy"] == 0.0
    sel = report["selection"]
    assert (sel["variant"], sel["rule"], sel["tta_shifts"]) == ("tta-arithmetic", "arithmetic", SHIFTS)
    # Inner-validation log loss of tta-arithmetic by hand: p(true) = (0.01 + 0.9 + 0.9) / 3.
    assert report["inner_validation"]["tta-arithmetic"]["log_loss"] == pytest.approx(-np.log(1.81 / 3))
    config = json.loads((bundle / "config.json").read_text())
    assert config["format_version"] == FORMAT_VERSION
    assert config["labels"] == LABELS
    assert config["ensemble"]["rule"] == "arithmetic" and config["ensemble"]["tta_shifts"] == SHIFTS
    assert config["folds"] == ["fold-0.safetensors", "fold-1.safetensors"]
    assert config["run_config"]["train"]["lr"] == 1e-3
    with open(bundle / "oof.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == N and {r["path"] for r in rows} == {f"c{i}.wav" for i in range(N)}
    for r in rows:
        assert sum(float(r[f"p_{name}"]) for name in LABELS) == pytest.approx(1.0, abs=1e-5)
    assert np.array(report["confusion_matrix"]).sum() == N
    for name in ("confusion.png", "fold_scores.png", "curves.png"):
        assert (bundle / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (bundle / "report.md").read_text()
    assert "tta-arithmetic (chosen)" in md and "not scored on the cross-validation clips" in md
    assert json.loads((bundle / "report.json").read_text())["selection"] == sel


def test_merge_scores_the_ensemble_only_on_the_test_set(tmp_path):
    report = merge_folds(make_run(tmp_path, with_test=True))
    test = report["ensemble_test"]
    assert test["n_clips"] == 2 and test["n_models"] == 2
    assert set(test["scores"]) == {"arithmetic", "geometric", "tta-arithmetic", "tta-geometric"}
    # No TTA, both rules: two identical models saying 0.98 for the true class.
    assert test["scores"]["geometric"]["log_loss"] == pytest.approx(-np.log(0.98))
    # TTA arithmetic: p(true) = (0.98 + 0.9 + 0.9) / 3 for every clip.
    assert test["scores"]["tta-arithmetic"]["log_loss"] == pytest.approx(-np.log(2.78 / 3))


def test_merge_names_missing_folds(tmp_path):
    with pytest.raises(BundleError, match=r"fold\(s\) 1 of 3 missing"):
        merge_folds(make_run(tmp_path, n_folds=3, skip_fold=1))
    assert not (tmp_path / "bundle" / "config.json").exists()


def test_merge_refuses_folds_trained_differently(tmp_path):
    make_run(tmp_path)
    other = tmp_path / "other"
    other.mkdir()
    make_run(other, lr=2e-3)
    (tmp_path / "fold-1" / "fold.json").write_text((other / "fold-1" / "fold.json").read_text())
    with pytest.raises(ConfigError, match=r"config\.train\.lr \(0\.001 vs 0\.002\)"):
        merge_folds(tmp_path)


def test_merge_of_an_empty_folder_says_what_to_do(tmp_path):
    with pytest.raises(BundleError, match="no finished fold"):
        merge_folds(tmp_path)


def test_fold_spread_is_the_sample_std_over_folds(tmp_path):
    root = make_run(tmp_path, n_folds=3)
    # Fold 0 of 3 gets every TTA view wrong except on one clip: per-fold accuracies differ.
    with np.load(root / "fold-0" / "predictions.npz") as p:
        arrays = dict(p)
    arrays["heldout"][0, 0] = np.log(np.roll(WRONG, 0))  # clip 0 (class a): view 0 now says "b"
    np.savez(root / "fold-0" / "predictions.npz", **arrays)
    report = merge_folds(root)
    accuracies = [s["accuracy"] for s in report["oof"]["single"]["per_fold"]]
    assert accuracies == [0.75, 1.0, 1.0]
    mean = np.mean(accuracies)
    by_hand = np.sqrt(sum((a - mean) ** 2 for a in accuracies) / (3 - 1))  # ddof=1
    assert report["oof"]["single"]["std"]["accuracy"] == pytest.approx(by_hand)
    assert "sample standard deviation (ddof=1)" in (root / "bundle" / "report.md").read_text()


def test_merge_refuses_a_folds_csv_the_folds_were_not_trained_on(tmp_path):
    root = make_run(tmp_path)
    rows = (root / "folds.csv").read_text().splitlines()
    rows[1] = rows[1].replace("c0.wav", "other.wav")  # another run rewrote the clip list
    (root / "folds.csv").write_text("\n".join(rows) + "\n")
    with pytest.raises(BundleError, match=r"folds\.csv: not the clips or folds the fold models were trained"):
        merge_folds(root)
    assert not (root / "bundle" / "config.json").exists()


def test_merge_refuses_a_test_clips_csv_the_folds_were_not_scored_on(tmp_path):
    root = make_run(tmp_path, with_test=True)
    (root / "test-clips.csv").write_text("path,label\nt0.wav,a\nt9.wav,b\n")
    with pytest.raises(BundleError, match=r"test-clips\.csv: not the clips"):
        merge_folds(root)


def test_merge_takes_exactly_the_folds_of_folds_csv_and_names_leftovers(tmp_path, caplog):
    root = make_run(tmp_path)  # 2 folds
    (tmp_path / "old").mkdir()
    make_run(tmp_path / "old", n_folds=3)  # an earlier 3-fold run left fold-2 behind
    (root / "fold-2").mkdir()
    (root / "fold-2" / "fold.json").write_text((tmp_path / "old" / "fold-2" / "fold.json").read_text())
    for suffix in (".safetensors", ".json"):
        (root / "bundle" / f"fold-2{suffix}").write_text("stale")
    with caplog.at_level("WARNING"):
        report = merge_folds(root)
    assert "fold(s) 2 are not part of this 2-fold run" in caplog.text
    assert report["n_folds"] == 2
    assert json.loads((root / "bundle" / "config.json").read_text())["folds"] == ["fold-0.safetensors",
                                                                              "fold-1.safetensors"]
    assert not (root / "bundle" / "fold-2.safetensors").exists()  # a model of another run is never shipped


@pytest.mark.parametrize("wrong", ["folds.csv", "a fold's config"])
def test_a_refused_merge_leaves_every_file_in_place(tmp_path, wrong):
    root = make_run(tmp_path)  # 2 folds, and fold-2 of an earlier 3-fold run left behind
    (tmp_path / "old").mkdir()
    make_run(tmp_path / "old", n_folds=3)
    (root / "fold-2").mkdir()
    (root / "fold-2" / "fold.json").write_text((tmp_path / "old" / "fold-2" / "fold.json").read_text())
    for suffix in (".safetensors", ".json"):
        (root / "bundle" / f"fold-2{suffix}").write_text("stale")
    if wrong == "folds.csv":
        (root / "folds.csv").write_text((root / "folds.csv").read_text().replace("c0.wav", "other.wav"))
    else:
        (tmp_path / "other").mkdir()
        make_run(tmp_path / "other", lr=2e-3)
        (root / "fold-1" / "fold.json").write_text((tmp_path / "other" / "fold-1" / "fold.json").read_text())
    before = {p: p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}
    with pytest.raises((BundleError, ConfigError)):
        merge_folds(root)
    assert {p: p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()} == before


def test_windows_are_averaged_per_clip_before_scoring(tmp_path):
    assert window_mean(np.array([[1.0, 0.0], [0.0, 1.0], [0.2, 0.8]]), np.array([0, 0, 1])).tolist() == \
        [[0.5, 0.5], [0.2, 0.8]]
    root = make_run(tmp_path)
    with np.load(root / "fold-0" / "predictions.npz") as p:
        arrays = dict(p)
    # Clip 0 of fold 0 (class a) was long: two windows, the second confidently "b" on view 0.
    arrays["heldout"] = np.concatenate([arrays["heldout"][:, :1], np.log([[WRONG]] * len(SHIFTS)),
                                        arrays["heldout"][:, 1:]], axis=1)
    arrays["heldout_clip"] = np.array([0, 0, *range(1, len(arrays["heldout_idx"]))])
    np.savez(root / "fold-0" / "predictions.npz", **arrays)
    merge_folds(root)
    with open(root / "bundle" / "oof.csv") as f:
        row = next(r for r in csv.DictReader(f) if r["path"] == "c0.wav")
    # The bundle runs tta-arithmetic (chosen on inner validation): views averaged per window, then windows.
    window1 = np.mean([RIGHT, WRONG, WRONG], axis=0)
    window2 = np.mean([WRONG, WRONG, WRONG], axis=0)
    assert [float(row[f"p_{name}"]) for name in LABELS] == pytest.approx((window1 + window2) / 2, abs=1e-6)


def test_report_names_the_commands_that_trained_the_folds(tmp_path):
    cmds = {0: "audioclf cv --manifest m.csv --out run --folds 0", 1: "audioclf cv --manifest m.csv --out run --folds 1"}
    merge_folds(make_run(tmp_path, commands=cmds), command="audioclf cv-merge run")
    md = (tmp_path / "bundle" / "report.md").read_text()
    assert "Command: `audioclf cv-merge run`" in md
    assert f"- fold 0: `{cmds[0]}`" in md and f"- fold 1: `{cmds[1]}`" in md
    report = json.loads((tmp_path / "bundle" / "report.json").read_text())
    assert report["fold_commands"] == {"0": cmds[0], "1": cmds[1]}
    same = tmp_path / "same"
    same.mkdir()
    merge_folds(make_run(same, commands={0: "audioclf cv x", 1: "audioclf cv x"}), command="audioclf cv x")
    assert "Fold models trained by" not in (same / "bundle" / "report.md").read_text()
