"""AudioClassifier: shapes, train/eval behaviour, presets, pretrained files, no bias before BatchNorm."""

import copy

import timm
import torch
from torch import nn

import pytest

from audioclf.config import AudioConfig, AugmentConfig, FeatureConfig, ModelConfig, RunConfig, TrainConfig
from audioclf.errors import ConfigError
from audioclf.model import (PRESETS, AudioClassifier, _fold_bias_into_batchnorm, bias_before_batchnorm,
                            build_model, check_backbone_name, check_model_config, create_backbone)

SR = 8000
FEATURES = FeatureConfig(n_fft=256, hop_length=64, n_mels=32, normalize="none")
NO_AUGMENT = AugmentConfig(freq_masks=0, time_masks=0, mixup_alpha=0.0)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def make_model(augment=NO_AUGMENT, drop_rate=0.0, num_classes=3, **model_kw) -> AudioClassifier:
    torch.manual_seed(0)
    return AudioClassifier(num_classes, SR, FEATURES, augment,
                           ModelConfig(backbone="test_resnet", drop_rate=drop_rate, **model_kw))


def waves(batch=4, n=2000, seed=0):
    return 0.3 * torch.randn(batch, n, generator=torch.Generator().manual_seed(seed))


def test_forward_shape_and_batch_consistency_in_eval():
    model = make_model().eval()
    x = waves(5)
    logits = model(x)  # (B, K)
    assert logits.shape == (5, 3)
    one_by_one = torch.cat([model(x[i:i + 1]) for i in range(5)])
    torch.testing.assert_close(logits, one_by_one, rtol=1e-4, atol=1e-5)


def test_batchnorm_uses_batch_statistics_in_train_and_running_statistics_in_eval():
    model = make_model()
    x, other = waves(4, seed=1), waves(4, seed=2)
    mixed = torch.cat([x[:2], other[2:]])
    bn = model.backbone.bn1
    model.eval()
    before = bn.running_mean.clone()
    # eval: a clip's output does not depend on the rest of the batch, running stats unchanged
    torch.testing.assert_close(model(x)[:2], model(mixed)[:2], rtol=1e-4, atol=1e-5)
    assert torch.equal(bn.running_mean, before)
    model.train()
    with torch.no_grad():
        a, b = model(x)[:2], model(mixed)[:2]
    assert not torch.allclose(a, b, atol=1e-4)  # batch statistics couple the clips
    assert not torch.equal(bn.running_mean, before)  # and the running statistics moved


@pytest.mark.parametrize("drop_rate", [0.0, 0.5])
def test_dropout_only_in_training(drop_rate):
    model = make_model(drop_rate=drop_rate)
    x = waves(4)
    model.eval()
    assert torch.equal(model(x), model(x))
    model.train()
    with torch.no_grad():
        same = torch.allclose(model(x), model(x))
    assert same == (drop_rate == 0.0)  # the control without dropout is deterministic


def capture_backbone_input(model, x, mix=None):
    seen = []
    hook = model.backbone.register_forward_pre_hook(lambda m, inp: seen.append(inp[0].clone()))
    with torch.no_grad():
        model(x, mix=mix)
    hook.remove()
    return seen[0]  # (B, 1, F, T)


def test_specaugment_acts_in_training_only_and_after_mix():
    augment = AugmentConfig(freq_masks=1, freq_mask_width=8, time_masks=0, specaugment_p=1.0,
                            mixup_alpha=0.0)
    model = make_model(augment=augment)
    model.specaugment.generator = torch.Generator().manual_seed(3)
    x = waves(8)
    model.eval()
    spec = capture_backbone_input(model, x)
    torch.testing.assert_close(spec, model.frontend(x))  # eval: the front end alone
    sevens = capture_backbone_input(model, x, mix=lambda s: torch.full_like(s, 7.0))
    assert torch.all(sevens == 7.0)
    model.train()
    masked = capture_backbone_input(model, x, mix=lambda s: torch.full_like(s, 7.0))
    # mix first, then masks: every value is 7 or a masked 0, and whole mel rows are masked
    assert set(masked.unique().tolist()) <= {0.0, 7.0} and (masked == 0).any()
    rows_zero = (masked[:, 0] == 0).all(dim=-1)  # (B, F)
    assert rows_zero.any(dim=1).sum() >= 1


