"""ESC-50: 2,000 five-second clips, 50 classes, 44.1 kHz; its 5 official folds.

Usage: python recipes/esc50.py --data-dir DIR --out OUT [--quick] [--preset cpu|gpu] [--download]
Settings, protocol and presets: recipes/esc50.toml. See `--help` for every option.
"""

import sys
from pathlib import Path

from audioclf.recipe import main

if __name__ == "__main__":
    sys.exit(main(Path(__file__).with_suffix(".toml"), doc=__doc__))
