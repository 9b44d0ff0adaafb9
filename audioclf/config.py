"""Typed, frozen configuration: one dataclass per stage, converted once at the edge.

The command line and config files (TOML or YAML) all end up here; library functions receive the
dataclass (or the fields they need), never a dict of strings. Every field is validated in
``__post_init__``, its type first (an integer field takes no 2.5 and no ``true``, a
switch takes no ``"false"``) and then its range; a bad value raises
:class:`~audioclf.errors.ConfigError` quoting the value and what is allowed.

A run's whole configuration is a :class:`RunConfig`; ``RunConfig.to_dict()`` is what
checkpoints and bundles store, and ``RunConfig.from_dict()`` rebuilds it.
"""

from __future__ import annotations

import dataclasses
import difflib
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from audioclf.errors import ConfigError

__all__ = [
    "AudioConfig",
    "FeatureConfig",
    "AugmentConfig",
    "ModelConfig",
    "TrainConfig",
    "CVConfig",
    "RunConfig",
    "load_config_file",
]


def _check(ok: bool, name: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"{name} must be {allowed} ({value!r} given)")


def _choice(name: str, value: Any, choices: tuple) -> None:
    _check(value in choices, name, value, "one of " + ", ".join(repr(c) for c in choices))


_KINDS = {  # annotation -> (test, what the message calls it); a bool is never a number
    "int": (lambda v: isinstance(v, int) and not isinstance(v, bool), "an integer"),
    "float": (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool), "a number"),
    "bool": (lambda v: isinstance(v, bool), "true or false"),
    "str": (lambda v: isinstance(v, str), "a string"),
    "None": (lambda v: v is None, "None"),
}


def _check_types(obj) -> None:
    """Every field of the dataclass ``obj`` holds a value of its annotated type.

    Runs before the range checks, so a TOML ``epochs = 2.5`` or ``amp = "false"`` is named
    here rather than failing later inside ``range()`` or NumPy. A field annotated
    ``float`` alone also accepts an integer and stores it as a float (``time_shift = 1``
    is the whole clip); where ``int | float`` is allowed the type carries meaning (an
    epoch or a fraction, frames or a fraction) and is kept.
    """
    for f in fields(obj):
        value = getattr(obj, f.name)
        kinds = [k.strip() for k in f.type.split("|")]
        named = [k for k in kinds if not (k == "int" and "float" in kinds)]  # "a number" covers both
        _check(any(_KINDS[k][0](value) for k in kinds), f.name, value,
               " or ".join(_KINDS[k][1] for k in named))
        if "float" in kinds and "int" not in kinds and isinstance(value, int):
            object.__setattr__(obj, f.name, float(value))


@dataclass(frozen=True)
class AudioConfig:
    """How clips are read and cut before the model sees them.

    Attributes:
        sample_rate: every file is resampled to this rate (Hz).
        clip_seconds: length of the fixed-size crops used for training and scoring.
        pad_mode: how a clip shorter than ``clip_seconds`` is filled: ``"zeros"`` or
            ``"repeat"`` (tile the clip).
    """

    sample_rate: int = 16000
    clip_seconds: float = 1.0
    pad_mode: str = "zeros"

    def __post_init__(self):
        _check_types(self)
        _check(0 < self.sample_rate <= 1_000_000, "sample_rate", self.sample_rate,
               "an integer in (0, 1000000] Hz")
        _check(0 < self.clip_seconds <= 3600, "clip_seconds", self.clip_seconds, "in (0, 3600]")
        _choice("pad_mode", self.pad_mode, ("zeros", "repeat"))

    @property
    def clip_samples(self) -> int:
        return int(round(self.clip_seconds * self.sample_rate))


