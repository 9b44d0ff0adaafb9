"""GTZAN: 1,000 thirty-second music clips, 10 genres, 22.05 kHz; stratified 10-fold CV.

Usage: python recipes/gtzan.py --data-dir DIR --out OUT [--quick] [--preset cpu|gpu]
GTZAN has no stable public archive: download it by hand (e.g. the Kaggle copy) into DIR.
Settings, protocol and presets: recipes/gtzan.toml. See `--help` for every option.
"""

import sys
from pathlib import Path

from audioclf.recipe import main

if __name__ == "__main__":
    sys.exit(main(Path(__file__).with_suffix(".toml"), doc=__doc__))
