"""Pickle-free files for nested training state (resume points).

A state is any nesting of dicts, lists, tuples, numbers, strings, None and tensors (an
optimizer's ``state_dict()``, a scheduler's, RNG states, counters). :func:`save_state`
puts every tensor into a safetensors file under its path in the nesting and the rest,
with placeholders for the tensors, as JSON in the same file's header, so one atomic
rename makes a state durable and loading never unpickles anything.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

from audioclf._io import atomic_path
from audioclf.errors import BundleError

__all__ = ["save_state", "load_state"]

_KEY = "audioclf_state"


def save_state(path: str | Path, state: Any) -> None:
    """Write ``state`` to ``path`` (a ``.safetensors`` file) atomically."""
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    encoded = _encode(state, "", tensors)
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={_KEY: json.dumps(encoded)})


def load_state(path: str | Path) -> Any:
    """Read a state written by :func:`save_state` (tensors on the CPU).

    Raises:
        BundleError: the file is missing, unreadable or not a state file.
    """
    from safetensors import safe_open

    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            header = (f.metadata() or {}).get(_KEY)
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except FileNotFoundError:
        raise BundleError(f"{path}: training state not found") from None
    except Exception as e:
        raise BundleError(f"{path}: cannot read training state ({e})") from None
    if header is None:
        raise BundleError(f"{path}: not an audioclf training state (no '{_KEY}' header)")
    return _decode(json.loads(header), tensors)


def _encode(obj: Any, where: str, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, torch.Tensor):
        key = where or "tensor"
        tensors[key] = obj.detach().cpu().contiguous().clone()
        return {"__tensor__": key}
    if isinstance(obj, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in obj):
            return {k: _encode(v, f"{where}/{k}", tensors) for k, v in obj.items()}
        # optimizer states are keyed by int: keep the key types
        return {"__items__": [[k, _encode(v, f"{where}/{k}", tensors)] for k, v in obj.items()]}
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(v, f"{where}/{i}", tensors) for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_encode(v, f"{where}/{i}", tensors) for i, v in enumerate(obj)]
    if isinstance(obj, float) and not math.isfinite(obj):
        return {"__float__": repr(obj)}  # inf, -inf, nan (a plateau scheduler's initial best)
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot store {type(obj).__name__} at {where!r} in a training state")


def _decode(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if "__tensor__" in obj:
        return tensors[obj["__tensor__"]]
    if "__items__" in obj:
        return {_decode(k, tensors): _decode(v, tensors) for k, v in obj["__items__"]}
    if "__tuple__" in obj:
        return tuple(_decode(v, tensors) for v in obj["__tuple__"])
    if "__float__" in obj:
        return float(obj["__float__"])
    return {k: _decode(v, tensors) for k, v in obj.items()}
