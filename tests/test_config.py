import re

import pytest

from audioclf.commands._options import add_run_options, run_config_from_args
from audioclf.config import AugmentConfig, RunConfig, TrainConfig, load_config_file
from audioclf.errors import ConfigError


def test_round_trip_through_dict():
    cfg = RunConfig().replace(train={"epochs": 7}, model={"backbone": "resnest26d"})
    assert RunConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize("section, values, message", [
    ("train", {"lr": -1.0}, "lr must be positive (-1.0 given)"),
    ("train", {"optimizer": "sgd"}, "optimizer must be one of 'adamw', 'adam' ('sgd' given)"),
    ("train", {"swa_start": 1.5}, "swa_start must be an epoch"),
    ("train", {"val_split": "speakers"}, "val_split must be one of 'groups', 'clips' ('speakers' given)"),
    ("audio", {"sample_rate": 0}, "sample_rate must be an integer in (0, 1000000] Hz (0 given)"),
    ("features", {"mel_scale": "bark"}, "mel_scale must be one of 'slaney', 'htk'"),
    ("augment", {"time_mask_width": 1.5}, "time_mask_width must be a fraction in [0, 1]"),
    ("augment", {"speed_perturb": 0.5}, "speed_perturb must be a fraction in [0, 0.5) (0.5 given)"),
    ("cv", {"k": 1}, "k must be in [2, 100] (1 given)"),
    # types, before ranges: these used to fail later, inside range() or NumPy
    ("train", {"epochs": 2.5}, "epochs must be an integer (2.5 given)"),
    ("train", {"epochs": True}, "epochs must be an integer (True given)"),
    ("train", {"batch_size": 8.5}, "batch_size must be an integer (8.5 given)"),
    ("features", {"n_mels": 40.5}, "n_mels must be an integer (40.5 given)"),
    ("train", {"amp": "false"}, "amp must be true or false ('false' given)"),
    ("train", {"swa_start": True}, "swa_start must be a number or None (True given)"),
    ("train", {"seed": -3}, "seed must be >= 0 (-3 given)"),
    ("train", {"seed": 1.5}, "seed must be an integer (1.5 given)"),
    ("train", {"plateau_patience": 1.5}, "plateau_patience must be an integer or None (1.5 given)"),
    ("train", {"lr": "0.01"}, "lr must be a number ('0.01' given)"),
    ("audio", {"sample_rate": 8000.5}, "sample_rate must be an integer (8000.5 given)"),
    ("augment", {"mixup_per_example": 1}, "mixup_per_example must be true or false (1 given)"),
    ("model", {"backbone": 18}, "backbone must be a string (18 given)"),
    ("cv", {"seed": -1}, "seed must be >= 0 (-1 given)"),
])
def test_out_of_range_values_are_named(section, values, message):
    with pytest.raises(ConfigError) as e:
        RunConfig.from_dict({section: values})
    assert message in str(e.value)


def test_unknown_keys_suggest_close_matches():
    with pytest.raises(ConfigError, match=r"unknown option 'epoch' \(did you mean epochs"):
        RunConfig.from_dict({"train": {"epoch": 3}})
    with pytest.raises(ConfigError, match=r"unknown section \[trian\] \(did you mean train"):
        RunConfig.from_dict({"trian": {}})


def test_derived_patience_and_swa_start():
    tc = TrainConfig(epochs=40)
    assert tc.resolved_plateau_patience() == 4
    assert tc.resolved_early_stopping_patience() == 10
    assert tc.resolved_swa_start() == 31  # 0.75 of 40 epochs, then the next epoch
    assert TrainConfig(epochs=5).resolved_plateau_patience() == 2
    assert TrainConfig(swa_start=None).resolved_swa_start() is None
    assert TrainConfig(epochs=10, swa_start=4).resolved_swa_start() == 4


