"""Training-time augmentation: ``SpecAugment``, ``MixUp``, ``TimeShift``, ``FreqShift``,
``SpeedPerturb``, and the loss for soft targets.

Each transform splits "draw the random parameters" (``draw``) from a deterministic
``apply``, so a draw can be logged and replayed. Random numbers come from an optional
``torch.Generator`` (drawn on the generator's device, then moved to the batch's device),
so a seed gives the same augmentation on CPU and CUDA.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from audioclf._checks import is_int, is_real, require
from audioclf.config import AugmentConfig

__all__ = [
    "SpecAugment",
    "MixUp",
    "MixParams",
    "TimeShift",
    "time_shift",
    "tta_shifts",
    "FreqShift",
    "freq_shift",
    "SpeedPerturb",
    "speed_perturb",
    "soft_target_cross_entropy",
]


def _rand(shape: tuple[int, ...], generator: torch.Generator | None, device) -> Tensor:
    """Uniform [0, 1) numbers drawn on the generator's device, returned on ``device``."""
    where = generator.device if generator is not None else "cpu"
    return torch.rand(shape, generator=generator, device=where).to(device)


def _band_masks(n_masks: int, max_width: int, size: int, batch: int,
                generator: torch.Generator | None, device) -> Tensor:
    """(B, size) bool: the union of ``n_masks`` bands per example, widths uniform in [0, max_width]."""
    max_width = min(max_width, size)
    u = _rand((batch, n_masks, 2), generator, device)
    width = (u[..., 0] * (max_width + 1)).long()  # (B, n) in [0, max_width]
    start = (u[..., 1] * (size - width + 1)).long()  # (B, n) in [0, size - width]
    pos = torch.arange(size, device=device)  # (size,)
    inside = (pos >= start[..., None]) & (pos < (start + width)[..., None])  # (B, n, size)
    return inside.any(dim=1)


