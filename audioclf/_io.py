"""Atomic file writes: a temporary file in the same folder, fsync, then rename.

A run killed at any point leaves either the old file or the new one, never half of one.
Temporary files and folders get the permissions of any new file (0o666 or 0o777 less the
umask), not ``tempfile``'s owner-only 0o600/0o700: manifests, caches and model bundles
are meant to be read by other users.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
from pathlib import Path
from typing import IO, Any, Iterator

__all__ = ["atomic_path", "atomic_open", "write_text_atomic", "write_json_atomic", "make_temp_file",
           "make_temp_dir"]

_ATTEMPTS = 100  # random names tried before giving up (a clash is already a 1 in 2**32 event)


def make_temp_file(folder: Path, prefix: str, suffix: str = "") -> Path:
    """Create a new empty file ``folder/<prefix><random><suffix>``, mode 0o666 less the umask."""
    for name in _random_names(folder, prefix, suffix):
        try:
            os.close(os.open(name, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
            return name
        except FileExistsError:
            continue
    raise FileExistsError(f"{folder}: could not create a temporary file {prefix}*{suffix}")


def make_temp_dir(folder: Path, prefix: str) -> Path:
    """Create a new empty folder ``folder/<prefix><random>``, mode 0o777 less the umask."""
    for name in _random_names(folder, prefix, ""):
        try:
            name.mkdir(0o777)
            return name
        except FileExistsError:
            continue
    raise FileExistsError(f"{folder}: could not create a temporary folder {prefix}*")


def _random_names(folder: Path, prefix: str, suffix: str) -> Iterator[Path]:
    for _ in range(_ATTEMPTS):
        yield Path(folder) / f"{prefix}{secrets.token_hex(4)}{suffix}"


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it over ``path``.

    For writers that want a file name (safetensors, numpy, matplotlib). On error the
    temporary file is removed and ``path`` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp_path = make_temp_file(path.parent, f".{path.name}.", suffix + ".tmp")
    try:
        yield tmp_path
        with open(tmp_path, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w", **kwargs: Any) -> Iterator[IO]:
    """``open()`` that writes to a temporary file and renames it into place on success."""
    if "r" in mode or "a" in mode:
        raise ValueError(f"atomic_open writes whole files; mode {mode!r} is not supported")
    with atomic_path(path) as tmp:
        with open(tmp, mode, **kwargs) as f:
            yield f


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    with atomic_open(path, "w", encoding="utf-8") as f:
        f.write(text)


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")
