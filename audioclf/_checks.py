"""Argument checks shared by the torch modules (features, augment): one message shape,
``"{name} must be {allowed} ({value!r} given)"``, raised as ValueError."""

from __future__ import annotations

import numbers


def require(ok: bool, name: str, value, allowed: str) -> None:
    """Raise ValueError naming ``name``, what it must be and the value given, unless ``ok``."""
    if not ok:
        raise ValueError(f"{name} must be {allowed} ({value!r} given)")


def is_int(value) -> bool:
    """Python or numpy integers (bool excluded)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_real(value) -> bool:
    """Python or numpy real numbers (bool excluded), so comparisons cannot raise TypeError."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)
