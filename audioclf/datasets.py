"""Where the public datasets come from, how many files they have, and a safe download.

A download is only ever made when the user asks for it (``--download``). It streams the
archive to a temporary file, unpacks it into a temporary folder beside the destination,
checks the number of audio files against the published count, and only then renames the
folder into place. An existing folder is never overwritten.
"""

from __future__ import annotations

import http.client
import logging
import os
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path

from audioclf.errors import ManifestError
from audioclf.layouts import AUDIO_EXTENSIONS

__all__ = ["DatasetSpec", "DATASETS", "download_dataset", "count_audio_files", "default_fsdd_dir"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DatasetSpec:
    """A public dataset in its official layout.

    Attributes:
        name: the recipe and manifest format name.
        title: human-readable name.
        url: official archive (None when there is no stable public download).
        archive_root: folder inside the archive that holds the official layout ("" if the
            archive's top level is the layout itself).
        marker: a path, relative to the dataset folder, that exists in the official layout.
        n_files: number of audio files in the official release.
        homepage: where to download it by hand.
    """

    name: str
    title: str
    url: str | None
    archive_root: str
    marker: str
    n_files: int
    homepage: str


DATASETS: dict[str, DatasetSpec] = {
    "fsdd": DatasetSpec(
        "fsdd", "Free Spoken Digit Dataset v1.0.10",
        "https://github.com/Jakobovski/free-spoken-digit-dataset/archive/refs/tags/v1.0.10.tar.gz",
        "free-spoken-digit-dataset-1.0.10", "recordings", 3000,
        "https://github.com/Jakobovski/free-spoken-digit-dataset"),
    "esc50": DatasetSpec(
        "esc50", "ESC-50",
        "https://github.com/karoldvl/ESC-50/archive/master.zip",
        "ESC-50-master", "meta/esc50.csv", 2000,
        "https://github.com/karolpiczak/ESC-50"),
    "urbansound8k": DatasetSpec(
        "urbansound8k", "UrbanSound8K",
        "https://zenodo.org/record/1203745/files/UrbanSound8K.tar.gz",
        "UrbanSound8K", "metadata/UrbanSound8K.csv", 8732,
        "https://urbansounddataset.weebly.com/urbansound8k.html"),
    "speechcommands": DatasetSpec(
        "speechcommands", "Speech Commands v0.02",
        "http://download.tensorflow.org/data/speech_commands_v0.02.tar.gz",
        "", "validation_list.txt", 105835,
        "https://www.tensorflow.org/datasets/catalog/speech_commands"),
    "gtzan": DatasetSpec(
        "gtzan", "GTZAN genre collection", None, "", "genres_original", 1000,
        "http://marsyas.info/index.html (also mirrored on Kaggle: 'GTZAN Dataset - Music Genre Classification')"),
}


def default_fsdd_dir() -> Path | None:
    """Where FSDD is expected when no folder is given.

    ``$AUDIOCLF_FSDD_DIR`` whenever it is set, even if it holds no FSDD copy: the caller
    then reports that folder as missing instead of silently using another one. Otherwise
    ``../shared/datasets/fsdd`` from the working folder or from the checkout, where one
    of them holds ``recordings/``; else None.
    """
    env = os.environ.get("AUDIOCLF_FSDD_DIR")
    if env:
        return Path(env)
    here = Path(__file__).resolve().parents[1]
    for c in (Path.cwd().parent / "shared/datasets/fsdd", here.parent / "shared/datasets/fsdd"):
        if (c / "recordings").is_dir():
            return c
    return None


def count_audio_files(folder: Path) -> int:
    """Audio files (by extension) at any depth below ``folder``."""
    return sum(1 for p in Path(folder).rglob("*") if p.suffix.lower() in AUDIO_EXTENSIONS)


def _manual_hint(spec: DatasetSpec, dest: Path) -> str:
    where = f"download {spec.title} from {spec.url or spec.homepage}"
    return f"{where} and unpack it so that {dest / spec.marker} exists"


def download_dataset(spec: DatasetSpec, dest: str | Path, url: str | None = None, timeout: float = 30.0) -> Path:
    """Download and unpack ``spec`` into ``dest`` (which must not exist yet).

    Args:
        spec: the dataset.
        dest: folder to create; it will hold the official layout (``dest / spec.marker``).
        url: override the archive address (a ``file://`` URL works, for mirrors and tests).
        timeout: seconds to wait for the server before giving up.

    Returns:
        ``dest``.

    Raises:
        ManifestError: ``dest`` already exists, there is no public download, the network
            cannot be reached (the message says where to get the data by hand), or the
            archive does not hold the expected number of files.
    """
    dest = Path(dest)
    url = url or spec.url
    if dest.exists() and any(dest.iterdir()):
        raise ManifestError(f"{dest}: already exists and is not empty; refusing to download over it")
    if url is None:
        raise ManifestError(f"{spec.title} has no public download address: {_manual_hint(spec, dest)}")
    dest.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{dest.name}.download.", dir=dest.parent))
    try:
        archive = work / ("archive.zip" if url.endswith(".zip") else "archive.tar.gz")
        _fetch(url, archive, timeout, spec, dest)
        unpacked = work / "unpacked"
        _unpack(archive, unpacked)
        root = unpacked / spec.archive_root if spec.archive_root else unpacked
        if not (root / spec.marker).exists():
            raise ManifestError(f"{url}: the archive has no {spec.archive_root + '/' if spec.archive_root else ''}"
                                f"{spec.marker}; it is not the official {spec.title} release")
        n = count_audio_files(root)
        if n != spec.n_files:
            raise ManifestError(f"{url}: the archive holds {n} audio files, {spec.title} has {spec.n_files}; "
                                "the download is incomplete or not the official release")
        try:
            if dest.exists():
                dest.rmdir()  # empty, checked above; fails if something appeared since
            os.replace(root, dest)
        except OSError as e:
            raise ManifestError(f"{dest}: could not move the verified download into place ({e}); "
                                "was it created meanwhile? Nothing there was changed") from None
        log.info("downloaded %s to %s (%d audio files)", spec.title, dest, n)
        return dest
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _fetch(url: str, out: Path, timeout: float, spec: DatasetSpec, dest: Path) -> None:
    from tqdm import tqdm

    try:
        with urllib.request.urlopen(url, timeout=timeout) as response, open(out, "wb") as f:
            total = int(response.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=f"download {spec.name}") as bar:
                while chunk := response.read(1 << 20):
                    f.write(chunk)
                    bar.update(len(chunk))
    except (urllib.error.URLError, OSError, TimeoutError, http.client.HTTPException, ValueError) as e:
        # HTTPException: the connection broke mid-transfer (IncompleteRead); ValueError: a malformed URL
        reason = getattr(e, "reason", None) or e
        raise ManifestError(f"could not download {spec.title} from {url} ({reason}); "
                            f"{_manual_hint(spec, dest)}") from None


def _unpack(archive: Path, out: Path) -> None:
    out.mkdir()
    try:
        if zipfile.is_zipfile(archive):
            with zipfile.ZipFile(archive) as z:
                z.extractall(out)
        else:
            with tarfile.open(archive) as t:
                t.extractall(out, filter="data")
    except (tarfile.TarError, zipfile.BadZipFile, EOFError) as e:
        raise ManifestError(f"{archive.name}: the downloaded archive is damaged ({e})") from None
