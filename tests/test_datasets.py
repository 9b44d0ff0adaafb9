"""audioclf.datasets: downloads only on request, verified, atomic, never over an existing copy.

No test touches the network: archives are built here and served through ``file://`` URLs;
an unreachable server is ``http://127.0.0.1:9`` (the discard port, closed) or a patched
``urlopen``.
"""

from __future__ import annotations

import dataclasses
import http.client
import io
import shutil
import tarfile
import urllib.error
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest

import layout_fixtures as fx
from audioclf import recipe
from audioclf.datasets import DATASETS, count_audio_files, default_fsdd_dir, download_dataset
from audioclf.errors import ManifestError
from audioclf.layouts import build_manifest

REPO = Path(__file__).resolve().parents[1]
N_ESC50 = 16  # clips written by fx.write_esc50
ESC50 = dataclasses.replace(DATASETS["esc50"], n_files=N_ESC50)


@pytest.fixture(scope="module")
def archives(tmp_path_factory) -> dict[str, Path]:
    """The ESC-50 fixture packed as the official archive is: under ``ESC-50-master/``."""
    base = tmp_path_factory.mktemp("archives")
    fx.write_esc50(base / "ESC-50-master")
    tar = base / "esc50.tar.gz"
    with tarfile.open(tar, "w:gz") as t:
        t.add(base / "ESC-50-master", arcname="ESC-50-master")
    zip_ = Path(shutil.make_archive(str(base / "esc50"), "zip", base, "ESC-50-master"))
    no_meta = base / "no-meta.tar.gz"
    with tarfile.open(no_meta, "w:gz") as t:
        t.add(base / "ESC-50-master" / "audio", arcname="ESC-50-master/audio")
    return {"tar": tar, "zip": zip_, "no_meta": no_meta}


def leftovers(parent: Path, dest: Path) -> list[str]:
    """Anything in ``parent`` besides ``dest``: temporary download folders must be gone."""
    return sorted(p.name for p in parent.iterdir() if p != dest)


@pytest.mark.parametrize("kind", ["tar", "zip"])
def test_download_unpacks_the_official_layout(tmp_path, archives, kind):
    dest = tmp_path / "esc50"
    assert download_dataset(ESC50, dest, url=archives[kind].as_uri()) == dest
    assert count_audio_files(dest) == N_ESC50
    manifest = build_manifest("esc50", dest)
    assert len(manifest) == N_ESC50 and sorted(set(manifest.folds().tolist())) == [1, 2, 3, 4, 5]
    assert leftovers(tmp_path, dest) == []


def test_download_into_an_existing_empty_folder(tmp_path, archives):
    (tmp_path / "esc50").mkdir()
    download_dataset(ESC50, tmp_path / "esc50", url=archives["tar"].as_uri())
    assert (tmp_path / "esc50" / "meta" / "esc50.csv").is_file()


def test_a_file_count_mismatch_leaves_nothing_behind(tmp_path, archives):
    dest = tmp_path / "esc50"
    with pytest.raises(ManifestError, match=f"holds {N_ESC50} audio files, ESC-50 has 2000; the download is "
                                            "incomplete or not the official release"):
        download_dataset(DATASETS["esc50"], dest, url=archives["tar"].as_uri())
    assert not dest.exists() and leftovers(tmp_path, dest) == []


def test_an_archive_without_the_layout_is_rejected(tmp_path, archives):
    with pytest.raises(ManifestError, match="the archive has no ESC-50-master/meta/esc50.csv; it is not the official"):
        download_dataset(ESC50, tmp_path / "esc50", url=archives["no_meta"].as_uri())
    assert list(tmp_path.iterdir()) == []


def test_a_damaged_archive_is_named(tmp_path):
    bad = tmp_path / "src" / "esc50.tar.gz"
    bad.parent.mkdir()
    bad.write_bytes(b"\x1f\x8b\x08 not really gzip")
    with pytest.raises(ManifestError, match="the downloaded archive is damaged"):
        download_dataset(ESC50, tmp_path / "esc50", url=bad.as_uri())
    assert leftovers(tmp_path, tmp_path / "esc50") == ["src"]


def test_an_existing_copy_is_never_overwritten(tmp_path, archives):
    dest = tmp_path / "esc50"
    (dest / "meta").mkdir(parents=True)
    (dest / "meta" / "esc50.csv").write_text("mine\n")
    with pytest.raises(ManifestError, match="already exists and is not empty; refusing to download over it"):
        download_dataset(ESC50, dest, url=archives["tar"].as_uri())
    assert (dest / "meta" / "esc50.csv").read_text() == "mine\n"
    assert sorted(p.name for p in dest.rglob("*")) == ["esc50.csv", "meta"]


def test_unreachable_server_says_how_to_download_by_hand(tmp_path):
    dest = tmp_path / "esc50"
    with pytest.raises(ManifestError) as e:
        download_dataset(ESC50, dest, url="http://127.0.0.1:9/ESC-50-master.zip", timeout=5)
    msg = str(e.value)
    assert msg.startswith("could not download ESC-50 from http://127.0.0.1:9/ESC-50-master.zip")
    assert f"download ESC-50 from {ESC50.url} and unpack it so that {dest / 'meta' / 'esc50.csv'} exists" in msg
    assert leftovers(tmp_path, dest) == []


