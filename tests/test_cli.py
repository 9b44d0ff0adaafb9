"""The command line's shell: fast start-up, version, error handling, exports."""

import subprocess
import sys

import pytest

import audioclf
from audioclf.cli import main
from audioclf.commands import COMMANDS

HEAVY = ("torch", "numpy", "timm", "torchaudio", "librosa")


def _modules_after(code: str) -> set[str]:
    code += "\nimport sys\nprint('MODULES:', ' '.join(sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return set(out.split("MODULES:")[-1].split())


@pytest.mark.parametrize("argv", [["--help"], ["--version"], ["train", "--help"], ["predict", "--help"]])
def test_help_and_version_do_not_import_heavy_packages(argv):
    code = f"from audioclf.cli import main\ntry:\n    main({argv!r})\nexcept SystemExit:\n    pass"
    assert not set(HEAVY) & _modules_after(code)


def test_version_is_printed(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.strip() == f"audioclf {audioclf.__version__}"


def test_every_subcommand_is_listed_in_help(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for name in COMMANDS:
        assert name.replace("_", "-") in out


def test_no_command_prints_help_and_exits_2(capsys):
    assert main([]) == 2
    assert "usage: audioclf" in capsys.readouterr().out


def test_user_error_is_one_line_and_status_2(tmp_path, capsys):
    missing = tmp_path / "nope.csv"
    status = main(["train", "--manifest", str(missing), "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert status == 2
    assert str(missing) in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_bad_option_value_names_the_option(tmp_path, capsys):
    manifest = tmp_path / "m.csv"
    manifest.write_text("path,label\n")
    status = main(["train", "--manifest", str(manifest), "--out", str(tmp_path / "run"), "--epochs", "0"])
    assert status == 2
    assert "epochs must be >= 1 (0 given)" in capsys.readouterr().err


def test_import_audioclf_is_light_and_every_public_name_resolves():
    assert not set(HEAVY) & _modules_after("import audioclf")
    for name in audioclf.__all__:
        assert getattr(audioclf, name) is not None, name
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        audioclf.nothing  # noqa: B018


@pytest.mark.parametrize("rank, verbose, level", [(None, False, "INFO"), ("0", True, "DEBUG"),
                                                   ("1", False, "WARNING"), ("3", True, "WARNING")])
def test_only_rank_0_logs_progress_under_torchrun(tmp_path, monkeypatch, rank, verbose, level):
    import logging

    if rank is None:
        monkeypatch.delenv("RANK", raising=False)
    else:
        monkeypatch.setenv("RANK", rank)
    seen = {}
    monkeypatch.setattr(logging, "basicConfig", lambda **kw: seen.update(kw))
    main(["-v"] * verbose + ["train", "--manifest", str(tmp_path / "nope.csv"), "--out", str(tmp_path / "o")])
    assert seen["level"] == getattr(logging, level)
