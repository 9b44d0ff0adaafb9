"""fit(): learning, train/eval discipline, LR schedules, best checkpoint, SWA, resume, bad input."""

import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import Dataset

from audioclf._state import load_state
from audioclf.checkpoint import load_checkpoint
from audioclf.config import AudioConfig, AugmentConfig, FeatureConfig, ModelConfig, RunConfig, TrainConfig
from audioclf.distributed import DistInfo
from audioclf.errors import ConfigError
from audioclf.model import build_model
from audioclf.optim import LRSchedule, build_optimizer, warmup_cosine
from audioclf.rundir import Progress, RunPlan, check_out_dir, check_same_run, claim_out_dir
from audioclf.runtime import inference_runtime, make_runtime
from audioclf.train import bring_swa_forward, early_stopping, fit, predict_proba, update_bn_stats

sys.path.insert(0, str(Path(__file__).parent))
from synth import tone  # noqa: E402

SR = 8000
LABELS = ["low", "mid", "high"]
FREQS = (300.0, 1200.0, 3000.0)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


class Tones(Dataset):
    """In-memory (waveform (2000,), label) pairs: three pitches, a few clips each."""

    def __init__(self, per_class: int, seed: int, shuffle_labels: bool = False):
        self.items = [(torch.from_numpy(tone(f, 0.25, SR, seed=seed * 1000 + 100 * c + i)), c)
                      for c, f in enumerate(FREQS) for i in range(per_class)]
        if shuffle_labels:  # an unlearnable validation set: its accuracy only wanders
            labels = np.random.default_rng(seed).permutation([y for _, y in self.items])
            self.items = [(x, int(y)) for (x, _), y in zip(self.items, labels)]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def config(augment: AugmentConfig | None = None, **train) -> RunConfig:
    train = {"epochs": 4, "batch_size": 8, "lr": 3e-3, "swa_start": None, "warmup_epochs": 0,
             "device": "cpu", **train}
    return RunConfig(audio=AudioConfig(sample_rate=SR, clip_seconds=0.25),
                     features=FeatureConfig(n_fft=256, hop_length=64, n_mels=32),
                     augment=augment or AugmentConfig(freq_mask_width=4),
                     model=ModelConfig(backbone="test_resnet", drop_rate=0.1),
                     train=TrainConfig(**train))


NO_AUGMENT = AugmentConfig(freq_masks=0, time_masks=0, mixup_alpha=0.0)


def run(cfg, out, train=None, val=None, **kw):
    model = build_model(cfg, len(LABELS))
    result = fit(model, train or Tones(6, 1), val or Tones(3, 2), cfg, out, label_names=LABELS, **kw)
    return model, result


def weights(path):
    from safetensors.torch import load_file

    return load_file(str(path))


# --- learning --------------------------------------------------------------------------


def test_overfits_a_small_batch(tmp_path):
    data = Tones(2, 1)  # 6 clips, one batch
    cfg = config(NO_AUGMENT, epochs=10, batch_size=6, lr=1e-2, plateau_patience=10)
    model, result = run(cfg, tmp_path, train=data, val=data)
    losses = [row["train_loss"] for row in result.history]
    assert losses[0] > 0.5 and losses[-1] < 0.05


def test_modes_during_fit_train_eval_and_bn_update(tmp_path):
    """train() for steps (with gradients), eval() for validation (none); the SWA BatchNorm
    update: only the BatchNorms in train mode (dropout and augmentation off), no gradients."""
    cfg = config(epochs=2, swa_start=1, batch_size=8)  # drop_rate 0.1 before the classifier
    model = build_model(cfg, len(LABELS))
    calls, augmenting = [], []
    model.specaugment.register_forward_pre_hook(lambda m, inp: augmenting.append(m.training))
    model.backbone.register_forward_pre_hook(  # timm's head dropout follows the backbone's mode
        lambda m, inp: calls.append((m.training, torch.is_grad_enabled(), augmenting[-1], m.bn1.training)))
    fit(model, Tones(6, 1), Tones(3, 2), cfg, tmp_path, label_names=LABELS)
    step, validation, bn_update = (True, True, True, True), (False,) * 4, (False, False, False, True)
    assert calls.count(step) == 2 * 2  # 18 clips: 2 batches of 8 per epoch
    assert calls.count(validation) == 2 * 2 + 2  # 9 clips in batches of 8, each epoch and for SWA
    assert calls.count(bn_update) == 2
    assert len(calls) == 2 * 2 + 2 * 2 + 2 + 2


