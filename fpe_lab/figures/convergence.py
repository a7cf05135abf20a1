r"""Figure: convergence of the ground-truth Fokker–Planck solver with the grid size (log–log, fitted order).

Solves ∂_t p = −∇·(f p) + ½g²Δp with :func:`fpe_lab.groundtruth.solve_fokker_planck`
(``Method.FINITE_VOLUME``, Scharfetter–Gummel, 2nd order in space and time) for a fixed, correlated
three-component Gaussian mixture p_0 under the runs' SDE, on n×n grids, and compares with the exact
mixture p_t (:meth:`fpe_lab.gmm.GaussianMixture.log_prob`/``score``) at one time t:

    density error  ‖p_num − p_t‖_L1  (midpoint rule on the grid),
    score error    ( Σ p_t |∇log p_num − ∇log p_t|² h² )^{1/2}   (p_t-weighted RMS).

The step count grows with n (n_steps = n), so time and space errors both scale like h² and the fitted
slope is the order of the whole scheme. Grids that the solver flags as not resolving p_0
(:class:`~fpe_lab.groundtruth.ResolutionWarning`) are drawn with open markers.
"""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from numpy.typing import ArrayLike

from fpe_lab.figures.output import save_figure, write_csv
from fpe_lab.figures.style import COLUMN_WIDTH, FLOOR_COLOR, TRUTH_COLOR, new_figure, paper_style
from fpe_lab.gmm import GaussianMixture
from fpe_lab.groundtruth import BoundaryWarning, Grid, Method, ResolutionWarning, solve_fokker_planck
from fpe_lab.progress import progress_bar as tqdm
from fpe_lab.sde import LinearSDE

__all__ = ["DEFAULT_GRIDS", "convergence_problem", "solver_errors", "fitted_order", "make"]

log = logging.getLogger(__name__)

STEM = "solver_convergence"
DEFAULT_GRIDS: tuple[int, ...] = (16, 24, 32, 48, 64, 96)
T_EVAL = 0.3
BOX = ((-8.0, 8.0), (-8.0, 8.0))  # p/max < 1e-12 on the walls for VE/VP/sub-VP up to t = 0.3


def convergence_problem() -> GaussianMixture:
    """Three anisotropic, correlated components (not separable, so the 2-D splitting is exercised)."""
    covs = [[[0.30, 0.10], [0.10, 0.20]], [[0.20, -0.05], [-0.05, 0.25]], [[0.16, 0.0], [0.0, 0.36]]]
    return GaussianMixture([0.5, 0.3, 0.2], [[1.2, 0.3], [-1.0, 1.0], [0.0, -1.5]], covs, dtype=torch.float64)


def fitted_order(n: ArrayLike, err: ArrayLike) -> float:
    """Least-squares slope p of log err = c − p log n (err ∝ h^p with h ∝ 1/n)."""
    slope = np.polyfit(np.log(np.asarray(n, float)), np.log(np.asarray(err, float)), 1)[0]
    return float(-slope)


