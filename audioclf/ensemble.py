"""Averaging the predictions of several members: fold models, time-shifted views, or both.

Two rules, over any number of members M:

- ``"arithmetic"``: the mean of the members' probabilities.
- ``"geometric"``: the mean of their log-probabilities, renormalised over classes with a
  log-sum-exp (``p ∝ exp(mean_m log p_m)``). One confident "no" from a member pulls a
  class down hard; with softmax members it equals the softmax of the mean logits.

Test-time augmentation (TTA) is a set of deterministic circular (or zero-padded) time
shifts of each waveform (:func:`audioclf.augment.tta_shifts`); every (model, view) pair
is one member, and all members are averaged by the same rule. With equal numbers of
views per model this is the same as averaging views first and models second.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np
import torch

__all__ = [
    "RULES",
    "GEOMETRIC_FLOOR",
    "arithmetic_mean",
    "geometric_mean",
    "combine",
    "combine_log_probs",
    "shift_views",
    "tta_views",
    "member_log_probs",
    "predict_members",
    "score_dataset",
]

RULES = ("arithmetic", "geometric")
GEOMETRIC_FLOOR = 1e-12
"""The geometric rule floors every member's probability here (its log-probability at
log(1e-12) = -27.6), in :func:`geometric_mean` and :func:`combine_log_probs` alike: a member
saying exactly 0 (float32 softmax underflow), or a log-probability of -200, costs -27.6,
so one member's extreme "no" pulls a class down hard but cannot veto it alone."""


def _stack(probs: np.ndarray | Sequence[np.ndarray]) -> np.ndarray:
    """A list of M (N, K) arrays or an (M, N, K) array -> float64 (M, N, K)."""
    stacked = np.asarray(probs if isinstance(probs, np.ndarray) else np.stack(list(probs)), dtype=np.float64)
    if stacked.ndim != 3 or stacked.shape[0] == 0:
        raise ValueError(f"expected M >= 1 members of shape (N, K), i.e. (M, N, K) (shape {stacked.shape} given)")
    return stacked


def _logsumexp(x: np.ndarray, axis: int) -> np.ndarray:
    peak = x.max(axis=axis, keepdims=True)
    return peak + np.log(np.exp(x - peak).sum(axis=axis, keepdims=True))


def arithmetic_mean(probs: np.ndarray | Sequence[np.ndarray]) -> np.ndarray:
    """Mean of probabilities: (M, N, K) or M x (N, K) -> (N, K)."""
    return _stack(probs).mean(axis=0)


def geometric_mean(probs: np.ndarray | Sequence[np.ndarray], floor: float = GEOMETRIC_FLOOR) -> np.ndarray:
    """``exp(mean_m log max(p_m, floor))`` renormalised over classes: (M, N, K) -> (N, K)."""
    if not floor > 0:
        raise ValueError(f"floor must be positive ({floor!r} given)")
    return combine_log_probs(np.log(np.maximum(_stack(probs), floor)), "geometric", floor)


def combine(probs: np.ndarray | Sequence[np.ndarray], rule: str) -> np.ndarray:
    """Average members' probabilities by ``rule`` (one of :data:`RULES`): -> (N, K)."""
    _check_rule(rule)
    return arithmetic_mean(probs) if rule == "arithmetic" else geometric_mean(probs)


def combine_log_probs(log_probs: np.ndarray, rule: str, floor: float = GEOMETRIC_FLOOR) -> np.ndarray:
    """Average members given as log-probabilities: (..., N, K) -> probabilities (N, K).

    All leading dimensions (models, views) are members. Working in log space keeps the
    arithmetic mean exact too (log-sum-exp instead of exp of tiny numbers). The geometric
    rule first clamps each log-probability at ``log(floor)``, as :func:`geometric_mean`
    floors probabilities, so both give the same answer.
    """
    _check_rule(rule)
    lp = np.asarray(log_probs, dtype=np.float64)
    lp = lp.reshape(-1, *lp.shape[-2:])  # (..., N, K) -> (M, N, K)
    if rule == "arithmetic":
        mixed = _logsumexp(lp, axis=0)[0] - np.log(len(lp))  # log mean_m p_m: (N, K)
    else:
        mixed = np.maximum(lp, np.log(floor)).mean(axis=0)  # (N, K), unnormalised
    return np.exp(mixed - _logsumexp(mixed, axis=-1))


