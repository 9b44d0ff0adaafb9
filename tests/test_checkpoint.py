"""Checkpoints (safetensors + JSON) and the pickle-free resume-state format."""

import dataclasses
import json
import math
import pickle

import pytest
import torch

from audioclf._state import load_state, save_state
from audioclf.checkpoint import checkpoint_paths, load_checkpoint, save_checkpoint
from audioclf.config import AudioConfig, FeatureConfig, ModelConfig, RunConfig
from audioclf.errors import BundleError
from audioclf.model import build_model

LABELS = ["dog", "rain", "siren"]
CFG = RunConfig(audio=AudioConfig(sample_rate=8000, clip_seconds=0.25),
                features=FeatureConfig(n_fft=256, hop_length=64, n_mels=32, normalize="dataset"),
                model=ModelConfig(backbone="test_resnet"))


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def trained_like():
    """A model whose buffers are not at their defaults: normalization stats and BN statistics."""
    model = build_model(CFG, len(LABELS))
    model.frontend.set_normalization(torch.linspace(-40, -20, 32), torch.linspace(5, 9, 32))
    model.train()
    with torch.no_grad():
        model(0.3 * torch.randn(6, 2000, generator=torch.Generator().manual_seed(0)))
    return model.eval()


def test_round_trip_gives_identical_outputs(tmp_path, trained_like):
    json_path = save_checkpoint(trained_like, tmp_path / "run", CFG, LABELS, extra={"epochs": 3})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.json", "run.safetensors"]  # no temp files
    model, meta = load_checkpoint(json_path)
    assert not model.training
    x = 0.3 * torch.randn(4, 2000, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(model(x), trained_like(x))
    assert torch.equal(model.frontend.norm_mean, trained_like.frontend.norm_mean)
    assert meta["label_names"] == LABELS and meta["sample_rate"] == 8000
    assert meta["clip_samples"] == 2000 and meta["extra"] == {"epochs": 3}
    assert RunConfig.from_dict(meta["config"]) == CFG
    assert {"torch", "timm", "audioclf", "numpy"} <= set(meta["versions"])


def test_paths_accepted(tmp_path, trained_like):
    save_checkpoint(trained_like, tmp_path, CFG, LABELS)  # a folder: model.*
    for path in (tmp_path, tmp_path / "model", tmp_path / "model.json", tmp_path / "model.safetensors"):
        assert checkpoint_paths(path) == (tmp_path / "model.safetensors", tmp_path / "model.json")
        load_checkpoint(path)


def test_loading_never_unpickles(tmp_path, trained_like, monkeypatch):
    save_checkpoint(trained_like, tmp_path, CFG, LABELS)

    def refuse(*args, **kwargs):
        raise AssertionError("unpickling attempted")

    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    load_checkpoint(tmp_path)


def test_label_count_must_match_outputs(tmp_path, trained_like):
    with pytest.raises(ValueError, match="label_names has 2 names but the model has 3 outputs"):
        save_checkpoint(trained_like, tmp_path, CFG, LABELS[:2])


def corrupt(tmp_path, trained_like, change):
    save_checkpoint(trained_like, tmp_path, CFG, LABELS)
    path = tmp_path / "model.json"
    meta = json.loads(path.read_text())
    change(meta)
    path.write_text(json.dumps(meta))
    return path


@pytest.mark.parametrize("change, message", [
    (lambda m: m.update(format_version=99), "field 'format_version' is 99"),
    (lambda m: m.update(format="something"), "field 'format' must be"),
    (lambda m: m.pop("label_names"), "field 'label_names' is missing"),
    (lambda m: m["config"]["train"].update(lr=-1.0), "field 'config' is invalid: .*lr"),
    (lambda m: m.update(weights_sha256="0" * 64), "weights do not match model.json"),
])
def test_bad_description_is_named(tmp_path, trained_like, change, message):
    path = corrupt(tmp_path, trained_like, change)
    with pytest.raises(BundleError, match=message):
        load_checkpoint(path)


def test_missing_or_unreadable_files(tmp_path, trained_like):
    with pytest.raises(BundleError, match="model.json: checkpoint description not found"):
        load_checkpoint(tmp_path)
    save_checkpoint(trained_like, tmp_path, CFG, LABELS)
    (tmp_path / "model.json").write_text("{not json")
    with pytest.raises(BundleError, match="model.json: not a readable JSON file"):
        load_checkpoint(tmp_path)
    save_checkpoint(trained_like, tmp_path, CFG, LABELS)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(BundleError, match="model.safetensors: weights file not found"):
        load_checkpoint(tmp_path)


def test_weights_of_another_architecture_are_named(tmp_path, trained_like):
    """A description whose config promises a different network than its weights hold."""
    path = corrupt(tmp_path, trained_like, lambda m: m["config"]["features"].update(n_mels=40))
    with pytest.raises(BundleError, match=r"frontend.norm_mean: file \(32,\) vs model \(40,\)"):
        load_checkpoint(path)


def test_state_round_trip_keeps_types(tmp_path):
    state = {
        "epoch": 3,
        "best": -math.inf,
        "history": [{"epoch": 1, "val_accuracy": 0.5, "improved": True}],
        "optimizer": {"state": {0: {"step": torch.tensor(4.0), "exp_avg": torch.arange(6.0).view(2, 3)}},
                      "param_groups": [{"betas": (0.9, 0.999), "params": [0]}]},
        "swa": None,
        "name": "x",
    }
    save_state(tmp_path / "s.safetensors", state)
    back = load_state(tmp_path / "s.safetensors")
    assert back["epoch"] == 3 and back["best"] == -math.inf and back["swa"] is None
    assert back["history"] == state["history"] and back["name"] == "x"
    assert list(back["optimizer"]["state"]) == [0]  # int keys survive
    assert torch.equal(back["optimizer"]["state"][0]["exp_avg"], torch.arange(6.0).view(2, 3))
    assert back["optimizer"]["param_groups"][0]["betas"] == (0.9, 0.999)


def test_state_errors(tmp_path):
    with pytest.raises(BundleError, match="training state not found"):
        load_state(tmp_path / "none.safetensors")
    with pytest.raises(TypeError, match="cannot store set at '/bad'"):
        save_state(tmp_path / "s.safetensors", {"bad": {1, 2}})
    assert not list(tmp_path.iterdir())  # the failed write left nothing behind


def test_resume_states_of_version_1_get_the_plan_their_config_resolves_to():
    from audioclf.config import TrainConfig
    from audioclf.errors import ConfigError
    from audioclf.rundir import RunPlan, restore_progress

    cfg = CFG.replace(train={"epochs": 20, "swa_start": 0.7})
    weights = {"w": torch.zeros(1)}
    old = {"version": 1, "run": {"config": cfg.to_dict()}, "epoch": 3, "history": [], "best_metric": 0.5,
           "best_loss": 1.0, "best_epoch": 2, "since_best": 1, "best_weights": None, "model": weights}
    progress = restore_progress(old)
    assert progress.plan == RunPlan.from_config(TrainConfig(epochs=20, swa_start=0.7))
    assert (progress.plan.swa_start, progress.plan.end_epoch) == (15, 20)
    assert progress.best_state is weights
    # a version-2 state that also kept the saved model's summary and the plateau patience
    # (no longer used) still loads
    plan = {**dataclasses.asdict(progress.plan), "plateau_patience": 2}
    assert restore_progress({**old, "version": 2, "plan": plan, "saved": {"chosen": "swa"}}).plan == progress.plan
    with pytest.raises(ConfigError, match="resume state version 9 is not one this audioclf reads"):
        restore_progress({**old, "version": 9})
