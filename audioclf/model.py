"""``AudioClassifier``: log-mel front end, training-time augmentation, and a timm backbone.

    (B, N) waveforms --SpeedPerturb--> --TimeShift--> --LogMel--> (B, 1, F, T) --mix-->
    --FreqShift--> --SpecAugment--> --timm backbone (in_chans=1)--> (B, K) logits

SpeedPerturb, TimeShift, FreqShift and SpecAugment act only in training mode (each is an
identity module when its setting is 0); ``mix`` (MixUp's ``apply``) is
passed by the trainer. Any timm model name works; :data:`PRESETS` lists the families
that are known to do well on spectrograms and are tested here.

Pretrained weights (``ModelConfig.pretrained``):

- ``None``: random initialisation (seeded by ``TrainConfig.seed`` in :func:`build_model`).
- ``"timm"``: timm's own ImageNet weights for the backbone, downloaded by timm.
- a path: a local ``.safetensors`` file, or a state dict read with
  ``torch.load(weights_only=True)``, for offline machines.

Either way the RGB stem is adapted to one input channel by summing its weights over the
three colour channels (timm's ``adapt_input_conv``) and the ImageNet classifier is
replaced by a fresh one with ``num_classes`` outputs.

A convolution or linear layer whose output goes straight into a BatchNorm gains nothing
from a bias: the normalization subtracts it again. :func:`create_backbone` removes such
biases (timm's ResNeSt has them in its split-attention blocks) after folding them into
the BatchNorm's running mean, which leaves the function computed unchanged.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
from pathlib import Path

import timm
import torch
from timm.models import adapt_input_conv
from torch import Tensor, nn

from audioclf.augment import FreqShift, SpecAugment, SpeedPerturb, TimeShift
from audioclf.config import AugmentConfig, FeatureConfig, ModelConfig, RunConfig
from audioclf.errors import ConfigError
from audioclf.features import LogMel

__all__ = ["AudioClassifier", "PRESETS", "build_model", "create_backbone", "check_backbone_name",
           "check_model_config", "load_pretrained_file", "bias_before_batchnorm"]

logger = logging.getLogger(__name__)

# Backbones known to work well on log-mel spectrograms; any other timm name is accepted too.
# Parameter counts are for 10 classes and one input channel.
PRESETS: dict[str, str] = {
    "resnest14d": "ResNeSt-14d, split-attention ResNet, 8.6M parameters: fast, strong on small data",
    "resnest26d": "ResNeSt-26d, 15.0M parameters: a good default for ESC-50 / UrbanSound8K size data",
    "resnest50d": "ResNeSt-50d, 25.4M parameters",
    "wide_resnet50_2": "Wide ResNet-50-2, 66.8M parameters",
    "wide_resnet101_2": "Wide ResNet-101-2, 124.8M parameters: largest preset, for large datasets",
    "resnet18": "ResNet-18, 11.2M parameters: quick baseline",
    "resnet34": "ResNet-34, 21.3M parameters",
    "resnet50": "ResNet-50, 23.5M parameters",
    "test_resnet": "timm's 0.4M-parameter test network: for tests and smoke runs only",
}


class AudioClassifier(nn.Module):
    """Waveforms to class logits: (B, N) -> (B, K).

    Args:
        num_classes: number of classes K (>= 2).
        sample_rate: rate of the input waveforms (Hz).
        features: log-mel front end settings.
        augment: SpecAugment, speed, time- and frequency-shift settings (MixUp is applied by the trainer
            through ``forward(..., mix=...)``).
        model: backbone name, pretrained weights, dropout before the classifier.

    Raises:
        ValueError: ``num_classes`` < 2.
        ConfigError: unknown backbone, or pretrained weights that cannot be loaded.

    Example:
        >>> model = AudioClassifier(10, 16000, FeatureConfig(), AugmentConfig(),
        ...                         ModelConfig(backbone="resnest26d"))
        >>> model.eval()(torch.randn(2, 16000)).shape
        torch.Size([2, 10])
    """

    def __init__(self, num_classes: int, sample_rate: int, features: FeatureConfig,
                 augment: AugmentConfig, model: ModelConfig):
        super().__init__()
        if not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(f"num_classes must be an integer >= 2 ({num_classes!r} given)")
        self.num_classes = num_classes
        self.sample_rate = sample_rate
        self.speed = SpeedPerturb(augment.speed_perturb) if augment.speed_perturb > 0 else nn.Identity()
        self.timeshift = TimeShift.from_config(augment) if augment.time_shift > 0 else nn.Identity()
        self.frontend = LogMel.from_config(sample_rate, features)
        self.freqshift = FreqShift(augment.freq_shift) if augment.freq_shift > 0 else nn.Identity()
        self.specaugment = SpecAugment.from_config(augment)
        self.backbone = create_backbone(model.backbone, num_classes, model.drop_rate, model.pretrained)

    def forward(self, waveforms: Tensor, mix=None) -> Tensor:
        """Classify a batch of clips.

        Args:
            waveforms: (B, N) float waveforms at ``sample_rate``.
            mix: optional callable (B, 1, F, T) -> (B, 1, F, T) applied to the spectrogram
                before SpecAugment (the trainer passes MixUp's ``apply`` here).

        Returns:
            (B, K) logits.
        """
        waveforms = self.speed(waveforms)  # (B, N), faster or slower in training only
        waveforms = self.timeshift(waveforms)  # (B, N), shifted in training only
        spec = self.frontend(waveforms)  # (B, N) -> (B, 1, F, T)
        if mix is not None:
            spec = mix(spec)
        spec = self.freqshift(spec)  # identity in eval mode
        spec = self.specaugment(spec)  # identity in eval mode
        return self.backbone(spec)  # (B, 1, F, T) -> (B, K)

    def set_generators(self, specaugment: torch.Generator | None,
                       timeshift: torch.Generator | None,
                       freqshift: torch.Generator | None = None,
                       speed: torch.Generator | None = None) -> None:
        """Give the training-time augmentations their own random streams (replayable draws)."""
        self.specaugment.generator = specaugment
        if isinstance(self.timeshift, TimeShift):
            self.timeshift.generator = timeshift
        if isinstance(self.freqshift, FreqShift):
            self.freqshift.generator = freqshift
        if isinstance(self.speed, SpeedPerturb):
            self.speed.generator = speed

    def augmentations(self) -> list[nn.Module]:
        """The modules that act only in training mode: speed, time shift, frequency shift, SpecAugment."""
        return [self.speed, self.timeshift, self.freqshift, self.specaugment]


def build_model(cfg: RunConfig, num_classes: int) -> AudioClassifier:
    """Build the model a :class:`RunConfig` describes; random layers are seeded by ``cfg.train.seed``.

    The global random state is left as it was.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.train.seed)
        return AudioClassifier(num_classes, cfg.audio.sample_rate, cfg.features, cfg.augment,
                               cfg.model)


