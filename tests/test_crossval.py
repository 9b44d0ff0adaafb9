import numpy as np
import pytest

from audioclf.config import RunConfig
from audioclf.crossval import assign_folds, inner_split, plan_folds, split_holdout_groups
from audioclf.errors import ManifestError
from audioclf.manifest import Manifest, Record


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