class _BrokenTransfer:
    """A response whose connection drops after the first chunk."""

    headers = {"Content-Length": "1000"}

    def __init__(self):
        self.calls = 0

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def read(self, n):
        self.calls += 1
        if self.calls > 1:
            raise http.client.IncompleteRead(b"", 900)
        return b"x" * 100


def test_a_broken_transfer_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr("urllib.request.urlopen", lambda url, timeout=None: _BrokenTransfer())
    dest = tmp_path / "esc50"
    with pytest.raises(ManifestError, match=r"could not download ESC-50 from http://mirror.example/esc50.zip "
                                            r"\(IncompleteRead\(0 bytes read, 900 more expected\)\); download"):
        download_dataset(ESC50, dest, url="http://mirror.example/esc50.zip")
    assert leftovers(tmp_path, dest) == []


def test_a_malformed_url_is_a_clear_error(tmp_path):
    dest = tmp_path / "esc50"
    with pytest.raises(ManifestError, match=r"could not download ESC-50 from mirror/esc50.zip "
                                            r"\(unknown url type: 'mirror/esc50.zip'\)"):
        download_dataset(ESC50, dest, url="mirror/esc50.zip")
    assert leftovers(tmp_path, dest) == []


def test_a_dataset_without_a_public_archive(tmp_path):
    with pytest.raises(ManifestError, match="GTZAN genre collection has no public download address: download"):
        download_dataset(DATASETS["gtzan"], tmp_path / "gtzan")
    assert list(tmp_path.iterdir()) == []


def test_recipe_download_without_network(tmp_path, monkeypatch):
    def offline(url, timeout=None):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr("urllib.request.urlopen", offline)
    dest = tmp_path / "sc"
    err = io.StringIO()
    with redirect_stdout(io.StringIO()), redirect_stderr(err):
        code = recipe.main(REPO / "recipes" / "speechcommands.toml",
                           ["--data-dir", str(dest), "--download", "--preset", "cpu", "--out", str(tmp_path / "o")])
    assert code == 2
    msg = err.getvalue().strip()
    assert msg.startswith("speechcommands: error: could not download Speech Commands v0.02 from "
                          f"{DATASETS['speechcommands'].url} ([Errno -3] Temporary failure in name resolution)")
    assert f"unpack it so that {dest / 'validation_list.txt'} exists" in msg
    assert leftovers(tmp_path, dest) == []


def test_default_fsdd_dir_follows_the_environment(tmp_path, monkeypatch):
    (tmp_path / "recordings").mkdir()
    monkeypatch.setenv("AUDIOCLF_FSDD_DIR", str(tmp_path))
    assert default_fsdd_dir() == tmp_path


def test_default_fsdd_dir_falls_back_beside_the_working_folder(tmp_path, monkeypatch):
    (tmp_path / "shared/datasets/fsdd/recordings").mkdir(parents=True)
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    monkeypatch.delenv("AUDIOCLF_FSDD_DIR", raising=False)
    assert default_fsdd_dir() == tmp_path / "shared/datasets/fsdd"


def test_a_wrong_fsdd_dir_in_the_environment_is_reported_not_replaced(tmp_path, monkeypatch):
    """A copy at the fallback location exists, yet the folder the user named is the one used."""
    (tmp_path / "shared/datasets/fsdd/recordings").mkdir(parents=True)
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    monkeypatch.setenv("AUDIOCLF_FSDD_DIR", str(tmp_path / "typo"))
    assert default_fsdd_dir() == tmp_path / "typo"
    err = io.StringIO()
    with redirect_stdout(io.StringIO()), redirect_stderr(err):
        code = recipe.main(REPO / "recipes" / "fsdd.toml", ["--preset", "cpu", "--out", str(tmp_path / "out")])
    assert code == 2
    assert f"{tmp_path / 'typo'}: does not exist; expected Free Spoken Digit Dataset" in err.getvalue()


def test_real_data_tests_fail_when_the_environment_names_a_missing_fsdd(tmp_path):
    """They find FSDD as the recipes do: the named folder is used, and its absence is an
    error, not a skip (CI sets the variable and must not pass without the data)."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "AUDIOCLF_FSDD_DIR": str(tmp_path / "typo")}
    test = "tests/test_data_manifests.py::test_fsdd_manifest_is_what_the_builder_writes"
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, done.stdout
    assert f"AUDIOCLF_FSDD_DIR={tmp_path / 'typo'} holds no FSDD copy" in done.stdout


def test_recipe_download_from_a_mirror_then_builds_the_manifest(tmp_path, archives, monkeypatch):
    """``--download --url``: fetched, verified and unpacked before the manifest is built (the run
    then stops on a cheap error of its own: 5 official folds cannot be joined into 9)."""
    monkeypatch.setitem(DATASETS, "esc50", ESC50)
    dest = tmp_path / "esc50"
    err = io.StringIO()
    with redirect_stdout(io.StringIO()), redirect_stderr(err):
        code = recipe.main(REPO / "recipes" / "esc50.toml",
                           ["--data-dir", str(dest), "--download", "--url", archives["zip"].as_uri(), "--quick",
                            "--k", "9", "--preset", "cpu", "--out", str(tmp_path / "out")])
    assert code == 2 and "cannot join 5 official folds into 9" in err.getvalue()
    assert count_audio_files(dest) == N_ESC50 and (dest / "meta" / "esc50.csv").is_file()
