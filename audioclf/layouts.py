"""Manifest builders for the official layouts of common audio datasets.

Each builder takes the dataset's top folder, lists it once (no audio is decoded), and
returns a :class:`~audioclf.manifest.Manifest` with paths relative to that folder. A folder
in the wrong layout raises :class:`~audioclf.errors.ManifestError` saying which file or
folder was expected; files named by the metadata but absent are counted and the first few
named.

Formats (layout; folds; group):

- ``folders``: ``<label>/<file>``, audio at any depth below the class folder; -; -.
- ``fsdd``: ``recordings/{digit}_{speaker}_{take}.wav``; -; speaker.
- ``esc50``: ``meta/esc50.csv`` and ``audio/<filename>``; official 1-5; ``src_file``.
- ``urbansound8k``: ``metadata/UrbanSound8K.csv`` and ``audio/fold<k>/<slice_file_name>``;
  official 1-10; ``fsID``.
- ``speechcommands`` (v2): ``<word>/<speaker>_nohash_<n>.wav`` plus ``validation_list.txt``
  and ``testing_list.txt``; extra column ``split`` (train/validation/test); speaker hash.
  ``_background_noise_`` is excluded.
- ``gtzan``: ``genres_original/<genre>/<genre>.000NN.wav`` (the Kaggle copy) or
  ``genres/<genre>/<genre>.000NN.au`` (the original archive); the first found is used.
  Each file's header is read, and unreadable files are left out with a warning (the
  Kaggle copy's ``jazz/jazz.00054.wav`` is one); ``Manifest.left_out`` lists them.

Every builder's rows pass the checks :func:`~audioclf.manifest.read_manifest` applies
(:func:`~audioclf.manifest.check_records`), so a manifest written from one reads back.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable
from pathlib import Path

from audioclf.errors import ManifestError
from audioclf.manifest import Manifest, Record, check_records, read_csv_rows, read_utf8

__all__ = ["FORMATS", "build_manifest", "AUDIO_EXTENSIONS"]

logger = logging.getLogger(__name__)

AUDIO_EXTENSIONS = frozenset({".wav", ".flac", ".ogg", ".mp3", ".au", ".aiff", ".aif"})
_SHOW = 5  # file names shown in an error before "..."


def build_manifest(format: str, root: str | os.PathLike) -> Manifest:
    """Build a manifest for ``format`` from ``root`` (see the module docstring for layouts)."""
    builder = FORMATS.get(format)
    if builder is None:
        raise ManifestError(f"unknown dataset format {format!r}; valid formats: {', '.join(FORMATS)}")
    root = Path(root)
    if not root.is_dir():
        raise ManifestError(f"{root}: no such folder (expected the top folder of a {format} dataset)")
    manifest = builder(root)
    if not len(manifest):
        raise ManifestError(f"{root}: no audio files found in the {format} layout")
    problems = check_records(manifest.records, range(2, len(manifest) + 2))
    if problems:  # the builders check their own inputs; this keeps the promise for any new one
        raise ManifestError(f"{root}: the {format} layout gives rows a manifest cannot hold",
                            [message for _, message in problems])
    logger.debug("%s (%s): %s", root, format, manifest.summary())
    return manifest


# --- helpers ----------------------------------------------------------------------------


def _subdirs(folder: Path) -> list[os.DirEntry]:
    with os.scandir(folder) as it:
        return sorted((e for e in it if e.is_dir() and not e.name.startswith(".")), key=lambda e: e.name)


def _files(folder: Path | str, extensions=AUDIO_EXTENSIONS) -> list[str]:
    """Names of the audio files directly in ``folder``, sorted."""
    with os.scandir(folder) as it:
        return sorted(e.name for e in it if e.is_file() and not e.name.startswith(".")
                      and os.path.splitext(e.name)[1].lower() in extensions)


def _first_few(names: list[str]) -> str:
    return ", ".join(names[:_SHOW]) + (", ..." if len(names) > _SHOW else "")


def _require_dir(path: Path, what: str) -> Path:
    if not path.is_dir():
        raise ManifestError(f"{path}: {'is not a folder' if path.exists() else 'not found'}; expected {what}")
    return path


def _require_file(path: Path, what: str) -> Path:
    if not path.is_file():
        raise ManifestError(f"{path}: {'is not a file' if path.exists() else 'not found'}; expected {what}")
    return path


def _read_metadata(path: Path, columns: tuple[str, ...], dataset: str) -> list[tuple[int, dict[str, str]]]:
    """The rows of an official metadata CSV, each with its line number, cells stripped."""
    header, rows = read_csv_rows(_require_file(path, f"the official {dataset} metadata file"))
    missing = [c for c in columns if c not in (header or [])]
    if missing:
        raise ManifestError(f"{path}: missing column(s) {', '.join(missing)}; "
                            f"the official {dataset} file has {','.join(columns)}")
    short = [f"line {line}: {len(row)} fields, the header has {len(header)}"
             for line, row in rows if len(row) != len(header)]
    if short:
        raise ManifestError(f"{path}: {len(short)} row(s) with the wrong number of fields", short)
    return [(line, {c: v.strip() for c, v in zip(header, row)}) for line, row in rows]


def _checked(records: list[Record], lines: list[int], source: Path) -> list[Record]:
    """``records`` if they pass :func:`check_records`, else a ManifestError citing ``source``'s lines."""
    problems = check_records(records, lines)
    if problems:
        raise ManifestError(f"{source}: {len(problems)} problem(s) in the rows",
                            [f"line {line}: {message}" for line, message in sorted(problems)])
    return records


