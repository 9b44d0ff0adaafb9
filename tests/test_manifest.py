"""audioclf.manifest: the CSV schema, validation that reports every problem, LabelMap."""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from audioclf._io import atomic_path, write_json_atomic
from audioclf.commands import manifest as manifest_command
from audioclf.errors import ManifestError
from audioclf.manifest import LabelMap, Manifest, Record, build_manifest, read_manifest, write_manifest


def _csv(tmp_path, text, files=()):
    for name in files:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    path = tmp_path / "m.csv"
    path.write_text(text)
    return path


# --- LabelMap ---------------------------------------------------------------------------


def test_label_map_is_sorted_unique_and_round_trips():
    labels = LabelMap(["dog", "cat", "dog", "bird"])
    assert labels.names == ["bird", "cat", "dog"] and len(labels) == 3
    assert labels.encode(["dog", "bird"]).tolist() == [2, 0]
    assert labels.encode(["dog"]).dtype == np.int64
    assert [labels.decode(i) for i in range(3)] == labels.names
    assert labels == LabelMap(["cat", "bird", "dog"])  # order of appearance does not matter


@pytest.mark.parametrize("target", [-1, 3])
def test_label_map_decode_rejects_targets_out_of_range(target):
    with pytest.raises(ManifestError, match=rf"target {target} is not in \[0, 3\): the label map has 3 labels"):
        LabelMap(["bird", "cat", "dog"]).decode(target)


def test_label_map_rejects_unknown_label():
    with pytest.raises(ManifestError, match="unknown label 'cow'; known labels: cat, dog"):
        LabelMap(["cat", "dog"]).index("cow")


# --- reading ----------------------------------------------------------------------------


def test_read_full_schema(tmp_path):
    path = _csv(tmp_path, "path,label,fold,group,split\na/1.wav,dog,2,s1,train\nb/2.wav,cat,1,s2,test\n",
                files=["a/1.wav", "b/2.wav"])
    m = read_manifest(path)
    assert m.root == tmp_path and len(m) == 2
    assert m.records[0] == Record("a/1.wav", "dog", 2, "s1", {"split": "train"})
    assert m.targets().tolist() == [1, 0]
    assert m.folds().tolist() == [2, 1] and m.groups() == ["s1", "s2"]
    assert m.abspath(1) == tmp_path / "b/2.wav"


def test_optional_columns_absent_or_empty_give_none(tmp_path):
    path = _csv(tmp_path, "path,label,fold\nx.wav,a,\ny.wav,b,\n", files=["x.wav", "y.wav"])
    m = read_manifest(path)
    assert m.folds() is None and m.groups() is None


def test_root_argument_and_check_files(tmp_path):
    path = _csv(tmp_path, "path,label\nclip.wav,a\n")
    data = tmp_path / "data"
    (data).mkdir()
    (data / "clip.wav").write_bytes(b"")
    assert read_manifest(path, root=data).abspath(0) == data / "clip.wav"
    assert len(read_manifest(path, check_files=False)) == 1  # file absent beside the CSV


def test_every_problem_is_reported_at_once_with_line_numbers(tmp_path):
    text = ("path,label,fold\n"
            "a.wav,x,1\n"          # line 2: fine
            "missing.wav,x,1\n"    # line 3: file missing
            "b.wav,,1\n"           # line 4: empty label
            "a.wav,y,2\n"          # line 5: duplicate
            "c.wav,z,one\n"        # line 6: non-integer fold
            "d.wav,z\n")           # line 7: too few fields
    path = _csv(tmp_path, text, files=["a.wav", "b.wav", "c.wav", "d.wav"])
    with pytest.raises(ManifestError) as info:
        read_manifest(path)
    problems = info.value.problems
    assert problems == [
        "line 3: file not found: " + str(tmp_path / "missing.wav"),
        "line 4: empty label for 'b.wav'",
        "line 5: duplicate path 'a.wav' (first on line 2)",
        "line 6: fold 'one' is not an integer",
        "line 7: 2 fields, the header has 3",
    ]
    assert "5 problem(s)" in str(info.value) and "line 6" in str(info.value)


