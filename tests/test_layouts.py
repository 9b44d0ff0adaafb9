"""audioclf.layouts: each dataset builder on a small tree in that dataset's official layout."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from audioclf.audio import load_audio
from audioclf.commands import manifest as manifest_command
from audioclf.errors import ManifestError
from audioclf import layouts
from audioclf.layouts import FORMATS
from audioclf.manifest import Manifest, Record, build_manifest, read_manifest, write_manifest


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


def test_fsdd_recordings_is_a_file(tmp_path):
    _write(tmp_path, "recordings", "")
    with pytest.raises(ManifestError, match=r"recordings: is not a folder; expected recordings/"):
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


def _esc50(root: Path, csv_text: str = ESC50_CSV) -> None:
    _write(root, "meta/esc50.csv", csv_text)
    _touch(root, *[f"audio/{line.split(',')[0]}" for line in ESC50_CSV.splitlines()[1:]])


def test_esc50_short_rows_are_named_with_their_lines(tmp_path):
    _esc50(tmp_path, ESC50_CSV + "1-100039-A-0.wav,1\n\n2-100040-A-0.wav\n")
    with pytest.raises(ManifestError, match=r"esc50\.csv: 2 row\(s\) with the wrong number of fields") as e:
        build_manifest("esc50", tmp_path)
    assert e.value.problems == ["line 6: 2 fields, the header has 7", "line 8: 1 fields, the header has 7"]


@pytest.mark.parametrize("change, problem", [
    (lambda text: text.replace(",dog,", ",,"), "line 2: empty label for 'audio/1-100032-A-0.wav'"),
    (lambda text: text + text.splitlines()[3] + "\n", "line 6: duplicate path 'audio/2-100648-A-43.wav' "
                                                      "(first on line 4)"),
    (lambda text: text.replace(",100038,", ",,"), "line 3: empty group for 'audio/1-100038-A-14.wav' "
                                                  "(other rows have one)"),
], ids=["empty category", "duplicate row", "empty src_file"])
def test_esc50_rows_get_the_checks_read_manifest_applies(tmp_path, change, problem):
    _esc50(tmp_path, change(ESC50_CSV))
    with pytest.raises(ManifestError, match=r"esc50\.csv: 1 problem\(s\) in the rows") as e:
        build_manifest("esc50", tmp_path)
    assert e.value.problems == [problem]


def test_esc50_metadata_not_utf8(tmp_path):
    _esc50(tmp_path)
    (tmp_path / "meta/esc50.csv").write_bytes(ESC50_CSV.replace("dog", "d\u00f6g").encode("cp1252"))
    with pytest.raises(ManifestError, match=r"esc50\.csv: not UTF-8 text: byte 0xf6 at offset \d+ \(line 2\)"):
        build_manifest("esc50", tmp_path)


def test_esc50_metadata_is_a_folder(tmp_path):
    _touch(tmp_path, "audio/1-100032-A-0.wav")
    (tmp_path / "meta/esc50.csv").mkdir(parents=True)
    with pytest.raises(ManifestError, match=r"esc50\.csv: is not a file; expected the official ESC-50 metadata"):
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


def test_urbansound8k_short_row(tmp_path):
    _write(tmp_path, "metadata/UrbanSound8K.csv", US8K_CSV + "102306-6-0-0.wav,102306,0.0\n")
    _touch(tmp_path, "audio/fold5/100032-3-0-0.wav")
    with pytest.raises(ManifestError, match=r"UrbanSound8K\.csv: 1 row\(s\) with the wrong number") as e:
        build_manifest("urbansound8k", tmp_path)
    assert e.value.problems == ["line 5: 3 fields, the header has 8"]


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


@pytest.mark.parametrize("name", ["0a7c2a8d_0.wav", "_nohash_0.wav"])
def test_speechcommands_names_without_a_speaker_hash(tmp_path, name):
    _speechcommands(tmp_path)
    _touch(tmp_path, f"yes/{name}")
    with pytest.raises(ManifestError, match=rf"1 file name\(s\) are not <speaker>_nohash_<n>.wav: yes/{name}$"):
        build_manifest("speechcommands", tmp_path)


def test_speechcommands_split_list_not_utf8(tmp_path):
    _speechcommands(tmp_path)
    (tmp_path / "validation_list.txt").write_bytes(b"\xff\xfeyes/1b4c9b89_nohash_0.wav\n")
    with pytest.raises(ManifestError, match=r"validation_list\.txt: not UTF-8 text: byte 0xff at offset 0"):
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


def test_gtzan_misnamed_files(tmp_path):
    _touch(tmp_path, "genres_original/blues/blues.00000.wav", "genres_original/blues/rock.00001.wav",
           "genres_original/blues/blues1.wav")
    with pytest.raises(ManifestError, match=r"2 file name\(s\) are not <genre>/<genre>.000NN.wav: "
                                            r"blues/blues1.wav, blues/rock.00001.wav"):
        build_manifest("gtzan", tmp_path)


def test_gtzan_leaves_out_unreadable_files(tmp_path, caplog, capsys):
    """The Kaggle copy's jazz.00054.wav cannot be read: the manifest goes on without it."""
    _touch(tmp_path, "genres_original/jazz/jazz.00053.wav", "genres_original/jazz/jazz.00054.wav",
           "genres_original/rock/rock.00000.wav")
    (tmp_path / "genres_original/jazz/jazz.00054.wav").write_bytes(b"\x00" * 1000)
    with caplog.at_level(logging.WARNING, logger="audioclf.layouts"):
        m = build_manifest("gtzan", tmp_path)
    assert [r.path for r in m.records] == ["genres_original/jazz/jazz.00053.wav", "genres_original/rock/rock.00000.wav"]
    assert m.left_out == ["genres_original/jazz/jazz.00054.wav"]
    assert "jazz.00054.wav: unreadable audio (" in caplog.text
    out = tmp_path / "gtzan.csv"
    parser = argparse.ArgumentParser()
    manifest_command.add_arguments(parser)
    manifest_command.run(parser.parse_args(["--format", "gtzan", str(tmp_path), "-o", str(out)]))
    assert capsys.readouterr().out == f"{out}: 2 rows, 2 labels, 0 folds, 0 groups, 1 unreadable file(s) left out\n"


