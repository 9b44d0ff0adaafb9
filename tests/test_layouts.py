"""audioclf.layouts: each dataset builder on a small tree in that dataset's official layout."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from audioclf.audio import load_audio
from audioclf.commands import manifest as manifest_command
from audioclf.errors import ManifestError
from audioclf.layouts import FORMATS
from audioclf.manifest import build_manifest


def _touch(root: Path, *paths: str) -> None:
    """Write each path as a tiny real clip (the builders never decode, but a test loads one)."""
    for p in paths:
        (root / p).parent.mkdir(parents=True, exist_ok=True)
        fmt = "AU" if p.endswith(".au") else "WAV"
        sf.write(root / p, np.full(8, 0.25, np.float32), 8000, format=fmt)


def _write(root: Path, path: str, text: str) -> None:
    (root / path).parent.mkdir(parents=True, exist_ok=True)
    (root / path).write_text(text)


def test_every_format_has_a_builder_and_a_command_choice():
    assert set(FORMATS) == {"fsdd", "esc50", "urbansound8k", "speechcommands", "gtzan", "folders"}
    assert tuple(FORMATS) == manifest_command.FORMATS  # the command lists them without importing us


# --- folders ----------------------------------------------------------------------------


def test_folders(tmp_path):
    _touch(tmp_path, "dog/a.wav", "dog/more/b.flac", "cat/c.wav")
    _write(tmp_path, "cat/notes.txt", "not audio")
    _write(tmp_path, ".hidden/x.wav", "")
    m = build_manifest("folders", tmp_path)
    assert [(r.path, r.label) for r in m.records] == [("cat/c.wav", "cat"), ("dog/a.wav", "dog"),
                                                      ("dog/more/b.flac", "dog")]
    assert m.folds() is None and m.groups() is None


def test_folders_without_class_folders(tmp_path):
    _touch(tmp_path, "loose.wav")
    with pytest.raises(ManifestError, match="expected one sub-folder per class"):
        build_manifest("folders", tmp_path)


# --- FSDD -------------------------------------------------------------------------------


def test_fsdd(tmp_path):
    _touch(tmp_path, "recordings/3_theo_10.wav", "recordings/3_theo_2.wav", "recordings/0_jackson_0.wav")
    _write(tmp_path, "speakers.csv", "speaker,gender\ntheo,male\n")
    m = build_manifest("fsdd", tmp_path)
    assert [(r.path, r.label, r.group) for r in m.records] == [
        ("recordings/0_jackson_0.wav", "0", "jackson"),
        ("recordings/3_theo_2.wav", "3", "theo"),  # takes in numeric order
        ("recordings/3_theo_10.wav", "3", "theo"),
    ]
    wav, rate = load_audio(m.abspath(0))
    assert rate == 8000 and wav.shape == (8,)


def test_fsdd_wrong_layout(tmp_path):
    _touch(tmp_path, "0_george_0.wav")
    with pytest.raises(ManifestError, match=r"recordings: not found; expected recordings/"):
        build_manifest("fsdd", tmp_path)


def test_fsdd_bad_file_name(tmp_path):
    _touch(tmp_path, "recordings/0_george_0.wav", "recordings/george.wav")
    with pytest.raises(ManifestError, match=r"1 file name\(s\) are not \{digit\}_\{speaker\}_\{take\}.wav: george.wav"):
        build_manifest("fsdd", tmp_path)


def test_real_fsdd(fsdd_dir):
    m = build_manifest("fsdd", fsdd_dir)
    assert len(m) == 3000 and m.labels.names == [str(d) for d in range(10)]
    assert len(set(m.groups())) == 6 and m.folds() is None


# --- ESC-50 -----------------------------------------------------------------------------

ESC50_CSV = """filename,fold,target,category,esc10,src_file,take
1-100032-A-0.wav,1,0,dog,True,100032,A
1-100038-A-14.wav,1,14,chirping_birds,False,100038,A
2-100648-A-43.wav,2,43,chainsaw,False,100648,A
2-100648-B-43.wav,2,43,chainsaw,False,100648,B
"""


def test_esc50(tmp_path):
    _write(tmp_path, "meta/esc50.csv", ESC50_CSV)
    _touch(tmp_path, *[f"audio/{line.split(',')[0]}" for line in ESC50_CSV.splitlines()[1:]])
    m = build_manifest("esc50", tmp_path)
    assert m.records[0].path == "audio/1-100032-A-0.wav" and m.records[0].label == "dog"
    assert m.folds().tolist() == [1, 1, 2, 2]
    assert m.groups() == ["100032", "100038", "100648", "100648"]
    assert m.records[0].extra == {"esc10": "True"}
    assert m.labels.names == ["chainsaw", "chirping_birds", "dog"]


def test_esc50_missing_metadata(tmp_path):
    _touch(tmp_path, "audio/1-100032-A-0.wav")
    with pytest.raises(ManifestError, match=r"meta/esc50.csv: not found; expected the official ESC-50"):
        build_manifest("esc50", tmp_path)


def test_esc50_missing_files_are_counted_and_named(tmp_path):
    _write(tmp_path, "meta/esc50.csv", ESC50_CSV)
    _touch(tmp_path, "audio/1-100032-A-0.wav")
    with pytest.raises(ManifestError, match=r"3 of 4 files listed in meta/esc50.csv are missing: "
                                            r"1-100038-A-14.wav, 2-100648-A-43.wav"):
        build_manifest("esc50", tmp_path)


def test_esc50_wrong_columns(tmp_path):
    _write(tmp_path, "meta/esc50.csv", "filename,fold,category\nx.wav,1,dog\n")
    _touch(tmp_path, "audio/x.wav")
    with pytest.raises(ManifestError, match="missing column.*target.*src_file"):
        build_manifest("esc50", tmp_path)


# --- UrbanSound8K -----------------------------------------------------------------------

US8K_CSV = """slice_file_name,fsID,start,end,salience,fold,classID,class
100032-3-0-0.wav,100032,0.0,0.317551,1,5,3,dog_bark
100263-2-0-117.wav,100263,58.5,62.5,1,5,2,children_playing
102305-6-0-0.wav,102305,0.0,2.61161,2,10,6,gun_shot
"""


def test_urbansound8k(tmp_path):
    _write(tmp_path, "metadata/UrbanSound8K.csv", US8K_CSV)
    _touch(tmp_path, "audio/fold5/100032-3-0-0.wav", "audio/fold5/100263-2-0-117.wav",
           "audio/fold10/102305-6-0-0.wav")
    m = build_manifest("urbansound8k", tmp_path)
    assert [r.path for r in m.records] == ["audio/fold5/100032-3-0-0.wav", "audio/fold5/100263-2-0-117.wav",
                                           "audio/fold10/102305-6-0-0.wav"]
    assert m.folds().tolist() == [5, 5, 10] and m.groups() == ["100032", "100263", "102305"]
    assert [r.label for r in m.records] == ["dog_bark", "children_playing", "gun_shot"]


def test_urbansound8k_file_in_the_wrong_fold_folder(tmp_path):
    _write(tmp_path, "metadata/UrbanSound8K.csv", US8K_CSV)
    _touch(tmp_path, "audio/fold5/100032-3-0-0.wav", "audio/fold5/100263-2-0-117.wav",
           "audio/fold9/102305-6-0-0.wav")
    with pytest.raises(ManifestError, match=r"1 of 3 files .* missing: audio/fold10/102305-6-0-0.wav"):
        build_manifest("urbansound8k", tmp_path)


# --- Speech Commands v2 -----------------------------------------------------------------


def _speechcommands(root: Path) -> None:
    _touch(root, "yes/0a7c2a8d_nohash_0.wav", "yes/0a7c2a8d_nohash_1.wav", "yes/1b4c9b89_nohash_0.wav",
           "no/0a7c2a8d_nohash_0.wav", "no/c1d39ce8_nohash_2.wav",
           "_background_noise_/white_noise.wav")
    _write(root, "validation_list.txt", "yes/1b4c9b89_nohash_0.wav\n")
    _write(root, "testing_list.txt", "no/c1d39ce8_nohash_2.wav\n")
    _write(root, "LICENSE", "CC BY 4.0")


def test_speechcommands(tmp_path):
    _speechcommands(tmp_path)
    m = build_manifest("speechcommands", tmp_path)
    rows = {r.path: (r.label, r.group, r.extra["split"]) for r in m.records}
    assert rows == {
        "no/0a7c2a8d_nohash_0.wav": ("no", "0a7c2a8d", "train"),
        "no/c1d39ce8_nohash_2.wav": ("no", "c1d39ce8", "test"),
        "yes/0a7c2a8d_nohash_0.wav": ("yes", "0a7c2a8d", "train"),
        "yes/0a7c2a8d_nohash_1.wav": ("yes", "0a7c2a8d", "train"),
        "yes/1b4c9b89_nohash_0.wav": ("yes", "1b4c9b89", "validation"),
    }
    assert m.labels.names == ["no", "yes"]  # _background_noise_ is not a class


def test_speechcommands_without_split_lists(tmp_path):
    _speechcommands(tmp_path)
    (tmp_path / "testing_list.txt").unlink()
    with pytest.raises(ManifestError, match=r"testing_list.txt: not found; expected the official testing_list.txt"):
        build_manifest("speechcommands", tmp_path)


def test_speechcommands_listed_file_missing(tmp_path):
    _speechcommands(tmp_path)
    (tmp_path / "no/c1d39ce8_nohash_2.wav").unlink()
    with pytest.raises(ManifestError, match=r"1 of 2 files listed in validation_list.txt/testing_list.txt "
                                            r"are missing: no/c1d39ce8_nohash_2.wav"):
        build_manifest("speechcommands", tmp_path)


# --- GTZAN ------------------------------------------------------------------------------


@pytest.mark.parametrize("folder, ext", [("genres_original", "wav"), ("genres", "au")])
def test_gtzan_both_layouts(tmp_path, folder, ext):
    _touch(tmp_path, f"{folder}/blues/blues.00000.{ext}", f"{folder}/blues/blues.00001.{ext}",
           f"{folder}/rock/rock.00099.{ext}")
    _write(tmp_path, "images_original/blues/blues00000.png", "png")  # the Kaggle copy's images
    m = build_manifest("gtzan", tmp_path)
    assert [(r.path, r.label) for r in m.records] == [
        (f"{folder}/blues/blues.00000.{ext}", "blues"), (f"{folder}/blues/blues.00001.{ext}", "blues"),
        (f"{folder}/rock/rock.00099.{ext}", "rock")]
    assert load_audio(m.abspath(0))[1] == 8000


def test_gtzan_wrong_layout(tmp_path):
    _touch(tmp_path, "blues/blues.00000.wav")
    with pytest.raises(ManifestError, match="expected genres_original/<genre>/.* or genres/<genre>/"):
        build_manifest("gtzan", tmp_path)


# --- common -----------------------------------------------------------------------------


@pytest.mark.parametrize("format", sorted(FORMATS))
def test_missing_root(tmp_path, format):
    with pytest.raises(ManifestError, match=rf"nowhere: no such folder \(expected the top folder of a {format}"):
        build_manifest(format, tmp_path / "nowhere")
