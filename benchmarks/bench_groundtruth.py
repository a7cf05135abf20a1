"""Ground-truth solvers side by side: wall time and score error in one run.

Problem: VP SDE, four Gaussians at (±2, 0), (0, ±2) with sd 0.2/0.3/0.25/0.35, box [−8, 8]², n² cells,
t = 0.5 and t = 0.1. Score error = max |s_num − s_exact| over cells with p ≥ level·max p (exact
mixture score, fpe_lab.gmm), reported for levels 1e-3, 1e-6, 1e-10.

Rows: the exact convolution (Method.CONVOLUTION); the same SG discretisation propagated exactly after
the time change (Method.SEPARABLE); the finite-volume solver (Method.FINITE_VOLUME) at several step
counts; the finite-volume solver on a non-separable, time-dependent drift (VP plus a rotation with
angular speed omega(t) = 2 + 4t, whose exact p_t is the VP mixture rotated by ∫omega); fplanck 0.2.2
(PyPI, if installed: VP as one constant operator in s = B(t)/2, ∂_s p = ∇·(x p) + Δp; NumPy 2 lacks
numpy.product, aliased to numpy.prod here only); the log-density solver (Method.LOG_DENSITY, started
from the exact log p0 since p0 underflows at the corners) on the VP problem and on the rotating VP.

A second table: the tail case of the issue (1D, VE, t = 0.3, "young" tails): mixture 0.3 N(−1.5, 0.5²) +
0.7 N(1, 0.4²), box [−8, 8], 512 cells (--quick: 256), convolution, finite volumes and log density.

    python benchmarks/bench_groundtruth.py [--quick] [--out PATH]

--quick uses 64² and fewer step counts. Prints a markdown table; writes it to PATH only if given.
Times: wall clock (perf_counter) and process CPU time; torch runs on one thread (a shared 2-core
machine oversubscribes otherwise).
"""

from __future__ import annotations

import argparse
import math
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from fpe_lab.gmm import GaussianMixture
from fpe_lab.groundtruth import Grid, Method, solve_fokker_planck
from fpe_lab.groundtruth.solver import fd_score
from fpe_lab.sde import VESDE, VPSDE

LEVELS = (1e-3, 1e-6, 1e-10, 1e-12)
SDS = (0.2, 0.3, 0.25, 0.35)
LEVELS_1D = (1e-3, 1e-6, 1e-10, 1e-12, 1e-30, 1e-60)


def mixture() -> GaussianMixture:
    means = np.array([[2.0, 0.0], [-2.0, 0.0], [0.0, 2.0], [0.0, -2.0]])
    covs = np.array([np.eye(2) * s * s for s in SDS])
    return GaussianMixture(np.ones(4), means, covs, dtype=torch.float64)


class RotatingVP:
    """VP drift plus a time-dependent rotation: f = −½beta(t) x + omega(t) J x, J = [[0, −1], [1, 0]].

    Non-separable (f_x depends on y) and time dependent. Rotations commute with the isotropic VP
    flow, so p_t is the VP marginal rotated by theta(t) = ∫_0^t omega = 2t + 2t².
    """

    def __init__(self) -> None:
        self.vp = VPSDE()

    def drift(self, x, t):
        omega = (2.0 + 4.0 * t)[:, None]
        rot = torch.stack([-x[:, 1], x[:, 0]], -1)
        return self.vp.drift(x, t) + omega * rot

    def diffusion(self, t):
        return self.vp.diffusion(t)

    def exact(self, gm: GaussianMixture, t: float) -> GaussianMixture:
        theta = 2 * t + 2 * t * t
        c, s = math.cos(theta), math.sin(theta)
        r = torch.tensor([[c, -s], [s, c]], dtype=torch.float64)
        pt = gm.perturbed(self.vp, t)
        return GaussianMixture(pt.weights, pt.means @ r.T, r @ pt.covs @ r.T, dtype=torch.float64)