def test_missing_column(tmp_path):
    path = _csv(tmp_path, "file,label\na.wav,x\n")
    with pytest.raises(ManifestError, match=r"line 1: missing column 'path' \(header is file,label\)"):
        read_manifest(path)


def test_partly_filled_group_is_a_problem(tmp_path):
    path = _csv(tmp_path, "path,label,group\na.wav,x,s1\nb.wav,x,\n", files=["a.wav", "b.wav"])
    with pytest.raises(ManifestError, match=r"line 3: empty group for 'b.wav' \(other rows have one\)"):
        read_manifest(path)


@pytest.mark.parametrize("text, message", [(None, "no such manifest file"), ("", "empty file"),
                                           ("path,label\n", "has no rows, only the header"),
                                           ("path,label\n\n  \n", "has no rows, only the header")],
                         ids=["missing", "empty", "header only", "header and blank lines"])
def test_missing_empty_or_header_only_manifest_file(tmp_path, text, message):
    path = tmp_path / "m.csv"
    if text is not None:
        path.write_text(text)
    with pytest.raises(ManifestError, match=rf"m\.csv: {message}"):
        read_manifest(path)


def test_a_folder_is_not_a_manifest(tmp_path):
    (tmp_path / "m.csv").mkdir()
    with pytest.raises(ManifestError, match=r"m\.csv: is a folder, expected a text file"):
        read_manifest(tmp_path / "m.csv")


@pytest.mark.parametrize("data, message", [
    ("path,label\n\u00e9.wav,x\n".encode("cp1252"), r"not UTF-8 text: byte 0xe9 at offset 11 \(line 2\); save it as UTF-8"),
    (b"\xef\xbb\xbfpath,label\na.wav,\xe9\n", r"not UTF-8 text: byte 0xe9 at offset 20 \(line 2\)"),
    (bytes(range(256)), r"not UTF-8 text: byte 0x80 at offset 128 \(line 2\)"),
    (b"path,label\na.wav,x\x00\n", r"NUL byte at offset 18 \(line 2\); a binary file, not text"),
    (b'path,label\n"' + b"a" * 200_000 + b'",x\n', r"line 2: not valid CSV \(field larger than field limit"),
], ids=["cp1252", "bom then latin-1", "binary", "nul", "huge field"])
def test_unreadable_manifest_text_names_the_file_and_the_place(tmp_path, data, message):
    path = tmp_path / "m.csv"
    path.write_bytes(data)
    with pytest.raises(ManifestError, match=r"m\.csv: " + message):
        read_manifest(path, check_files=False)


def test_utf8_with_a_byte_order_mark_reads(tmp_path):
    path = _csv(tmp_path, "", files=["\u00e9.wav"])
    path.write_bytes("path,label\n\u00e9.wav,x\n".encode("utf-8-sig"))
    assert read_manifest(path).records == [Record("\u00e9.wav", "x")]


def test_duplicate_column(tmp_path):
    path = _csv(tmp_path, "path,label,label\na.wav,x,y\n", files=["a.wav"])
    with pytest.raises(ManifestError, match=r"line 1: duplicate column 'label'"):
        read_manifest(path)


@pytest.mark.parametrize("first, second", [("a.wav", "./a.wav"), ("sub/a.wav", "sub//a.wav"),
                                           ("sub/a.wav", "other/../sub/a.wav")])
def test_duplicate_path_written_another_way(tmp_path, first, second):
    path = _csv(tmp_path, f"path,label\n{first},x\n{second},y\n", files=[first])
    with pytest.raises(ManifestError, match=rf"line 3: duplicate path '{re.escape(second)}' \(first on line 2\)"):
        read_manifest(path, check_files=False)


# --- writing, subsets, hashing ----------------------------------------------------------


def test_write_then_read_round_trips(tmp_path):
    records = [Record("a.wav", "x", 1, "g", {"split": "train", "note": "q,uoted"}),
               Record("b.wav", "y", 2, "h", {"split": "test"})]
    write_manifest(Manifest(records, tmp_path), tmp_path / "out.csv")
    back = read_manifest(tmp_path / "out.csv", check_files=False)
    assert back.records[0] == records[0]
    assert back.records[1] == Record("b.wav", "y", 2, "h", {"split": "test", "note": ""})
    assert (tmp_path / "out.csv").read_text().splitlines()[0] == "path,label,fold,group,split,note"