class SpecAugment(nn.Module):
    """Frequency and time masking (Park et al., 2019), drawn independently per example.

    Args:
        freq_masks: number of frequency masks per example.
        freq_mask_width: largest frequency mask, in bins (each width is uniform in [0, it]).
        time_masks: number of time masks per example.
        time_mask_width: largest time mask: an int in frames, or a float in [0, 1] as a
            fraction of the spectrogram's length T.
        p: probability that an example is masked at all.
        mask_value: "zero", or "mean" (each example's own mean value).
        generator: optional torch.Generator for reproducible masks.

    Raises:
        ValueError: an argument is out of range (the message quotes it).

    Example:
        >>> gen = torch.Generator().manual_seed(0)
        >>> aug = SpecAugment(freq_masks=2, freq_mask_width=8, generator=gen)
        >>> aug(torch.randn(4, 1, 64, 100)).shape  # training mode: masked; eval mode: unchanged
        torch.Size([4, 1, 64, 100])
    """

    def __init__(self, freq_masks: int = 2, freq_mask_width: int = 16, time_masks: int = 2,
                 time_mask_width: int | float = 0.1, p: float = 1.0, mask_value: str = "zero",
                 generator: torch.Generator | None = None):
        super().__init__()
        require(is_int(freq_masks) and freq_masks >= 0, "freq_masks", freq_masks, "an integer >= 0")
        require(is_int(freq_mask_width) and freq_mask_width >= 0, "freq_mask_width",
                 freq_mask_width, "an integer >= 0 (bins)")
        require(is_int(time_masks) and time_masks >= 0, "time_masks", time_masks, "an integer >= 0")
        if is_int(time_mask_width):
            require(time_mask_width >= 0, "time_mask_width", time_mask_width,
                     "a width in frames (int >= 0) or a fraction in [0, 1] (float)")
            time_mask_width = int(time_mask_width)
        else:
            require(is_real(time_mask_width) and 0.0 <= time_mask_width <= 1.0, "time_mask_width",
                     time_mask_width, "a fraction in [0, 1] (float) or a width in frames (int >= 0)")
            time_mask_width = float(time_mask_width)
        require(is_real(p) and 0.0 <= p <= 1.0, "p", p, "in [0, 1]")
        require(mask_value in ("zero", "mean"), "mask_value", mask_value, "'zero' or 'mean'")
        self.freq_masks, self.freq_mask_width = int(freq_masks), int(freq_mask_width)
        self.time_masks, self.time_mask_width = int(time_masks), time_mask_width
        self.p, self.mask_value, self.generator = float(p), mask_value, generator

    @classmethod
    def from_config(cls, cfg: AugmentConfig, generator: torch.Generator | None = None) -> "SpecAugment":
        return cls(cfg.freq_masks, cfg.freq_mask_width, cfg.time_masks, cfg.time_mask_width,
                   cfg.specaugment_p, cfg.mask_value, generator)

    def extra_repr(self) -> str:
        return (f"freq_masks={self.freq_masks}, freq_mask_width={self.freq_mask_width}, "
                f"time_masks={self.time_masks}, time_mask_width={self.time_mask_width}, p={self.p}")

    def max_time_width(self, n_frames: int) -> int:
        """Largest time mask in frames for a spectrogram of ``n_frames`` frames."""
        if isinstance(self.time_mask_width, float):
            return int(self.time_mask_width * n_frames)
        return min(self.time_mask_width, n_frames)

    def draw(self, batch_size: int, n_freq: int, n_time: int, device=None) -> Tensor:
        """Draw masks: a (B, 1, F, T) bool tensor, True where the spectrogram is masked."""
        device = device if device is not None else "cpu"
        freq = _band_masks(self.freq_masks, self.freq_mask_width, n_freq, batch_size,
                           self.generator, device)  # (B, F)
        time = _band_masks(self.time_masks, self.max_time_width(n_time), n_time, batch_size,
                           self.generator, device)  # (B, T)
        chosen = _rand((batch_size,), self.generator, device) < self.p  # (B,)
        mask = freq[:, :, None] | time[:, None, :]  # (B, F, T)
        return (mask & chosen[:, None, None]).unsqueeze(1)  # (B, 1, F, T)

    def apply(self, x: Tensor, mask: Tensor) -> Tensor:
        """Fill ``x`` where ``mask`` is True: (B, C, F, T), mask (B, 1|C, F, T) -> (B, C, F, T)."""
        if self.mask_value == "mean":
            fill = x.mean(dim=(1, 2, 3), keepdim=True)  # (B, 1, 1, 1)
        else:
            fill = torch.zeros((), dtype=x.dtype, device=x.device)
        return torch.where(mask, fill.to(x.dtype), x)

    def forward(self, x: Tensor) -> Tensor:
        """Mask a batch of spectrograms in training mode: (B, C, F, T) -> (B, C, F, T).

        Identity in eval mode.
        """
        if x.ndim != 4:
            raise ValueError(f"SpecAugment expects (B, C, F, T) spectrograms, "
                             f"got shape {tuple(x.shape)}")
        if not self.training or x.shape[0] == 0:
            return x
        return self.apply(x, self.draw(x.shape[0], x.shape[2], x.shape[3], x.device))


@dataclass(frozen=True)
class MixParams:
    """One MixUp draw: ``lam`` (B,) float in [0, 1], weight of each example itself, and
    ``index`` (B,) long, the partner each example is mixed with."""

    lam: Tensor
    index: Tensor


