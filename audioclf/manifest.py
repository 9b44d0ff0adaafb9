"""CSV manifests: which files to use, their labels, and optionally folds and groups.

One schema for every dataset::

    path,label[,fold][,group][,any extra columns]

``path`` is relative to a data root given when reading (by default the CSV's folder);
``fold`` is an integer (an official cross-validation fold); ``group`` keeps related clips
(one speaker, one source recording) on the same side of a split. Extra columns are kept
as strings, e.g. Speech Commands' official ``split``.

Reading validates everything and reports every problem at once, with line numbers, in a
single :class:`~audioclf.errors.ManifestError`. Builders for official dataset layouts live
in :mod:`audioclf.layouts`; :func:`build_manifest` dispatches to them.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from audioclf._io import atomic_open
from audioclf.errors import ManifestError

__all__ = ["Record", "LabelMap", "Manifest", "read_manifest", "write_manifest", "build_manifest"]

REQUIRED = ("path", "label")
OPTIONAL = ("fold", "group")


@dataclass(frozen=True)
class Record:
    """One row of a manifest. ``path`` is relative to the manifest's root."""

    path: str
    label: str
    fold: int | None = None
    group: str | None = None
    extra: dict[str, str] = field(default_factory=dict)


class LabelMap:
    """Label names <-> integer targets: the sorted unique names, stable across runs.

    Models save ``names`` so predictions decode to the same labels on any machine.
    """

    def __init__(self, names: Iterable[str]):
        self.names: list[str] = sorted(set(names))
        self._index = {name: i for i, name in enumerate(self.names)}

    def __len__(self) -> int:
        return len(self.names)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, LabelMap) and self.names == other.names

    def __repr__(self) -> str:
        return f"LabelMap({self.names!r})"

    def index(self, label: str) -> int:
        """Target of ``label``. Raises ManifestError for a label the map does not know."""
        try:
            return self._index[label]
        except KeyError:
            raise ManifestError(f"unknown label {label!r}; known labels: {', '.join(self.names)}") from None

    def encode(self, labels: Iterable[str]) -> np.ndarray:
        """Labels -> int64 targets of shape (N,)."""
        return np.array([self.index(label) for label in labels], dtype=np.int64)

    def decode(self, i: int) -> str:
        """Target -> label name."""
        return self.names[int(i)]


class Manifest:
    """Records plus the folder their paths are relative to.

    Args:
        records: the rows.
        root: the data root.
        labels: the label map; by default built from the records' labels. Subsets keep
            their parent's map, so targets mean the same thing in every fold.
    """

    def __init__(self, records: Sequence[Record], root: str | os.PathLike, labels: LabelMap | None = None):
        self.records: list[Record] = list(records)
        self.root = Path(root)
        self.labels = labels if labels is not None else LabelMap(r.label for r in self.records)

    def __len__(self) -> int:
        return len(self.records)

    def __repr__(self) -> str:
        return f"Manifest({len(self)} records, {len(self.labels)} labels, root={str(self.root)!r})"

    def targets(self) -> np.ndarray:
        """Integer targets (N,) int64 through :attr:`labels`."""
        return self.labels.encode(r.label for r in self.records)

    def groups(self) -> list[str] | None:
        """Each record's group, or None when the manifest has no groups."""
        if all(r.group is None for r in self.records):
            return None
        return [r.group for r in self.records]

    def folds(self) -> np.ndarray | None:
        """Each record's official fold (N,) int64, or None when the manifest has no folds."""
        if all(r.fold is None for r in self.records):
            return None
        return np.array([r.fold for r in self.records], dtype=np.int64)

    def abspath(self, i: int) -> Path:
        """Absolute path of record ``i``'s audio file."""
        return self.root / self.records[i].path

    def subset(self, indices: Iterable[int]) -> "Manifest":
        """The records at ``indices``, same root and label map."""
        return Manifest([self.records[int(i)] for i in indices], self.root, self.labels)

    def without_folds(self) -> "Manifest":
        """A copy with every fold cleared (to cross-validate without the official folds)."""
        return self._replace(fold=None)

    def without_groups(self) -> "Manifest":
        """A copy with every group cleared (to split by stratification alone)."""
        return self._replace(group=None)

    def _replace(self, **changes) -> "Manifest":
        return Manifest([dataclasses.replace(r, **changes) for r in self.records], self.root, self.labels)

    def content_hash(self) -> str:
        """SHA-256 (hex) of the records: changes when any path, label, fold, group or extra does."""
        h = hashlib.sha256()
        for r in self.records:
            h.update(json.dumps([r.path, r.label, r.fold, r.group, r.extra], sort_keys=True).encode())
            h.update(b"\n")
        return h.hexdigest()

    def summary(self) -> str:
        """One line: rows, labels, folds, groups."""
        folds = self.folds()
        groups = self.groups()
        n_folds = len(set(folds.tolist())) if folds is not None else 0
        n_groups = len(set(groups)) if groups is not None else 0
        return f"{len(self)} rows, {len(self.labels)} labels, {n_folds} folds, {n_groups} groups"


