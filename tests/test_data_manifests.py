"""The checked-in manifests in data_manifests/ agree with the datasets they describe."""

from __future__ import annotations

from pathlib import Path

from audioclf.manifest import build_manifest, read_manifest

MANIFESTS = Path(__file__).resolve().parents[1] / "data_manifests"


def test_fsdd_manifest_matches_the_recordings_folder(fsdd_dir):
    checked_in = read_manifest(MANIFESTS / "fsdd.csv", root=fsdd_dir)  # also checks every file exists
    on_disk = {p.relative_to(fsdd_dir).as_posix() for p in (fsdd_dir / "recordings").glob("*.wav")}
    assert {r.path for r in checked_in.records} == on_disk


def test_fsdd_manifest_is_what_the_builder_writes(fsdd_dir):
    checked_in = read_manifest(MANIFESTS / "fsdd.csv", root=fsdd_dir, check_files=False)
    assert checked_in.content_hash() == build_manifest("fsdd", fsdd_dir).content_hash()


def test_fsdd_manifest_labels_and_groups_follow_the_file_names(fsdd_dir):
    m = read_manifest(MANIFESTS / "fsdd.csv", root=fsdd_dir, check_files=False)
    for r in m.records:
        digit, speaker, _take = Path(r.path).stem.split("_")
        assert (r.label, r.group) == (digit, speaker), r.path
    assert m.labels.names == [str(d) for d in range(10)]
    assert sorted(set(m.groups())) == ["george", "jackson", "lucas", "nicolas", "theo", "yweweler"]
    assert m.folds() is None  # folds are assigned by cross-validation, grouped by speaker
