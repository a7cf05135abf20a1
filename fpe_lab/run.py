"""Command-line entry point: ``python -m fpe_lab.run COMMAND [--flags]``.

Each command lives in its own module under ``fpe_lab.commands``; this file only lists them.
"""

from __future__ import annotations

import argparse
import logging
import sys

from fpe_lab.commands import CLIError

# The commands, in the order ``--help`` shows them. Add a module here to add a command.
COMMAND_MODULES: tuple[str, ...] = ("train", "groundtruth", "study")


def build_parser() -> argparse.ArgumentParser:
    import importlib

    parser = argparse.ArgumentParser(
        prog="python -m fpe_lab.run",
        description="fpe_lab: the score Fokker-Planck equation testbed.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(f"fpe_lab.commands.{name}").add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.handler(args) or 0)
    except CLIError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
