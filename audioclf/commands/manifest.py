"""Build a manifest CSV (path,label[,fold][,group][,extras]) from a dataset in its official layout.

Paths in the CSV are relative to ROOT; give ROOT again (``--root``) when training from it
if the CSV is written elsewhere.
"""

from __future__ import annotations

import argparse

NAME = "manifest"
HELP = "build a manifest CSV from a dataset folder (fsdd, esc50, urbansound8k, ...)"
FORMATS = ("fsdd", "esc50", "urbansound8k", "speechcommands", "gtzan", "folders")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("root", metavar="ROOT", help="the dataset's top folder")
    parser.add_argument("--format", required=True, choices=FORMATS, help="the dataset's layout")
    parser.add_argument("-o", "--output", required=True, metavar="OUT.csv", help="manifest to write")


def run(args: argparse.Namespace) -> int:
    from audioclf.manifest import build_manifest, write_manifest

    manifest = build_manifest(args.format, args.root)
    write_manifest(manifest, args.output)
    print(f"{args.output}: {manifest.summary()}")
    return 0
