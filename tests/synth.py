"""Synthetic audio the tests write themselves: classes a model can learn in seconds."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import soundfile as sf

# Three classes that differ in pitch; a tiny CNN separates them within a few epochs.
TONE_CLASSES = {"low": 300.0, "mid": 1200.0, "high": 3000.0}


def tone(freq: float, seconds: float, sample_rate: int, seed: int = 0, amp: float = 0.5) -> np.ndarray:
    """A sine with a little noise, a random phase and a slightly jittered pitch."""
    rng = np.random.default_rng(seed)
    n = int(round(seconds * sample_rate))
    t = np.arange(n) / sample_rate
    f = freq * (1 + 0.03 * rng.standard_normal())
    x = amp * np.sin(2 * np.pi * f * t + rng.uniform(0, 2 * np.pi))
    x += 0.02 * rng.standard_normal(n)
    return x.astype(np.float32)


def write_tone_dataset(
    root: str | Path,
    n_per_class: int = 8,
    sample_rate: int = 8000,
    seconds: float = 0.5,
    n_groups: int = 4,
    classes: dict[str, float] | None = None,
) -> Path:
    """Write ``root/<label>/<label>_<i>.wav`` and ``root/manifest.csv`` (path,label,group).

    Clip lengths vary by +-30% so padding and cropping are exercised. Returns the manifest path.
    """
    root = Path(root)
    classes = classes or TONE_CLASSES
    rows = []
    for c, (label, freq) in enumerate(classes.items()):
        (root / label).mkdir(parents=True, exist_ok=True)
        for i in range(n_per_class):
            seed = 1000 * c + i
            length = seconds * (0.7 + 0.6 * np.random.default_rng(seed).random())
            rel = f"{label}/{label}_{i}.wav"
            sf.write(root / rel, tone(freq, length, sample_rate, seed=seed), sample_rate, subtype="PCM_16")
            rows.append({"path": rel, "label": label, "group": f"g{i % n_groups}"})
    manifest = root / "manifest.csv"
    with open(manifest, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["path", "label", "group"])
        writer.writeheader()
        writer.writerows(rows)
    return manifest


def write_fsdd_slice(fsdd_dir: str | Path, out_csv: str | Path, speakers=None, takes=range(4)) -> Path:
    """A manifest over a small slice of the real FSDD (all digits, a few takes per speaker)."""
    fsdd_dir = Path(fsdd_dir)
    speakers = speakers or sorted({p.name.split("_")[1] for p in (fsdd_dir / "recordings").glob("*.wav")})
    rows = []
    for digit in range(10):
        for speaker in speakers:
            for take in takes:
                rel = f"recordings/{digit}_{speaker}_{take}.wav"
                rows.append({"path": rel, "label": str(digit), "group": speaker})
    out_csv = Path(out_csv)
    with open(out_csv, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["path", "label", "group"])
        writer.writeheader()
        writer.writerows(rows)
    return out_csv
