"""Options shared by ``audioclf train`` and ``audioclf cv``.

Precedence, lowest to highest: the dataclass defaults, the ``--config`` TOML file, then
options given on the command line. Every option maps to one field of
:class:`audioclf.config.RunConfig`; the table below is the single source of that mapping.
"""

from __future__ import annotations

import argparse

from audioclf.config import RunConfig, load_config_file

# (flag, section, field, type, help)
_OPTIONS: list[tuple[str, str, str, object, str]] = [
    ("--sample-rate", "audio", "sample_rate", int, "resample every file to this rate (Hz)"),
    ("--clip-seconds", "audio", "clip_seconds", float, "length of training crops (s)"),
    ("--pad-mode", "audio", "pad_mode", str, "fill short clips with 'zeros' or 'repeat'"),
    ("--n-fft", "features", "n_fft", int, "FFT size"),
    ("--hop-length", "features", "hop_length", int, "STFT hop (samples)"),
    ("--n-mels", "features", "n_mels", int, "number of mel bins"),
    ("--f-max", "features", "f_max", float, "highest mel frequency (Hz)"),
    ("--normalize", "features", "normalize", str, "none | dataset | instance"),
    ("--mixup-alpha", "augment", "mixup_alpha", float, "MixUp Beta(alpha, alpha); 0 disables"),
    ("--freq-masks", "augment", "freq_masks", int, "SpecAugment frequency masks"),
    ("--time-masks", "augment", "time_masks", int, "SpecAugment time masks"),
    ("--time-shift", "augment", "time_shift", float, "max random waveform shift (fraction)"),
    ("--freq-shift", "augment", "freq_shift", int, "max random mel-axis shift (bins)"),
    ("--speed-perturb", "augment", "speed_perturb", float, "max random speed change (fraction, e.g. 0.1)"),
    ("--backbone", "model", "backbone", str, "timm model name (e.g. resnest26d, resnet18)"),
    ("--pretrained", "model", "pretrained", str, "'timm' for timm's ImageNet weights, or a local weights file"),
    ("--drop-rate", "model", "drop_rate", float, "dropout before the classifier"),
    ("--epochs", "train", "epochs", int, "maximum number of epochs"),
    ("--batch-size", "train", "batch_size", int, "global batch size"),
    ("--lr", "train", "lr", float, "peak learning rate"),
    ("--weight-decay", "train", "weight_decay", float, "decoupled weight decay (not on norms and biases)"),
    ("--optimizer", "train", "optimizer", str, "adamw | adam"),
    ("--scheduler", "train", "scheduler", str, "plateau | cosine"),
    ("--plateau-patience", "train", "plateau_patience", int, "epochs without improvement before LR drop"),
    ("--early-stopping-patience", "train", "early_stopping_patience", int, "epochs without improvement before stopping"),
    ("--swa-start", "train", "swa_start", float, "epoch (>= 1) or fraction of epochs (< 1) where SWA starts"),
    ("--swa-lr", "train", "swa_lr", float, "SWA learning rate"),
    ("--grad-clip", "train", "grad_clip", float, "clip the gradient norm to this value"),
    ("--seed", "train", "seed", int, "seed for everything random"),
    ("--num-workers", "train", "num_workers", int, "DataLoader worker processes"),
    ("--device", "train", "device", str, "auto | cpu | cuda | cuda:N"),
    ("--val-fraction", "train", "val_fraction", float, "fraction held out for validation"),
    ("--val-split", "train", "val_split", str, "groups (whole speakers aside) | clips (a share of every group)"),
]


def add_run_options(parser: argparse.ArgumentParser) -> None:
    """Add the model/training options and the run-control flags to ``parser``."""
    parser.add_argument("--manifest", required=True, help="manifest CSV (path,label[,fold,group])")
    parser.add_argument("--data-root", default=None,
                        help="folder the manifest's paths are relative to (default: the manifest's folder)")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--config",
                        help="TOML (or .yaml) file with [audio] [features] [augment] [model] [train] [cv] sections")
    parser.add_argument("--cache-dir", default=None, help="waveform cache folder (default: ~/.cache/audioclf)")
    group = parser.add_argument_group("model and training (override --config)")
    for flag, _section, _name, typ, help_ in _OPTIONS:
        group.add_argument(flag, type=typ, default=None, help=help_)
    group.add_argument("--no-swa", action="store_true", help="disable stochastic weight averaging")
    group.add_argument("--no-amp", action="store_true", help="disable autocast on CUDA")
    group.add_argument("--compile", action="store_true", help="torch.compile the model (CUDA)")
    control = parser.add_mutually_exclusive_group()
    control.add_argument("--resume", action="store_true", help="continue the run found in --out")
    control.add_argument("--overwrite", action="store_true", help="replace the run found in --out")


def run_config_from_args(args: argparse.Namespace) -> RunConfig:
    """defaults < --config file < command-line options."""
    data = load_config_file(args.config) if args.config else {}
    source = args.config or "config"
    overrides: dict[str, dict] = {}
    for flag, section, name, _typ, _help in _OPTIONS:
        value = getattr(args, flag.lstrip("-").replace("-", "_"))
        if value is not None:
            overrides.setdefault(section, {})[name] = value
    if args.no_swa:
        overrides.setdefault("train", {})["swa_start"] = None
    if args.no_amp:
        overrides.setdefault("train", {})["amp"] = False
    if args.compile:
        overrides.setdefault("train", {})["compile"] = True
    merged = {section: dict(values) for section, values in data.items()}
    for section, values in overrides.items():
        merged.setdefault(section, {}).update(values)
    return RunConfig.from_dict(merged, source=source)