def test_plateau_halves_the_lr_after_patience_epochs_without_improvement():
    param = torch.nn.Parameter(torch.zeros(2, 2))
    tc = TrainConfig(epochs=20, lr=1e-3, plateau_patience=2, plateau_factor=0.5, swa_start=None)
    schedule = LRSchedule(torch.optim.AdamW([param], lr=tc.lr), tc, steps_per_epoch=5)
    lrs = []
    for metric in [0.5, 0.6, 0.6, 0.6, 0.6, 0.7, 0.7, 0.7, 0.7]:
        schedule.after_epoch(metric, averaging=False)
        lrs.append(schedule.lr)
    # 3 epochs without improvement (> patience 2) cut the LR; the improvement at 0.7 resets
    assert lrs == [1e-3] * 4 + [5e-4] * 4 + [2.5e-4]


@pytest.mark.parametrize("name, klass", [("adamw", torch.optim.AdamW), ("adam", torch.optim.Adam)])
def test_weight_decay_spares_norms_and_biases(name, klass):
    model = build_model(config(), 3)
    optimizer = build_optimizer(model, TrainConfig(optimizer=name, weight_decay=0.05))
    decay, no_decay = optimizer.param_groups
    assert type(optimizer) is klass and (decay["weight_decay"], no_decay["weight_decay"]) == (0.05, 0.0)
    names = {id(p): n for n, p in model.named_parameters()}
    spared = {names[id(p)] for p in no_decay["params"]}
    norms = {f"{m_name}.{p_name}" for m_name, m in model.named_modules()
             if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for p_name, _ in m.named_parameters()}
    biases = {n for n in names.values() if n.endswith(".bias")}
    assert "backbone.fc.bias" in biases and "backbone.bn1.weight" in norms
    assert spared == norms | biases
    assert len(decay["params"]) + len(no_decay["params"]) == len(names)


def test_default_patience_is_derived_from_the_budget():
    assert TrainConfig(epochs=10).resolved_plateau_patience() == 2
    assert TrainConfig(epochs=60).resolved_plateau_patience() == 6
    assert TrainConfig(epochs=60).resolved_early_stopping_patience() == 14


def test_warmup_then_cosine_to_zero():
    f = warmup_cosine(total_steps=110, warmup_steps=10)
    assert [f(s) for s in range(3)] == [0.1, 0.2, 0.3]
    assert f(9) == 1.0 and f(10) == 1.0
    assert math.isclose(f(60), 0.5) and f(110) < 1e-12


def test_fit_follows_warmup_and_cosine_per_batch(tmp_path):
    cfg = config(epochs=3, scheduler="cosine", warmup_epochs=1, lr=1e-3)
    _, result = run(cfg, tmp_path)  # 18 clips, batches of 8: 2 steps per epoch, 6 in all
    # LR at the start of each epoch: step 0 of warmup (1/2), step 2 (cosine at 0), step 4 (half way)
    assert [row["lr"] for row in result.history] == pytest.approx([5e-4, 1e-3, 5e-4])


def test_early_stopping_restores_the_best_weights(tmp_path):
    val = Tones(4, 2, shuffle_labels=True)
    cfg = config(epochs=15, early_stopping_patience=2, plateau_patience=20)
    model, result = run(cfg, tmp_path, val=val)
    history = result.history
    assert len(history) == result.best_epoch + 2 < 15  # stopped two epochs after the best
    scores = [(row["val_accuracy"], -row["val_loss"]) for row in history]
    assert result.best_epoch == 1 + scores.index(max(scores))
    assert result.chosen == "best" and result.swa_metric is None
    probs = predict_proba(model, val, batch_size=5)
    targets = np.array([y for _, y in val.items])
    assert (probs.argmax(1) == targets).mean() == pytest.approx(result.best_metric)
    # the weights are the best epoch's (its validation loss, its saved copy), not the last epoch's
    loss = -np.log(probs[np.arange(len(targets)), targets]).mean()
    assert loss == pytest.approx(history[result.best_epoch - 1]["val_loss"], rel=1e-4)
    state = load_state(tmp_path / "state.safetensors")
    assert all(torch.equal(v, state["best_weights"][k]) for k, v in model.state_dict().items())
    assert not all(torch.equal(v, state["model"][k]) for k, v in model.state_dict().items())
    saved, meta = load_checkpoint(result.model_path)
    assert meta["extra"]["training"]["best_epoch"] == result.best_epoch