def test_gtzan_with_no_readable_file(tmp_path):
    _write(tmp_path, "genres/blues/blues.00000.au", "not audio at all")
    with pytest.raises(ManifestError, match=r"none of the 1 audio files can be read: genres/blues/blues.00000.au"):
        build_manifest("gtzan", tmp_path)


# --- common -----------------------------------------------------------------------------


def test_every_built_manifest_reads_back(tmp_path):
    """What `audioclf manifest` writes, read_manifest accepts, for every layout."""
    _touch(tmp_path / "folders", "dog/a.wav", "cat/b.wav")
    _touch(tmp_path / "fsdd", "recordings/0_jackson_0.wav")
    _esc50(tmp_path / "esc50")
    _write(tmp_path / "urbansound8k", "metadata/UrbanSound8K.csv", US8K_CSV)
    _touch(tmp_path / "urbansound8k", "audio/fold5/100032-3-0-0.wav", "audio/fold5/100263-2-0-117.wav",
           "audio/fold10/102305-6-0-0.wav")
    _speechcommands(tmp_path / "speechcommands")
    _touch(tmp_path / "gtzan", "genres/blues/blues.00000.au")
    for format in FORMATS:
        built = build_manifest(format, tmp_path / format)
        write_manifest(built, tmp_path / f"{format}.csv")
        back = read_manifest(tmp_path / f"{format}.csv", root=tmp_path / format)
        assert back.content_hash() == built.content_hash(), format


def test_a_builder_cannot_produce_rows_the_reader_rejects(tmp_path, monkeypatch):
    monkeypatch.setitem(layouts.FORMATS, "folders", lambda root: Manifest([Record("a.wav", "")], root))
    with pytest.raises(ManifestError, match="the folders layout gives rows a manifest cannot hold") as e:
        build_manifest("folders", tmp_path)
    assert e.value.problems == ["empty label for 'a.wav'"]




@pytest.mark.parametrize("format", sorted(FORMATS))
def test_missing_root(tmp_path, format):
    with pytest.raises(ManifestError, match=rf"nowhere: no such folder \(expected the top folder of a {format}"):
        build_manifest(format, tmp_path / "nowhere")