def check_model_config(model: ModelConfig) -> None:
    """Refuse what :func:`build_model` would refuse, cheaply: call it before decoding any audio.

    Checks the backbone name and that a local pretrained file exists; it neither creates
    the network nor reads the weights.

    Raises:
        ConfigError: an unknown backbone (with close matches), or a pretrained path that
            is not a file.
    """
    check_backbone_name(model.backbone)
    if model.pretrained not in (None, "timm") and not Path(model.pretrained).is_file():
        raise ConfigError(f"{model.pretrained}: pretrained weights file not found (give a local "
                          "weights file, or 'timm' for timm's own weights)")


def check_backbone_name(name: str) -> None:
    """Raise :class:`ConfigError` listing close timm names when ``name`` is not a timm model."""
    if name in PRESETS or timm.is_model(name):
        return
    names = list(dict.fromkeys([*PRESETS, *timm.list_models()]))  # presets are timm names too
    close = difflib.get_close_matches(name, names, n=5, cutoff=0.6)
    hint = f"; did you mean {', '.join(close)}?" if close else f"; presets: {', '.join(PRESETS)}"
    raise ConfigError(f"unknown backbone {name!r}: not a timm model name{hint}")


def create_backbone(name: str, num_classes: int, drop_rate: float = 0.0,
                    pretrained: str | None = None) -> nn.Module:
    """A timm model with one input channel, ``num_classes`` outputs, no bias before BatchNorm.

    Args:
        name: timm model name (see :data:`PRESETS`).
        num_classes: outputs of the new classifier.
        drop_rate: dropout before the classifier.
        pretrained: None, ``"timm"`` or a local weights file (see the module docstring).

    Raises:
        ConfigError: unknown name; a weights file that is missing, unreadable or does not fit.
    """
    check_backbone_name(name)
    from_timm = pretrained == "timm"
    try:
        backbone = timm.create_model(name, pretrained=from_timm, in_chans=1,
                                     num_classes=num_classes, drop_rate=drop_rate)
    except (OSError, ConnectionError) as e:  # hub download failed (offline machine)
        raise ConfigError(f"could not fetch timm's pretrained weights for {name!r} ({e}); "
                          "on an offline machine pass a local weights file instead") from None
    with torch.device("meta"):  # find the pairs on a twin that costs nothing to run
        twin = timm.create_model(name, pretrained=False, in_chans=1, num_classes=num_classes)
    pairs = bias_before_batchnorm(twin)
    for conv_name, bn_name in pairs:
        _fold_bias_into_batchnorm(backbone.get_submodule(conv_name), backbone.get_submodule(bn_name))
    if pretrained is not None and not from_timm:
        load_pretrained_file(backbone, pretrained, folded=pairs)
    return backbone


