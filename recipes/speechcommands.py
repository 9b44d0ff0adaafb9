"""Speech Commands v0.02: 105,829 one-second utterances of 35 words, 16 kHz; official split.

Usage: python recipes/speechcommands.py --data-dir DIR --out OUT [--quick] [--preset cpu|gpu] [--download]
Settings, protocol and presets: recipes/speechcommands.toml. See `--help` for every option.
"""

import sys
from pathlib import Path

from audioclf.recipe import main

if __name__ == "__main__":
    sys.exit(main(Path(__file__).with_suffix(".toml"), doc=__doc__))