def errors(score: np.ndarray, exact: GaussianMixture, grid: Grid) -> list[float]:
    x = torch.from_numpy(grid.coords.reshape(-1, grid.ndim))
    lp = exact.log_prob(x).numpy().reshape(grid.shape)
    s = exact.score(x).numpy().reshape(*grid.shape, grid.ndim)
    err = np.abs(score - s).max(-1)
    rel = lp - lp.max()
    return [float(err[rel >= math.log(lvl)].max()) for lvl in LEVELS]


def timed(fn, *args, **kwargs):
    """``fn(*args, **kwargs)`` with its wall and CPU seconds."""
    w, c = time.perf_counter(), time.process_time()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - w, time.process_time() - c


def run_fplanck(p0: np.ndarray, grid: Grid, sde: VPSDE, times):
    try:
        import fplanck
        from scipy import constants
    except ImportError:
        return None, "fplanck not installed (pip install fplanck==0.2.2): row skipped"
    if not hasattr(np, "product"):
        np.product = np.prod  # fplanck 0.2.2 calls numpy.product, removed in NumPy 2
    n = grid.shape[0]
    extent = grid.bounds[0][1] - grid.bounds[0][0]

    def build():
        return fplanck.fokker_planck(
            temperature=1 / constants.k, drag=1.0, extent=[extent, extent], resolution=extent / n,
            force=lambda x, y: np.array([-x, -y]), boundary=fplanck.boundary.reflecting,
        )

    solver, wall_b, cpu_b = timed(build)
    rows = []
    for t in times:
        s = 0.5 * float(sde.int_beta(torch.tensor(t, dtype=torch.float64)))
        p, wall, cpu = timed(solver.propagate, lambda *g: p0.copy(), s)
        with np.errstate(divide="ignore"):
            rows.append((t, fd_score(np.log(np.maximum(p, 0)), grid), wall + wall_b, cpu + cpu_b))
    return rows, f"fplanck build {wall_b:.2f} s wall (included in each row)"


