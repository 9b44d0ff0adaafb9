"""audioclf.data: the waveform cache (content, invalidation, atomicity, concurrency) and ClipDataset."""

from __future__ import annotations

import multiprocessing
import os
import pickle
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

import audioclf.data as data_module
from audioclf.audio import fix_length, load_audio
from audioclf.data import ClipDataset, WaveformCache
from audioclf.errors import AudioError
from audioclf.manifest import Manifest, Record, read_manifest
from synth import tone, write_fsdd_slice

FORK = multiprocessing.get_context("fork")


@pytest.fixture
def mixed(tmp_path) -> Manifest:
    """Four files at three rates, one stereo, one 24-bit, lengths 0.1-0.3 s."""
    root = tmp_path / "data"
    root.mkdir()
    specs = [("a.wav", 8000, 1, "PCM_16", 0.1), ("b.wav", 16000, 1, "PCM_24", 0.3),
             ("c.flac", 22050, 2, "PCM_16", 0.2), ("d.wav", 8000, 1, "FLOAT", 0.25)]
    records = []
    for i, (name, rate, channels, subtype, seconds) in enumerate(specs):
        x = np.stack([tone(440 * (i + 1), seconds, rate, seed=i + c) for c in range(channels)], axis=1)
        sf.write(root / name, x, rate, subtype=subtype)
        records.append(Record(name, f"class{i % 2}"))
    return Manifest(records, root)


def _count_decodes(monkeypatch) -> list[str]:
    calls: list[str] = []
    real = data_module._decode

    def counting(job):
        calls.append(job[1])
        return real(job)

    monkeypatch.setattr(data_module, "_decode", counting)
    return calls


def _cache_dirs(cache_dir: Path) -> list[str]:
    return sorted(p.name for p in cache_dir.iterdir() if p.is_dir())


# --- content ----------------------------------------------------------------------------


def test_cache_holds_each_file_decoded_at_the_target_rate(mixed, tmp_path):
    cache = WaveformCache(mixed, 16000, tmp_path / "cache").build()
    assert len(cache) == 4
    for i in range(4):
        expected, _ = load_audio(mixed.abspath(i), sample_rate=16000)
        assert cache[i].dtype == np.float32
        np.testing.assert_array_equal(cache[i], expected.numpy())
    assert cache.lengths.tolist() == [1600, 4800, 3200, 4000]


def test_workers_give_the_same_cache(mixed, tmp_path):
    serial = WaveformCache(mixed, 16000, tmp_path / "one").build()
    parallel = WaveformCache(mixed, 16000, tmp_path / "two", num_workers=2).build()
    assert serial.path.name == parallel.path.name  # the key does not depend on the workers
    for i in range(4):
        np.testing.assert_array_equal(serial[i], parallel[i])


def test_real_fsdd_clips_are_cached_exactly(fsdd_dir, tmp_path):
    manifest = read_manifest(write_fsdd_slice(fsdd_dir, tmp_path / "m.csv", takes=[0]), root=fsdd_dir)
    cache = WaveformCache(manifest, 8000, tmp_path / "cache").build()
    assert len(cache) == 60
    for i in (0, 17, 59):
        np.testing.assert_array_equal(cache[i], sf.read(manifest.abspath(i), dtype="float32")[0])


def test_default_cache_dir_comes_from_the_environment(mixed, tmp_path, monkeypatch):
    monkeypatch.setenv("AUDIOCLF_CACHE_DIR", str(tmp_path / "env-cache"))
    cache = WaveformCache(mixed, 8000).build()
    assert cache.path.parent == tmp_path / "env-cache"


@pytest.mark.skipif(os.name == "nt", reason="POSIX permissions")
def test_cache_is_readable_by_others_as_the_umask_allows(mixed, tmp_path):
    old = os.umask(0o022)
    try:
        cache = WaveformCache(mixed, 16000, tmp_path / "cache").build()
    finally:
        os.umask(old)
    assert oct(cache.path.stat().st_mode & 0o777) == oct(0o755)
    assert {oct(p.stat().st_mode & 0o777) for p in cache.path.iterdir()} == {oct(0o644)}


def test_pickled_cache_carries_no_samples_and_reads_the_same(mixed, tmp_path):
    cache = WaveformCache(mixed, 16000, tmp_path / "cache").build()
    blob = pickle.dumps(cache)
    assert len(blob) < 4 * int(cache.lengths.sum())  # smaller than the samples alone
    np.testing.assert_array_equal(pickle.loads(blob)[3], cache[3])


