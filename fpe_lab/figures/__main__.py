"""``python -m fpe_lab.figures RUN_DIR... [--out figures/]``: every paper figure from saved run folders.

Bad input (a missing or incomplete run folder, runs of different data sets or SDEs, no DSM or no
DSM+FPE run) prints one line ``error: ...`` naming the folder and exits with code 2; nothing is written.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
from pathlib import Path

from fpe_lab.commands import path_arg
from fpe_lab.figures.make import FigureOptions, make_all
from fpe_lab.figures.runs import RunFolderError


def _positive_time(text: str) -> float:
    try:
        t = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number; got {text!r}") from None
    if not 0 < t <= 1:
        raise argparse.ArgumentTypeError(f"must be a time in (0, 1]; got {text}")
    return t


MAX_GRID = 4096
"""Largest grid of the figures, per axis (as ``groundtruth --grid``): beyond int64 torch overflowed, and far below
that the grids do not fit in memory."""


def _positive_number(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number; got {text!r}") from None
    if not (math.isfinite(v) and v > 0):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0 (the λ of a DSM+FPE run); got {text}")
    return v


def _int_in(lo: int, hi: int):
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer; got {text!r}") from None
        if not lo <= v <= hi:
            raise argparse.ArgumentTypeError(f"must be in [{lo}, {hi}]; got {text}")
        return v

    parse.__name__ = "int"
    return parse


def build_parser() -> argparse.ArgumentParser:
    d = FigureOptions()
    p = argparse.ArgumentParser(prog="python -m fpe_lab.figures", description=__doc__,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                                allow_abbrev=False)  # a flag must be spelled out
    p.add_argument("run_dirs", nargs="+", type=path_arg, metavar="RUN_DIR",
                   help="finished toy2d run folders of one data set and SDE (e.g. runs/study/gmm_vp_*/)")
    p.add_argument("--out", type=path_arg, default=Path("figures"), help="output folder (PNG, PDF, CSV)")
    p.add_argument("--lam", type=_positive_number, default=None,
                   help="DSM+FPE weight shown in the field figures (default: the largest λ of the runs)")
    p.add_argument("--field-times", type=_positive_time, nargs="+", default=list(d.field_times),
                   help="times of the score-field figure")
    p.add_argument("--curl-times", type=_positive_time, nargs="+", default=list(d.curl_times),
                   help="times of the curl figure (a small and a moderate t)")
    p.add_argument("--field-grid", type=_int_in(8, MAX_GRID), default=d.field_grid,
                   help="points per axis of field grids")
    p.add_argument("--density-grid", type=_int_in(8, MAX_GRID), default=d.density_grid,
                   help="points per axis of the PF-ODE density grid (one ODE solve over all points)")
    p.add_argument("--solver-grids", type=_int_in(8, MAX_GRID), nargs="+", default=list(d.solver_grids),
                   help="cells per axis of the solver-convergence study")

    def error(message: str):
        p.exit(2, f"error: {p.prog}: {message}\n")

    p.error = error  # type: ignore[method-assign]
    return p


def main(argv: list[str] | None = None) -> int:
    """Exit codes as the main CLI: 0 done; 2 bad input; 1 an unwritable --out (read-only, a file in the way,
    disk full); 130/143 on SIGINT/SIGTERM. One ``error:`` line, no traceback."""
    from fpe_lab.interrupts import Interrupted, raise_on_signals

    with raise_on_signals():
        try:
            return _main(argv)
        except Interrupted as e:
            print(f"error: interrupted: {e}; the figures written so far are complete", file=sys.stderr)
            return e.exit_code


def _main(argv: list[str] | None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("fontTools").setLevel(logging.WARNING)  # PDF font subsetting chatter
    args = build_parser().parse_args(argv)
    try:
        options = FigureOptions(lam=args.lam, field_times=tuple(args.field_times), curl_times=tuple(args.curl_times),
                                field_grid=args.field_grid, density_grid=args.density_grid,
                                solver_grids=tuple(args.solver_grids))
        make_all(args.run_dirs, args.out, options)
    except (RunFolderError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # the output side: permissions, a file where a folder should be, a full disk
        where = f": {e.filename}" if e.filename else f" (--out {args.out})"
        print(f"error: cannot write the figures{where}: {e.strerror or e}; check --out's permissions and free "
              "space", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
