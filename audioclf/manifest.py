"""CSV manifests: which files to use, their labels, and optionally folds and groups.

One schema for every dataset::

    path,label[,fold][,group][,any extra columns]

``path`` is relative to a data root given when reading (by default the CSV's folder);
``fold`` is an integer (an official cross-validation fold); ``group`` keeps related clips
(one speaker, one source recording) on the same side of a split. Extra columns are kept
as strings, e.g. Speech Commands' official ``split``.

Reading validates everything and reports every problem at once, with line numbers, in a
single :class:`~audioclf.errors.ManifestError`. Builders for official dataset layouts live
in :mod:`audioclf.layouts`; :func:`build_manifest` dispatches to them. Both apply the same
row checks (:func:`check_records`), so a built manifest always reads back.
"""

from __future__ import annotations

import codecs
import csv
import dataclasses
import hashlib
import io
import json
import operator
import os
import posixpath
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
        """Target -> label name. Raises ManifestError for a target outside [0, len)."""
        i = operator.index(i)
        if not 0 <= i < len(self.names):
            raise ManifestError(f"target {i} is not in [0, {len(self.names)}): the label map has "
                                f"{len(self.names)} labels")
        return self.names[i]


class Manifest:
    """Records plus the folder their paths are relative to.

    Args:
        records: the rows.
        root: the data root.
        labels: the label map; by default built from the records' labels. Subsets keep
            their parent's map, so targets mean the same thing in every fold.
        left_out: paths of files a dataset builder found unreadable and left out (counted
            in :meth:`summary`).
    """

    def __init__(self, records: Sequence[Record], root: str | os.PathLike, labels: LabelMap | None = None,
                 left_out: Sequence[str] = ()):
        self.records: list[Record] = list(records)
        self.root = Path(root)
        self.labels = labels if labels is not None else LabelMap(r.label for r in self.records)
        self.left_out: list[str] = list(left_out)

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
        """One line: rows, labels, folds, groups (and files left out as unreadable, if any)."""
        folds = self.folds()
        groups = self.groups()
        n_folds = len(set(folds.tolist())) if folds is not None else 0
        n_groups = len(set(groups)) if groups is not None else 0
        line = f"{len(self)} rows, {len(self.labels)} labels, {n_folds} folds, {n_groups} groups"
        if self.left_out:
            line += f", {len(self.left_out)} unreadable file(s) left out"
        return line


def read_manifest(path: str | os.PathLike, root: str | os.PathLike | None = None,
                  check_files: bool = True) -> Manifest:
    """Read and validate a manifest CSV (UTF-8).

    Args:
        path: the CSV file.
        root: folder the ``path`` column is relative to (default: the CSV's folder).
        check_files: report rows whose file does not exist.

    Returns:
        The :class:`Manifest`.

    Raises:
        ManifestError: a file that is not UTF-8 CSV text, has no header or no rows; or,
            listing every problem with its line number: missing or duplicate column, empty
            path or label, duplicate path, non-integer or partly missing fold/group, wrong
            number of fields, missing file.
    """
    path = Path(path)
    root = Path(root) if root is not None else path.parent
    if not path.exists():
        raise ManifestError(f"{path}: no such manifest file")
    header, rows = read_csv_rows(path)
    if header is None:
        raise ManifestError(f"{path}: empty file; expected a header line 'path,label[,fold][,group]'")
    _check_header(header, path)
    if not rows:
        raise ManifestError(f"{path}: has no rows, only the header; a manifest lists at least one file")
    lines, records, problems = _parse_rows(header, rows)
    problems += check_records(records, lines)
    if check_files:
        problems += [(line, f"file not found: {root / r.path}")
                     for line, r in zip(lines, records) if r.path and not (root / r.path).is_file()]
    if problems:
        raise ManifestError(f"{path}: {len(problems)} problem(s) in the manifest",
                            [f"line {line}: {message}" for line, message in sorted(problems)])
    return Manifest(records, root)