def _check_present(expected: list[str], present: set[str], root: Path, source: str) -> None:
    missing = [p for p in expected if p not in present]
    if missing:
        raise ManifestError(f"{root}: {len(missing)} of {len(expected)} files listed in {source} "
                            f"are missing: {_first_few(missing)}")


def _int_column(rows: list[tuple[int, dict[str, str]]], column: str, path: Path) -> list[int]:
    bad = []
    values = []
    for line, row in rows:
        try:
            values.append(int(row[column]))
        except ValueError:
            bad.append(f"line {line}: {column} {row[column]!r} is not an integer")
    if bad:
        raise ManifestError(f"{path}: invalid {column} values", bad)
    return values


# --- builders ---------------------------------------------------------------------------


def folders(root: Path) -> Manifest:
    """``root/<label>/...``: every visible sub-folder is a class; audio files at any depth."""
    records = []
    for entry in _subdirs(root):
        n_before = len(records)
        for folder, dirs, files in os.walk(entry.path):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            rel = Path(folder).relative_to(root).as_posix()
            records += [Record(f"{rel}/{name}", entry.name) for name in _files(folder)]
        if len(records) == n_before:
            logger.warning("%s: class folder has no audio files; skipped", entry.path)
    if not records:
        raise ManifestError(f"{root}: no audio found; expected one sub-folder per class holding "
                            f"audio files ({', '.join(sorted(AUDIO_EXTENSIONS))})")
    return Manifest(records, root)


_FSDD_NAME = re.compile(r"^(\d)_([A-Za-z0-9-]+)_(\d+)\.wav$")


def fsdd(root: Path) -> Manifest:
    """Free Spoken Digit Dataset: ``recordings/{digit}_{speaker}_{take}.wav``; group = speaker."""
    folder = _require_dir(root / "recordings", "recordings/ holding {digit}_{speaker}_{take}.wav files")
    names = _files(folder, {".wav"})
    parsed, bad = [], []
    for name in names:
        m = _FSDD_NAME.match(name)
        if m:
            parsed.append((int(m[1]), m[2], int(m[3]), name))
        else:
            bad.append(name)
    if bad:
        raise ManifestError(f"{folder}: {len(bad)} file name(s) are not {{digit}}_{{speaker}}_{{take}}.wav: "
                            + _first_few(bad))
    parsed.sort()
    return Manifest([Record(f"recordings/{name}", str(digit), group=speaker)
                     for digit, speaker, _, name in parsed], root)


_ESC50_COLUMNS = ("filename", "fold", "target", "category", "esc10", "src_file", "take")


def esc50(root: Path) -> Manifest:
    """ESC-50: ``meta/esc50.csv`` and ``audio/``; label = category, official folds, group = src_file."""
    meta = root / "meta" / "esc50.csv"
    rows = _read_metadata(meta, _ESC50_COLUMNS, "ESC-50")
    audio = _require_dir(root / "audio", "audio/ holding the ESC-50 clips")
    folds = _int_column(rows, "fold", meta)
    records = [Record(f"audio/{r['filename']}", r["category"], fold, r["src_file"], {"esc10": r["esc10"]})
               for (_, r), fold in zip(rows, folds)]
    _checked(records, [line for line, _ in rows], meta)
    _check_present([r["filename"] for _, r in rows], set(_files(audio)), audio, "meta/esc50.csv")
    return Manifest(records, root)


_US8K_COLUMNS = ("slice_file_name", "fsID", "start", "end", "salience", "fold", "classID", "class")