def read_manifest(path: str | os.PathLike, root: str | os.PathLike | None = None,
                  check_files: bool = True) -> Manifest:
    """Read and validate a manifest CSV.

    Args:
        path: the CSV file.
        root: folder the ``path`` column is relative to (default: the CSV's folder).
        check_files: report rows whose file does not exist.

    Returns:
        The :class:`Manifest`.

    Raises:
        ManifestError: listing every problem with its line number: missing column, empty
            path or label, duplicate path, non-integer or partly missing fold/group, wrong
            number of fields, missing file.
    """
    path = Path(path)
    root = Path(root) if root is not None else path.parent
    if not path.is_file():
        raise ManifestError(f"{path}: no such manifest file")
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None:
            raise ManifestError(f"{path}: empty file; expected a header line 'path,label[,fold][,group]'")
        header = [h.strip() for h in header]
        missing = [c for c in REQUIRED if c not in header]
        if missing:
            raise ManifestError(f"{path}: invalid manifest", [
                f"line 1: missing column {c!r} (header is {','.join(header)})" for c in missing])
        rows = [(reader.line_num, row) for row in reader if any(cell.strip() for cell in row)]
    records, problems = _parse_rows(header, rows)
    problems += _check_optional_columns(header, rows, records)
    if check_files:
        problems += [(line, f"file not found: {root / r.path}")
                     for line, r in records if not (root / r.path).is_file()]
    if problems:
        raise ManifestError(f"{path}: {len(problems)} problem(s) in the manifest",
                            [f"line {line}: {message}" for line, message in sorted(problems)])
    return Manifest([r for _, r in records], root)


def _parse_rows(header: list[str], rows: list[tuple[int, list[str]]]) -> tuple[list, list]:
    """Rows -> (line, Record) pairs plus every problem found, as (line, message)."""
    records, problems, first_line = [], [], {}
    extras = [c for c in header if c not in REQUIRED + OPTIONAL]
    for line, row in rows:
        if len(row) != len(header):
            problems.append((line, f"{len(row)} fields, the header has {len(header)}"))
            continue
        cells = {c: v.strip() for c, v in zip(header, row)}
        if not cells["path"]:
            problems.append((line, "empty path"))
            continue
        if not cells["label"]:
            problems.append((line, f"empty label for {cells['path']!r}"))
        if cells["path"] in first_line:
            problems.append((line, f"duplicate path {cells['path']!r} "
                                   f"(first on line {first_line[cells['path']]})"))
        first_line.setdefault(cells["path"], line)
        fold = cells.get("fold") or None
        if fold is not None:
            try:
                fold = int(fold)
            except ValueError:
                problems.append((line, f"fold {fold!r} is not an integer"))
                fold = None
        records.append((line, Record(cells["path"], cells["label"], fold, cells.get("group") or None,
                                     {c: cells[c] for c in extras})))
    return records, problems


def _check_optional_columns(header, rows, records) -> list[tuple[int, str]]:
    """A fold or group column is either empty throughout or filled on every row."""
    problems = []
    raw = {line: dict(zip(header, row)) for line, row in rows}
    for column in OPTIONAL:
        if column not in header:
            continue
        empty = [line for line, _ in records if not raw[line][column].strip()]
        if empty and len(empty) < len(records):
            problems += [(line, f"empty {column} (other rows have one)") for line in empty]
    return problems


def write_manifest(manifest: Manifest, path: str | os.PathLike) -> None:
    """Write ``manifest`` as CSV, atomically. Paths are written as stored (relative to its root).

    Columns: path, label, then fold and group when any record has one, then extra columns
    in order of first appearance.
    """
    records = manifest.records
    columns = list(REQUIRED)
    columns += [c for c in OPTIONAL if any(getattr(r, c) is not None for r in records)]
    extras: dict[str, None] = {}
    for r in records:
        extras.update(dict.fromkeys(r.extra))
    columns += list(extras)
    with atomic_open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(columns)
        for r in records:
            values = {"path": r.path, "label": r.label, "fold": r.fold, "group": r.group, **r.extra}
            writer.writerow(["" if values.get(c) is None else values[c] for c in columns])


def build_manifest(format: str, root: str | os.PathLike) -> Manifest:
    """Build a manifest from a dataset in its official layout (see :mod:`audioclf.layouts`).

    Args:
        format: one of ``audioclf.layouts.FORMATS``: fsdd, esc50, urbansound8k,
            speechcommands, gtzan, folders.
        root: the dataset's top folder.

    Raises:
        ManifestError: an unknown format (listing the valid ones) or a folder that is not
            in the expected layout (saying which file or folder was expected).
    """
    from audioclf import layouts  # noqa: PLC0415 (layouts imports this module)

    return layouts.build_manifest(format, root)
