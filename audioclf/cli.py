"""The ``audioclf`` command line: argparse subcommands, nothing else.

Each subcommand lives in :mod:`audioclf.commands` as a small module with ``add_arguments``
and ``run``; those modules import only the standard library at start-up, so
``audioclf --help`` answers without importing torch. Errors caused by the user's input
(:class:`~audioclf.errors.AudioclfError`) print one line and exit with status 2. Under
torchrun only rank 0 logs progress (INFO); the other ranks log warnings and errors.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from audioclf._version import __version__
from audioclf.commands import COMMANDS
from audioclf.errors import AudioclfError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="audioclf",
        description="Audio classification: manifests, training, K-fold ensembles, prediction.",
    )
    parser.add_argument("--version", action="version", version=f"audioclf {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="log debug messages (rank 0 only under torchrun)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        module = importlib.import_module(f"audioclf.commands.{name}")
        p = sub.add_parser(module.NAME, help=module.HELP, description=module.__doc__)
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    logging.basicConfig(
        level=_log_level(args.verbose),
        format="%(message)s" if not args.verbose else "%(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args._run(args) or 0)
    except AudioclfError as e:
        print(f"audioclf {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"audioclf {args.command}: interrupted", file=sys.stderr)
        return 130


def _log_level(verbose: bool) -> int:
    """INFO (DEBUG with -v) on rank 0; under torchrun the other ranks log warnings and errors only."""
    if os.environ.get("RANK", "0").strip() not in ("", "0"):
        return logging.WARNING
    return logging.DEBUG if verbose else logging.INFO


if __name__ == "__main__":
    sys.exit(main())