def load_pretrained_file(backbone: nn.Module, path: str | Path,
                         folded: list[tuple[str, str]] = ()) -> None:
    """Load ImageNet-style weights from a local file into a 1-channel backbone.

    The stem (timm's ``first_conv``) is summed over its input channels and the
    classifier (``classifier``) is dropped, so weights of the 3-channel, 1000-class
    model fit. Reads ``.safetensors`` with safetensors, anything else with
    ``torch.load(weights_only=True)`` (a bare state dict, or one under "state_dict" or
    "model"; a DistributedDataParallel "module." prefix is removed). An audioclf
    checkpoint works too: its ``backbone.`` weights are used.

    Args:
        backbone: the timm model to load into.
        path: the weights file.
        folded: (conv, BatchNorm) pairs whose conv bias ``backbone`` no longer has; a
            bias for them in the file is folded into the BatchNorm's running mean.

    Raises:
        ConfigError: the file is missing or unreadable, or its tensors do not fit the
            backbone (the message names each mismatched, missing or unexpected tensor).
    """
    path = Path(path)
    state = _read_state_dict(path)
    cfg = getattr(backbone, "pretrained_cfg", {}) or {}
    for conv in _as_list(cfg.get("first_conv")):
        key = f"{conv}.weight"
        if key in state and state[key].ndim == 4 and state[key].shape[1] != 1:
            state[key] = adapt_input_conv(1, state[key])  # sum over the RGB channels
    head = {f"{c}.{p}" for c in _as_list(cfg.get("classifier")) for p in ("weight", "bias")}
    state = {k: v for k, v in state.items() if k not in head}
    for conv, bn in folded:
        bias, mean = state.pop(f"{conv}.bias", None), state.get(f"{bn}.running_mean")
        if bias is not None and mean is not None:
            state[f"{bn}.running_mean"] = mean - bias  # as _fold_bias_into_batchnorm does

    own = backbone.state_dict()
    problems = [f"{k}: file {tuple(v.shape)} vs model {tuple(own[k].shape)}"
                for k, v in state.items() if k in own and v.shape != own[k].shape]
    problems += [f"{k}: not in the model" for k in state if k not in own]
    problems += [f"{k}: missing from the file" for k in own
                 if k not in state and k not in head and not k.endswith("num_batches_tracked")]
    if problems:
        shown = "; ".join(problems[:10]) + (f"; ... {len(problems) - 10} more" if len(problems) > 10 else "")
        raise ConfigError(f"{path}: pretrained weights do not fit backbone "
                          f"{cfg.get('architecture', type(backbone).__name__)!r}: {shown}")
    backbone.load_state_dict(state, strict=False)
    logger.info("loaded pretrained weights from %s (stem summed to 1 channel, new classifier)", path)


def _read_state_dict(path: Path) -> dict[str, Tensor]:
    if not path.is_file():
        raise ConfigError(f"{path}: pretrained weights file not found")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # any reader error means the same thing to the user
        raise ConfigError(f"{path}: cannot read pretrained weights ({type(e).__name__}: {e})") from None
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ConfigError(f"{path}: expected a state dict (tensor name -> tensor)")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    if any(k.startswith("backbone.") for k in state):  # an audioclf checkpoint
        state = {k.removeprefix("backbone."): v for k, v in state.items() if k.startswith("backbone.")}
    return state


def _as_list(value) -> list[str]:
    if value is None:
        return []
    return [value] if isinstance(value, str) else list(value)


