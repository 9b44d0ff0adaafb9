"""``python -m audioclf`` (also what ``torchrun -m audioclf`` runs)."""

import sys

from audioclf.cli import main

sys.exit(main())