@dataclass(frozen=True)
class FeatureConfig:
    """Log-mel front end (see :class:`audioclf.features.LogMel`).

    ``normalize`` is ``"none"``, ``"dataset"`` (per-mel-bin mean/std computed on the
    training set and saved with the model) or ``"instance"`` (each spectrogram to zero
    mean, unit variance).
    """

    n_fft: int = 1024
    win_length: int | None = None
    hop_length: int = 320
    n_mels: int = 128
    f_min: float = 0.0
    f_max: float | None = None
    power: float = 2.0
    mel_scale: str = "slaney"
    mel_norm: str | None = "slaney"
    top_db: float | None = 80.0
    amin: float = 1e-10
    center: bool = True
    normalize: str = "dataset"

    def __post_init__(self):
        _check_types(self)
        _check(self.n_fft >= 16, "n_fft", self.n_fft, "at least 16")
        if self.win_length is not None:
            _check(0 < self.win_length <= self.n_fft, "win_length", self.win_length,
                   f"in (0, n_fft={self.n_fft}]")
        _check(self.hop_length > 0, "hop_length", self.hop_length, "positive")
        _check(0 < self.n_mels <= 512, "n_mels", self.n_mels, "in (0, 512]")
        _check(self.f_min >= 0, "f_min", self.f_min, ">= 0 Hz")
        if self.f_max is not None:
            _check(self.f_max > self.f_min, "f_max", self.f_max, f"greater than f_min={self.f_min}")
        _check(self.power in (1.0, 2.0), "power", self.power, "1.0 (magnitude) or 2.0 (power)")
        _choice("mel_scale", self.mel_scale, ("slaney", "htk"))
        _choice("mel_norm", self.mel_norm, ("slaney", None))
        if self.top_db is not None:
            _check(self.top_db > 0, "top_db", self.top_db, "positive or None")
        _check(self.amin > 0, "amin", self.amin, "positive")
        _choice("normalize", self.normalize, ("none", "dataset", "instance"))


@dataclass(frozen=True)
class AugmentConfig:
    """Training-time augmentation (see :mod:`audioclf.augment`). Zero disables a part.

    ``time_mask_width``: an int is a width in frames; a float in (0, 1] a fraction of
    the spectrogram's length. ``time_shift`` is the largest random circular shift of the
    waveform, as a fraction of the clip. ``freq_shift`` is the largest random shift of the
    mel axis in bins (a vocal-tract-length-like perturbation; 0 disables). ``speed_perturb``
    is the largest relative change of playback speed (0.1: factors 0.9-1.1; tempo, pitch
    and formants change together; 0 disables).
    """

    freq_masks: int = 2
    freq_mask_width: int = 16
    time_masks: int = 2
    time_mask_width: int | float = 0.1
    specaugment_p: float = 1.0
    mask_value: str = "zero"
    mixup_alpha: float = 0.4
    mixup_p: float = 1.0
    mixup_per_example: bool = False
    time_shift: float = 0.0
    freq_shift: int = 0
    speed_perturb: float = 0.0

    def __post_init__(self):
        _check_types(self)
        _check(self.freq_masks >= 0, "freq_masks", self.freq_masks, ">= 0")
        _check(self.freq_mask_width >= 0, "freq_mask_width", self.freq_mask_width, ">= 0")
        _check(self.time_masks >= 0, "time_masks", self.time_masks, ">= 0")
        if isinstance(self.time_mask_width, float):
            _check(0 <= self.time_mask_width <= 1, "time_mask_width", self.time_mask_width,
                   "a fraction in [0, 1] (float) or a width in frames (int)")
        else:
            _check(self.time_mask_width >= 0, "time_mask_width", self.time_mask_width, ">= 0")
        _check(0 <= self.specaugment_p <= 1, "specaugment_p", self.specaugment_p, "in [0, 1]")
        _choice("mask_value", self.mask_value, ("zero", "mean"))
        _check(self.mixup_alpha >= 0, "mixup_alpha", self.mixup_alpha, ">= 0 (0 disables MixUp)")
        _check(0 <= self.mixup_p <= 1, "mixup_p", self.mixup_p, "in [0, 1]")
        _check(0 <= self.time_shift <= 1, "time_shift", self.time_shift, "a fraction in [0, 1]")
        _check(self.freq_shift >= 0, "freq_shift", self.freq_shift, "a number of mel bins >= 0")
        _check(0 <= self.speed_perturb < 0.5, "speed_perturb", self.speed_perturb, "a fraction in [0, 0.5)")


