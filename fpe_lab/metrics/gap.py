r"""The ODE–SDE gap of a learned 2-D score: its two models against each other and against the truth.

A score s_θ that violates the score Fokker–Planck equation defines two different models of p_eps: the
probability-flow ODE q_ODE (whose likelihood papers report) and the reverse SDE q_SDE (what samplers
draw from). :func:`ode_sde_gap` computes both exactly on an N × N grid
(:func:`fpe_lab.metrics.model_densities.model_densities`) and reports

* TV, KL, Hellinger and W2 between q_ODE and q_SDE, and of the truth p_eps against each
  (KL(p_eps‖q_ODE) is the NLL gap of the PF-ODE, a cross-check of the pointwise NLL);
* the held-out NLL under the SDE model, −E log q_SDE(x_0), by bilinear interpolation of log q_SDE
  (the SDE model's own likelihood, which no sample count gives), next to −E log p_eps.

**The window.** Both models start at t0 from p_start: the SDE's prior at t0 = 1 when the marginal at 1
is narrow enough for a grid that also resolves the data (sigma(1) ≤ :data:`MAX_START_SIGMA`: VP, sub-VP),
else the *exact* marginal p_{t0} at the largest t0 with sigma(t0) ≤ MAX_START_SIGMA (VE: t0 ≈ 0.54 with
the default coefficients). Then the gap measures the model on [eps, t0] only; ``t0`` is recorded with
every number. The box is square, [−L, L]² with L = max(R + 6.5 sigma(eps), alpha(t0) R + 6.5 sigma(t0)),
R the data's bound, so the start density is below 1e-8 of its peak on the walls.
"""

from __future__ import annotations

import logging
import math
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from scipy.interpolate import RegularGridInterpolator

from fpe_lab.fpe import ScoreFn
from fpe_lab.groundtruth.diagnostics import BoundaryWarning
from fpe_lab.groundtruth.grid import Grid
from fpe_lab.metrics.model_densities import ModelDensities, density_distances, model_densities
from fpe_lab.metrics.truth import Truth
from fpe_lab.sde import LinearSDE

__all__ = ["GapReport", "ode_sde_gap", "gap_window", "MAX_START_SIGMA", "GAP_ODE_RTOL", "GAP_SDE_STEPS"]

MAX_START_SIGMA = 1.0
"""Largest marginal standard deviation at the start time t0 (a wider start needs a box the grid cannot
resolve the data in)."""
GAP_ODE_RTOL = 1e-4
"""rtol = atol of the PF-ODE solve on the grid (TV floor of q_ODE ~1e-6 at 64², measured)."""
GAP_SDE_STEPS = 50
"""Time steps of the reverse Fokker–Planck solve (200 instead changed the VP floor at 64² by 5%, measured)."""
log = logging.getLogger(__name__)
_HALF_WIDTH_SIGMAS = 6.5  # exp(−6.5²/2) ≈ 7e-10: the start density on the walls, below model_densities' 1e-8


@dataclass(frozen=True)
class GapReport:
    """What :func:`ode_sde_gap` measured (distances: dicts with tv, kl, hellinger, w2)."""

    grid: int
    box: float
    t0: float
    start: str
    ode_vs_sde: dict[str, Any]
    truth_vs_ode: dict[str, Any]
    truth_vs_sde: dict[str, Any]
    sde_nll_nats: float
    sde_nll_sem: float
    true_nll_nats: float
    nll_points: int
    nll_points_outside: int
    ode_mass: float
    wall_s: float
    boundary: tuple[str, ...] = ()

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> GapReport:
        return cls(**{**d, "boundary": tuple(d.get("boundary", ()))})


def gap_window(sde: LinearSDE, eps: float) -> float:
    """t0: 1 if sigma(1) ≤ MAX_START_SIGMA, else the largest t0 in (eps, 1) with sigma(t0) = MAX_START_SIGMA."""
    def sigma(t: float) -> float:
        return float(sde.marginal(torch.tensor([t], dtype=torch.float64))[1])

    if sigma(1.0) <= MAX_START_SIGMA:
        return 1.0
    lo, hi = eps, 1.0
    if sigma(lo) > MAX_START_SIGMA:
        raise ValueError(f"sigma(eps) = {sigma(lo):.3g} > {MAX_START_SIGMA}: no start time fits a grid")
    for _ in range(60):  # bisection on the increasing sigma(t)
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if sigma(mid) <= MAX_START_SIGMA else (lo, mid)
    return round(lo, 4)


