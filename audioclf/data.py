"""Waveform cache (decode once, memory-map forever) and fixed-length clips for training.

:class:`WaveformCache` decodes and resamples every file of a manifest once into a single
float32 array on disk plus an offsets array; epochs, folds and later runs read slices of
that memory map instead of decoding again. The cache lives in a folder named after a hash
of the target rate, the decoder and resampler versions and, for every record, the
absolute path, size and modification time of its file, so a changed manifest, rate,
resampler or file gets a new cache instead of a stale one.

A build writes into a temporary folder and renames it into place when complete, so a
killed build never leaves anything that looks valid. Two processes building the same
cache take turns through a file lock (where the OS has ``fcntl``). Without one (Windows)
both may build, each into its own temporary folder; the first rename wins and the other
process uses that cache. Temporary folders of killed builds are removed by the next build
(without a lock, only once they are a day old, as another process may still be writing).

:class:`ClipDataset` cuts cached waveforms to a fixed length: a random crop (or random
placement of a short clip) for training, replayable from ``(seed, epoch, index)``; a
centre crop or centred padding for evaluation.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import multiprocessing
import os
import shutil
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from audioclf._io import make_temp_dir
from audioclf.audio import DECODER_ID, check_sample_rate, fix_length, load_audio, placement
from audioclf.errors import AudioError
from audioclf.manifest import Manifest

try:
    import fcntl
except ImportError:  # Windows: no lock; concurrent builds still end in one valid cache
    fcntl = None

__all__ = ["WaveformCache", "ClipDataset", "default_cache_dir"]

logger = logging.getLogger(__name__)

_FORMAT = 1  # bump when the on-disk layout changes: old caches are then ignored
_DATA, _OFFSETS, _META = "waveforms.f32", "offsets.npy", "meta.json"
_STALE_S = 24 * 3600  # without a lock, a temporary folder untouched this long is a killed build's


def default_cache_dir() -> Path:
    """$AUDIOCLF_CACHE_DIR, else ~/.cache/audioclf."""
    return Path(os.environ.get("AUDIOCLF_CACHE_DIR") or Path.home() / ".cache" / "audioclf")


class WaveformCache:
    """Every file of a manifest decoded at ``sample_rate``, mono, in one memory-mapped array.

    Args:
        manifest: the files to cache (its labels play no part).
        sample_rate: rate every file is resampled to (Hz).
        cache_dir: parent folder of the cache (default: :func:`default_cache_dir`).
        num_workers: processes that decode in parallel while building (0: this process).

    Example:
        >>> cache = WaveformCache(manifest, 16000).build()
        >>> cache[0].shape, cache.lengths[:3]
    """

    def __init__(self, manifest: Manifest, sample_rate: int, cache_dir: str | os.PathLike | None = None,
                 num_workers: int = 0):
        check_sample_rate(sample_rate)
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0 ({num_workers!r} given)")
        self.manifest = manifest
        self.sample_rate = sample_rate
        self.cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        self.num_workers = num_workers
        self.path: Path | None = None  # the cache folder, known after build()
        self._offsets: np.ndarray | None = None
        self._data: np.ndarray | None = None

    # --- identity -----------------------------------------------------------------------

    def key(self) -> str:
        """Hash of the format version, the rate, the decoder and resampler versions, and each
        file's absolute path, size and mtime.

        Raises:
            AudioError: a file of the manifest does not exist.
        """
        h = hashlib.sha256(f"audioclf-waveforms:{_FORMAT}:{self.sample_rate}:{DECODER_ID}\n".encode())
        for i in range(len(self.manifest)):
            path = os.path.abspath(self.manifest.abspath(i))
            try:
                st = os.stat(path)
            except FileNotFoundError:
                raise AudioError(f"{path}: no such file (record {i} of the manifest)") from None
            h.update(f"{path}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
        return h.hexdigest()[:24]

    # --- building -----------------------------------------------------------------------

    def build(self) -> "WaveformCache":
        """Open the cache, decoding every file first if no valid cache exists. Idempotent.

        Returns:
            ``self``, so ``WaveformCache(m, sr).build()`` reads naturally.

        Raises:
            AudioError: a file cannot be decoded (the message names it); nothing is left behind.
        """
        path = self.cache_dir / f"{self.sample_rate}hz-{self.key()}"
        if not _is_valid(path, len(self.manifest)):
            self.cache_dir.mkdir(parents=True, exist_ok=True)
            with _lock(self.cache_dir / f".{path.name}.lock") as locked:
                if not _is_valid(path, len(self.manifest)):  # another process may have built it
                    _sweep_killed_builds(path, locked)
                    self._build_into(path)
        self.path = path
        self._open()
        return self

    def _build_into(self, path: Path) -> None:
        if path.exists():  # damaged after it was built (files deleted or edited by hand)
            logger.warning("%s: cache is damaged; rebuilding it", path)
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink()
        logger.info("caching %d files at %d Hz in %s", len(self.manifest), self.sample_rate, path)
        tmp = make_temp_dir(path.parent, f".{path.name}.tmp-")
        try:
            lengths = self._decode_all(tmp / _DATA)
            offsets = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)])
            np.save(tmp / _OFFSETS, offsets)
            meta = {"format": _FORMAT, "sample_rate": self.sample_rate, "count": len(lengths),
                    "samples": int(offsets[-1]), "root": str(self.manifest.root.resolve())}
            (tmp / _META).write_text(json.dumps(meta, indent=2))  # written last: marks completion
            _fsync_tree(tmp)
            try:
                os.rename(tmp, path)
            except OSError:  # a concurrent builder without a lock renamed first: use theirs
                if not _is_valid(path, len(self.manifest)):
                    raise
                shutil.rmtree(tmp, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    def _decode_all(self, data_path: Path) -> list[int]:
        """Decode every file in manifest order, appending float32 samples to ``data_path``."""
        jobs = [(i, str(self.manifest.abspath(i)), self.sample_rate) for i in range(len(self.manifest))]
        lengths = []
        with open(data_path, "wb") as f, _pool(self.num_workers) as pool:
            decoded = pool.imap(_decode, jobs, chunksize=16) if pool else map(_decode, jobs)
            for waveform in tqdm(decoded, total=len(jobs), desc="caching waveforms", unit="file", disable=None):
                waveform.tofile(f)
                lengths.append(len(waveform))
        return lengths

    # --- reading ------------------------------------------------------------------------

    def _open(self) -> None:
        self._offsets = np.load(self.path / _OFFSETS)
        if self._offsets[-1] == 0:  # an empty manifest: nothing to map
            self._data = np.zeros(0, dtype=np.float32)
        else:
            self._data = np.memmap(self.path / _DATA, dtype=np.float32, mode="r")

    def __len__(self) -> int:
        return len(self.manifest)

    def __getitem__(self, i: int) -> np.ndarray:
        """Waveform ``i``: a read-only float32 (N_i,) view of the memory map."""
        if self._data is None:
            if self.path is None:
                raise RuntimeError("WaveformCache.build() must be called before reading")
            self._open()
        if not -len(self) <= i < len(self):
            raise IndexError(f"index {i} out of range for a cache of {len(self)} files")
        i = i % len(self)
        start, stop = self._offsets[i], self._offsets[i + 1]
        return self._data[start:stop]

    @property
    def lengths(self) -> np.ndarray:
        """Samples per file, (N,) int64."""
        if self._offsets is None:
            raise RuntimeError("WaveformCache.build() must be called before reading")
        return np.diff(self._offsets)

    def __getstate__(self) -> dict:
        # DataLoader workers started by "spawn" get the folder, not a pickled copy of the data.
        state = self.__dict__.copy()
        state["_data"] = None
        return state


def _decode(job: tuple[int, str, int]) -> np.ndarray:
    index, path, sample_rate = job
    try:
        waveform, _ = load_audio(path, sample_rate=sample_rate)
    except AudioError as e:
        raise AudioError(f"{e} (record {index} of the manifest: replace the file or drop its row)") from None
    return waveform.numpy()


def _is_valid(path: Path, count: int) -> bool:
    """A cache folder is valid when it is complete: metadata, offsets and data agree.

    Whatever is wrong with a damaged cache (a file cut short, emptied, or holding other
    JSON), it is invalid and gets rebuilt; reading it never raises.
    """
    try:
        meta = json.loads((path / _META).read_text())
        offsets = np.load(path / _OFFSETS)
        size = (path / _DATA).stat().st_size
    except Exception:  # noqa: BLE001 (EOFError, UnicodeDecodeError, ... all mean "damaged")
        return False
    return (isinstance(meta, dict) and meta.get("format") == _FORMAT and meta.get("count") == count
            and offsets.shape == (count + 1,) and offsets.dtype == np.int64 and offsets[0] == 0
            and bool(np.all(np.diff(offsets) >= 0))
            and meta.get("samples") == int(offsets[-1]) and size == 4 * int(offsets[-1]))


def _sweep_killed_builds(path: Path, locked: bool) -> None:
    """Remove the temporary folders killed builds of ``path`` left behind.

    Under the lock every one is dead. Without a lock another process may be building into
    one right now, so only folders untouched for :data:`_STALE_S` seconds are removed.
    """
    for tmp in path.parent.glob(f".{path.name}.tmp-*"):
        if locked or _idle_seconds(tmp) > _STALE_S:
            shutil.rmtree(tmp, ignore_errors=True)


def _idle_seconds(folder: Path) -> float:
    """Seconds since anything in ``folder`` last changed (0 if it cannot be read)."""
    try:
        with os.scandir(folder) as it:
            newest = max([folder.stat().st_mtime] + [e.stat().st_mtime for e in it])
    except OSError:
        return 0.0
    return time.time() - newest


@contextlib.contextmanager
def _lock(path: Path):
    """Hold an exclusive lock on ``path``; yields whether one could be taken (not without fcntl)."""
    if fcntl is None:
        yield False
        return
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield True
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@contextlib.contextmanager
def _pool(num_workers: int):
    if num_workers == 0:
        yield None
        return
    with multiprocessing.get_context().Pool(num_workers, initializer=_init_worker) as pool:
        yield pool


def _init_worker() -> None:
    # One thread per decoding process: no oversubscription, and no OpenMP pool inherited
    # half-initialised through fork.
    torch.set_num_threads(1)


def _fsync_tree(folder: Path) -> None:
    for name in os.listdir(folder):
        with open(folder / name, "rb") as f:
            os.fsync(f.fileno())
    with contextlib.suppress(OSError):  # directories cannot be fsynced on every platform
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


class ClipDataset(Dataset):
    """Fixed-length clips from a :class:`WaveformCache`, with integer targets.

    Item ``j`` is ``(waveform (clip_samples,) float32, target)`` for cache item
    ``indices[j]``. Training crops (or places a short clip within ``clip_samples`` of
    padding) at a random offset drawn from a generator seeded by ``(seed, epoch,
    indices[j])``: the same clip gets the same crop in the same epoch whatever the
    DataLoader workers, the fold, or a resumed run. Evaluation centre-crops or pads.

    Call :meth:`set_epoch` before each training epoch. DataLoader workers copy the
    dataset when they start, so use ``persistent_workers=False`` for new crops per epoch.

    Args:
        cache: a built :class:`WaveformCache`.
        indices: cache items in this dataset.
        targets: integer target of each of ``indices`` (same length).
        clip_samples: output length in samples.
        train: random crops (True) or deterministic centre crops (False).
        pad_mode: ``"zeros"`` or ``"repeat"`` for clips shorter than ``clip_samples``.
        seed: base seed of the crops.
    """

    def __init__(self, cache: WaveformCache, indices: Sequence[int], targets: Sequence[int],
                 clip_samples: int, train: bool, pad_mode: str = "zeros", seed: int = 0):
        self.indices = np.asarray(indices, dtype=np.int64)
        self.targets = np.asarray(targets, dtype=np.int64)
        if len(self.indices) != len(self.targets):
            raise ValueError(f"indices and targets must have the same length "
                             f"({len(self.indices)} and {len(self.targets)} given)")
        if len(self.indices) and not 0 <= self.indices.min() <= self.indices.max() < len(cache):
            raise ValueError(f"indices must be in [0, {len(cache)}) for a cache of {len(cache)} files")
        if clip_samples <= 0:
            raise ValueError(f"clip_samples must be positive ({clip_samples!r} given)")
        if pad_mode not in ("zeros", "repeat"):
            raise ValueError(f"pad_mode must be 'zeros' or 'repeat' ({pad_mode!r} given)")
        self.cache = cache
        self.clip_samples = clip_samples
        self.train = train
        self.pad_mode = pad_mode
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the crops of ``epoch`` (training only; evaluation is the same every epoch)."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.indices)

    def generator(self, j: int) -> torch.Generator:
        """The generator that draws item ``j``'s crop this epoch."""
        state = np.random.SeedSequence([self.seed, self.epoch, int(self.indices[j])]).generate_state(1, np.uint64)
        return torch.Generator().manual_seed(int(state[0]))

    def __getitem__(self, j: int) -> tuple[torch.Tensor, int]:
        waveform = self.cache[int(self.indices[j])]
        n = self.clip_samples
        generator = self.generator(j) if self.train else None
        if len(waveform) > n:  # crop from the memory map without copying the whole clip
            start = placement(len(waveform), n, self.train, generator)
            clip = torch.from_numpy(np.array(waveform[start:start + n]))
        else:
            clip = fix_length(torch.from_numpy(np.array(waveform)), n, self.pad_mode, self.train, generator)
        return clip, int(self.targets[j])
