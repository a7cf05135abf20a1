"""Sub-commands of ``python -m fpe_lab.run``: one module per command, each with
``add_parser(subparsers)`` registering its arguments and handler (``set_defaults(handler=...)``).

Handlers raise :class:`CLIError` for bad input; ``fpe_lab.run`` prints it as one line and exits 2.
"""

import argparse
import math
from pathlib import Path


class CLIError(Exception):
    """Bad command-line input: printed as ``error: <message>`` with exit code 2, no traceback."""


class EnvironmentFailure(Exception):
    """The environment, not the input, stops the command (not a folder, permissions, disk, memory):
    printed as ``error: <message>`` with exit code 1."""


def ranged(kind: type, lo: float, hi: float = math.inf, lo_open: bool = False):
    """argparse type: a ``kind`` number in [lo, hi] (or (lo, hi] with lo_open). Integers are compared as
    integers: one too large for a float (``1`` and 400 zeros) is out of range, not an OverflowError."""

    def parse(text: str):
        try:
            v = kind(text)
        except ValueError:
            what = "an integer" if kind is int else "a number"
            raise argparse.ArgumentTypeError(f"expected {what}; got {text!r}") from None
        if not ((kind is int or math.isfinite(v)) and (v > lo if lo_open else v >= lo) and v <= hi):
            def show(x: float) -> str:
                return str(x) if isinstance(x, int) else f"{x:g}"

            rng = f"{'(' if lo_open else '['}{show(lo)}, {show(hi)}]"
            raise argparse.ArgumentTypeError(f"must be in {rng}; got {text}")
        return v

    parse.__name__ = kind.__name__
    return parse


def path_arg(text: str) -> Path:
    """argparse type of a file or folder argument: any text but the empty one, which ``Path`` would read as
    the current folder (``--out ''`` wrote into it)."""
    if not text.strip():
        raise argparse.ArgumentTypeError(f"expected a path; got {text!r}")
    return Path(text)


def one_line_errors(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Usage errors as one line ``error: ...`` with exit code 2 (argparse would print the usage too)."""

    def error(message: str):
        parser.exit(2, f"error: {parser.prog}: {message}\n")

    parser.error = error  # type: ignore[method-assign]
    return parser