def _box(sde: LinearSDE, bound: float, eps: float, t0: float) -> float:
    a0, s0 = (float(v) for v in sde.marginal(torch.tensor([t0], dtype=torch.float64)))
    se = float(sde.marginal(torch.tensor([eps], dtype=torch.float64))[1])
    return max(bound + _HALF_WIDTH_SIGMAS * se, a0 * bound + _HALF_WIDTH_SIGMAS * s0)


def ode_sde_gap(
    score_fn: ScoreFn,
    sde: LinearSDE,
    data: Any,
    truth: Truth,
    *,
    n: int,
    eps: float,
    nll_points: int,
    generator: torch.Generator,
    progress: bool = False,
) -> tuple[GapReport, ModelDensities, np.ndarray]:
    """The ODE–SDE gap of ``score_fn`` on an ``n`` × ``n`` grid (module docstring).

    data: 2-D data with ``bounds`` and ``sample(n, generator)``; truth: its exact p_t. ``nll_points``
    held-out points (from ``generator``) give the SDE model's NLL. Returns (report, the densities, p_eps
    on the grid), the last two for figures.
    """
    import time

    start_time = time.perf_counter()
    if isinstance(n, bool) or not isinstance(n, int) or not 16 <= n <= 512:
        raise ValueError(f"the gap grid must have n in [16, 512] cells per axis; got {n!r}")
    bound = max(abs(v) for pair in data.bounds for v in pair)
    t0 = gap_window(sde, eps)
    half = _box(sde, bound, eps, t0)
    grid = Grid(((-half, half), (-half, half)), (n, n))
    start = None if t0 == 1.0 else (lambda x: truth.log_prob(x.to(torch.float64), t0))
    with warnings.catch_warnings(record=True) as caught:  # a model's mass on the walls is a result, not a crash
        warnings.simplefilter("always", BoundaryWarning)
        dens = model_densities(score_fn, sde, grid, eps=eps, t0=t0, start=start, ode_rtol=GAP_ODE_RTOL,
                               ode_atol=GAP_ODE_RTOL, sde_steps=GAP_SDE_STEPS, progress=progress)
    walls = [str(w.message).split(";")[0] for w in caught if issubclass(w.category, BoundaryWarning)]
    for message in walls:
        log.warning("ODE–SDE gap: %s (the model puts mass outside the box; its distances count it at the walls)",
                    message)
    centres = torch.from_numpy(grid.coords.reshape(-1, 2)).to(torch.float64)
    log_p = truth.log_prob(centres, eps).numpy().reshape(grid.shape)
    p_eps = np.exp(log_p - log_p.max())
    p_eps /= grid.integrate(p_eps)
    x0 = torch.as_tensor(data.sample(nll_points, generator)).to(torch.float64).reshape(nll_points, 2)
    inside = (x0.abs() < half).all(-1)
    pts = x0[inside].numpy()
    log_q = np.log(np.maximum(dens.sde, 1e-300))
    interp = RegularGridInterpolator(grid.axes, log_q, bounds_error=False, fill_value=None)
    nll_sde = -interp(pts)
    nll_true = -truth.log_prob(x0[inside], eps).numpy()
    m = len(pts)
    if m < 2:
        raise ValueError(f"only {m} of {nll_points} held-out points lie inside the gap box ±{half:.3g}")
    report = GapReport(
        grid=n, box=half, t0=t0, start=dens.start,
        ode_vs_sde=density_distances(dens.ode, dens.sde, grid).as_dict(),
        truth_vs_ode=density_distances(p_eps, dens.ode, grid).as_dict(),
        truth_vs_sde=density_distances(p_eps, dens.sde, grid).as_dict(),
        sde_nll_nats=float(nll_sde.mean()), sde_nll_sem=float(nll_sde.std(ddof=1) / math.sqrt(m)),
        true_nll_nats=float(nll_true.mean()), nll_points=m, nll_points_outside=int(nll_points - m),
        ode_mass=float(dens.ode_mass), wall_s=time.perf_counter() - start_time, boundary=tuple(walls),
    )
    return report, dens, p_eps
