"""``python -m fpe_lab.run groundtruth``: ground-truth p_t, log p_t and scores of a toy data set on a grid.

``--out`` is a folder; the command writes exactly two names in it: ``solution.npz`` (density,
log_density, score, unresolved, axes, bounds, times, SDE name and parameters) and ``solution.png``
(density and score field per time; skipped with ``--no-figure``). The solvers start from the data set's
exact log p_0, so the convolution gives a finite log p_t and score at every cell; ``unresolved``
(times × cells, bool) marks cells whose log p_t or score is not finite (possible only where a
p-based solver, ``finite_volume`` or ``separable``, underflows), and each solver warning (such cells
with their count and remedy, mass at the walls, a p_0 the grid does not resolve) is printed as one
line ``warning: ...``. A time whose transition kernel is narrower than 1e-3 cell (e.g. ``--times
1e-300``) is refused with the smallest time the grid resolves. It never derives other names from ``--out``.
If either file already exists the command stops before solving (exit 2) unless ``--overwrite`` is given;
with ``--overwrite --no-figure`` an older ``solution.png`` is removed so that the folder never pairs a
new solution with an old figure. Both files are written atomically, only after the solve finished.

Exit codes: 0 done; 2 bad input (flags, grids the solver cannot use, outputs that exist); 1 the
environment (``--out`` under a file, an unwritable folder, a full disk, out of memory).
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import logging
import math
import os
import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fpe_lab.checkpoint import atomic_write_bytes
from fpe_lab.commands import CLIError, EnvironmentFailure, one_line_errors, path_arg

log = logging.getLogger(__name__)

METHOD_CHOICES = ("auto", "convolution", "finite_volume", "separable", "log_density")
# Half-width of the box in units of sigma(t) beyond the pushed data box: p/max = e^{−8²/2} ≈ 1e-14 there.
_SIGMA_MARGIN = 8.0
GRID_RANGE = (8, 4096)
# The data box must span this many cells per axis, or p_0 is not sampled by the cell centres at all
# (VE boxes grow with sigma(1) = 50: --grid 8 gives cells ~100 wide and a p_0 that is zero everywhere).
MIN_DATA_CELLS = 2
NPZ_NAME = "solution.npz"
PNG_NAME = "solution.png"


def _positive_int(lo: int, hi: int):
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer in [{lo}, {hi}]; got {text!r}") from None
        if not lo <= v <= hi:
            raise argparse.ArgumentTypeError(f"expected an integer in [{lo}, {hi}]; got {v}")
        return v

    return parse


def _unit_time(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a time in [0, 1]; got {text!r}") from None
    if not 0 <= v <= 1:
        raise argparse.ArgumentTypeError(f"expected a time in [0, 1]; got {v}")
    return v


def add_parser(subparsers) -> None:
    from fpe_lab.data.toy import TOY_NAMES

    p = subparsers.add_parser(
        "groundtruth",
        help="ground-truth perturbed densities and scores of a toy data set on a grid",
        description=__doc__,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        allow_abbrev=False,  # --overwr is not --overwrite: a flag must be spelled out
    )
    p.add_argument("--data", choices=TOY_NAMES, default="checkerboard", help="toy data set (p_0)")
    from fpe_lab.commands.train import _add_leaf
    from fpe_lab.config import leaves, toy2d

    defaults = toy2d()
    for leaf in leaves():  # the forward SDE and its coefficients: the same flags as training
        if leaf.path[0] == "sde":
            _add_leaf(p, leaf, leaf.get(defaults))
    p.add_argument("--grid", type=_positive_int(*GRID_RANGE), default=256, help="cells per axis")
    p.add_argument("--times", type=_unit_time, nargs="+", default=[0.01, 0.1, 0.5, 1.0],
                   help="increasing times in [0, 1]")
    p.add_argument("--method", choices=METHOD_CHOICES, default="auto",
                   help="solver (auto: exact convolution for linear SDEs)")
    p.add_argument("--n-steps", type=_positive_int(1, 100000), default=200,
                   help="time steps of the finite-volume and log-density solvers")
    p.add_argument("--out", type=path_arg, default=None, metavar="DIR",
                   help=f"output folder receiving {NPZ_NAME} and {PNG_NAME} (default runs/groundtruth_DATA_SDE_GRID)")
    p.add_argument("--overwrite", action="store_true", help=f"replace an existing {NPZ_NAME} / {PNG_NAME} in --out")
    p.add_argument("--no-figure", action="store_true", help=f"skip {PNG_NAME}")
    p.set_defaults(handler=run)
    one_line_errors(p)


def _sde(args: argparse.Namespace):
    """(the SDE, its --sde name) from the training flags (``--sde``, ``--beta-min``, ...), built by the same
    builder as a run."""
    from fpe_lab.build import build_sde
    from fpe_lab.commands.train import _flag_value
    from fpe_lab.config import leaves, toy2d

    changes = {leaf.path: _flag_value(getattr(args, "/".join(leaf.path))) for leaf in leaves()
               if leaf.path[0] == "sde" and hasattr(args, "/".join(leaf.path))}
    try:
        config = toy2d().override(changes).sde
    except ValueError as e:
        raise CLIError(str(e)) from None
    return build_sde(config), config.kind.value


def _method(name: str):
    from fpe_lab.groundtruth import Method

    match name:
        case "auto":
            return Method.AUTO
        case "convolution":
            return Method.CONVOLUTION
        case "finite_volume":
            return Method.FINITE_VOLUME
        case "log_density":
            return Method.LOG_DENSITY
        case "separable":
            return Method.SEPARABLE
    raise CLIError(f"--method must be one of {', '.join(METHOD_CHOICES)}; got {name!r}")


def box_for(data_bounds, sde, times) -> tuple[tuple[float, float], ...]:
    """Smallest box holding the data box and, at every time, alpha·(data box) ± 8 sigma(t)."""
    out = []
    for lo, hi in data_bounds:
        lo_t, hi_t = lo, hi
        for t in times:
            alpha, sigma = (float(v) for v in sde.marginal(torch.tensor(float(t), dtype=torch.float64)))
            lo_t = min(lo_t, alpha * lo - _SIGMA_MARGIN * sigma)
            hi_t = max(hi_t, alpha * hi + _SIGMA_MARGIN * sigma)
        out.append((lo_t, hi_t))
    return tuple(out)


def figure_png(solution, title: str) -> bytes:
    """PNG bytes: density (top) and score field over log-density (bottom) for each solved time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grid, n_t = solution.grid, len(solution.times)
    (xlo, xhi), (ylo, yhi) = grid.bounds
    fig, axes = plt.subplots(2, n_t, figsize=(3.2 * n_t, 6.4), squeeze=False)
    stride = max(1, grid.shape[0] // 24)
    xs, ys = grid.axes
    for j, t in enumerate(solution.times):
        ax = axes[0, j]
        ax.imshow(solution.density[j].T, origin="lower", extent=(xlo, xhi, ylo, yhi), cmap="viridis")
        ax.set_title(f"p_t, t = {t:g}")
        ax = axes[1, j]
        ax.imshow(np.maximum(solution.log_density[j].T, solution.log_density[j].max() - 30), origin="lower",
                  extent=(xlo, xhi, ylo, yhi), cmap="magma")
        s = solution.score[j, ::stride, ::stride]
        norm = np.linalg.norm(s, axis=-1, keepdims=True)
        direction = np.divide(s, norm, out=np.zeros_like(s), where=norm > 0)
        ax.quiver(xs[::stride], ys[::stride], direction[..., 0].T, direction[..., 1].T, color="w", scale=40,
                  width=0.004)
        ax.set_title("log p_t and score direction")
    fig.suptitle(title)
    fig.tight_layout()
    buf = io.BytesIO()
    try:
        fig.savefig(buf, dpi=90, format="png")
    finally:
        plt.close(fig)
    return buf.getvalue()


def check_grid(data_bounds, box, n: int, context: str) -> None:
    """CLIError unless the data box spans at least ``MIN_DATA_CELLS`` cells of the n-cell box on every axis."""
    need = 0
    for (lo, hi), (blo, bhi) in zip(data_bounds, box):
        need = max(need, math.ceil(MIN_DATA_CELLS * (bhi - blo) / (hi - lo)))
    if n >= need:
        return
    (blo, bhi), (lo, hi) = box[0], data_bounds[0]
    fix = f"use --grid >= {need}" if need <= GRID_RANGE[1] else "use earlier --times or another --sde"
    raise CLIError(
        f"--grid {n} is too coarse for {context}: the box [{blo:.4g}, {bhi:.4g}] makes cells "
        f"{(bhi - blo) / n:.3g} wide, and the data box [{lo:.3g}, {hi:.3g}] must span at least {MIN_DATA_CELLS} "
        f"cells per axis for p_0 to be sampled; {fix}"
    )


def check_method(method, sde, times, sde_flag: str) -> None:
    """CLIError when the solver cannot take this SDE (e.g. the separable propagator and sub-VP)."""
    from fpe_lab.groundtruth import Method
    from fpe_lab.groundtruth.propagator import time_change

    if method is Method.SEPARABLE:
        try:
            time_change(sde, float(times[-1]))
        except ValueError:
            raise CLIError(
                f"--method separable cannot solve --sde {sde_flag}: it needs a drift that is a constant multiple "
                "of ½g²·x (VE, VP; not sub-VP); use --method convolution, finite_volume or log_density"
            ) from None


def output_paths(out: Path) -> tuple[Path, Path]:
    return out / NPZ_NAME, out / PNG_NAME


def check_outputs(out: Path, overwrite: bool) -> None:
    """Before any work: ``out`` can become a writable folder, and no output exists unless ``overwrite``."""
    if out.exists() and not out.is_dir():
        raise EnvironmentFailure(f"--out {out} is a file, not a folder: pass a folder path (it receives {NPZ_NAME}"
                                 f" and {PNG_NAME})")
    anc = out
    while not anc.exists() and anc != anc.parent:
        anc = anc.parent
    if not anc.is_dir():
        raise EnvironmentFailure(f"--out {out}: {anc} is a file, not a folder; choose an --out inside a folder")
    if not os.access(anc, os.W_OK | os.X_OK):
        raise EnvironmentFailure(f"--out {out}: cannot write in {anc} (permission denied); choose a writable folder "
                                 "or change its permissions")
    if not overwrite:
        for path in output_paths(out):
            if path.exists() or path.is_symlink():
                raise CLIError(f"{path} exists; pass --overwrite to replace it, or choose another --out")


def _write(path: Path, data: bytes) -> None:
    try:
        atomic_write_bytes(path, data)
        os.chmod(path, 0o644)  # the temp file was created 0600; give the result ordinary file permissions
    except OSError as e:
        raise EnvironmentFailure(f"cannot write {path}: {e.strerror or e}; check the folder's permissions and "
                                 "free space, or choose another --out") from None
    log.info("wrote %s", path)


def run(args: argparse.Namespace) -> int:
    try:
        return _run(args)
    except EnvironmentFailure as e:
        sys.stderr.write(f"error: {e}\n")
        return 1
    except MemoryError:
        sys.stderr.write(f"error: out of memory for a {args.grid}² grid at {len(args.times)} times; use a smaller "
                         "--grid or fewer --times, or free memory\n")
        return 1


def _run(args: argparse.Namespace) -> int:
    from fpe_lab.data.toy import toy_distribution
    from fpe_lab.groundtruth import Grid, SolverBreakdown, solve_fokker_planck

    # 1. every input check, before any output is touched or any solve starts
    times = list(args.times)
    if any(b <= a for a, b in zip(times[:-1], times[1:])):
        raise CLIError(f"--times must be strictly increasing; got {times}")
    data = toy_distribution(args.data)
    sde, sde_flag = _sde(args)
    method = _method(args.method)
    box = box_for(data.bounds, sde, times)
    check_grid(data.bounds, box, args.grid, f"--data {args.data} --sde {sde_flag} up to t = {times[-1]:g}")
    check_method(method, sde, times, sde_flag)
    out = args.out if args.out is not None else Path("runs") / f"groundtruth_{args.data}_{sde_flag}_{args.grid}"
    check_outputs(out, args.overwrite)

    # 2. the solve
    grid = Grid(box, (args.grid, args.grid))
    log.info("%s on %s, %d² cells, %s", data, grid.bounds, args.grid, sde)
    # the toy set's exact log p0: a density on the grid underflows to 0 in the corners, and the far tails
    # of p_t (convolution, log-density solver) are only resolved from the exact tails of p0
    coords = torch.as_tensor(grid.coords.reshape(-1, 2), dtype=torch.float64)
    log_p0 = data.log_prob(coords).reshape(grid.shape).numpy()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            sol = solve_fokker_planck(sde, grid=grid, times=times, method=method, n_steps=args.n_steps,
                                      p0=None, log_p0=log_p0)
    except (ValueError, SolverBreakdown) as e:
        raise CLIError(str(e)) from None
    for message in dict.fromkeys(str(w.message).splitlines()[0] for w in caught):  # each once, one line each
        sys.stderr.write(f"warning: {message}\n")

    # 3. both files in memory first, then written atomically
    # Any: mypy checks the ** values against savez_compressed's allow_pickle: bool as well
    arrays: dict[str, Any] = dict(
        density=sol.density,
        log_density=sol.log_density,
        score=sol.score,
        unresolved=sol.unresolved,
        x=grid.axes[0],
        y=grid.axes[1],
        bounds=np.array(grid.bounds),
        times=sol.times,
        method=np.array(sol.method.value),
        data=np.array(args.data),
        sde=np.array(str(sde)),
        sde_params=np.array(json.dumps({"class": type(sde).__name__, **dataclasses.asdict(sde)})),
    )
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    png = None if args.no_figure else figure_png(sol, f"{args.data}, {sde_flag}, {args.grid}², {sol.method.value}")
    check_outputs(out, args.overwrite)  # again: something may have appeared during the solve
    npz_path, png_path = output_paths(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise EnvironmentFailure(f"cannot create the folder --out {out}: {e.strerror or e}") from None
    _write(npz_path, buf.getvalue())
    if png is not None:
        _write(png_path, png)
    elif png_path.exists() or png_path.is_symlink():  # only reachable with --overwrite
        try:
            png_path.unlink()
        except OSError as e:
            raise EnvironmentFailure(f"cannot remove the old {png_path}: {e.strerror or e}") from None
        log.info("removed the old %s (--no-figure)", png_path)
    return 0