def solver_errors(sde: LinearSDE, grids: Sequence[int] = DEFAULT_GRIDS, t: float = T_EVAL,
                  progress: bool = True) -> list[dict]:
    """Density L1 and p-weighted score RMS errors of the finite-volume solver on n×n grids.

    Returns one dict per n: {"n", "h", "density_l1", "score_rms", "resolved", "wall_s"}.
    """
    if len(grids) < 3 or any(not isinstance(n, int) or n < 8 for n in grids) or list(grids) != sorted(set(grids)):
        raise ValueError(f"grids must be >= 3 increasing ints >= 8 (cells per axis); got {list(grids)!r}")
    mixture = convergence_problem()
    rows = []
    for n in tqdm(grids, desc="solver convergence", disable=not progress, leave=False):
        grid = Grid(BOX, (n, n))
        x = torch.from_numpy(grid.coords.reshape(-1, 2))
        p0 = mixture.log_prob(x).exp().numpy().reshape(n, n)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ResolutionWarning)
            warnings.simplefilter("error", BoundaryWarning)  # the box is chosen so this cannot happen
            start = time.perf_counter()
            sol = solve_fokker_planck(sde, p0, grid, [t], method=Method.FINITE_VOLUME, n_steps=n, progress=False)
            wall = time.perf_counter() - start
        log_p = mixture.log_prob(x, t, sde).numpy().reshape(n, n)
        score = mixture.score(x, t, sde).numpy().reshape(n, n, 2)
        p = np.exp(log_p)
        dens = float(grid.integrate(np.abs(sol.density[0] - p)))
        srms = float(np.sqrt(grid.integrate(p * ((sol.score[0] - score) ** 2).sum(-1))))
        resolved = not any(issubclass(w.category, ResolutionWarning) for w in caught)
        rows.append({"n": n, "h": grid.dx[0], "density_l1": dens, "score_rms": srms, "resolved": resolved,
                     "wall_s": wall})
    return rows


def make(sde: LinearSDE, sde_name: str, out: Path, grids: Sequence[int] = DEFAULT_GRIDS,
         progress: bool = True) -> list[Path]:
    """Draw ``solver_convergence.{png,pdf,csv}`` into ``out`` for ``sde`` (named ``sde_name``)."""
    rows = solver_errors(sde, grids, progress=progress)
    n = np.array([r["n"] for r in rows])
    resolved = np.array([r["resolved"] for r in rows])
    # neutral colours: these lines are neither DSM nor DSM+FPE
    series = (("density_l1", r"density $\|p_h - p_t\|_{L^1}$", "o", TRUTH_COLOR),
              ("score_rms", r"score $\|\nabla\log p_h - \nabla\log p_t\|_{L^2(p_t)}$", "s", FLOOR_COLOR))
    orders = {key: fitted_order(n, [r[key] for r in rows]) for key, *_ in series}
    with paper_style():
        fig = new_figure((COLUMN_WIDTH, 3.1))
        ax = fig.subplots()
        for key, label, marker, color in series:
            err = np.array([r[key] for r in rows])
            ax.plot(n, err, "-", color=color, label=f"{label}: order {orders[key]:.2f}")
            ax.plot(n[resolved], err[resolved], marker, color=color, ls="none")
            ax.plot(n[~resolved], err[~resolved], marker, color=color, ls="none", mfc="white")
        # reference slope h²: through the first density point
        ref = rows[0]["density_l1"] * (n / n[0]) ** -2.0
        ax.plot(n, ref, ":", color=FLOOR_COLOR, lw=1.0, label=r"slope $h^2$ (2nd order)")
        if not resolved.all():
            ax.plot([], [], "o", color=TRUTH_COLOR, mfc="white", ls="none",
                    label="open: solver flags $p_0$ under-resolved")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xticks(n)
        ax.set_xticklabels([str(v) for v in n])
        ax.minorticks_off()
        ax.set_xlabel("grid cells per axis $n$  ($h = 16/n$)")
        ax.set_ylabel(f"error vs exact $p_t$ at t = {T_EVAL:g}")
        ax.set_title(f"finite-volume FPE solver, {sde_name} SDE, 3-Gaussian mixture")
        fig.legend(loc="outside lower center", ncol=1)  # below the axes: never over the data
        paths = save_figure(fig, out, STEM)
    header = ["n", "h", "density_l1", "score_rms", "resolved", "wall_s", "order_density", "order_score"]
    table = [[r["n"], r["h"], r["density_l1"], r["score_rms"], int(r["resolved"]), r["wall_s"], orders["density_l1"],
              orders["score_rms"]] for r in rows]
    paths.append(write_csv(out, STEM, header, table))
    log.info("solver convergence (%s): order %.2f (density), %.2f (score)", sde_name, orders["density_l1"],
             orders["score_rms"])
    return paths
