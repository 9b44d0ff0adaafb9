"""Print the path of one clip that a recipe run never trained or selected on.

Usage: python scripts/demo_clip.py RUN_DIR   (RUN_DIR: a recipe's --out with a held-out test set)
Used by `make demo` to pick the clip it predicts: the path goes to stdout (the Makefile
captures it), the clip's true label to stderr, so the demo shows what the prediction
should say.
"""

import csv
import json
import sys
from pathlib import Path


def main(run_dir: str) -> int:
    run = Path(run_dir)
    try:
        data_dir = Path(json.loads((run / "recipe.json").read_text())["data_dir"])
        with open(run / "test-clips.csv", newline="") as f:
            rows = list(csv.DictReader(f))
        row = rows[len(rows) // 2]  # the middle row: a mid-range digit
    except (OSError, KeyError, ValueError, IndexError) as e:
        print(f"demo_clip: {run}: not a finished recipe run with a held-out test set ({e})", file=sys.stderr)
        return 2
    path = data_dir / row["path"]
    print(f"demo clip: {path} (true label: {row['label']}; never trained or selected on)", file=sys.stderr)
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "demo-out"))
