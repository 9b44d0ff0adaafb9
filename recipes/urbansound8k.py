"""UrbanSound8K: 8,732 clips of up to 4 s, 10 classes; its 10 official folds.

Usage: python recipes/urbansound8k.py --data-dir DIR --out OUT [--quick] [--preset cpu|gpu] [--download]
Settings, protocol and presets: recipes/urbansound8k.toml. See `--help` for every option.
"""

import sys
from pathlib import Path

from audioclf.recipe import main

if __name__ == "__main__":
    sys.exit(main(Path(__file__).with_suffix(".toml"), doc=__doc__))