# --- reuse and invalidation -------------------------------------------------------------


def test_second_build_reuses_the_cache(mixed, tmp_path, monkeypatch):
    calls = _count_decodes(monkeypatch)
    first = WaveformCache(mixed, 16000, tmp_path / "cache").build()
    second = WaveformCache(mixed, 16000, tmp_path / "cache").build().build()
    assert len(calls) == 4 and second.path == first.path


def test_relabelling_keeps_the_cache(mixed, tmp_path, monkeypatch):
    calls = _count_decodes(monkeypatch)
    WaveformCache(mixed, 16000, tmp_path / "cache").build()
    relabelled = Manifest([Record(r.path, "other") for r in mixed.records], mixed.root)
    WaveformCache(relabelled, 16000, tmp_path / "cache").build()
    assert len(calls) == 4


@pytest.mark.parametrize("change", ["manifest", "rate", "resampler", "file"])
def test_cache_is_rebuilt_when_its_inputs_change(mixed, tmp_path, monkeypatch, change):
    calls = _count_decodes(monkeypatch)
    cache_dir = tmp_path / "cache"
    old = WaveformCache(mixed, 16000, cache_dir).build()
    manifest, rate = mixed, 16000
    if change == "manifest":
        manifest = mixed.subset([3, 0])
    elif change == "rate":
        rate = 8000
    elif change == "resampler":  # e.g. a soxr upgrade, or another quality setting
        monkeypatch.setattr(data_module, "DECODER_ID", data_module.DECODER_ID + " (upgraded)")
    else:  # same name, same size, new content and mtime
        x, r = sf.read(mixed.abspath(0), dtype="float32")
        sf.write(mixed.abspath(0), -x, r, subtype="PCM_16")
        st = os.stat(mixed.abspath(0))
        os.utime(mixed.abspath(0), ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    new = WaveformCache(manifest, rate, cache_dir).build()
    assert new.path != old.path and len(_cache_dirs(cache_dir)) == 2
    assert len(calls) == 4 + len(manifest)
    expected, _ = load_audio(manifest.abspath(0), sample_rate=rate)
    np.testing.assert_array_equal(new[0], expected.numpy())


def test_missing_file_is_named(mixed, tmp_path):
    mixed.abspath(2).unlink()
    with pytest.raises(AudioError, match=r"c\.flac: no such file \(record 2 of the manifest\)"):
        WaveformCache(mixed, 16000, tmp_path / "cache").build()


def test_file_too_short_for_the_rate_is_named(mixed, tmp_path):
    """One sample at 44.1 kHz is no sample at 8 kHz: an error, not an empty clip to pad later."""
    sf.write(mixed.root / "click.wav", np.array([0.5], np.float32), 44100)
    manifest = Manifest(mixed.records + [Record("click.wav", "class0")], mixed.root)
    with pytest.raises(AudioError, match=r"click\.wav: too short to resample: 1 samples at 44100 Hz are none "
                                         r"at 8000 Hz \(record 4 of the manifest"):
        WaveformCache(manifest, 8000, tmp_path / "cache").build()


# --- atomicity and concurrency ----------------------------------------------------------


@pytest.mark.parametrize("workers", [0, 2])
def test_failed_build_leaves_nothing(mixed, tmp_path, workers):
    mixed.abspath(2).write_text("not audio")
    cache_dir = tmp_path / "cache"
    with pytest.raises(AudioError, match=r"c\.flac: cannot decode audio .* \(record 2 of the manifest"):
        WaveformCache(mixed, 16000, cache_dir, num_workers=workers).build()
    assert _cache_dirs(cache_dir) == []


def _build_then_die(manifest, cache_dir):
    real = data_module._decode
    done = []

    def dying(job):
        if len(done) == 2:
            os._exit(9)  # like SIGKILL: no cleanup runs
        done.append(job)
        return real(job)

    data_module._decode = dying
    WaveformCache(manifest, 16000, cache_dir).build()


def test_killed_build_never_counts_as_valid(mixed, tmp_path, monkeypatch):
    cache_dir = tmp_path / "cache"
    child = FORK.Process(target=_build_then_die, args=(mixed, cache_dir))
    child.start()
    child.join()
    assert child.exitcode == 9
    leftovers = _cache_dirs(cache_dir)
    assert len(leftovers) == 1 and ".tmp-" in leftovers[0]  # the half-written build, never renamed
    calls = _count_decodes(monkeypatch)
    cache = WaveformCache(mixed, 16000, cache_dir).build()
    assert len(calls) == 4  # rebuilt in full, not resumed from the partial data
    assert _cache_dirs(cache_dir) == [cache.path.name]  # and the stale temporary folder is gone
    np.testing.assert_array_equal(cache[3], load_audio(mixed.abspath(3), 16000)[0].numpy())


def _damage(folder: Path, damage: str) -> None:
    if damage == "truncate data":
        with open(folder / "waveforms.f32", "r+b") as f:
            f.truncate(100)
    elif damage == "delete meta":
        (folder / "meta.json").unlink()
    elif damage == "empty offsets":
        (folder / "offsets.npy").write_bytes(b"")
    elif damage == "garbage offsets":
        (folder / "offsets.npy").write_bytes(b"\x93NUMPY garbage")
    elif damage == "meta null":
        (folder / "meta.json").write_text("null")
    elif damage == "meta not utf-8":
        (folder / "meta.json").write_bytes(b"\xff\xfe{}")
    elif damage == "offsets a folder":
        (folder / "offsets.npy").unlink()
        (folder / "offsets.npy").mkdir()


@pytest.mark.parametrize("damage", ["truncate data", "delete meta", "empty offsets", "garbage offsets",
                                    "meta null", "meta not utf-8", "offsets a folder"])
def test_damaged_cache_is_rebuilt(mixed, tmp_path, damage):
    cache = WaveformCache(mixed, 16000, tmp_path / "cache").build()
    expected = np.array(cache[1])
    _damage(cache.path, damage)
    again = WaveformCache(mixed, 16000, tmp_path / "cache").build()
    np.testing.assert_array_equal(again[1], expected)
    assert _cache_dirs(tmp_path / "cache") == [cache.path.name]


def _build_in_turn(manifest, cache_dir, log, first_decoding, second_started, second_building):
    """Build; the first of two such processes holds its first decode until the second has
    started and either begun building too (no working lock) or waited a second for the lock."""
    real_decode, real_build_into = data_module._decode, WaveformCache._build_into

    def decode(job):
        with open(log, "a") as f:
            f.write(job[1] + "\n")
        if not first_decoding.is_set():  # the first process, on its first file
            first_decoding.set()
            second_started.wait(timeout=30)
            second_building.wait(timeout=1.0)  # set at once when the lock lets both in
        return real_decode(job)

    def build_into(self, path):
        if first_decoding.is_set():  # the second process got past the lock while the first decodes
            second_building.set()
        real_build_into(self, path)

    data_module._decode = decode
    WaveformCache._build_into = build_into
    if first_decoding.is_set():
        second_started.set()
    WaveformCache(manifest, 16000, cache_dir).build()


def test_two_processes_building_at_once_share_one_build(mixed, tmp_path):
    """The second process asks for the cache while the first is decoding into it: it waits
    for the lock, then reuses the first one's cache instead of decoding again."""
    cache_dir, log = tmp_path / "cache", tmp_path / "decodes.log"
    events = [FORK.Event() for _ in range(3)]  # first decoding, second started, second building
    first = FORK.Process(target=_build_in_turn, args=(mixed, cache_dir, log, *events))
    first.start()
    assert events[0].wait(timeout=30)
    second = FORK.Process(target=_build_in_turn, args=(mixed, cache_dir, log, *events))
    second.start()
    for c in (first, second):
        c.join()
    assert [first.exitcode, second.exitcode] == [0, 0]
    assert not events[2].is_set()  # the second never built while the first held the lock
    assert len(log.read_text().splitlines()) == 4  # one build in all
    cache = WaveformCache(mixed, 16000, cache_dir).build()
    assert _cache_dirs(cache_dir) == [cache.path.name]


def test_without_a_lock_only_stale_temporary_folders_are_swept(mixed, tmp_path, monkeypatch):
    """Without fcntl another process may be writing into a temporary folder right now."""
    monkeypatch.setattr(data_module, "fcntl", None)
    cache_dir = tmp_path / "cache"
    name = WaveformCache(mixed, 16000, cache_dir).build().path.name
    shutil.rmtree(cache_dir / name)
    live, stale = cache_dir / f".{name}.tmp-live", cache_dir / f".{name}.tmp-killed"
    for folder in (live, stale):
        folder.mkdir()
        (folder / "waveforms.f32").write_bytes(bytes(8))
    two_days_ago = time.time() - 2 * 24 * 3600
    for p in (stale / "waveforms.f32", stale):
        os.utime(p, (two_days_ago, two_days_ago))
    WaveformCache(mixed, 16000, cache_dir).build()
    assert _cache_dirs(cache_dir) == sorted([name, live.name])


# --- ClipDataset ------------------------------------------------------------------------


@pytest.fixture
def cache(mixed, tmp_path) -> WaveformCache:
    return WaveformCache(mixed, 16000, tmp_path / "cache").build()  # lengths 1600, 4800, 3200, 4000


def test_train_crops_replay_from_seed_epoch_and_index(cache):
    ds = ClipDataset(cache, [1, 2, 3], [0, 1, 0], clip_samples=2000, train=True, seed=7)
    ds.set_epoch(3)
    first = [ds[j][0] for j in range(3)]
    again = ClipDataset(cache, [3, 2, 1], [0, 1, 0], clip_samples=2000, train=True, seed=7)
    again.set_epoch(3)  # another order, another dataset object: same crop per cache item
    assert all(torch.equal(first[j], again[2 - j][0]) for j in range(3))
    for j, i in enumerate([1, 2, 3]):  # a crop is a contiguous slice of the clip
        source = torch.from_numpy(np.array(cache[i]))
        assert torch.equal(first[j], fix_length(source, 2000, random=True, generator=ds.generator(j)))


def test_train_crops_change_with_epoch_and_seed(cache):
    ds = ClipDataset(cache, [1], [0], clip_samples=1000, train=True, seed=0)
    crops = set()
    for seed in (0, 1):
        ds.seed = seed
        for epoch in range(5):
            ds.set_epoch(epoch)
            crops.add(tuple(ds[0][0][:4].tolist()))
    assert len(crops) >= 8  # 3801 possible offsets: collisions are rare


def test_eval_is_a_deterministic_centre_crop_or_pad(cache):
    ds = ClipDataset(cache, [0, 1], [5, 6], clip_samples=3200, train=False)
    x, target = ds[1]
    assert target == 6 and x.dtype == torch.float32 and x.shape == (3200,)
    assert torch.equal(x, torch.from_numpy(np.array(cache[1][800:4000])))
    short, _ = ds[0]  # 1600 samples centred in 3200: 800 zeros each side
    assert torch.equal(short[800:2400], torch.from_numpy(np.array(cache[0])))
    assert short[:800].abs().sum() == 0 and short[2400:].abs().sum() == 0
    ds.set_epoch(9)
    assert torch.equal(ds[1][0], x)


def test_repeat_padding_tiles_short_clips(cache):
    x, _ = ClipDataset(cache, [0], [0], clip_samples=4000, train=False, pad_mode="repeat")[0]
    clip = torch.from_numpy(np.array(cache[0]))
    assert torch.equal(x, fix_length(clip, 4000, mode="repeat"))
    assert torch.equal(x[1200:2800], clip)


def test_dataloader_workers_give_the_same_batches(cache):
    ds = ClipDataset(cache, [0, 1, 2, 3], [0, 1, 0, 1], clip_samples=2000, train=True, seed=3)
    ds.set_epoch(2)
    loader = lambda w: list(torch.utils.data.DataLoader(ds, batch_size=2, num_workers=w,  # noqa: E731
                                                        multiprocessing_context=FORK if w else None))
    for (a, ya), (b, yb) in zip(loader(0), loader(2)):
        assert torch.equal(a, b) and torch.equal(ya, yb)


@pytest.mark.parametrize("kwargs, message", [
    ({"targets": [0]}, "same length"),
    ({"indices": [0, 9]}, r"in \[0, 4\)"),
    ({"clip_samples": 0}, "positive"),
    ({"pad_mode": "edge"}, "'zeros' or 'repeat'"),
])
def test_clip_dataset_rejects_bad_arguments(cache, kwargs, message):
    args = {"indices": [0, 1], "targets": [0, 1], "clip_samples": 100, "train": True, **kwargs}
    with pytest.raises(ValueError, match=message):
        ClipDataset(cache, **args)


def test_cache_indexing_follows_sequence_rules(cache):
    np.testing.assert_array_equal(cache[-1], cache[3])
    with pytest.raises(IndexError, match="index 4 out of range for a cache of 4 files"):
        cache[4]


def test_empty_manifest_gives_an_empty_cache(tmp_path):
    cache = WaveformCache(Manifest([], tmp_path), 8000, tmp_path / "cache").build()
    assert len(cache) == 0 and cache.lengths.tolist() == []