def ve_tail_table(n: int) -> list[str]:
    """The issue's tail case: 1D VE at t = 0.3, where the density-form solvers lose the young tails."""
    gm = GaussianMixture([0.3, 0.7], [[-1.5], [1.0]], [[[0.25]], [[0.16]]], dtype=torch.float64)
    grid, sde, t = Grid(((-8.0, 8.0),), (n,)), VESDE(), 0.3
    x = torch.from_numpy(grid.coords.reshape(-1, 1))
    log_p0 = gm.log_prob(x).numpy()
    lines = [
        "",
        f"VE, 1D mixture 0.3 N(-1.5, 0.5^2) + 0.7 N(1, 0.4^2), box [-8, 8], {n} cells, t = {t}, 400 steps.",
        "",
        "| method | t | wall s | cpu s | " + " | ".join(f"err p>={lvl:g}" for lvl in LEVELS_1D) + " |",
        "|---|---|---|---|" + "---|" * len(LEVELS_1D),
    ]
    print("\n".join(lines), flush=True)
    for name, method in (("exact convolution", Method.CONVOLUTION), ("FV (SG, Richardson)", Method.FINITE_VOLUME),
                         ("log density (u = log p, IMEX ADI)", Method.LOG_DENSITY)):
        sol, wall, cpu = timed(solve_fokker_planck, sde, None, grid, [t], method=method, n_steps=400, progress=False,
                               log_p0=log_p0)
        exact = gm.perturbed(sde, t)
        lp = exact.log_prob(x).numpy()
        err = np.abs(sol.score[0] - exact.score(x).numpy()).max(-1)
        errs = [float(err[lp - lp.max() >= math.log(lvl)].max()) for lvl in LEVELS_1D]
        lines.append(f"| {name} | {t:g} | {wall:.3f} | {cpu:.3f} | " + " | ".join(f"{e:.2e}" for e in errs) + " |")
        print(lines[-1], flush=True)
    return lines


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="64² grid and fewer step counts")
    parser.add_argument("--out", type=Path, default=None, help="also write the table to this file")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    n = 64 if args.quick else 256
    steps = (50, 100) if args.quick else (50, 100, 200)
    times = (0.5, 0.1)
    grid, sde, gm = Grid(((-8.0, 8.0), (-8.0, 8.0)), (n, n)), VPSDE(), mixture()
    p0 = gm.log_prob(torch.from_numpy(grid.coords.reshape(-1, 2))).exp().numpy().reshape(grid.shape)

    lines = [
        f"VP, 4 Gaussians, box [-8, 8]^2, {n}^2 cells. Score error max |s - s_exact| where p >= level*max p.",
        "",
        "| method | t | wall s | cpu s | " + " | ".join(f"err p>={lvl:g}" for lvl in LEVELS) + " |",
        "|---|---|---|---|" + "---|" * len(LEVELS),
    ]

    def row(name, t, wall, cpu, errs):
        lines.append(f"| {name} | {t:g} | {wall:.3f} | {cpu:.3f} | " + " | ".join(f"{e:.2e}" for e in errs) + " |")
        print(lines[-1], flush=True)

    print("\n".join(lines), flush=True)
    for t in times:  # one time per call, so each row's time is that of one slice
        sol, wall, cpu = timed(solve_fokker_planck, sde, p0, grid, [t], method=Method.CONVOLUTION, progress=False)
        row("exact convolution", t, wall, cpu, errors(sol.score[0], gm.perturbed(sde, t), grid))
    for t in times:
        sol, wall, cpu = timed(solve_fokker_planck, sde, p0, grid, [t], method=Method.SEPARABLE, progress=False)
        row("SG + time change + separable expm", t, wall, cpu, errors(sol.score[0], gm.perturbed(sde, t), grid))
    for k in steps:
        for t in times:
            sol, wall, cpu = timed(
                solve_fokker_planck, sde, p0, grid, [t], method=Method.FINITE_VOLUME, n_steps=k, progress=False
            )
            row(f"FV (SG, Richardson ADI), {k} steps", t, wall, cpu, errors(sol.score[0], gm.perturbed(sde, t), grid))
    rot = RotatingVP()
    for k in steps:
        t = 0.5
        sol, wall, cpu = timed(
            solve_fokker_planck, rot, p0, grid, [t], method=Method.FINITE_VOLUME, n_steps=k, progress=False
        )
        row(f"FV, rotating VP (non-separable f(x,t)), {k} steps", t, wall, cpu,
            errors(sol.score[0], rot.exact(gm, t), grid))
    log_p0 = gm.log_prob(torch.from_numpy(grid.coords.reshape(-1, 2))).numpy().reshape(grid.shape)
    for k in steps:
        for t in times:
            sol, wall, cpu = timed(solve_fokker_planck, sde, None, grid, [t], method=Method.LOG_DENSITY, n_steps=k,
                                   progress=False, log_p0=log_p0)
            row(f"log density (u = log p, IMEX ADI), {k} steps", t, wall, cpu,
                errors(sol.score[0], gm.perturbed(sde, t), grid))
    for k in steps:
        t = 0.5
        sol, wall, cpu = timed(solve_fokker_planck, rot, None, grid, [t], method=Method.LOG_DENSITY, n_steps=k,
                               progress=False, log_p0=log_p0)
        row(f"log density, rotating VP (non-separable f(x,t)), {k} steps", t, wall, cpu,
            errors(sol.score[0], rot.exact(gm, t), grid))
    rows, note = run_fplanck(p0, grid, sde, times)
    if rows is not None:
        for t, score, wall, cpu in rows:
            row("fplanck 0.2.2 (time change, expm_multiply)", t, wall, cpu, errors(score, gm.perturbed(sde, t), grid))
    lines += ["", note]
    print(note)
    lines += ve_tail_table(256 if args.quick else 512)
    table = "\n".join(lines) + "\n"
    if args.out is not None:
        fd, tmp = tempfile.mkstemp(dir=args.out.parent, prefix=f".{args.out.name}.")
        with os.fdopen(fd, "w") as f:
            f.write(table)
        os.replace(tmp, args.out)
    return table


if __name__ == "__main__":
    main()
