"""Free Spoken Digit Dataset: 3,000 clips, 10 digits, 6 speakers, 8 kHz.

Usage: python recipes/fsdd.py --data-dir DIR --out OUT [--quick] [--preset cpu|gpu] [--download]
Settings, protocol and presets: recipes/fsdd.toml. See `--help` for every option.
"""

import sys
from pathlib import Path

from audioclf.recipe import main

if __name__ == "__main__":
    sys.exit(main(Path(__file__).with_suffix(".toml"), doc=__doc__))
