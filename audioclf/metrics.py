"""Classification metrics on numpy arrays: targets (N,) int, probabilities (N, K).

Every function takes the true class indices and the predicted probabilities and returns
a plain float (or, for the confusion matrix, an int64 array), so results go straight
into JSON reports.

- :func:`accuracy`: fraction of clips whose most probable class is the true one.
- :func:`macro_f1`: unweighted mean of per-class F1 over the classes that occur in the
  targets or the predictions (scikit-learn's ``f1_score(average="macro")`` label set).
- :func:`log_loss`: mean negative log-probability of the true class, with probabilities
  floored at ``1e-15`` so a confident mistake costs ``-log(1e-15) = 34.5``, not infinity.
- :func:`expected_calibration_error`: 15 equal-width confidence bins (the common choice
  since Guo et al., 2017), weighted by the fraction of clips in each bin.
- :func:`confusion_matrix`: (K, K), rows are true classes, columns predicted classes.
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "accuracy",
    "macro_f1",
    "log_loss",
    "expected_calibration_error",
    "confusion_matrix",
    "score_all",
    "ECE_BINS",
    "LOG_LOSS_FLOOR",
]

ECE_BINS = 15
LOG_LOSS_FLOOR = 1e-15


def _check(targets, probs) -> tuple[np.ndarray, np.ndarray]:
    """Validate and convert: targets (N,) int64 in [0, K), probs (N, K) float64."""
    targets = np.asarray(targets)
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != 2:
        raise ValueError(f"probs must have shape (N, K) (shape {probs.shape} given)")
    if targets.shape != (probs.shape[0],):
        raise ValueError(f"targets must have shape ({probs.shape[0]},) to match probs "
                         f"(shape {targets.shape} given)")
    if not np.issubdtype(targets.dtype, np.integer):
        raise ValueError(f"targets must be integer class indices (dtype {targets.dtype} given)")
    if len(targets) == 0:
        raise ValueError("metrics need at least one clip (0 given)")
    k = probs.shape[1]
    if targets.min() < 0 or targets.max() >= k:
        raise ValueError(f"targets must lie in [0, {k}) ({targets.min()}..{targets.max()} given)")
    return targets.astype(np.int64), probs


def accuracy(targets, probs) -> float:
    """Fraction of rows whose argmax equals the target."""
    targets, probs = _check(targets, probs)
    return float(np.mean(probs.argmax(axis=1) == targets))


def confusion_matrix(targets, probs) -> np.ndarray:
    """(K, K) int64 counts: ``cm[i, j]`` = clips of class i predicted as class j."""
    targets, probs = _check(targets, probs)
    k = probs.shape[1]
    cm = np.zeros((k, k), dtype=np.int64)
    np.add.at(cm, (targets, probs.argmax(axis=1)), 1)
    return cm


def macro_f1(targets, probs) -> float:
    """Unweighted mean F1 over classes present in the targets or the predictions.

    A class that is neither true nor predicted for any clip has no defined F1 and is
    left out (otherwise a 10-class metric on a 3-class subset would be capped at 0.3).
    """
    cm = confusion_matrix(targets, probs)
    tp = np.diag(cm).astype(np.float64)
    support = cm.sum(axis=1)  # true count per class
    predicted = cm.sum(axis=0)
    present = (support + predicted) > 0
    # F1 = 2TP / (2TP + FP + FN) = 2TP / (support + predicted); defined wherever present.
    f1 = 2 * tp[present] / (support[present] + predicted[present])
    return float(f1.mean())


def log_loss(targets, probs) -> float:
    """Mean ``-log p(true class)``, with p floored at :data:`LOG_LOSS_FLOOR` (not renormalised)."""
    targets, probs = _check(targets, probs)
    p_true = probs[np.arange(len(targets)), targets]
    return float(-np.mean(np.log(np.maximum(p_true, LOG_LOSS_FLOOR))))


def expected_calibration_error(targets, probs, n_bins: int = ECE_BINS) -> float:
    """``sum_b (n_b / N) * |accuracy_b - mean confidence_b|`` over equal-width bins.

    Confidence is the largest probability of a row. Bins are ``(i/n, (i+1)/n]``; the
    first bin also holds confidence 0.
    """
    targets, probs = _check(targets, probs)
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1 ({n_bins} given)")
    confidence = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == targets).astype(np.float64)
    # ceil(c * n) - 1 puts c in (i/n, (i+1)/n] into bin i; clip handles c == 0 and c > 1.
    bins = np.clip(np.ceil(confidence * n_bins).astype(np.int64) - 1, 0, n_bins - 1)
    acc_sum = np.bincount(bins, weights=correct, minlength=n_bins)
    conf_sum = np.bincount(bins, weights=confidence, minlength=n_bins)
    # sum_b (n_b / N) |acc_b - conf_b| = sum_b |acc_sum_b - conf_sum_b| / N
    return float(np.abs(acc_sum - conf_sum).sum() / len(targets))


def score_all(targets, probs) -> dict[str, float]:
    """The four report metrics in one dict: accuracy, macro_f1, log_loss, ece."""
    return {
        "accuracy": accuracy(targets, probs),
        "macro_f1": macro_f1(targets, probs),
        "log_loss": log_loss(targets, probs),
        "ece": expected_calibration_error(targets, probs),
    }