class MixUp:
    """MixUp (Zhang et al., 2018): x = lam * x + (1 - lam) * x[perm], targets likewise.

    Args:
        alpha: lam ~ Beta(alpha, alpha); 0 disables mixing (lam = 1).
        num_classes: number of classes, needed when targets are integer labels.
        per_example: one lam per example instead of one per batch.
        p: probability of mixing (per batch, or per example with ``per_example``).
        generator: optional torch.Generator for reproducible draws.

    Raises:
        ValueError: an argument is out of range (the message quotes it).

    Example:
        >>> mixup = MixUp(alpha=0.4, num_classes=3)
        >>> x, y = mixup(torch.randn(4, 1, 64, 100), torch.tensor([0, 1, 2, 0]))
        >>> y.sum(dim=1)  # soft targets
        tensor([1., 1., 1., 1.])
        >>> params = mixup.draw(4)  # or draw once and apply where the batch is ready
        >>> mixed = mixup.apply(torch.randn(4, 16000), params)
    """

    def __init__(self, alpha: float = 0.4, num_classes: int | None = None, per_example: bool = False,
                 p: float = 1.0, generator: torch.Generator | None = None):
        require(is_real(alpha) and alpha >= 0, "alpha", alpha, "a number >= 0 (0 disables mixing)")
        require(num_classes is None or (is_int(num_classes) and num_classes >= 1), "num_classes",
                 num_classes, "a positive integer or None")
        require(isinstance(per_example, bool), "per_example", per_example, "True or False")
        require(is_real(p) and 0.0 <= p <= 1.0, "p", p, "in [0, 1]")
        num_classes = None if num_classes is None else int(num_classes)
        self.alpha, self.num_classes, self.per_example = float(alpha), num_classes, per_example
        self.p, self.generator = float(p), generator

    @classmethod
    def from_config(cls, cfg: AugmentConfig, num_classes: int | None = None,
                    generator: torch.Generator | None = None) -> "MixUp":
        return cls(cfg.mixup_alpha, num_classes, cfg.mixup_per_example, cfg.mixup_p, generator)

    def __repr__(self) -> str:
        return f"MixUp(alpha={self.alpha}, per_example={self.per_example}, p={self.p})"

    def draw(self, batch_size: int, device=None) -> MixParams:
        """Draw lam (B,) and a permutation (B,) for a batch of ``batch_size``."""
        device = device if device is not None else "cpu"
        where = self.generator.device if self.generator is not None else "cpu"
        n = batch_size if self.per_example else 1
        index = torch.randperm(batch_size, generator=self.generator, device=where)
        # Beta has no torch.Generator interface: seed numpy's from ours so the draw replays.
        seed = int(torch.randint(0, 2**62, (1,), generator=self.generator, device=where))
        lam = np.random.default_rng(seed).beta(self.alpha, self.alpha, n) if self.alpha > 0 else np.ones(n)
        lam = torch.as_tensor(lam, dtype=torch.float32)  # (1,) per batch or (B,) per example
        mixed = torch.rand(n, generator=self.generator, device=where).cpu() < self.p
        lam = torch.where(mixed, lam, torch.ones_like(lam)).expand(batch_size).clone()
        return MixParams(lam=lam.to(device), index=index.to(device))

    def apply(self, x: Tensor, params: MixParams) -> Tensor:
        """Mix inputs: (B, ...) -> (B, ...), same dtype."""
        lam = params.lam.to(x.device, x.dtype).view(-1, *([1] * (x.ndim - 1)))  # (B,) -> (B, 1, ..., 1)
        return lam * x + (1 - lam) * x[params.index.to(x.device)]

    def mix_targets(self, y: Tensor, params: MixParams, num_classes: int | None = None) -> Tensor:
        """Mix targets into soft targets (B, K) float32.

        Args:
            y: (B,) integer labels in [0, K), or (B, K) soft / multi-hot float targets.
            num_classes: K for integer labels (defaults to the constructor's).

        Raises:
            ValueError: integer labels without num_classes, or outside [0, K); wrong shape.
        """
        if not y.is_floating_point():
            k = num_classes or self.num_classes
            if k is None:
                raise ValueError("integer labels need num_classes (MixUp(num_classes=K) or "
                                 "mix_targets(..., num_classes=K))")
            if y.ndim != 1:
                raise ValueError(f"integer labels must have shape (B,), got {tuple(y.shape)}")
            outside = (y < 0) | (y >= k)
            if outside.any():
                bad = sorted(set(y[outside].tolist()))
                raise ValueError(f"integer labels must be in [0, num_classes={k}); got {bad[:10]} "
                                 "(check num_classes against the label map)")
            y = F.one_hot(y.long(), k)
        elif y.ndim != 2:
            raise ValueError(f"soft targets must have shape (B, K), got {tuple(y.shape)}")
        y = y.float()
        lam = params.lam.to(y.device)[:, None]  # (B, 1)
        return lam * y + (1 - lam) * y[params.index.to(y.device)]

    def __call__(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """Mix a batch: x (B, ...), y (B,) labels or (B, K) -> (mixed x (B, ...), targets (B, K))."""
        params = self.draw(x.shape[0], x.device)
        return self.apply(x, params), self.mix_targets(y, params)


def time_shift(x: Tensor, shift: int | Tensor, mode: str = "circular") -> Tensor:
    """Shift along the last dimension; a positive shift moves content later in time.

    Args:
        x: (B, ..., L) waveforms or spectrograms.
        shift: one int for the whole batch, or a (B,) LongTensor, one per example.
        mode: "circular" (what leaves one end enters the other) or "pad" (zeros enter).

    Returns:
        (B, ..., L), same dtype and device.
    """
    require(mode in ("circular", "pad"), "mode", mode, "'circular' or 'pad'")
    if x.ndim < 2:
        raise ValueError(f"time_shift expects (B, ..., L), got shape {tuple(x.shape)}; "
                         "use x.unsqueeze(0) for one clip")
    length = x.shape[-1]
    if not isinstance(shift, Tensor):
        if mode == "circular":
            return torch.roll(x, int(shift), dims=-1)
        shift = torch.full((x.shape[0],), int(shift))
    if shift.shape != (x.shape[0],):
        raise ValueError(f"shift must be an int or have shape (B,)=({x.shape[0]},), "
                         f"got {tuple(shift.shape)}")
    source = torch.arange(length, device=x.device) - shift.to(x.device).long()[:, None]  # (B, L)
    if mode == "circular":
        source = source % length
    view = (x.shape[0],) + (1,) * (x.ndim - 2) + (length,)  # (B, 1, ..., L)
    out = x.gather(-1, source.clamp(0, length - 1).view(view).expand_as(x))
    if mode == "pad":
        valid = (source >= 0) & (source < length)
        out = out * valid.view(view).to(x.dtype)
    return out


class TimeShift(nn.Module):
    """Random shift along time, drawn per example, uniform in [-max_shift, max_shift].

    Args:
        max_shift: the largest shift: an int in samples (or frames), or a float in [0, 1] as
            a fraction of the last dimension's length.
        mode: "circular" or "pad" (see :func:`time_shift`).
        generator: optional torch.Generator for reproducible shifts.

    Raises:
        ValueError: an argument is out of range (the message quotes it).
    """

    def __init__(self, max_shift: int | float, mode: str = "circular",
                 generator: torch.Generator | None = None):
        super().__init__()
        if is_int(max_shift):
            require(max_shift >= 0, "max_shift", max_shift,
                     "a number of samples (int >= 0) or a fraction in [0, 1] (float)")
            max_shift = int(max_shift)
        else:
            require(is_real(max_shift) and 0.0 <= max_shift <= 1.0, "max_shift", max_shift,
                     "a fraction in [0, 1] (float) or a number of samples (int >= 0)")
            max_shift = float(max_shift)
        require(mode in ("circular", "pad"), "mode", mode, "'circular' or 'pad'")
        self.max_shift, self.mode, self.generator = max_shift, mode, generator

    @classmethod
    def from_config(cls, cfg: AugmentConfig, generator: torch.Generator | None = None) -> "TimeShift":
        """A circular shift of up to ``cfg.time_shift`` of the clip (a fraction)."""
        return cls(float(cfg.time_shift), "circular", generator)

    def extra_repr(self) -> str:
        return f"max_shift={self.max_shift}, mode={self.mode!r}"

    def max_samples(self, length: int) -> int:
        """The largest shift for a last dimension of ``length``."""
        if isinstance(self.max_shift, float):
            return int(self.max_shift * length)
        return min(self.max_shift, length)

    def draw(self, batch_size: int, length: int, device=None) -> Tensor:
        """Shifts for a batch: (B,) long, uniform in [-max, max]."""
        m = self.max_samples(length)
        u = _rand((batch_size,), self.generator, device if device is not None else "cpu")
        return (u * (2 * m + 1)).long() - m

    def forward(self, x: Tensor) -> Tensor:
        """Randomly shift in training mode: (B, ..., L) -> (B, ..., L). Identity in eval mode."""
        if not self.training or x.shape[0] == 0:
            return x
        return time_shift(x, self.draw(x.shape[0], x.shape[-1], x.device), self.mode)


def tta_shifts(n_views: int, length: int, max_fraction: float) -> list[int]:
    """Deterministic shifts for test-time augmentation: 0 first, then +-s, spread up to the maximum.

    With m = int(max_fraction * length): 1 view -> [0]; 3 -> [0, m, -m];
    5 -> [0, m/2, -m/2, m, -m] (rounded); an even count ends with one extra +shift.

    Raises:
        ValueError: n_views < 1, length < 1, or max_fraction outside [0, 1].
    """
    require(is_int(n_views) and n_views >= 1, "n_views", n_views, "an integer >= 1")
    require(is_int(length) and length >= 1, "length", length, "an integer >= 1")
    require(is_real(max_fraction) and 0.0 <= max_fraction <= 1.0, "max_fraction", max_fraction,
             "in [0, 1]")
    m = int(max_fraction * length)
    levels = n_views // 2  # number of distinct magnitudes
    shifts = [0]
    for j in range(1, levels + 1):
        s = round(m * j / levels)
        shifts += [s, -s]
    return shifts[:n_views]


def freq_shift(x: Tensor, shift: Tensor) -> Tensor:
    """Shift spectrograms along frequency, one shift per example; edge bins fill the gap.

    On a mel axis a shift of k bins scales frequencies by a near-constant factor (above
    ~1 kHz), like a change of vocal-tract length or pitch.

    Args:
        x: (B, C, F, T) spectrograms.
        shift: (B,) LongTensor; positive moves content to higher bins.

    Returns:
        (B, C, F, T), same dtype and device.
    """
    if x.ndim != 4:
        raise ValueError(f"freq_shift expects (B, C, F, T), got shape {tuple(x.shape)}")
    if shift.shape != (x.shape[0],):
        raise ValueError(f"shift must have shape (B,)=({x.shape[0]},), got {tuple(shift.shape)}")
    n_freq = x.shape[-2]
    source = torch.arange(n_freq, device=x.device) - shift.to(x.device).long()[:, None]  # (B, F)
    index = source.clamp(0, n_freq - 1)[:, None, :, None].expand_as(x)  # (B, C, F, T)
    return x.gather(-2, index)


class FreqShift(nn.Module):
    """Random shift of the frequency axis, uniform in [-max_shift, max_shift] bins per example.

    A cheap stand-in for vocal tract length perturbation: it helps a model trained on a
    few speakers generalise to new ones. Identity in eval mode.

    Args:
        max_shift: the largest shift in bins (int >= 0).
        p: probability that an example is shifted at all.
        generator: optional torch.Generator for reproducible shifts.

    Raises:
        ValueError: an argument is out of range (the message quotes it).
    """

    def __init__(self, max_shift: int, p: float = 1.0, generator: torch.Generator | None = None):
        super().__init__()
        require(is_int(max_shift) and max_shift >= 0, "max_shift", max_shift, "a number of bins (int >= 0)")
        require(is_real(p) and 0.0 <= p <= 1.0, "p", p, "in [0, 1]")
        self.max_shift, self.p, self.generator = int(max_shift), float(p), generator

    def extra_repr(self) -> str:
        return f"max_shift={self.max_shift}, p={self.p}"

    def draw(self, batch_size: int, device=None) -> Tensor:
        """Shifts for a batch: (B,) long in [-max_shift, max_shift]; 0 where not applied."""
        u = _rand((batch_size, 2), self.generator, device if device is not None else "cpu")
        shift = (u[:, 0] * (2 * self.max_shift + 1)).long() - self.max_shift
        return torch.where(u[:, 1] < self.p, shift, torch.zeros_like(shift))

    def forward(self, x: Tensor) -> Tensor:
        """(B, C, F, T) -> (B, C, F, T), shifted in training mode only."""
        if not self.training or x.shape[0] == 0 or self.max_shift == 0:
            return x
        return freq_shift(x, self.draw(x.shape[0], x.device))


def speed_perturb(x: Tensor, factor: Tensor) -> Tensor:
    """Play each waveform faster or slower about its centre, keeping its length.

    ``y[n] = x(c + (n - c) * factor)`` with ``c = (N - 1) / 2``, linearly interpolated, and
    zeros where that reads outside the clip. A factor above 1 speeds a clip up: its
    pitch and formants rise by the factor and it gets shorter (Kaldi-style speed
    perturbation, Ko et al. 2015). There is no anti-aliasing filter: with a factor f > 1
    whatever lies above ``sample_rate / (2 f)`` folds back, which costs little for the
    modest factors (about 0.9-1.1) that this augmentation uses.

    Args:
        x: (B, N) waveforms.
        factor: (B,) positive speed factors, one per example.

    Returns:
        (B, N), same dtype and device.
    """
    if x.ndim != 2:
        raise ValueError(f"speed_perturb expects (B, N) waveforms, got shape {tuple(x.shape)}")
    if factor.shape != (x.shape[0],):
        raise ValueError(f"factor must have shape (B,)=({x.shape[0]},), got {tuple(factor.shape)}")
    n = x.shape[1]
    centre = (n - 1) / 2
    offset = torch.arange(n, device=x.device, dtype=torch.float64) - centre  # (N,)
    pos = centre + offset[None] * factor.to(x.device, torch.float64)[:, None]  # (B, N) source positions
    left = pos.floor().clamp(0, n - 1).long()
    right = (left + 1).clamp(max=n - 1)
    frac = (pos - left).to(x.dtype)  # in [0, 1) inside the clip
    out = x.gather(1, left) * (1 - frac) + x.gather(1, right) * frac
    inside = (pos >= 0) & (pos <= n - 1)
    return out * inside.to(x.dtype)


class SpeedPerturb(nn.Module):
    """Random speed change per example, factor uniform in [1 - max_change, 1 + max_change].

    Changes tempo, pitch and formants together, as a different speaker or speaking
    rate would; see :func:`speed_perturb`. Identity in eval mode.

    Args:
        max_change: the largest relative change, in [0, 0.5) (0.1: factors 0.9-1.1).
        p: probability that an example is perturbed at all.
        generator: optional torch.Generator for reproducible factors.

    Raises:
        ValueError: an argument is out of range (the message quotes it).
    """

    def __init__(self, max_change: float, p: float = 1.0, generator: torch.Generator | None = None):
        super().__init__()
        require(is_real(max_change) and 0.0 <= max_change < 0.5, "max_change", max_change, "in [0, 0.5)")
        require(is_real(p) and 0.0 <= p <= 1.0, "p", p, "in [0, 1]")
        self.max_change, self.p, self.generator = float(max_change), float(p), generator

    def extra_repr(self) -> str:
        return f"max_change={self.max_change}, p={self.p}"

    def draw(self, batch_size: int, device=None) -> Tensor:
        """Factors for a batch: (B,) float in [1 - max_change, 1 + max_change]; 1 where not applied."""
        u = _rand((batch_size, 2), self.generator, device if device is not None else "cpu")
        factor = 1 + self.max_change * (2 * u[:, 0] - 1)
        return torch.where(u[:, 1] < self.p, factor, torch.ones_like(factor))

    def forward(self, x: Tensor) -> Tensor:
        """(B, N) -> (B, N), perturbed in training mode only."""
        if not self.training or x.shape[0] == 0 or self.max_change == 0:
            return x
        return speed_perturb(x, self.draw(x.shape[0], x.device))


def soft_target_cross_entropy(logits: Tensor, targets: Tensor, reduction: str = "mean") -> Tensor:
    """Cross-entropy against soft targets: -sum_k targets[k] * log_softmax(logits)[k].

    Args:
        logits: (B, K).
        targets: (B, K) non-negative, each row summing to 1 (e.g. from :class:`MixUp`).
        reduction: "mean" | "sum" | "none" (then shape (B,)).

    Returns:
        A scalar, or (B,) with ``reduction="none"``; computed in float32.
    """
    require(reduction in ("mean", "sum", "none"), "reduction", reduction, "'mean', 'sum' or 'none'")
    if logits.shape != targets.shape or logits.ndim != 2:
        raise ValueError(f"logits and targets must both be (B, K), got {tuple(logits.shape)} "
                         f"and {tuple(targets.shape)}")
    loss = -(targets.float() * F.log_softmax(logits.float(), dim=-1)).sum(-1)  # (B,)
    if reduction == "mean":
        return loss.mean()
    return loss.sum() if reduction == "sum" else loss