def read_csv_rows(path: Path) -> tuple[list[str] | None, list[tuple[int, list[str]]]]:
    """The header (cells stripped; None for an empty file) and the non-blank rows, each
    with its line number, of a UTF-8 CSV file (a leading byte-order mark is allowed).

    Raises:
        ManifestError: naming the file: it cannot be read, is not UTF-8 text (with the
            byte offset and line), or is not valid CSV (with the line).
    """
    reader = csv.reader(io.StringIO(read_utf8(path), newline=""))
    try:
        header = next(reader, None)
        rows = [(reader.line_num, row) for row in reader if any(cell.strip() for cell in row)]
    except csv.Error as e:
        raise ManifestError(f"{path}: line {reader.line_num}: not valid CSV ({e})") from None
    return ([h.strip() for h in header] if header is not None else None), rows


def read_utf8(path: Path) -> str:
    """The text of a UTF-8 file (a leading byte-order mark is dropped).

    Raises:
        ManifestError: naming the file: it cannot be read, or is not UTF-8 text (with the
            offset and line of the first bad byte), or holds NUL bytes (a binary file).
    """
    try:
        data = path.read_bytes()
    except IsADirectoryError:
        raise ManifestError(f"{path}: is a folder, expected a text file") from None
    except OSError as e:
        raise ManifestError(f"{path}: cannot read file ({e.strerror or e})") from None
    skip = len(codecs.BOM_UTF8) if data.startswith(codecs.BOM_UTF8) else 0
    try:
        text = data[skip:].decode("utf-8")
    except UnicodeDecodeError as e:
        offset = skip + e.start
        raise ManifestError(f"{path}: not UTF-8 text: byte 0x{data[offset]:02x} at offset {offset} "
                            f"(line {_line_at(data, offset)}); save it as UTF-8 "
                            "(or is it a binary file?)") from None
    if "\x00" in text:
        offset = data.index(b"\x00")
        raise ManifestError(f"{path}: NUL byte at offset {offset} (line {_line_at(data, offset)}); "
                            "a binary file, not text")
    return text


def _line_at(data: bytes, offset: int) -> int:
    return data.count(b"\n", 0, offset) + 1


def _check_header(header: list[str], path: Path) -> None:
    problems = [f"line 1: missing column {c!r} (header is {','.join(header)})"
                for c in REQUIRED if c not in header]
    problems += [f"line 1: duplicate column {c!r}" for c in dict.fromkeys(header) if header.count(c) > 1]
    if problems:
        raise ManifestError(f"{path}: invalid manifest", problems)


def _parse_rows(header: list[str], rows: list[tuple[int, list[str]]]) -> tuple[list, list, list]:
    """Rows -> their lines and Records, plus the rows that are not records, as (line, message).

    A row with the wrong number of fields or a non-integer fold is reported here and not
    checked further.
    """
    lines, records, problems = [], [], []
    extras = [c for c in header if c not in REQUIRED + OPTIONAL]
    for line, row in rows:
        if len(row) != len(header):
            problems.append((line, f"{len(row)} fields, the header has {len(header)}"))
            continue
        cells = {c: v.strip() for c, v in zip(header, row)}
        fold = cells.get("fold") or None
        if fold is not None:
            try:
                fold = int(fold)
            except ValueError:
                problems.append((line, f"fold {fold!r} is not an integer"))
                continue
        lines.append(line)
        records.append(Record(cells["path"], cells["label"], fold, cells.get("group") or None,
                              {c: cells[c] for c in extras}))
    return lines, records, problems


def check_records(records: Sequence[Record], lines: Sequence[int]) -> list[tuple[int, str]]:
    """Problems of the rows themselves, as (line, message), ``lines[i]`` being record i's.

    Empty path or label; a duplicate path (``./a.wav`` is ``a.wav``); a fold or group
    given on some rows but not on others. Applied by :func:`read_manifest` and by every
    dataset builder, so that a built manifest is one the reader accepts.
    """
    problems, first_line = [], {}
    for line, r in zip(lines, records):
        if not r.path:
            problems.append((line, "empty path"))
            continue
        if not r.label:
            problems.append((line, f"empty label for {r.path!r}"))
        key = posixpath.normpath(r.path)
        if key in first_line:
            problems.append((line, f"duplicate path {r.path!r} (first on line {first_line[key]})"))
        first_line.setdefault(key, line)
    for column in OPTIONAL:
        empty = [(line, r.path) for line, r in zip(lines, records) if getattr(r, column) in (None, "")]
        if 0 < len(empty) < len(records):
            problems += [(line, f"empty {column} for {path!r} (other rows have one)") for line, path in empty]
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
