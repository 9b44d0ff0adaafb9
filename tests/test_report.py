"""Merging fold outputs into a bundle and its report, on hand-made fold predictions (no training)."""

import csv
import json

import numpy as np
import pytest

from audioclf.bundle import FORMAT_VERSION, merge_folds
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


def make_run(root, n_folds=2, lr=1e-3, skip_fold=None, with_test=False):
    """A run folder as cross_validate leaves it, with predictions chosen by hand.

    Held-out folds: view 0 right, TTA views wrong -> "single" wins there.
    Inner validation: view 0 confidently wrong, TTA views mildly right -> "tta-arithmetic"
    wins there (geometric is dragged down by the wrong view). The merge must follow the
    inner validation.
    """
    targets = np.arange(N) % K
    fold_ids = np.arange(N) % n_folds
    with open(root / "folds.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label", "group", "fold"])
        w.writerows([[f"c{i}.wav", LABELS[t], "", fi] for i, (t, fi) in enumerate(zip(targets, fold_ids))])
    if with_test:
        with open(root / "test-clips.csv", "w", newline="") as f:
            csv.writer(f).writerows([["path", "label"], ["t0.wav", "a"], ["t1.wav", "b"]])
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
                    "test_manifest": "t" if with_test else None}
        summary = {"format_version": FORMAT_VERSION, "fold": fold, "identity": identity, "n_fit": 3,
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
