"""Tiny copies of public datasets in their exact official layouts, with real (synthetic) audio.

Every class is a tone of its own pitch (:func:`synth.tone`), so a model can learn it; clips
are short and at 8 kHz so recipes run in seconds. Each writer returns the dataset folder.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

import soundfile as sf

from synth import tone

RATE = 8000
PITCHES = (300.0, 700.0, 1500.0, 3000.0)  # one per class, in order


def _wav(path: Path, freq: float, seconds: float = 1.0, seed: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, tone(freq, seconds, RATE, seed=seed), RATE, subtype="PCM_16")


def _csv(path: Path, header: list[str], rows: list[list]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)


# ESC-50's first categories and their official targets.
ESC50_CLASSES = {"dog": 0, "rooster": 1, "pig": 2}


def write_esc50(root: str | Path, folds: int = 5, classes: dict[str, int] = ESC50_CLASSES) -> Path:
    """``meta/esc50.csv`` + ``audio/{fold}-{src_file}-{take}-{target}.wav``: one clip per class
    and fold, plus a second take ("B") of fold 1's first source recording (same group)."""
    root = Path(root)
    rows = []
    for fold in range(1, folds + 1):
        for c, (category, target) in enumerate(classes.items()):
            src = 100000 + 100 * fold + c
            takes = "AB" if (fold, c) == (1, 0) else "A"
            for take in takes:
                name = f"{fold}-{src}-{take}-{target}.wav"
                _wav(root / "audio" / name, PITCHES[c], seed=len(rows))
                rows.append([name, fold, target, category, target in (0, 1), src, take])
    _csv(root / "meta" / "esc50.csv", ["filename", "fold", "target", "category", "esc10", "src_file", "take"], rows)
    return root


US8K_CLASSES = {0: "air_conditioner", 1: "car_horn", 3: "dog_bark"}


def write_urbansound8k(root: str | Path, folds: int = 10, classes: dict[int, str] = US8K_CLASSES) -> Path:
    """``metadata/UrbanSound8K.csv`` + ``audio/fold<k>/{fsID}-{classID}-{occurrence}-{slice}.wav``:
    one slice per class and fold (folds 1..10; each recording in one fold)."""
    root = Path(root)
    rows = []
    for fold in range(1, folds + 1):
        for c, (class_id, name) in enumerate(classes.items()):
            fs_id = 7000 + 10 * fold + c
            file = f"{fs_id}-{class_id}-0-0.wav"
            _wav(root / "audio" / f"fold{fold}" / file, PITCHES[c], seed=len(rows))
            rows.append([file, fs_id, 0.0, 1.0, 1, fold, class_id, name])
    _csv(root / "metadata" / "UrbanSound8K.csv",
         ["slice_file_name", "fsID", "start", "end", "salience", "fold", "classID", "class"], rows)
    (root / "UrbanSound8K_README.txt").write_text("UrbanSound8K (test fixture)\n")
    return root


SC_WORDS = ("no", "up", "yes")
SC_SPLITS = ("train", "train", "train", "train", "validation", "test")  # speaker i's split


def write_speechcommands(root: str | Path, words=SC_WORDS, speakers=SC_SPLITS) -> Path:
    """Speech Commands v2: ``<word>/{hash}_nohash_{n}.wav``, the official split lists (by
    speaker, as the real hashing does), ``_background_noise_/`` with two long recordings,
    LICENSE and README.md. Training speakers say each word twice."""
    root = Path(root)
    lists = {"validation": [], "test": []}
    for s, split in enumerate(speakers):
        speaker = f"{0x0a1b2c3d + 0x1111 * s:08x}"
        for w, word in enumerate(words):
            for n in range(2 if split == "train" else 1):
                rel = f"{word}/{speaker}_nohash_{n}.wav"
                _wav(root / rel, PITCHES[w], seed=100 * s + 10 * w + n)
                if split != "train":
                    lists[split].append(rel)
    for name, freq in (("white_noise.wav", 60.0), ("running_tap.wav", 200.0)):
        _wav(root / "_background_noise_" / name, freq, seconds=3.0)
    (root / "_background_noise_" / "README.md").write_text("Background noise (test fixture)\n")
    (root / "validation_list.txt").write_text("".join(f"{p}\n" for p in lists["validation"]))
    (root / "testing_list.txt").write_text("".join(f"{p}\n" for p in lists["test"]))
    (root / "LICENSE").write_text("CC BY 4.0 (test fixture)\n")
    (root / "README.md").write_text("Speech Commands v0.02 (test fixture)\n")
    return root


GTZAN_GENRES = ("blues", "classical", "metal")


def write_gtzan(root: str | Path, genres=GTZAN_GENRES, per_genre: int = 4, seconds: float = 1.5) -> Path:
    """GTZAN as on Kaggle: ``genres_original/{genre}/{genre}.000NN.wav`` (plus an empty
    ``images_original/``, which the recipe ignores)."""
    root = Path(root)
    for g, genre in enumerate(genres):
        for i in range(per_genre):
            _wav(root / "genres_original" / genre / f"{genre}.{i:05d}.wav", PITCHES[g], seconds, seed=10 * g + i)
        (root / "images_original" / genre).mkdir(parents=True, exist_ok=True)
    return root


def write_fsdd_slice(fsdd_dir: str | Path, root: str | Path, takes=range(1)) -> Path:
    """``recordings/{digit}_{speaker}_{take}.wav`` linking to a slice of the real FSDD:
    every digit and speaker, the given takes."""
    fsdd_dir, root = Path(fsdd_dir), Path(root)
    (root / "recordings").mkdir(parents=True)
    for src in sorted((fsdd_dir / "recordings").glob("*.wav")):
        if int(src.stem.split("_")[2]) in takes:
            os.symlink(src, root / "recordings" / src.name)
    return root
