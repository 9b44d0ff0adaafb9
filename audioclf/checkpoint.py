"""Self-describing model checkpoints: weights in safetensors, everything else in JSON beside them.

``save_checkpoint(model, "run/model", cfg, labels)`` writes

- ``run/model.safetensors``: the model's state dict (backbone weights, BatchNorm statistics,
  the front end's normalization statistics as buffers);
- ``run/model.json``: the format version, the whole :class:`~audioclf.config.RunConfig`
  (sample rate, clip length, front end, backbone, ...), the label names in output order,
  package versions, the seed, a training summary, and the SHA-256 of the weights file.

Loading reads JSON and safetensors only, so it never executes pickled code. Both files
are written atomically, weights first; a description that does not match its weights
(a run killed between the two writes, or files mixed up by hand) is detected by the hash.
"""

from __future__ import annotations

import datetime
import hashlib
import importlib.metadata
import json
import platform
from pathlib import Path
from typing import Any

import torch
from torch import nn

from audioclf._io import atomic_path, write_json_atomic
from audioclf.config import RunConfig
from audioclf.errors import AudioclfError, BundleError
from audioclf.model import AudioClassifier, without_pretrained

__all__ = ["save_checkpoint", "load_checkpoint", "checkpoint_paths", "package_versions",
           "unwrap_model", "FORMAT_VERSION"]

FORMAT = "audioclf.checkpoint"
FORMAT_VERSION = 1
_PACKAGES = ("audioclf", "torch", "torchaudio", "timm", "numpy", "safetensors")


def checkpoint_paths(path: str | Path) -> tuple[Path, Path]:
    """(weights, description) paths for a folder, a stem, or either file.

    ``run/`` -> ``run/model.safetensors``, ``run/model.json``; ``run/fold-1`` (or
    ``run/fold-1.json``, ``run/fold-1.safetensors``) -> ``run/fold-1.safetensors``,
    ``run/fold-1.json``.
    """
    path = Path(path)
    if path.is_dir():
        path = path / "model"
    elif path.suffix in (".safetensors", ".json"):
        path = path.with_suffix("")
    return path.with_name(path.name + ".safetensors"), path.with_name(path.name + ".json")


def unwrap_model(model: nn.Module) -> nn.Module:
    """The plain module inside DistributedDataParallel, AveragedModel or torch.compile wrappers."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, (nn.parallel.DistributedDataParallel, torch.optim.swa_utils.AveragedModel)):
            model = model.module
        else:
            return model


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "unknown"
    return versions


def save_checkpoint(model: nn.Module, path: str | Path, config: RunConfig, label_names: list[str],
                    extra: dict[str, Any] | None = None) -> Path:
    """Write ``<path>.safetensors`` and ``<path>.json`` (see :func:`checkpoint_paths`) atomically.

    Args:
        model: an :class:`AudioClassifier` (or a DDP / AveragedModel / compiled wrapper of one).
        path: a folder (files named ``model.*``), or a path without suffix.
        config: the run's configuration; stored whole so the model can be rebuilt.
        label_names: class names in the order of the model's outputs.
        extra: JSON-serializable additions, e.g. the training summary.

    Returns:
        The path of the JSON description.

    Raises:
        ValueError: ``label_names`` does not match the model's number of outputs.
    """
    from safetensors.torch import save_file

    model = unwrap_model(model)
    num_classes = getattr(model, "num_classes", None)
    if num_classes is not None and len(label_names) != num_classes:
        raise ValueError(f"label_names has {len(label_names)} names but the model has "
                         f"{num_classes} outputs")
    weights_path, json_path = checkpoint_paths(path)
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    with atomic_path(weights_path) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt"})
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "weights": weights_path.name,
        "weights_sha256": _sha256(weights_path),
        "num_classes": len(label_names),
        "label_names": list(label_names),
        "sample_rate": config.audio.sample_rate,
        "clip_seconds": config.audio.clip_seconds,
        "clip_samples": config.audio.clip_samples,
        "backbone": config.model.backbone,
        "seed": config.train.seed,
        "config": config.to_dict(),
        "versions": package_versions(),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "extra": extra or {},
    }
    write_json_atomic(json_path, meta)
    return json_path


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> tuple[AudioClassifier, dict]:
    """Rebuild a model saved by :func:`save_checkpoint`, in eval mode.

    Args:
        path: the folder, the stem, or either file of the checkpoint.
        device: where to put the model.

    Returns:
        (model, meta): the model and the JSON description as a dict.

    Raises:
        BundleError: a file is missing or unreadable, the format is unknown or newer than
            this version of audioclf, the weights do not match the description (the
            message names the file and the field or tensors).
    """
    from safetensors.torch import load_file

    weights_path, json_path = checkpoint_paths(path)
    meta = _read_meta(json_path)
    try:
        config = RunConfig.from_dict(meta["config"], source=str(json_path))
    except AudioclfError as e:
        raise BundleError(f"{json_path}: field 'config' is invalid: {e}") from None
    labels = meta["label_names"]
    if not isinstance(labels, list) or len(labels) < 2:
        raise BundleError(f"{json_path}: field 'label_names' must list at least 2 class names")
    if not weights_path.is_file():
        raise BundleError(f"{weights_path}: weights file not found (described by {json_path.name})")
    if _sha256(weights_path) != meta["weights_sha256"]:
        raise BundleError(f"{weights_path}: weights do not match {json_path.name} (SHA-256 differs); "
                          "the pair was mixed up or a write was interrupted")
    try:
        state = load_file(str(weights_path))
    except Exception as e:
        raise BundleError(f"{weights_path}: cannot read safetensors weights ({e})") from None
    model = AudioClassifier(len(labels), config.audio.sample_rate, config.features, config.augment,
                            without_pretrained(config.model))
    _load_state_strict(model, state, weights_path)
    return model.to(device).eval(), meta


def _read_meta(json_path: Path) -> dict:
    if not json_path.is_file():
        raise BundleError(f"{json_path}: checkpoint description not found")
    try:
        meta = json.loads(json_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BundleError(f"{json_path}: not a readable JSON file ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise BundleError(f"{json_path}: field 'format' must be {FORMAT!r}; not an audioclf checkpoint")
    version = meta.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise BundleError(f"{json_path}: field 'format_version' is {version!r}; this audioclf reads "
                          f"versions up to {FORMAT_VERSION} (upgrade audioclf)")
    for key in ("config", "label_names", "weights_sha256"):
        if key not in meta:
            raise BundleError(f"{json_path}: field {key!r} is missing")
    return meta


def _load_state_strict(model: nn.Module, state: dict[str, torch.Tensor], source: Path) -> None:
    own = model.state_dict()
    problems = [f"{k}: file {tuple(v.shape)} vs model {tuple(own[k].shape)}"
                for k, v in state.items() if k in own and v.shape != own[k].shape]
    problems += [f"{k}: unexpected" for k in state if k not in own]
    problems += [f"{k}: missing" for k in own if k not in state]
    if problems:
        shown = "; ".join(problems[:10]) + (f"; ... {len(problems) - 10} more" if len(problems) > 10 else "")
        raise BundleError(f"{source}: weights do not fit the model described beside them: {shown}")
    model.load_state_dict(state)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