def test_swa_average_is_the_mean_of_the_epoch_weights(tmp_path):
    cfg = config(epochs=1, swa_start=1)
    run(cfg, tmp_path)
    w1 = load_state(tmp_path / "state.safetensors")["model"]
    run(cfg.replace(train={"epochs": 2}), tmp_path, resume=True)
    state = load_state(tmp_path / "state.safetensors")
    w2, swa = state["model"], state["swa"]
    assert int(swa["n_averaged"]) == 2
    params = [k for k in w1 if "running" not in k and "num_batches" not in k and "norm_" not in k]
    assert params and not torch.equal(w1[params[0]], w2[params[0]])
    for k in params:
        torch.testing.assert_close(swa[f"module.{k}"], (w1[k] + w2[k]) / 2, rtol=1e-6, atol=1e-7)


def test_early_stopping_brings_swa_forward_for_its_planned_length():
    plan = RunPlan(budget=20, end_epoch=20, swa_start=15, stop_patience=6)
    progress = Progress(plan=plan, since_best=5)
    assert not bring_swa_forward(progress, 10) and plan.swa_start == 15  # patience not yet spent
    progress.since_best = 6
    assert bring_swa_forward(progress, 11) and (plan.swa_start, plan.end_epoch) == (12, 17)
    assert plan.last_epoch(20) == 17 and plan.last_epoch(25) == 22  # 6 SWA epochs, as planned
    assert not early_stopping(progress)  # with SWA the run goes on, and SWA is never cut short
    progress.since_best = 9
    assert not bring_swa_forward(progress, 13) and (plan.swa_start, plan.end_epoch) == (12, 17)
    no_swa = Progress(plan=RunPlan(budget=20, end_epoch=20, swa_start=None, stop_patience=6), since_best=6)
    assert not bring_swa_forward(no_swa, 11) and early_stopping(no_swa)


def test_a_run_that_stalls_early_still_averages_the_planned_swa_epochs(tmp_path):
    val = Tones(4, 2, shuffle_labels=True)  # unlearnable: the score stalls within a few epochs
    cfg = config(epochs=12, swa_start=10, early_stopping_patience=2, plateau_patience=20)  # SWA: 3 epochs
    _, result = run(cfg, tmp_path, val=val)
    improved = [row["improved"] for row in result.history]
    stall = next(e for e in range(2, 13) if not improved[e - 2] and not improved[e - 1])
    assert stall < 9  # early stopping fired well before the planned SWA start (epoch 10)
    assert [row["epoch"] for row in result.history if row["swa"]] == [stall + 1, stall + 2, stall + 3]
    assert len(result.history) == stall + 3 and result.swa_metric is not None
    state = load_state(tmp_path / "state.safetensors")
    assert int(state["swa"]["n_averaged"]) == 3 and state["plan"]["swa_start"] == stall + 1
    assert json_of(tmp_path)["extra"]["training"]["swa_start"] == stall + 1