def urbansound8k(root: Path) -> Manifest:
    """UrbanSound8K: ``metadata/UrbanSound8K.csv``, ``audio/fold<k>/``; official folds; group = fsID."""
    meta = root / "metadata" / "UrbanSound8K.csv"
    rows = _read_metadata(meta, _US8K_COLUMNS, "UrbanSound8K")
    _require_dir(root / "audio", "audio/fold1 ... audio/fold10 holding the UrbanSound8K clips")
    folds = _int_column(rows, "fold", meta)
    records = [Record(f"audio/fold{k}/{r['slice_file_name']}", r["class"], k, r["fsID"],
                      {"salience": r["salience"]}) for (_, r), k in zip(rows, folds)]
    _checked(records, [line for line, _ in rows], meta)
    present = set()
    for k in sorted(set(folds)):
        if (root / "audio" / f"fold{k}").is_dir():
            present.update(f"audio/fold{k}/{name}" for name in _files(root / "audio" / f"fold{k}"))
    _check_present([r.path for r in records], present, root, "metadata/UrbanSound8K.csv")
    return Manifest(records, root)


_SC_LISTS = {"validation": "validation_list.txt", "test": "testing_list.txt"}


def speechcommands(root: Path) -> Manifest:
    """Speech Commands v2: a folder per word, official split lists; group = speaker hash.

    ``_background_noise_`` holds long noise recordings, not examples, and is excluded.
    The extra column ``split`` is ``validation`` or ``test`` for files in the official
    lists and ``train`` for the rest.
    """
    split_of: dict[str, str] = {}
    for split, name in _SC_LISTS.items():
        listed = _require_file(root / name, f"the official {name} of Speech Commands v2")
        split_of.update(dict.fromkeys(read_utf8(listed).split(), split))
    records, bad = [], []
    for entry in _subdirs(root):
        if entry.name == "_background_noise_":
            continue
        for name in _files(entry.path, {".wav"}):
            speaker, sep, _ = name.partition("_nohash_")
            if not sep or not speaker:
                bad.append(f"{entry.name}/{name}")
            path = f"{entry.name}/{name}"
            records.append(Record(path, entry.name, group=speaker, extra={"split": split_of.get(path, "train")}))
    if bad:
        raise ManifestError(f"{root}: {len(bad)} file name(s) are not <speaker>_nohash_<n>.wav: "
                            + _first_few(bad))
    _check_present(sorted(split_of), {r.path for r in records}, root, "validation_list.txt/testing_list.txt")
    return Manifest(records, root)


_GTZAN_NAME = re.compile(r"^([a-z]+)\.\d{5}\.(wav|au)$")


def gtzan(root: Path) -> Manifest:
    """GTZAN: ``genres_original/<genre>/`` (Kaggle copy) or ``genres/<genre>/`` (original archive).

    Files whose audio header cannot be read are left out with a warning naming each.
    """
    candidates = [root / "genres_original", root / "genres"]
    folder = next((c for c in candidates if c.is_dir()), None)
    if folder is None:
        raise ManifestError(f"{root}: expected genres_original/<genre>/<genre>.000NN.wav (Kaggle) "
                            f"or genres/<genre>/<genre>.000NN.au (original archive)")
    logger.info("GTZAN: using %s", folder)
    records, bad = [], []
    for entry in _subdirs(folder):
        for name in _files(entry.path, {".wav", ".au"}):
            m = _GTZAN_NAME.match(name)
            if not m or m[1] != entry.name:
                bad.append(f"{entry.name}/{name}")
            records.append(Record(f"{folder.name}/{entry.name}/{name}", entry.name))
    if bad:
        raise ManifestError(f"{folder}: {len(bad)} file name(s) are not <genre>/<genre>.000NN.wav: "
                            + _first_few(bad))
    readable, left_out = _split_readable(records, root)
    if records and not readable:
        raise ManifestError(f"{folder}: none of the {len(records)} audio files can be read: "
                            + _first_few(left_out))
    return Manifest(readable, root, left_out=left_out)


def _split_readable(records: list[Record], root: Path) -> tuple[list[Record], list[str]]:
    """The records whose file has a readable audio header, and the paths of the others (logged)."""
    readable, left_out = [], []
    for r in records:
        problem = _header_problem(root / r.path)
        if problem is None:
            readable.append(r)
        else:
            logger.warning("%s: unreadable audio (%s); left out of the manifest", root / r.path, problem)
            left_out.append(r.path)
    return readable, left_out


def _header_problem(path: Path) -> str | None:
    """Why ``path`` has no usable audio header, or None when it has one (no audio is decoded)."""
    import soundfile as sf  # noqa: PLC0415 (`audioclf manifest` starts without numpy)

    try:
        info = sf.info(str(path))
    except (RuntimeError, OSError) as e:  # sf.LibsndfileError is a RuntimeError
        return getattr(e, "error_string", None) or str(e)
    if info.format == "RAW":  # libsndfile's guess for an .au without its header
        return "no audio header"
    return None if info.frames > 0 else "no samples"


FORMATS: dict[str, Callable[[Path], Manifest]] = {
    "fsdd": fsdd,
    "esc50": esc50,
    "urbansound8k": urbansound8k,
    "speechcommands": speechcommands,
    "gtzan": gtzan,
    "folders": folders,
}
