"""``python -m fpe_lab.run groundtruth``: ground-truth p_t, log p_t and scores of a toy data set on a grid.

Writes ``OUT.npz`` (density, log_density, score, axes, bounds, times, SDE name and parameters) and
``OUT.png`` (density and score field per time). Both are written atomically, only after the solve
finished.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import tempfile
from pathlib import Path

import numpy as np
import torch

from fpe_lab.commands import CLIError, one_line_errors

log = logging.getLogger(__name__)

SDE_CHOICES = ("ve", "vp", "subvp")
METHOD_CHOICES = ("auto", "convolution", "finite_volume", "separable", "log_density")
# Half-width of the box in units of sigma(t) beyond the pushed data box: p/max = e^{−8²/2} ≈ 1e-14 there.
_SIGMA_MARGIN = 8.0


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
    )
    p.add_argument("--data", choices=TOY_NAMES, default="checkerboard", help="toy data set (p_0)")
    p.add_argument("--sde", choices=SDE_CHOICES, default="vp", help="forward SDE with default parameters")
    p.add_argument("--grid", type=_positive_int(8, 4096), default=256, help="cells per axis")
    p.add_argument("--times", type=_unit_time, nargs="+", default=[0.01, 0.1, 0.5, 1.0], help="increasing times in [0, 1]")
    p.add_argument("--method", choices=METHOD_CHOICES, default="auto", help="solver (auto: exact convolution for linear SDEs)")
    p.add_argument("--n-steps", type=_positive_int(1, 100000), default=200, help="time steps of the finite-volume and log-density solvers")
    p.add_argument("--out", type=Path, default=None, help="output path without suffix (default runs/groundtruth_DATA_SDE_GRID)")
    p.add_argument("--no-figure", action="store_true", help="skip the PNG")
    p.set_defaults(handler=run)
    one_line_errors(p)


def _sde(name: str):
    from fpe_lab.sde import SubVPSDE, VESDE, VPSDE

    match name:
        case "ve":
            return VESDE()
        case "vp":
            return VPSDE()
        case "subvp":
            return SubVPSDE()
    raise CLIError(f"--sde must be one of {', '.join(SDE_CHOICES)}; got {name!r}")


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


def _atomic(path: Path, write) -> None:
    """Write with ``write(tmp_path)`` into a temp file beside ``path``, then rename it over ``path``."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=path.suffix)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; give the result ordinary file permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_figure(solution, title: str, path: Path) -> None:
    """Density (top) and score field over log-density (bottom) for each solved time."""
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
        ax.quiver(xs[::stride], ys[::stride], direction[..., 0].T, direction[..., 1].T, color="w", scale=40, width=0.004)
        ax.set_title("log p_t and score direction")
    fig.suptitle(title)
    fig.tight_layout()
    _atomic(path, lambda tmp: fig.savefig(tmp, dpi=90, format="png"))
    plt.close(fig)


def run(args: argparse.Namespace) -> int:
    from fpe_lab.data.toy import toy_distribution
    from fpe_lab.groundtruth import Grid, Method, SolverBreakdown, solve_fokker_planck

    times = list(args.times)
    if any(b <= a for a, b in zip(times[:-1], times[1:])):
        raise CLIError(f"--times must be strictly increasing; got {times}")
    data = toy_distribution(args.data)
    sde = _sde(args.sde)
    out = args.out if args.out is not None else Path("runs") / f"groundtruth_{args.data}_{args.sde}_{args.grid}"
    out.parent.mkdir(parents=True, exist_ok=True)

    grid = Grid(box_for(data.bounds, sde, times), (args.grid, args.grid))
    log.info("%s on %s, %d² cells, %s", data, grid.bounds, args.grid, sde)
    method = _method(args.method)
    if method is Method.LOG_DENSITY:
        # the toy set's exact log p0: a density on the grid underflows to 0 in the corners
        coords = torch.as_tensor(grid.coords.reshape(-1, 2), dtype=torch.float64)
        inputs = dict(p0=None, log_p0=data.log_prob(coords).reshape(grid.shape).numpy())
    else:
        inputs = dict(p0=data.density(grid))
    try:
        sol = solve_fokker_planck(sde, grid=grid, times=times, method=method, n_steps=args.n_steps, **inputs)
    except (ValueError, SolverBreakdown) as e:
        raise CLIError(str(e)) from None

    arrays = dict(
        density=sol.density,
        log_density=sol.log_density,
        score=sol.score,
        x=grid.axes[0],
        y=grid.axes[1],
        bounds=np.array(grid.bounds),
        times=sol.times,
        method=np.array(sol.method.value),
        data=np.array(args.data),
        sde=np.array(str(sde)),
        sde_params=np.array(json.dumps({"class": type(sde).__name__, **dataclasses.asdict(sde)})),
    )
    npz = out.with_suffix(".npz")
    _atomic(npz, lambda tmp: np.savez_compressed(tmp, **arrays))
    log.info("wrote %s", npz)
    if not args.no_figure:
        png = out.with_suffix(".png")
        save_figure(sol, f"{args.data}, {args.sde}, {args.grid}², {sol.method.value}", png)
        log.info("wrote %s", png)
    return 0