def test_build_model_is_seeded_and_leaves_global_rng_alone():
    cfg = RunConfig(audio=AudioConfig(sample_rate=SR), features=FEATURES,
                    model=ModelConfig(backbone="test_resnet"), train=TrainConfig(seed=5))
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    a, b = build_model(cfg, 4), build_model(cfg, 4)
    assert torch.equal(torch.rand(1), expected_next)
    c = build_model(cfg.replace(train={"seed": 6}), 4)
    wa, wb, wc = (m.backbone.fc.weight for m in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)


def test_bad_arguments():
    with pytest.raises(ValueError, match="num_classes must be an integer >= 2"):
        make_model(num_classes=1)
    with pytest.raises(ConfigError, match="resnet18"):  # close match listed
        create_backbone("resnet_18", 3)
    with pytest.raises(ConfigError, match="unknown backbone 'zzzz'"):
        create_backbone("zzzz", 3)


def test_close_matches_are_listed_once():
    with pytest.raises(ConfigError, match="did you mean") as e:
        check_backbone_name("resnet_18")  # resnet18 is a preset and a timm name
    close = str(e.value).split("did you mean ")[1].rstrip("?").split(", ")
    assert "resnet18" in close and len(close) == len(set(close))


def test_model_config_is_checked_without_building_anything(tmp_path):
    """What the commands call before decoding any audio."""
    with pytest.raises(ConfigError, match="unknown backbone 'resnet_18'.*resnet18"):
        check_model_config(ModelConfig(backbone="resnet_18"))
    with pytest.raises(ConfigError, match="nope.pth: pretrained weights file not found"):
        check_model_config(ModelConfig(backbone="test_resnet", pretrained=str(tmp_path / "nope.pth")))
    (tmp_path / "w.pth").write_bytes(b"")  # existence only: reading it is build_model's job
    for pretrained in (None, "timm", str(tmp_path / "w.pth")):
        check_model_config(ModelConfig(backbone="test_resnet", pretrained=pretrained))


# --- no bias feeding straight into BatchNorm -------------------------------------------


def test_bias_detector_flags_a_bias_before_batchnorm():
    bad = nn.Sequential(nn.Conv2d(1, 4, 3, bias=True), nn.BatchNorm2d(4), nn.ReLU(),
                        nn.Conv2d(4, 4, 3, bias=True), nn.ReLU(), nn.BatchNorm2d(4))
    # the second conv feeds a ReLU, not the BatchNorm: allowed
    assert bias_before_batchnorm(bad, torch.zeros(2, 1, 16, 16), strict=True) == [("0", "1")]


class _SharedOutput(nn.Module):
    """A conv output that feeds its BatchNorm and also a residual sum: its bias must stay."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(1, 4, 3, padding=1, bias=True), nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y) + y


class _InPlaceBetween(nn.Module):
    """conv -> in-place ReLU -> BatchNorm: the bias does not cancel through the ReLU."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(1, 4, 3, bias=True), nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.conv(x)
        y.relu_()
        return self.bn(y)