def test_bn_update_runs_with_dropout_off(tmp_path):
    """The SWA statistics describe test-time activations: dropout before a BatchNorm is off."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Dropout(0.5), torch.nn.BatchNorm1d(4))
    x = torch.randn(16, 3)
    update_bn_stats(net, [(x, None)], make_runtime(TrainConfig(device="cpu"), torch.device("cpu"), DistInfo()))
    with torch.no_grad():
        h = net[0](x)  # (16, 4): what the BatchNorm sees without dropout
    torch.testing.assert_close(net[2].running_mean, h.mean(0))
    torch.testing.assert_close(net[2].running_var, h.var(0))
    assert not net.training and not net[2].training


def json_of(out):
    import json

    return json.loads((out / "model.json").read_text())


# --- resume ----------------------------------------------------------------------------


RESUME_CFG = config(epochs=4, swa_start=2, plateau_patience=1)  # MixUp + SpecAugment on


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("full")
    _, result = run(RESUME_CFG, out)
    return out, result


def same_run(out, result, reference):
    ref_out, ref_result = reference
    for name in ("model.safetensors", "state.safetensors"):
        a, b = weights(out / name), weights(ref_out / name)
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), name
    strip = [{k: v for k, v in row.items() if k != "seconds"} for row in result.history]
    assert strip == [{k: v for k, v in row.items() if k != "seconds"} for row in ref_result.history]
    assert (result.chosen, result.swa_metric) == (ref_result.chosen, ref_result.swa_metric)


def test_resume_after_a_shorter_run_matches_an_uninterrupted_run(tmp_path, uninterrupted):
    run(RESUME_CFG.replace(train={"epochs": 2}), tmp_path)
    _, result = run(RESUME_CFG, tmp_path, resume=True)
    same_run(tmp_path, result, uninterrupted)


def test_resume_after_a_kill_mid_epoch_matches_an_uninterrupted_run(tmp_path, uninterrupted):
    model = build_model(RESUME_CFG, len(LABELS))
    steps = []

    def kill(module, inputs):
        if module.training and torch.is_grad_enabled():
            steps.append(1)
            if len(steps) == 5:  # the first step of epoch 3 (2 steps per epoch)
                raise KeyboardInterrupt

    model.backbone.register_forward_pre_hook(kill)
    with pytest.raises(KeyboardInterrupt):
        fit(model, Tones(6, 1), Tones(3, 2), RESUME_CFG, tmp_path, label_names=LABELS)
    assert load_state(tmp_path / "state.safetensors")["epoch"] == 2
    _, result = run(RESUME_CFG, tmp_path, resume=True)
    same_run(tmp_path, result, uninterrupted)


def test_resume_with_more_epochs_keeps_the_plan_of_the_first_start(tmp_path):
    """swa_start 0.5 of 2 epochs is epoch 2, of 7 epochs it would be 5: the run keeps 2, so
    SWA averages every epoch from 2 on (no gap in which the plateau schedule acts)."""
    cfg = config(epochs=2, swa_start=0.5, plateau_patience=1)
    run(cfg, tmp_path)
    _, result = run(cfg.replace(train={"epochs": 7}), tmp_path, resume=True)
    assert [row["swa"] for row in result.history] == [False] + [True] * 6
    state = load_state(tmp_path / "state.safetensors")
    assert int(state["swa"]["n_averaged"]) == 6
    assert state["plan"] == {"budget": 2, "end_epoch": 2, "swa_start": 2, "stop_patience": 5}
    assert state["schedule"]["main"]["patience"] == 1  # the plateau patience lives in the schedule's state


def test_a_cosine_run_without_swa_is_not_extended(tmp_path):
    cfg = config(epochs=1, scheduler="cosine")
    run(cfg, tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    with pytest.raises(ConfigError, match="cosine schedule was planned for 1 epochs .* start a new run"):
        run(cfg.replace(train={"epochs": 2}), tmp_path, resume=True)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()} == before


def test_extending_a_finished_swa_run_never_saves_a_worse_model(tmp_path, monkeypatch):
    import audioclf.train as train

    from audioclf._state import save_state

    cfg = config(epochs=3, swa_start=2)
    _, first = run(cfg, tmp_path)
    assert first.chosen == "swa" and first.swa_metric > first.best_metric  # the SWA model was saved
    saved = {name: (tmp_path / name).read_bytes() for name in ("model.safetensors", "model.json")}
    # The resume point knows nothing of the saved model (as a kill right after writing it
    # would leave it): its scores come from model.json.
    state = load_state(tmp_path / "state.safetensors")
    state.pop("saved", None)
    save_state(tmp_path / "state.safetensors", state)
    # the extra epochs, and the longer average, all validate worse than the saved SWA model
    monkeypatch.setattr(train, "evaluate", lambda *args: {"accuracy": 0.0, "loss": 9.0})
    _, longer = run(cfg.replace(train={"epochs": 5}), tmp_path, resume=True)
    assert len(longer.history) == 5 and int(load_state(tmp_path / "state.safetensors")["swa"]["n_averaged"]) == 4
    assert {name: (tmp_path / name).read_bytes() for name in saved} == saved
    assert (longer.chosen, longer.swa_metric, longer.best_metric) == ("swa", first.swa_metric, first.best_metric)


# --- bad input -------------------------------------------------------------------------


def test_a_folder_holding_a_run_is_refused_and_left_alone(tmp_path, uninterrupted):
    out, _ = uninterrupted
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    with pytest.raises(ConfigError, match="already holds a run .*--resume .*--overwrite"):
        run(RESUME_CFG, out)
    with pytest.raises(ConfigError, match=r"cannot resume a different run \(saved vs now\): config\.train\.lr \(0\.003 vs 0\.01\)"):
        run(RESUME_CFG.replace(train={"lr": 1e-2}), out, resume=True)
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before


def test_a_cross_validation_folder_is_refused_unless_overwrite(tmp_path):
    (tmp_path / "folds.csv").write_text("path,label,group,fold\n")
    (tmp_path / "fold-0").mkdir()
    (tmp_path / "fold-0" / "fold.json").write_text("{}")
    (tmp_path / "bundle").mkdir()
    (tmp_path / "fold-notes").mkdir()  # the user's, not a fold of the run
    (tmp_path / "fold-notes" / "todo.txt").write_text("try a larger n_mels")
    with pytest.raises(ConfigError, match=r"already holds a run \(bundle, fold-0, folds.csv\);"):
        check_out_dir(tmp_path, resume=False, overwrite=False)
    with pytest.raises(ConfigError, match="without a resume state"):
        check_out_dir(tmp_path, resume=True, overwrite=False)
    claim_out_dir(tmp_path, resume=False, overwrite=True)
    assert [p.name for p in tmp_path.iterdir()] == ["fold-notes"]
    assert (tmp_path / "fold-notes" / "todo.txt").is_file()


def test_resume_accepts_a_run_saved_before_a_config_field_existed(tmp_path):
    import copy

    current = {"config": config().to_dict(), "label_names": LABELS, "n_train": 18, "n_val": 9}
    older = copy.deepcopy(current)
    del older["config"]["augment"]["freq_shift"]  # saved before freq_shift existed: its default
    check_same_run(older, current, tmp_path / "state.safetensors")
    changed = copy.deepcopy(current)
    changed["config"]["augment"]["freq_shift"] = 3
    with pytest.raises(ConfigError, match=r"config\.augment\.freq_shift \(0 vs 3\)"):
        check_same_run(older, changed, tmp_path / "state.safetensors")


def test_scoring_follows_the_amp_setting(monkeypatch):
    """predict_proba hands ``amp`` to its runtime, which autocasts on CUDA only when it is
    set (bf16 support is faked, so the choice is checked without a GPU)."""
    import audioclf.train as train

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: True)
    assert inference_runtime(torch.device("cuda"), DistInfo(), 4, amp=True).amp_dtype == torch.bfloat16
    assert inference_runtime(torch.device("cuda"), DistInfo(), 4, amp=False).amp_dtype is None
    assert inference_runtime(torch.device("cpu"), DistInfo(), 4, amp=True).amp_dtype is None
    asked = []
    real = train.inference_runtime
    monkeypatch.setattr(train, "inference_runtime", lambda *args, amp: asked.append(amp) or real(*args, amp=amp))
    model = build_model(config(), 3)
    predict_proba(model, Tones(1, 4), batch_size=4, amp=False)
    predict_proba(model, Tones(1, 4), batch_size=4)
    assert asked == [False, True]


@pytest.mark.cuda
@pytest.mark.parametrize("amp", [True, False])
def test_scoring_on_cuda_autocasts_as_the_amp_setting_says(amp):
    model = build_model(config(), 3)
    seen = []
    model.backbone.register_forward_pre_hook(lambda module, inputs: seen.append(torch.is_autocast_enabled("cuda")))
    predict_proba(model, Tones(1, 4), batch_size=4, device="cuda", amp=amp)
    assert seen and set(seen) == {amp and torch.cuda.is_bf16_supported()}


def test_overwrite_replaces_a_run(tmp_path):
    cfg = config(epochs=1)
    run(cfg, tmp_path)
    (tmp_path / "metrics.csv").write_text("old\n")
    _, result = run(cfg, tmp_path, overwrite=True)
    assert (tmp_path / "metrics.csv").read_text().startswith("epoch,lr,")
    assert len(result.history) == 1


def test_bad_inputs(tmp_path):
    cfg = config(epochs=1)
    model = build_model(cfg, 3)
    with pytest.raises(ConfigError, match="label_names has 2 names but the model has 3 outputs"):
        fit(model, Tones(2, 1), Tones(1, 2), cfg, tmp_path, label_names=LABELS[:2])
    with pytest.raises(ConfigError, match="the validation set is empty"):
        fit(model, Tones(2, 1), Tones(0, 2), cfg, tmp_path, label_names=LABELS)
    one_clip = torch.utils.data.Subset(Tones(1, 1), [0])
    with pytest.raises(ConfigError, match="the training set has 1 clips; need at least 2"):
        fit(model, one_clip, Tones(1, 2), cfg, tmp_path, label_names=LABELS)
    with pytest.raises(ConfigError, match="batch_size 8 .* not divisible by the 3 processes"):
        make_runtime(cfg.train, torch.device("cpu"), DistInfo(rank=0, world_size=3))
    assert not any(tmp_path.iterdir())  # nothing written


def test_predict_proba_matches_the_model_in_eval_mode():
    cfg = config()
    model = build_model(cfg, 3)
    data = Tones(3, 4)
    model.train()
    probs = predict_proba(model, data, batch_size=4)
    assert probs.shape == (9, 3) and probs.dtype == np.float32
    np.testing.assert_allclose(probs.sum(1), 1.0, rtol=1e-6)
    assert not model.training
    x = torch.stack([w for w, _ in data.items])
    with torch.no_grad():
        expected = torch.softmax(model(x), 1).numpy()
    np.testing.assert_allclose(probs, expected, rtol=1e-4, atol=1e-6)
    bare = [w for w, _ in data.items]  # waveforms without labels
    np.testing.assert_allclose(predict_proba(model, bare, batch_size=4), probs, rtol=1e-5, atol=1e-7)


# --- real data -------------------------------------------------------------------------


def test_short_fsdd_run_beats_chance_by_a_wide_margin(tmp_path, fsdd_dir):
    from audioclf.data import ClipDataset, WaveformCache
    from audioclf.manifest import read_manifest
    from synth import write_fsdd_slice

    manifest = read_manifest(write_fsdd_slice(fsdd_dir, tmp_path / "fsdd.csv", takes=range(4)), root=fsdd_dir)
    take = np.array([int(r.path.rsplit("_", 1)[1].split(".")[0]) for r in manifest.records])
    train_idx, val_idx = np.flatnonzero(take < 3), np.flatnonzero(take == 3)  # 180 / 60 clips
    cfg = RunConfig(audio=AudioConfig(sample_rate=8000, clip_seconds=0.8),
                    features=FeatureConfig(n_fft=256, hop_length=80, n_mels=40),
                    augment=AugmentConfig(freq_masks=0, time_masks=0, mixup_alpha=0.0),
                    model=ModelConfig(backbone="test_resnet", drop_rate=0.1),
                    train=TrainConfig(epochs=10, batch_size=16, lr=3e-3, swa_start=7, warmup_epochs=0,
                                      device="cpu"))
    cache = WaveformCache(manifest, 8000, tmp_path / "cache").build()
    y = manifest.targets()

    def dataset(idx, train):
        return ClipDataset(cache, idx, y[idx], cfg.audio.clip_samples, train=train)

    model = build_model(cfg, 10)
    result = fit(model, dataset(train_idx, True), dataset(val_idx, False), cfg, tmp_path / "run",
                 label_names=manifest.labels.names)
    chosen = result.swa_metric if result.chosen == "swa" else result.best_metric
    assert chosen >= 0.6  # chance is 0.1; measured 0.87 (best epoch 10), SWA 0.83
    probs = predict_proba(model, dataset(val_idx, False), batch_size=32)
    assert (probs.argmax(1) == y[val_idx]).mean() == pytest.approx(chosen)  # fit kept that model


# --- command line ----------------------------------------------------------------------


CLI_OPTIONS = ["--backbone", "test_resnet", "--sample-rate", "8000", "--clip-seconds", "0.5",
               "--n-fft", "256", "--hop-length", "64", "--n-mels", "32", "--device", "cpu",
               "--batch-size", "8", "--no-swa"]


@pytest.fixture(scope="module")
def tone_manifest(tmp_path_factory):
    from synth import write_tone_dataset

    return write_tone_dataset(tmp_path_factory.mktemp("tones"), n_per_class=6)


def test_cli_trains_and_says_where_the_model_went(tmp_path, tone_manifest, capsys):
    from audioclf.cli import main

    out = tmp_path / "run"
    code = main(["train", "--manifest", str(tone_manifest), "--out", str(out), "--epochs", "2",
                 "--cache-dir", str(tmp_path / "cache"), *CLI_OPTIONS])
    printed = capsys.readouterr().out
    assert code == 0
    assert f"model: {out / 'model.safetensors'}" in printed and "validation accuracy:" in printed
    model, meta = load_checkpoint(out)
    assert meta["label_names"] == ["high", "low", "mid"] and meta["config"]["train"]["epochs"] == 2
    code = main(["train", "--manifest", str(tone_manifest), "--out", str(out), *CLI_OPTIONS])
    assert code == 2 and "already holds a run" in capsys.readouterr().err


@pytest.mark.parametrize("rows, extra, message", [
    ("path,label\na.wav,dog\nb.wav,dog\n", [], "a classifier needs at least 2 classes"),
    ("path,label\na.wav,dog\nb.wav,cat\n", ["--val-fold", "1"], "--val-fold 1 needs a fold column"),
    ("path,label,fold\na.wav,dog,1\nb.wav,cat,1\n", ["--val-fold", "1"], "the training split is empty"),
    ("path,label,fold\na.wav,dog,1\nb.wav,cat,2\n", ["--val-fold", "3"],
     r"no row has fold 3; the folds are \[1, 2\]"),
])
def test_cli_bad_splits_fail_in_one_line(tmp_path, capsys, rows, extra, message):
    import re

    import soundfile as sf

    from audioclf.cli import main

    for name in ("a.wav", "b.wav"):
        sf.write(tmp_path / name, tone(440.0, 0.3, SR), SR)
    (tmp_path / "m.csv").write_text(rows)
    code = main(["train", "--manifest", str(tmp_path / "m.csv"), "--out", str(tmp_path / "run"),
                 *extra, *CLI_OPTIONS])
    err = capsys.readouterr().err
    assert code == 2 and re.search(message, err) and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("extra, message", [
    (["--backbone", "resnet_18"], "unknown backbone 'resnet_18'"),
    (["--pretrained", "PATH"], "nope.pth: pretrained weights file not found"),
])
def test_cli_model_errors_come_before_any_audio_is_decoded(tmp_path, tone_manifest, capsys, extra, message):
    from audioclf.cli import main

    extra = [str(tmp_path / "nope.pth") if a == "PATH" else a for a in extra]
    code = main(["train", "--manifest", str(tone_manifest), "--out", str(tmp_path / "run"),
                 "--cache-dir", str(tmp_path / "cache"), *CLI_OPTIONS, *extra])
    assert code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "cache").exists() and not (tmp_path / "run").exists()


@pytest.mark.cuda
def test_cuda_run_uses_channels_last_and_saves_a_cpu_loadable_model(tmp_path):
    cfg = config(epochs=2, swa_start=2, device="cuda")
    model = build_model(cfg, len(LABELS))
    autocast = []  # (training, autocast on, its dtype) at every backbone call
    model.backbone.register_forward_pre_hook(lambda m, inp: autocast.append(
        (m.training, torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda"))))
    result = fit(model, Tones(6, 1), Tones(3, 2), cfg, tmp_path, label_names=LABELS)
    assert next(model.parameters()).is_cuda and len(result.history) == 2
    assert model.backbone.conv1[0].weight.is_contiguous(memory_format=torch.channels_last)
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    assert {a[0] for a in autocast} == {True, False} and all(a[1:] == (True, dtype) for a in autocast)
    autocast.clear()
    predict_proba(model, Tones(1, 3), batch_size=4, device="cuda", amp=False)  # a --no-amp run
    assert autocast and not any(on for _, on, _ in autocast)
    loaded, _ = load_checkpoint(tmp_path)
    x = torch.stack([w for w, _ in Tones(1, 3).items])
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model.cpu()(x), rtol=1e-4, atol=1e-4)
