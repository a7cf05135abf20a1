"""Command-line entry point: ``python -m fpe_lab.run COMMAND [--flags]``.

Each command lives in its own module under ``fpe_lab.commands``; this file only lists them, and holds
the one contract for every command: exit codes, one ``error:`` line, no traceback, and SIGINT/SIGTERM
handled from the first line of :func:`main` (:mod:`fpe_lab.interrupts`).
"""

from __future__ import annotations

import argparse
import logging
import sys

from fpe_lab.commands import CLIError, EnvironmentFailure, one_line_errors

# The commands, in the order ``--help`` shows them. Add a module here to add a command.
COMMAND_MODULES: tuple[str, ...] = ("train", "groundtruth", "study", "report", "audit")


def build_parser() -> argparse.ArgumentParser:
    import importlib

    parser = argparse.ArgumentParser(
        prog="python -m fpe_lab.run",
        description="fpe_lab: the score Fokker-Planck equation testbed.",
        allow_abbrev=False,
    )
    parser.add_argument("--debug", action="store_true", help="show the traceback of unexpected errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(f"fpe_lab.commands.{name}").add_parser(sub)
    return one_line_errors(parser)


def main(argv: list[str] | None = None) -> int:
    """Run one command. Exit codes: 0 done; 2 bad input (one ``error:`` line); 1 environment failure
    (permissions, disk full, out of memory, a run folder locked by another process: one ``error:`` line);
    130/143 interrupted by SIGINT/SIGTERM, wherever it came (one line ``error: interrupted: …``; during
    training after writing a checkpoint). No traceback unless ``--debug``."""
    from fpe_lab.interrupts import Interrupted, raise_on_signals

    with raise_on_signals():  # first: a signal during start-up (importing torch) is handled too
        try:
            return _main(argv)
        except Interrupted as e:
            print(f"error: interrupted: {e}; every file written is complete (a run continues with --resume, a "
                  "study when run again)", file=sys.stderr)
            return e.exit_code


def _main(argv: list[str] | None) -> int:
    # fpe_lab.train first: it imports torch, so a signal right after start-up most likely lands there. CPython (3.11)
    # drops an exception a signal handler raises while compile() runs, and without .pyc files (PYTHONDONTWRITEBYTECODE)
    # every fpe_lab module is compiled at import: commands.train first would start with a chain of compiles.
    from fpe_lab.train import TrainingInterrupted

    # isort: split
    from fpe_lab.commands.train import preload_plugins

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:  # a plug-in's regularizer and its flags must exist before the parser is built
        preload_plugins(sys.argv[1:] if argv is None else argv)
    except CLIError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # usage errors (already printed on one line) and --help
        return int(e.code or 0)
    try:
        return int(args.handler(args) or 0)
    except CLIError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except EnvironmentFailure as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except TrainingInterrupted as e:
        print(f"error: interrupted: {e}; rerun the same command with --resume to continue", file=sys.stderr)
        return e.exit_code
    except (OSError, MemoryError) as e:
        if args.debug:
            raise
        if isinstance(e, OSError) and e.filename and str(e.filename) not in str(e.strerror):
            what = f"{e.strerror}: {e.filename}"
        elif isinstance(e, OSError) and e.strerror:
            what = e.strerror
        else:
            what = str(e) or type(e).__name__
        print(f"error: {what.splitlines()[0]} (check the path's permissions and free space or memory)", file=sys.stderr)
        return 1
    except Exception as e:  # noqa: BLE001 - the contract: one line, the traceback only with --debug
        if args.debug:
            raise
        msg = str(e).splitlines()[0] if str(e) else ""
        print(f"error: unexpected {type(e).__name__}: {msg} (rerun with --debug for the traceback)", file=sys.stderr)
        return 1


def main_exit() -> None:
    """The ``fpe-lab`` console script."""
    sys.exit(main())


if __name__ == "__main__":
    main_exit()