class _Unrunnable(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(1, 4, 3, bias=True), nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(self.conv(x)).view(-1, 13)  # fails on the probe's input


def test_bias_detector_skips_outputs_that_go_elsewhere_too():
    x = torch.zeros(2, 1, 8, 8)
    assert bias_before_batchnorm(_SharedOutput(), x, strict=True) == []
    assert bias_before_batchnorm(_InPlaceBetween(), x, strict=True) == []
    plain = nn.Sequential(nn.Conv2d(1, 4, 3, bias=True), nn.BatchNorm2d(4))
    for p in plain.parameters():
        p.requires_grad_(False)  # frozen layers are probed too, and stay frozen
    assert bias_before_batchnorm(plain, x, strict=True) == [("0", "1")]
    assert not any(p.requires_grad for p in plain.parameters())


def test_bias_detector_that_cannot_run_fails_loudly_when_strict(caplog):
    with pytest.raises(RuntimeError, match="invalid for input"):
        bias_before_batchnorm(_Unrunnable(), torch.zeros(2, 1, 16, 16), strict=True)
    assert bias_before_batchnorm(_Unrunnable(), torch.zeros(2, 1, 16, 16)) == []  # nothing to remove
    assert "could not check _Unrunnable" in caplog.text


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_have_no_bias_before_batchnorm(name):
    with torch.device("meta"):  # full-size networks, no memory and no compute
        backbone = create_backbone(name, 10)
    assert bias_before_batchnorm(backbone, strict=True) == []
    assert backbone.get_classifier().out_features == 10


def test_whole_classifier_has_no_bias_before_batchnorm():
    model = make_model()
    assert bias_before_batchnorm(model, waves(2), strict=True) == []


def test_folding_a_bias_into_batchnorm_keeps_the_function():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(2, 3, 1, bias=True), nn.BatchNorm2d(3))
    nn.init.normal_(net[0].bias)
    net[1].running_mean.normal_()
    net[1].running_var.uniform_(0.5, 2.0)
    folded = copy.deepcopy(net)
    _fold_bias_into_batchnorm(folded[0], folded[1])
    assert folded[0].bias is None
    x = torch.randn(4, 2, 5, 5)
    torch.testing.assert_close(folded.eval()(x), net.eval()(x), rtol=1e-5, atol=1e-5)
    # training: the batch mean absorbs the bias; the running means stay exactly b apart
    torch.testing.assert_close(folded.train()(x), net.train()(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(folded[1].running_mean, net[1].running_mean - net[0].bias.detach())


def test_resnest_split_attention_bias_folds_without_changing_outputs():
    torch.manual_seed(0)
    plain = timm.create_model("resnest14d", pretrained=False, in_chans=1, num_classes=3).eval()
    for m in plain.modules():  # non-trivial statistics, so the fold has something to move
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
    pairs = bias_before_batchnorm(plain, strict=True)
    assert pairs and all(conv.endswith("conv2.fc1") for conv, _ in pairs)
    folded = copy.deepcopy(plain)
    for conv, bn in pairs:
        _fold_bias_into_batchnorm(folded.get_submodule(conv), folded.get_submodule(bn))
    assert bias_before_batchnorm(folded, strict=True) == []
    x = torch.randn(2, 1, 32, 32)
    torch.testing.assert_close(folded(x), plain(x), rtol=1e-4, atol=1e-5)


# --- pretrained weights from a local file ----------------------------------------------


def rgb_test_resnet_state():
    torch.manual_seed(1)
    rgb = timm.create_model("test_resnet", pretrained=False, in_chans=3, num_classes=1000)
    return {k: v.clone() for k, v in rgb.state_dict().items()}


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_pretrained_file_stem_summed_to_one_channel_and_head_replaced(tmp_path, suffix):
    from safetensors.torch import save_file

    state = rgb_test_resnet_state()
    path = tmp_path / f"rgb{suffix}"
    if suffix == ".safetensors":
        save_file(state, str(path))
    else:
        torch.save({"state_dict": state}, path)
    model = make_model(num_classes=5, pretrained=str(path))
    own = model.backbone.state_dict()
    torch.testing.assert_close(own["conv1.0.weight"], state["conv1.0.weight"].sum(dim=1, keepdim=True))
    assert torch.equal(own["layer3.0.conv2.weight"], state["layer3.0.conv2.weight"])
    assert torch.equal(own["bn1.running_var"], state["bn1.running_var"])
    assert own["fc.weight"].shape == (5, 96)  # a new head, not the 1000-class one


def test_pretrained_file_that_does_not_fit_names_the_tensors(tmp_path):
    from safetensors.torch import save_file

    state = rgb_test_resnet_state()
    state["layer1.0.conv1.weight"] = torch.zeros(32, 32, 5, 5)
    del state["layer2.0.bn1.running_mean"]
    state["extra.weight"] = torch.zeros(1)
    path = tmp_path / "bad.safetensors"
    save_file(state, str(path))
    with pytest.raises(ConfigError) as err:
        make_model(pretrained=str(path))
    message = str(err.value)
    assert "bad.safetensors" in message
    assert "layer1.0.conv1.weight: file (32, 32, 5, 5) vs model (32, 32, 3, 3)" in message
    assert "layer2.0.bn1.running_mean: missing from the file" in message
    assert "extra.weight: not in the model" in message


def test_pretrained_file_missing_or_unreadable(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        make_model(pretrained=str(tmp_path / "nope.safetensors"))
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match="cannot read pretrained weights"):
        make_model(pretrained=str(junk))


def test_time_shift_given_as_an_integer_is_still_a_fraction_of_the_clip():
    """A TOML ``time_shift = 1`` means the whole clip, not one sample."""
    augment = RunConfig.from_dict({"augment": {"time_shift": 1, "freq_masks": 0, "time_masks": 0}}).augment
    assert make_model(augment=augment).timeshift.max_samples(2000) == 2000


def test_time_shift_acts_in_training_only():
    model = make_model(augment=AugmentConfig(freq_masks=0, time_masks=0, mixup_alpha=0.0, time_shift=0.5))
    model.timeshift.generator = torch.Generator().manual_seed(0)
    x = waves(4)
    model.eval()
    torch.testing.assert_close(capture_backbone_input(model, x), model.frontend(x))
    model.train()
    shifted = capture_backbone_input(model, x)
    assert not torch.allclose(shifted, model.frontend(x), atol=1e-3)
    # a circular shift moves frames: every clip keeps its set of frame energies
    torch.testing.assert_close(shifted.sum(dim=(1, 2, 3)), model.frontend(x).sum(dim=(1, 2, 3)),
                               rtol=0.05, atol=1.0)


def test_speed_perturb_acts_in_training_only_with_its_own_stream():
    model = make_model(augment=AugmentConfig(freq_masks=0, time_masks=0, mixup_alpha=0.0, speed_perturb=0.1))
    assert model.speed in model.augmentations()
    streams = [torch.Generator().manual_seed(i) for i in range(4)]
    model.set_generators(*streams)
    assert model.speed.generator is streams[3]
    x = waves(4)
    model.eval()
    torch.testing.assert_close(capture_backbone_input(model, x), model.frontend(x))
    model.train()
    assert not torch.allclose(capture_backbone_input(model, x), model.frontend(x), atol=1e-3)


def test_resnest_weights_with_conv_biases_load_into_the_folded_model(tmp_path):
    """ImageNet ResNeSt files hold the split-attention biases the model no longer has."""
    from safetensors.torch import save_file

    torch.manual_seed(2)
    rgb = timm.create_model("resnest14d", pretrained=False, in_chans=3, num_classes=1000).eval()
    for m in rgb.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
    save_file({k: v.contiguous() for k, v in rgb.state_dict().items()}, str(tmp_path / "rgb.safetensors"))
    folded = create_backbone("resnest14d", 3, pretrained=str(tmp_path / "rgb.safetensors")).eval()
    assert bias_before_batchnorm(folded, strict=True) == []
    # the same features: the RGB model on a grey image (3 equal channels) = summed stem on 1 channel
    x = torch.randn(2, 1, 32, 32)
    torch.testing.assert_close(folded.forward_features(x), rgb.forward_features(x.expand(-1, 3, -1, -1)),
                               rtol=1e-4, atol=1e-4)


def test_an_audioclf_checkpoint_can_be_the_pretrained_file(tmp_path):
    from audioclf.checkpoint import save_checkpoint

    source = make_model(num_classes=4)
    cfg = RunConfig(audio=AudioConfig(sample_rate=SR), features=FEATURES, augment=NO_AUGMENT,
                    model=ModelConfig(backbone="test_resnet"))
    save_checkpoint(source, tmp_path / "m", cfg, ["a", "b", "c", "d"])
    model = make_model(num_classes=2, pretrained=str(tmp_path / "m.safetensors"))
    assert torch.equal(model.backbone.layer1[0].conv1.weight, source.backbone.layer1[0].conv1.weight)
    assert model.backbone.fc.out_features == 2
