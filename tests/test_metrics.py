import math

import numpy as np
import pytest
import sklearn.metrics as skm

from audioclf import metrics

# Four clips, three classes. Predictions: 0 (right), 1 (right), 0 (wrong), 2 (wrong).
TARGETS = np.array([0, 1, 2, 1])
PROBS = np.array([
    [0.70, 0.20, 0.10],
    [0.10, 0.65, 0.25],
    [0.50, 0.30, 0.20],
    [0.15, 0.20, 0.65],
])


def test_accuracy_by_hand():
    assert metrics.accuracy(TARGETS, PROBS) == 0.5


def test_confusion_matrix_by_hand():
    expected = [[1, 0, 0],
                [0, 1, 1],
                [1, 0, 0]]
    np.testing.assert_array_equal(metrics.confusion_matrix(TARGETS, PROBS), expected)


def test_macro_f1_by_hand():
    # class 0: TP 1, support 1, predicted 2 -> 2/3; class 1: TP 1, support 2, predicted 1
    # -> 2/3; class 2: TP 0 -> 0. Mean 4/9.
    assert metrics.macro_f1(TARGETS, PROBS) == pytest.approx(4 / 9)


def test_macro_f1_skips_classes_never_seen_nor_predicted():
    probs = np.array([[0.9, 0.1, 0.0], [0.2, 0.8, 0.0]])
    assert metrics.macro_f1([0, 1], probs) == 1.0


def test_log_loss_by_hand():
    expected = -(math.log(0.70) + math.log(0.65) + math.log(0.20) + math.log(0.20)) / 4
    assert metrics.log_loss(TARGETS, PROBS) == pytest.approx(expected)


def test_log_loss_floors_zero_probability():
    probs = np.array([[1.0, 0.0]])
    assert metrics.log_loss([1], probs) == pytest.approx(-math.log(metrics.LOG_LOSS_FLOOR))


def test_ece_by_hand():
    # 15 bins of width 1/15: 0.70 -> bin 10 (acc 1), 0.65 x2 -> bin 9 (acc 1/2),
    # 0.50 -> bin 7 (acc 0).
    expected = (abs(1 - 0.70) + 2 * abs(0.5 - 0.65) + abs(0 - 0.50)) / 4
    assert metrics.expected_calibration_error(TARGETS, PROBS) == pytest.approx(expected)
    assert metrics.ECE_BINS == 15


def test_ece_zero_when_confidence_matches_accuracy():
    # Two clips at confidence 0.5 in the same bin, one right and one wrong.
    probs = np.array([[0.5, 0.5, 0.0], [0.0, 0.5, 0.5]])
    assert metrics.expected_calibration_error([0, 0], probs) == pytest.approx(0.0)


def test_agrees_with_sklearn_on_random_data():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(200, 5))
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    targets = rng.integers(0, 5, size=200)
    pred = probs.argmax(axis=1)
    assert metrics.accuracy(targets, probs) == pytest.approx(skm.accuracy_score(targets, pred))
    assert metrics.macro_f1(targets, probs) == pytest.approx(skm.f1_score(targets, pred, average="macro"))
    assert metrics.log_loss(targets, probs) == pytest.approx(skm.log_loss(targets, probs, labels=range(5)))
    np.testing.assert_array_equal(metrics.confusion_matrix(targets, probs),
                                  skm.confusion_matrix(targets, pred, labels=range(5)))


def test_score_all_returns_plain_floats():
    scores = metrics.score_all(TARGETS, PROBS)
    assert set(scores) == {"accuracy", "macro_f1", "log_loss", "ece"}
    assert all(type(v) is float for v in scores.values())


@pytest.mark.parametrize("targets, probs, match", [
    ([0, 1], np.ones((3, 2)) / 2, "targets must have shape"),
    ([0, 2], np.ones((2, 2)) / 2, r"targets must lie in \[0, 2\)"),
    ([0.0, 1.0], np.ones((2, 2)) / 2, "integer class indices"),
    ([0], np.ones(2) / 2, r"shape \(N, K\)"),
    (np.zeros(0, dtype=int), np.zeros((0, 2)), "at least one clip"),
])
def test_bad_input_is_named(targets, probs, match):
    with pytest.raises(ValueError, match=match):
        metrics.accuracy(targets, probs)