def test_write_omits_unused_optional_columns(tmp_path):
    write_manifest(Manifest([Record("a.wav", "x")], tmp_path), tmp_path / "out.csv")
    assert (tmp_path / "out.csv").read_text() == "path,label\na.wav,x\n"


@pytest.mark.skipif(os.name == "nt", reason="POSIX permissions")
@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600)], ids=["022", "077"])
def test_atomic_writes_follow_the_umask(tmp_path, umask, mode):
    """Manifests, bundles and reports are as readable as any file the user creates."""
    old = os.umask(umask)
    try:
        write_manifest(Manifest([Record("a.wav", "x")], tmp_path), tmp_path / "m.csv")
        write_json_atomic(tmp_path / "config.json", {"a": 1})
        with atomic_path(tmp_path / "fold-0.safetensors") as tmp:
            tmp.write_bytes(b"weights")
    finally:
        os.umask(old)
    modes = {p.name: oct(p.stat().st_mode & 0o777) for p in tmp_path.iterdir()}
    assert modes == dict.fromkeys(["m.csv", "config.json", "fold-0.safetensors"], oct(mode))


def test_subset_keeps_the_parent_label_map():
    m = Manifest([Record("a", "cat"), Record("b", "dog"), Record("c", "eel")], "/data")
    sub = m.subset([2])
    assert sub.labels.names == ["cat", "dog", "eel"] and sub.targets().tolist() == [2]
    assert sub.root == m.root


def test_without_folds_and_groups_clear_only_that_column():
    m = Manifest([Record("a", "cat", 1, "g", {"s": "t"}), Record("b", "dog", 2, "h")], "/data")
    no_folds, no_groups = m.without_folds(), m.without_groups()
    assert no_folds.folds() is None and no_folds.groups() == ["g", "h"]
    assert no_groups.groups() is None and no_groups.folds().tolist() == [1, 2]
    assert no_folds.records[0].extra == {"s": "t"} and no_folds.labels == m.labels
    assert m.folds().tolist() == [1, 2]  # the original is untouched


def test_content_hash_changes_with_any_field_and_not_otherwise():
    base = [Record("a", "cat", 1, "g"), Record("b", "dog", 2, "h")]
    h = Manifest(base, "/x").content_hash()
    assert Manifest(list(base), "/y").content_hash() == h
    variants = [[Record("a2", "cat", 1, "g"), base[1]], [Record("a", "cow", 1, "g"), base[1]],
                [Record("a", "cat", 3, "g"), base[1]], [Record("a", "cat", 1, "k"), base[1]],
                [Record("a", "cat", 1, "g", {"s": "t"}), base[1]], base[::-1]]
    assert len({Manifest(v, "/x").content_hash() for v in variants} | {h}) == len(variants) + 1


def test_build_manifest_lists_valid_formats(tmp_path):
    with pytest.raises(ManifestError, match="unknown dataset format 'esc10'; valid formats: fsdd, esc50"):
        build_manifest("esc10", tmp_path)


# --- the `audioclf manifest` command --------------------------------------------------------


def _run_command(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    manifest_command.add_arguments(parser)
    return manifest_command.run(parser.parse_args(argv))


def test_manifest_command_on_real_fsdd(fsdd_dir, tmp_path, capsys):
    out = tmp_path / "fsdd.csv"
    assert _run_command(["--format", "fsdd", str(fsdd_dir), "-o", str(out)]) == 0
    assert capsys.readouterr().out == f"{out}: 3000 rows, 10 labels, 0 folds, 6 groups\n"
    m = read_manifest(out, root=fsdd_dir)
    assert len(m) == 3000 and len(m.labels) == 10 and len(set(m.groups())) == 6


def test_manifest_command_rejects_unknown_format(tmp_path, capsys):
    with pytest.raises(SystemExit):
        _run_command(["--format", "timit", str(tmp_path), "-o", str(tmp_path / "x.csv")])
    assert "invalid choice: 'timit'" in capsys.readouterr().err


def test_manifest_command_imports_only_the_standard_library():
    code = "import sys, audioclf.commands.manifest; print(sorted({'torch', 'numpy'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
