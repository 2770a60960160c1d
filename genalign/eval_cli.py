"""``genalign-eval MODALITY ...``: score a trained checkpoint (or a folder of samples) and write ``metrics.json``.

Each modality keeps its subcommand in its own module (listed in :data:`SUBCOMMANDS`); a module exposes
``add_parser(subparsers)``, which adds its parser and sets ``func(args) -> int`` on it as the parser default.
"""

from __future__ import annotations

import argparse
import importlib
from typing import Sequence

#: modules holding one subcommand each
SUBCOMMANDS: tuple[str, ...] = (
    "genalign.eval.image_cli",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="genalign-eval", description=__doc__.splitlines()[0])
    subparsers = parser.add_subparsers(dest="modality", required=True, metavar="MODALITY")
    for name in SUBCOMMANDS:
        importlib.import_module(name).add_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
