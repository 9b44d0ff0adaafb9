"""audioclf: audio classification that starts from the practices known to work.

The pipeline, in order (one module each):

1. ``audio``      read any WAV/FLAC/OGG file -> float32 waveform at the model's rate
2. ``manifest``   CSV of (path, label, fold, group); builders for official dataset layouts
3. ``data``       waveform cache (decoded once, memory-mapped) and fixed-length crops
4. ``features``   ``LogMel``: (B, N) waveforms -> (B, 1, n_mels, T) log-mel, on any device
5. ``augment``    ``SpecAugment``, ``MixUp``, ``TimeShift``, ``FreqShift``, ``SpeedPerturb`` (training, TTA)
6. ``model``      ``AudioClassifier``: LogMel + SpecAugment + a timm backbone (in_chans=1)
7. ``train``      ``fit``: AdamW, plateau or cosine LR, best checkpoint, early stopping, SWA
8. ``checkpoint`` safetensors weights + JSON config; never unpickles
9. ``crossval``   K folds (given, stratified, grouped) -> K models + out-of-fold scores
10. ``ensemble``  arithmetic / geometric means over models and time-shift views
11. ``predict``   ``Predictor``: a bundle + files of any rate and length -> labels

Names are imported lazily, so ``import audioclf`` (and the CLI's start-up) stays fast.
"""

from __future__ import annotations

import importlib

from audioclf._version import __version__

_EXPORTS = {
    "errors": ["AudioclfError", "AudioError", "ManifestError", "BundleError", "ConfigError"],
    "config": ["AudioConfig", "FeatureConfig", "AugmentConfig", "ModelConfig", "TrainConfig",
               "CVConfig", "RunConfig"],
    "audio": ["load_audio", "fix_length", "resample"],
    "manifest": ["Manifest", "LabelMap", "read_manifest", "write_manifest", "build_manifest"],
    "data": ["WaveformCache", "ClipDataset"],
    "features": ["LogMel", "compute_normalization_stats", "mel_filterbank"],
    "augment": ["SpecAugment", "MixUp", "MixParams", "TimeShift", "FreqShift", "time_shift", "freq_shift",
                "SpeedPerturb", "speed_perturb", "tta_shifts", "soft_target_cross_entropy"],
    "model": ["AudioClassifier", "build_model", "PRESETS"],
    "train": ["fit", "TrainResult"],
    "checkpoint": ["save_checkpoint", "load_checkpoint"],
    "crossval": ["assign_folds", "cross_validate"],
    "ensemble": ["arithmetic_mean", "geometric_mean", "tta_views"],
    "predict": ["Predictor"],
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = ["__version__", *_WHERE]


def __getattr__(name: str):
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'audioclf' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"audioclf.{module}"), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(__all__)