def test_an_integer_for_a_float_field_is_stored_as_a_float():
    cfg = RunConfig.from_dict({"augment": {"time_shift": 1}, "train": {"lr": 1}})
    assert cfg.augment.time_shift == 1.0 and isinstance(cfg.augment.time_shift, float)  # the whole clip
    assert isinstance(cfg.train.lr, float)
    assert TrainConfig(swa_start=3).swa_start == 3 and isinstance(TrainConfig(swa_start=3).swa_start, int)


def test_time_mask_width_int_is_frames_float_is_fraction():
    assert AugmentConfig(time_mask_width=12).time_mask_width == 12
    with pytest.raises(ConfigError):
        AugmentConfig(time_mask_width=-1)


def test_cli_options_override_the_config_file(tmp_path):
    import argparse

    toml = tmp_path / "run.toml"
    toml.write_text('[train]\nepochs = 12\nlr = 0.01\n[model]\nbackbone = "resnet34"\n')
    parser = argparse.ArgumentParser()
    add_run_options(parser)
    args = parser.parse_args(["--manifest", "m.csv", "--out", "o", "--config", str(toml),
                              "--epochs", "3", "--no-swa", "--swa-start", "2"])
    cfg = run_config_from_args(args)
    assert cfg.train.epochs == 3 and cfg.train.lr == 0.01 and cfg.model.backbone == "resnet34"
    assert cfg.train.swa_start is None  # --no-swa wins over --swa-start


@pytest.mark.parametrize("given, expected", [("3", 3), ("3.0", 3), ("0.5", 0.5), ("2.7", None)])
@pytest.mark.parametrize("source", ["--swa-start", "toml"])
def test_swa_start_is_an_epoch_or_a_fraction_alike_from_the_command_line_and_a_file(tmp_path, source, given,
                                                                                      expected):
    import argparse

    parser = argparse.ArgumentParser()
    add_run_options(parser)
    argv = ["--manifest", "m.csv", "--out", "o"]
    if source == "toml":
        (tmp_path / "run.toml").write_text(f"[train]\nswa_start = {given}\n")
        argv += ["--config", str(tmp_path / "run.toml")]
    else:
        argv += ["--swa-start", given]
    args = parser.parse_args(argv)
    if expected is None:  # 2.7 used to become epoch 2 without a word
        with pytest.raises(ConfigError, match=r"swa_start must be an epoch \(a whole number >= 1\) .* \(2.7 given\)"):
            run_config_from_args(args)
    else:
        value = run_config_from_args(args).train.swa_start
        assert value == expected and type(value) is type(expected)


def test_config_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config_file(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[train\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config_file(bad)


def test_yaml_config_file_reads_like_toml(tmp_path):
    (tmp_path / "run.toml").write_text('[train]\nepochs = 12\nlr = 0.01\n[model]\nbackbone = "resnet34"\n')
    (tmp_path / "run.yaml").write_text("train:\n  epochs: 12\n  lr: 0.01\nmodel:\n  backbone: resnet34\n")
    from_toml = RunConfig.from_dict(load_config_file(tmp_path / "run.toml"))
    from_yaml = RunConfig.from_dict(load_config_file(tmp_path / "run.yaml"))
    assert from_yaml == from_toml and from_yaml.train.epochs == 12 and from_yaml.model.backbone == "resnet34"


@pytest.mark.parametrize("text, message", [
    ("train: [epochs\n", "not valid YAML"),
    ("- 1\n- 2\n", "expected a mapping of sections (audio, features, ...), found list"),
])
def test_yaml_config_file_errors(tmp_path, text, message):
    bad = tmp_path / "bad.yml"
    bad.write_text(text)
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config_file(bad)


@pytest.mark.parametrize("name, kind", [("bad.toml", "TOML"), ("bad.yaml", "YAML")])
def test_config_file_that_is_not_utf8_is_named(tmp_path, name, kind):
    bad = tmp_path / name
    bad.write_bytes(b"[train]\nepochs = \xff\n")
    with pytest.raises(ConfigError, match=re.escape(f"{bad}: not valid {kind}: not UTF-8 text")):
        load_config_file(bad)