def _check_rule(rule: str) -> None:
    if rule not in RULES:
        raise ValueError(f"rule must be one of {', '.join(RULES)} ({rule!r} given)")


def shift_views(waveforms: torch.Tensor, shifts: Sequence[int], mode: str = "circular") -> torch.Tensor:
    """One time-shifted copy per shift: (B, N) -> (V, B, N), V = len(shifts)."""
    from audioclf.augment import time_shift

    if waveforms.ndim != 2:
        raise ValueError(f"waveforms must have shape (B, N) (shape {tuple(waveforms.shape)} given)")
    if len(shifts) == 0:
        raise ValueError("shifts must hold at least one shift (use [0] for no TTA)")
    return torch.stack([waveforms if s == 0 else time_shift(waveforms, int(s), mode) for s in shifts])


def tta_views(waveforms: torch.Tensor, n_views: int, max_fraction: float, mode: str = "circular") -> torch.Tensor:
    """Deterministic TTA views: (B, N) -> (n_views, B, N); ``n_views=1`` is the input itself.

    Args:
        waveforms: (B, N) batch.
        n_views: number of views (shifts from :func:`audioclf.augment.tta_shifts`).
        max_fraction: largest shift as a fraction of N.
        mode: ``"circular"`` (roll) or ``"pad"`` (shift in zeros).
    """
    from audioclf.augment import tta_shifts

    return shift_views(waveforms, tta_shifts(n_views, waveforms.shape[-1], max_fraction), mode)


@torch.inference_mode()
def member_log_probs(models: Sequence[torch.nn.Module], waveforms: torch.Tensor, shifts: Sequence[int],
                     mode: str = "circular") -> torch.Tensor:
    """Log-probabilities of every (model, view) pair: (B, N) -> (M, V, B, K), float32.

    Models must be in eval mode and on the waveforms' device.
    """
    views = shift_views(waveforms, shifts, mode)  # (V, B, N)
    v, b, n = views.shape
    flat = views.reshape(v * b, n)  # (V, B, N) -> (V*B, N): one forward per model
    out = [torch.log_softmax(m(flat).float(), dim=-1).reshape(v, b, -1) for m in models]  # M x (V, B, K)
    return torch.stack(out)


def predict_members(models: Sequence[torch.nn.Module], waveforms: torch.Tensor, shifts: Sequence[int] = (0,),
                    mode: str = "circular", rule: str = "geometric") -> np.ndarray:
    """Ensemble probabilities of models x views for one batch: (B, N) -> (B, K) float64."""
    lp = member_log_probs(models, waveforms, shifts, mode)
    return combine_log_probs(lp.cpu().numpy(), rule)


def score_dataset(models: Sequence[torch.nn.Module], dataset, shifts: Sequence[int] = (0,),
                  mode: str = "circular", batch_size: int = 64, device: str | torch.device = "cpu",
                  num_workers: int = 0, progress: bool = False) -> np.ndarray:
    """Log-probabilities of every member on every item of a dataset of (waveform, target).

    Returns:
        (M, V, N_items, K) float32 array, items in dataset order.
    """
    from torch.utils.data import DataLoader
    from tqdm import tqdm

    for m in models:
        m.eval()
    loader: Iterable = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    parts = []
    for waveforms, _ in tqdm(loader, desc="scoring", disable=not progress, leave=False):
        parts.append(member_log_probs(models, waveforms.to(device), shifts, mode).cpu().numpy())
    return np.concatenate(parts, axis=2)