def bias_before_batchnorm(module: nn.Module, example: Tensor | None = None,
                          strict: bool = False) -> list[tuple[str, str]]:
    """Names of (conv or linear with a bias, BatchNorm) pairs where one feeds only the other.

    Found by running ``module`` once in eval mode and watching which tensor each
    BatchNorm receives: it follows the real data flow, not the order modules were
    declared in. A pair counts only when the BatchNorm is the output's sole consumer
    (counted in the autograd graph) and nothing changed the output in place on the way:
    a bias that also reaches a residual sum, say, does not cancel and must stay. On the
    meta device this costs neither memory nor compute.

    Args:
        module: the network to check.
        example: its input; default a (2, 1, H, W) zero batch on the module's device, with
            H, W from timm's ``pretrained_cfg`` (else 64).
        strict: re-raise when ``module`` cannot run on ``example`` (tests use this, so a
            check that ran nothing cannot pass); by default log a warning and return no
            pairs (nothing is removed where the data flow is unknown).
    """
    if example is None:
        cfg = getattr(module, "pretrained_cfg", None) or {}
        size = (cfg.get("input_size") or (1, 64, 64))[1:]
        example = torch.zeros(2, 1, *size, device=next(module.parameters()).device)
    names = {m: n for n, m in module.named_modules()}
    # id -> (layer, tensor, its autograd node, version); holding the tensor keeps its id unique
    produced: dict[int, tuple] = {}
    candidates: list[tuple[str, str, tuple]] = []

    def after(mod, _inputs, out):
        if mod.bias is not None and isinstance(out, Tensor):
            produced[id(out)] = (mod, out, (out.grad_fn, out.output_nr), out._version)

    def before(mod, inputs):
        src = produced.get(id(inputs[0]))
        if src is not None and inputs[0]._version == src[3]:  # not changed in place since
            candidates.append((names[src[0]], names[mod], src[2]))

    hooks = []
    for m in module.modules():
        if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Linear)):
            hooks.append(m.register_forward_hook(after))
        elif isinstance(m, nn.modules.batchnorm._BatchNorm):
            hooks.append(m.register_forward_pre_hook(before))
    was_training = module.training
    frozen = [p for p in module.parameters() if not p.requires_grad]
    uses: dict = {}
    try:
        for p in frozen:  # every layer output needs an autograd node to count its consumers
            p.requires_grad_(True)
        with torch.enable_grad():
            uses = _consumers(module.eval()(example))
    except Exception as e:  # an exotic architecture the probe cannot run
        if strict:
            raise
        logger.warning("could not check %s for biases before BatchNorm (%s)", type(module).__name__, e)
    finally:
        for h in hooks:
            h.remove()
        for p in frozen:
            p.requires_grad_(False)
        module.train(was_training)
    return sorted({(conv, bn) for conv, bn, node in candidates if uses.get(node) == 1})


def _consumers(output) -> dict[tuple, int]:
    """How many autograd nodes take each (node, output index) as input, walking back from ``output``."""
    if isinstance(output, Tensor):
        roots = [output.grad_fn]
    elif isinstance(output, dict):
        roots = [t.grad_fn for t in output.values() if isinstance(t, Tensor)]
    else:
        roots = [t.grad_fn for t in output if isinstance(t, Tensor)]
    counts: dict[tuple, int] = {}
    stack, seen = [r for r in roots if r is not None], set()
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        for nxt, index in node.next_functions:
            if nxt is not None:
                counts[(nxt, index)] = counts.get((nxt, index), 0) + 1
                stack.append(nxt)
    return counts


@torch.no_grad()
def _fold_bias_into_batchnorm(layer: nn.Module, bn: nn.modules.batchnorm._BatchNorm) -> None:
    """Remove ``layer.bias`` without changing the output of ``bn(layer(x))``.

    In training BatchNorm subtracts the batch mean, which contains the bias, so the
    bias cancels exactly; in evaluation it subtracts ``running_mean``, so the bias moves
    there: BN(Wx + b; mean m) == BN(Wx; mean m - b).
    """
    if bn.running_mean is not None:
        bn.running_mean.sub_(layer.bias.to(bn.running_mean.dtype))
    layer.register_parameter("bias", None)


def without_pretrained(model: ModelConfig) -> ModelConfig:
    """The same model config with random init: weights come from a checkpoint instead."""
    return dataclasses.replace(model, pretrained=None)