@dataclass(frozen=True)
class ModelConfig:
    """Backbone and pretrained weights (see :mod:`audioclf.model`).

    ``pretrained``: None (random init), ``"timm"`` (timm's own ImageNet weights for the
    backbone, downloaded by timm), or a path to a local ``.safetensors`` / state-dict file.
    """

    backbone: str = "resnet18"
    pretrained: str | None = None
    drop_rate: float = 0.2

    def __post_init__(self):
        _check_types(self)
        _check(bool(self.backbone), "backbone", self.backbone, "a timm model name")
        _check(0 <= self.drop_rate < 1, "drop_rate", self.drop_rate, "in [0, 1)")


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation, selection and run-time settings (see :func:`audioclf.train.fit`).

    ``plateau_patience`` and ``early_stopping_patience`` default to values derived from
    ``epochs`` (see :meth:`resolved_plateau_patience`): generous, so a noisy validation
    metric does not cut the learning rate or the run too early.
    ``swa_start`` is the epoch (1-based) from which weights are averaged, or a float in
    (0, 1) as a fraction of ``epochs``; None disables SWA. A whole float from 1 up is that
    epoch (TOML ``swa_start = 3.0`` and ``--swa-start 3`` are epoch 3); 2.7 is neither.
    ``val_split`` says how the validation part (``val_fraction``) is drawn from grouped
    training data: ``"groups"`` sets whole groups aside (selection on unseen speakers, one
    speaker fewer to fit on), ``"clips"`` a stratified share of every group's clips (every
    training speaker is fitted on, and selection sees them too). Data without groups is
    always split by clips.
    """

    epochs: int = 30
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 1e-2
    optimizer: str = "adamw"
    scheduler: str = "plateau"
    plateau_factor: float = 0.5
    plateau_patience: int | None = None
    warmup_epochs: int = 1
    early_stopping_patience: int | None = None
    swa_start: int | float | None = 0.75
    swa_lr: float | None = None
    grad_clip: float | None = None
    label_smoothing: float = 0.0
    seed: int = 0
    num_workers: int = 0
    device: str = "auto"
    amp: bool = True
    channels_last: bool = True
    compile: bool = False
    val_fraction: float = 0.15
    val_split: str = "groups"

    def __post_init__(self):
        _check_types(self)
        _check(self.epochs >= 1, "epochs", self.epochs, ">= 1")
        _check(self.batch_size >= 1, "batch_size", self.batch_size, ">= 1")
        _check(self.lr > 0, "lr", self.lr, "positive")
        _check(self.weight_decay >= 0, "weight_decay", self.weight_decay, ">= 0")
        _choice("optimizer", self.optimizer, ("adamw", "adam"))
        _choice("scheduler", self.scheduler, ("plateau", "cosine"))
        _check(0 < self.plateau_factor < 1, "plateau_factor", self.plateau_factor, "in (0, 1)")
        if self.plateau_patience is not None:
            _check(self.plateau_patience >= 0, "plateau_patience", self.plateau_patience, ">= 0")
        _check(self.warmup_epochs >= 0, "warmup_epochs", self.warmup_epochs, ">= 0")
        if self.early_stopping_patience is not None:
            _check(self.early_stopping_patience >= 1, "early_stopping_patience",
                   self.early_stopping_patience, ">= 1")
        if isinstance(self.swa_start, float) and self.swa_start >= 1 and self.swa_start.is_integer():
            object.__setattr__(self, "swa_start", int(self.swa_start))
        if isinstance(self.swa_start, float):
            _check(0 < self.swa_start < 1, "swa_start", self.swa_start,
                   "an epoch (a whole number >= 1) or a fraction of the epochs in (0, 1)")
        elif self.swa_start is not None:
            _check(1 <= self.swa_start <= self.epochs, "swa_start", self.swa_start,
                   f"an epoch in [1, epochs={self.epochs}]")
        if self.swa_lr is not None:
            _check(self.swa_lr > 0, "swa_lr", self.swa_lr, "positive")
        if self.grad_clip is not None:
            _check(self.grad_clip > 0, "grad_clip", self.grad_clip, "positive or None")
        _check(0 <= self.label_smoothing < 1, "label_smoothing", self.label_smoothing, "in [0, 1)")
        _check(self.seed >= 0, "seed", self.seed, ">= 0")
        _check(self.num_workers >= 0, "num_workers", self.num_workers, ">= 0")
        _check(0 < self.val_fraction < 1, "val_fraction", self.val_fraction, "in (0, 1)")
        _choice("val_split", self.val_split, ("groups", "clips"))

    def resolved_plateau_patience(self) -> int:
        """Epochs without improvement before the LR is halved: a tenth of the budget, >= 2."""
        if self.plateau_patience is not None:
            return self.plateau_patience
        return max(2, self.epochs // 10)

    def resolved_early_stopping_patience(self) -> int:
        """Epochs without improvement before stopping: room for two LR reductions, >= 5."""
        if self.early_stopping_patience is not None:
            return self.early_stopping_patience
        return max(5, 2 * self.resolved_plateau_patience() + 2)

    def resolved_swa_start(self) -> int | None:
        """1-based epoch from which SWA averages weights, or None when disabled."""
        if self.swa_start is None:
            return None
        if isinstance(self.swa_start, float):
            return max(1, min(self.epochs, int(round(self.swa_start * self.epochs)) + 1))
        return int(self.swa_start)


@dataclass(frozen=True)
class CVConfig:
    """K-fold cross-validation and the fold ensemble (see :mod:`audioclf.crossval`).

    ``tta_shifts`` is the number of deterministic time-shift views per clip at test
    time (1 means no TTA); ``tta_mode`` is ``"circular"`` or ``"pad"``.
    """

    k: int = 5
    seed: int = 0
    tta_shifts: int = 5
    tta_max_shift: float = 0.2
    tta_mode: str = "circular"

    def __post_init__(self):
        _check_types(self)
        _check(2 <= self.k <= 100, "k", self.k, "in [2, 100]")
        _check(self.seed >= 0, "seed", self.seed, ">= 0")
        _check(self.tta_shifts >= 1, "tta_shifts", self.tta_shifts, ">= 1")
        _check(0 <= self.tta_max_shift <= 1, "tta_max_shift", self.tta_max_shift, "in [0, 1]")
        _choice("tta_mode", self.tta_mode, ("circular", "pad"))


_SECTIONS = {
    "audio": AudioConfig,
    "features": FeatureConfig,
    "augment": AugmentConfig,
    "model": ModelConfig,
    "train": TrainConfig,
    "cv": CVConfig,
}


@dataclass(frozen=True)
class RunConfig:
    """Everything a training run needs; stored in checkpoints and bundles as JSON."""

    audio: AudioConfig = field(default_factory=AudioConfig)
    features: FeatureConfig = field(default_factory=FeatureConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    cv: CVConfig = field(default_factory=CVConfig)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> "RunConfig":
        """Build from nested dicts; unknown sections or keys raise ConfigError with close matches."""
        unknown = set(data) - set(_SECTIONS)
        if unknown:
            name = sorted(unknown)[0]
            raise ConfigError(f"{source}: unknown section [{name}]{_did_you_mean(name, _SECTIONS)}")
        parts = {}
        for section, klass in _SECTIONS.items():
            values = dict(data.get(section) or {})
            parts[section] = _build(klass, values, f"{source} [{section}]")
        return cls(**parts)

    def replace(self, **sections: dict[str, Any]) -> "RunConfig":
        """Copy with some fields changed: ``cfg.replace(train={"epochs": 3})``."""
        parts = {}
        for name, changes in sections.items():
            if name not in _SECTIONS:
                raise ConfigError(f"unknown section {name!r}{_did_you_mean(name, _SECTIONS)}")
            current = dataclasses.asdict(getattr(self, name))
            current.update(changes)
            parts[name] = _build(_SECTIONS[name], current, name)
        return dataclasses.replace(self, **parts)


def _did_you_mean(name: str, options) -> str:
    close = difflib.get_close_matches(name, list(options), n=3)
    return f" (did you mean {', '.join(close)}?)" if close else ""


def _build(klass, values: dict[str, Any], where: str):
    names = {f.name for f in fields(klass)}
    for key in values:
        if key not in names:
            raise ConfigError(f"{where}: unknown option {key!r}{_did_you_mean(key, names)}")
    try:
        return klass(**values)
    except TypeError as e:  # e.g. a comparison between str and int from a bad TOML value
        raise ConfigError(f"{where}: {e}") from None


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Read a TOML file (or YAML: ``.yaml`` / ``.yml``) into nested dicts.

    The sections are those of :class:`RunConfig` (``audio``, ``features``, ``augment``,
    ``model``, ``train``, ``cv``); the values are validated later by ``RunConfig.from_dict``.
    YAML is read with PyYAML's ``safe_load`` (PyYAML, which timm needs too).
    """
    path = Path(path)
    yaml_file = path.suffix.lower() in (".yaml", ".yml")
    kind = "YAML" if yaml_file else "TOML"
    try:
        if yaml_file:
            return _load_yaml(path)
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a directory, expected a {kind} file") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not valid {kind}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None


def _load_yaml(path: Path) -> dict[str, Any]:
    import yaml

    with open(path, encoding="utf-8") as f:
        try:
            data = yaml.safe_load(f)
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {' '.join(str(e).split())}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections (audio, features, ...), "
                          f"found {type(data).__name__}")
    return data
