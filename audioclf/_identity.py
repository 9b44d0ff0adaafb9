"""Whether a saved run is the run asked for now: the one comparison of run identities.

A run identity is the JSON-like dict a run records about itself: a resume point's
``run`` (:mod:`audioclf.rundir`), a fold's ``identity`` in ``fold.json``
(:mod:`audioclf.crossval`). Its ``"config"`` holds a ``RunConfig.to_dict()`` (whole, or
less its runtime-only fields). Both configs are compared as
``RunConfig.from_dict(...).to_dict()``, so a field added to audioclf after a run was saved
takes its default, as loading that config would, and does not tell the runs apart. Any
other key one side lacks (something audioclf records only since a later version, such as
the hashes of ``folds.csv``) cannot be checked: that run was made by an older audioclf,
and the difference says so.
"""

from __future__ import annotations

from typing import Any

from audioclf.config import RunConfig
from audioclf.errors import ConfigError

__all__ = ["run_differences"]

_MISSING = object()


def run_differences(saved: dict[str, Any], current: dict[str, Any], ignore=frozenset()) -> list[str]:
    """Every field where two run identities differ, in order, as ``"field (saved vs current)"``.

    Args:
        saved, current: run identities (see the module docstring).
        ignore: dotted fields not compared, e.g. ``{"config.train.epochs"}``.

    Raises:
        ConfigError: a configuration is not valid in this audioclf (the field is named).
    """
    diffs: list[str] = []
    _compare(_normalized(saved), _normalized(current), "", frozenset(ignore), diffs)
    return diffs


def _normalized(identity: dict[str, Any]) -> dict[str, Any]:
    if not isinstance(identity.get("config"), dict):
        return identity
    try:
        config = RunConfig.from_dict(identity["config"], source="the saved config").to_dict()
    except ConfigError as e:
        raise ConfigError(f"the saved run's configuration is not valid in this audioclf ({e}); "
                          "rerun with --overwrite") from None
    return {**identity, "config": config}


def _compare(a: Any, b: Any, where: str, ignore: frozenset, out: list[str]) -> None:
    if where in ignore:
        return
    if isinstance(a, dict) and isinstance(b, dict):
        for key in list(a) + [k for k in b if k not in a]:
            _compare(a.get(key, _MISSING), b.get(key, _MISSING), f"{where}.{key}" if where else str(key),
                     ignore, out)
    elif a is _MISSING or b is _MISSING:
        out.append(f"{where} ({_short(a)} vs {_short(b)}: made by an older audioclf; rerun with --overwrite)")
    elif a != b:
        out.append(f"{where} ({_short(a)} vs {_short(b)})")


def _short(value: Any) -> str:
    if value is _MISSING:
        return "not recorded"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
