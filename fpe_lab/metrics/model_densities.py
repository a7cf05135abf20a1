r"""The two model densities of a learned score on a 1-D/2-D grid, and distances between densities.

A score s_θ(x, t) defines two generative models on the window [eps, t0], both started at t0 from a
density p_start (the SDE's prior at t0 = 1, or the exact marginal p_{t0} supplied by the caller):

* **PF-ODE model** q_ODE: x_{t0} ~ p_start carried by dx/dt = v = f − ½ g² s_θ from t0 down to eps.
  By the instantaneous change of variables, with x_eps = x,

      log q_ODE(x) = log p_start(x_{t0}) + ∫_eps^{t0} ∇·(f − ½ g² s_θ)(x_t, t) dt,

  evaluated pointwise at every cell centre by :func:`fpe_lab.likelihood.pf_ode_nll` (the batched torch
  Dormand–Prince of :mod:`fpe_lab.ode`, error control per point, on the score's device; exact ∇·s_θ).
* **Reverse-SDE model** q_SDE: dx = [f − g² s_θ] dt + g dw̄ run from t0 down to eps. In τ = 1 − t the
  process y(τ) = x(1 − τ) is the forward SDE dy = b dτ + g(1 − τ) dw with

      b(y, τ) = −f(y, 1 − τ) + g(1 − τ)² s_θ(y, 1 − τ),

  whose density solves the Fokker–Planck equation

      ∂_τ q = −∇·(b q) + ½ g(1 − τ)² Δq,   q(τ = 1 − t0) = p_start,   solved up to τ = 1 − eps,

  with the Scharfetter–Gummel finite volumes of :mod:`fpe_lab.groundtruth.finite_volume` (zero-flux
  walls; positive and mass-conserving; split implicit steps with Richardson extrapolation, second order
  in space and time). s_θ enters only through b, evaluated at the cell faces at each stage time.

If s_θ is the exact score of the marginals p_t and p_start = p_{t0}, both models equal p_eps exactly;
on a grid they reproduce it to the grid/ODE tolerance (the floor). A score that violates the score
Fokker–Planck equation is not the score of any diffusion of p_start, and the two models part:
TV(q_ODE, q_SDE) above the floor measures that.

**What the comparison covers.** Both densities depend on s_θ only on [eps, t0] and on p_start. With
t0 < 1 and the exact p_{t0} as start, the gap measures the model on [eps, t0] only: neither the score
on (t0, 1] nor the prior mismatch p_1 ≠ prior enters.

**VE.** Its prior N(0, sigma(1)² I) is ~50 wide while the data features are ~0.1: no uniform grid that
resolves the data also holds the prior's tails, and the reverse-SDE solve's zero-flux walls would fold
the prior back into the box. A start density whose p/max on the walls of the box exceeds ``wall_tol``
is therefore a ValueError; VE must be started at t0 < 1 from the exact marginal (``start=``).

Grids: :class:`fpe_lab.groundtruth.Grid` (values at cell centres, "ij" axes). Both densities are
numpy float64 arrays of ``grid.shape`` normalised so that ``grid.integrate(q) == 1``.
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from fpe_lab.groundtruth.diagnostics import BoundaryWarning
from fpe_lab.groundtruth.finite_volume import ScharfetterGummel, step_times
from fpe_lab.groundtruth.grid import Grid
from fpe_lab.likelihood import pf_ode_nll
from fpe_lab.progress import progress_bar
from fpe_lab.sampling import ODEMethod
from fpe_lab.sde import LinearSDE

__all__ = ["ModelDensities", "model_densities", "DensityDistances", "density_distances",
           "START_WALL_TOL", "KL_FLOOR", "W2_MAX_CELLS"]

log = logging.getLogger(__name__)

ScoreFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
LogDensity = Callable[[torch.Tensor], torch.Tensor]

# p/max allowed on the walls of the box for the start density (see model_densities, ``wall_tol``)
START_WALL_TOL = 1e-8
# KL(p‖q) floors q at this fraction of max q (see density_distances)
KL_FLOOR = 1e-12
# the W2 transport problem is solved on at most this many cells (blocks of cells summed beyond it)
W2_MAX_CELLS = 64**2


@dataclass(frozen=True, eq=False)
class ModelDensities:
    """The PF-ODE and reverse-SDE model densities of one score at t = eps on ``grid``.

    ode, sde: float64 arrays of ``grid.shape``, each with ``grid.integrate(q) == 1``.
    t0, eps: the model window [eps, t0]; started from ``start`` ("prior" or "caller") at t0.
    ode_mass: ∫_box exp(−NLL) before normalisation: the share of the ODE model's mass inside the box
        (1 up to the tails the box cuts off and the quadrature error; far below 1: enlarge the box).
    info: settings and costs (ODE tolerances and NFE, SDE steps, seconds spent in each part).
    """

    ode: np.ndarray
    sde: np.ndarray
    grid: Grid
    t0: float
    eps: float
    start: str
    ode_mass: float
    info: dict = field(default_factory=dict)


class _ReverseTimeSDE:
    r"""The reverse SDE in τ = 1 − t as a forward SDE for the finite-volume scheme.

    drift(y, τ) = −f(y, 1 − τ) + g(1 − τ)² s_θ(y, 1 − τ), diffusion(τ) = g(1 − τ); y of shape (m, D)
    arrives as float64 on the host (the scheme's face points) and is moved to the score's device and
    dtype. t = 1 − τ is clipped to [eps, t0] (it leaves that window by round-off only).
    """

    def __init__(self, score_fn: ScoreFn, sde: LinearSDE, eps: float, t0: float, device, dtype) -> None:
        self.score_fn, self.sde, self.eps, self.t0 = score_fn, sde, eps, t0
        self.device, self.dtype = device, dtype
        self.evaluations = 0  # score evaluations (points)

    def _t(self, tau: torch.Tensor) -> torch.Tensor:
        return (1.0 - tau.to(torch.float64)).clamp(self.eps, self.t0)

    def drift(self, y: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
        x = y.to(device=self.device, dtype=self.dtype)
        t = self._t(tau).to(device=self.device, dtype=self.dtype)
        with torch.no_grad():
            s = self.score_fn(x, t)
            if not isinstance(s, torch.Tensor) or s.shape != x.shape:
                got = tuple(s.shape) if isinstance(s, torch.Tensor) else type(s).__name__
                raise ValueError(f"score_fn(x, t) must return the shape of x {tuple(x.shape)}; got {got}")
            g2 = self.sde.diffusion(t) ** 2
            b = -self.sde.drift(x, t) + g2[:, None] * s
        self.evaluations += x.shape[0]
        if not torch.isfinite(b).all():
            raise FloatingPointError(
                f"reverse drift −f + g² s_θ is non-finite at t = {float(t[0]):.6g} "
                f"({int((~torch.isfinite(b)).any(-1).sum())} of {x.shape[0]} face points)"
            )
        return b

    def diffusion(self, tau: torch.Tensor) -> torch.Tensor:
        return self.sde.diffusion(self._t(torch.as_tensor(tau)))


def _device_dtype(score_fn, device, dtype) -> tuple[torch.device, torch.dtype]:
    params = list(score_fn.parameters()) if isinstance(score_fn, torch.nn.Module) else []
    if device is None:
        device = params[0].device if params else torch.device("cpu")
    if dtype is None:
        dtype = params[0].dtype if params and params[0].is_floating_point() else torch.float64
    if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ValueError(f"dtype must be a floating torch dtype; got {dtype!r}")
    return torch.device(device), dtype


def _check_window(eps, t0) -> tuple[float, float]:
    for name, v in (("eps", eps), ("t0", t0)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise ValueError(f"{name} must be a finite number; got {v!r}")
    if not 0 < eps < t0 <= 1:
        raise ValueError(f"need 0 < eps < t0 <= 1; got eps={eps!r}, t0={t0!r}")
    return float(eps), float(t0)


def _wall_ratio(log_p: np.ndarray) -> float:
    """max over the wall cells of p / max p, from log p on the grid."""
    walls = max(np.take(log_p, idx, axis=d).max() for d in range(log_p.ndim) for idx in (0, -1))
    return float(np.exp(walls - log_p.max()))


def _start_on_grid(start_fn: LogDensity, centres: torch.Tensor, grid: Grid, label: str) -> np.ndarray:
    with torch.no_grad():
        lp = start_fn(centres)
    if not isinstance(lp, torch.Tensor) or tuple(lp.shape) != (centres.shape[0],):
        got = tuple(lp.shape) if isinstance(lp, torch.Tensor) else type(lp).__name__
        raise ValueError(f"{label}(x) must return log-densities of shape (b,) = ({centres.shape[0]},); got {got}")
    out = lp.detach().to(torch.float64).cpu().numpy().reshape(grid.shape)
    if np.isnan(out).any() or np.isposinf(out).any():
        raise ValueError(f"{label}(x) must be a log-density (finite or −inf); got "
                         f"{np.count_nonzero(np.isnan(out) | np.isposinf(out))} NaN/+inf values on the grid")
    if not np.isfinite(out).any():
        raise ValueError(f"{label}(x) is −inf on every cell of the grid: the start density has no mass in the box")
    return out


def _reverse_nodes(sde: LinearSDE, grid: Grid, eps: float, t0: float, n_steps: int) -> np.ndarray:
    """τ-nodes from 1 − t0 to 1 − eps: the forward step grading of the groundtruth solver on [eps, t0]
    (steps shrink towards small t, where features are narrow), traversed from t0 down to eps."""
    t_nodes = step_times(sde, np.array([eps, t0]), n_steps, tau0=(2 * min(grid.dx)) ** 2)[1]
    t_nodes[0], t_nodes[-1] = eps, t0
    return 1.0 - t_nodes[::-1]


def model_densities(
    score_fn: ScoreFn,
    sde: LinearSDE,
    grid: Grid,
    *,
    eps: float = 1e-3,
    t0: float = 1.0,
    start: LogDensity | None = None,
    ode_rtol: float = 1e-5,
    ode_atol: float = 1e-5,
    ode_batch_size: int | None = None,
    sde_steps: int = 200,
    wall_tol: float = START_WALL_TOL,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    progress: bool = False,
) -> ModelDensities:
    r"""q_ODE and q_SDE, the PF-ODE and reverse-SDE models of ``score_fn`` at t = eps, on ``grid``.

    Main arguments:
        score_fn: s_θ(x, t) for x of shape (b, D), t of shape (b,) (a ``ScoreModel``, or
            ``GaussianMixture.score_fn(sde)``); evaluated at t in [eps, t0] only. Points must not interact.
            The ODE part differentiates it in x (exact ∇·s_θ); the FPE part calls it under
            ``torch.no_grad()`` at the cell faces (a score that needs autograd itself must enable it).
        sde: the forward SDE (drift, diffusion, div_drift, prior_log_prob, prior_std).
        grid: a 1-D/2-D :class:`~fpe_lab.groundtruth.Grid`; D = grid.ndim.
        eps, t0: the model window, 0 < eps < t0 <= 1.
        start: log p_start(x) for x of shape (b, D) -> (b,), the density at t0. ``None`` means the
            SDE's prior ``sde.prior_log_prob``, which is the law at t = 1 only (t0 < 1 with
            ``start=None`` is a ValueError). Pass the exact log p_{t0} (e.g.
            ``lambda x: mixture.log_prob(x, t0, sde)``) to start from the exact marginal. It must be a
            callable, not a gridded array: the PF-ODE needs log p_start at the end points x_{t0} of its
            trajectories, which lie anywhere.

    Other arguments:
        ode_rtol, ode_atol: DOPRI5 tolerances of the PF-ODE (per point, on [x, ∫∇·v]).
        ode_batch_size: solve the N cells in chunks of this many points (separate adaptive solves);
            default one solve of all cells.
        sde_steps: about this many Richardson-extrapolated implicit steps for the reverse FPE, graded
            like the groundtruth solver's (short steps near eps).
        wall_tol: largest p/max allowed on the walls of the box for the start density (ValueError
            above it: the zero-flux walls would fold the cut-off tails back in). Default 1e-8: the
            mass the box then cuts off is far below the TV floor of any grid that resolves the data
            (VP's N(0, I) prior needs a box of about ±6.1; VE's, about ±300). The groundtruth
            solvers' stricter level (1e-12, for scores deep in the tails) is not needed for densities
            compared in TV. The outputs at eps are checked against the same level with a
            BoundaryWarning.
        device, dtype: where and in what the score is evaluated; default the parameters' device and
            dtype when ``score_fn`` is an ``nn.Module`` with parameters, else the CPU and float64
            (use float64 for verification). The FPE itself is solved in float64 on the host.
        progress: progress bars (ODE over t, FPE over steps).

    Returns :class:`ModelDensities`. Raises ValueError for bad arguments or a start density that the
    box does not hold (VE's prior: start at t0 < 1 from the exact marginal), FloatingPointError if
    the score gives non-finite values.
    """
    eps, t0 = _check_window(eps, t0)
    if not isinstance(grid, Grid):
        raise ValueError(f"grid must be a fpe_lab.groundtruth.Grid; got {type(grid).__name__}")
    if not callable(score_fn):
        raise ValueError(f"score_fn must be callable as score_fn(x, t); got {type(score_fn).__name__}")
    if isinstance(sde_steps, bool) or not isinstance(sde_steps, int) or sde_steps < 1:
        raise ValueError(f"sde_steps must be an int >= 1; got {sde_steps!r}")
    if isinstance(wall_tol, bool) or not isinstance(wall_tol, (int, float)) or not 0 < wall_tol < 1:
        raise ValueError(f"wall_tol must be a number in (0, 1); got {wall_tol!r}")
    if start is None and t0 != 1.0:
        raise ValueError(
            f"start=None starts from the SDE's prior, which is the law at t = 1 only; got t0={t0!r}. "
            "Pass start = log p_t0 (e.g. the exact marginal, lambda x: mixture.log_prob(x, t0, sde)) or t0 = 1"
        )
    if start is not None and not callable(start):
        raise ValueError(f"start must be None or a callable x (b, D) -> log p_t0(x) (b,); got {type(start).__name__}")
    device, dtype = _device_dtype(score_fn, device, dtype)
    label = "sde.prior_log_prob" if start is None else "start"
    start_fn = sde.prior_log_prob if start is None else start

    centres = torch.from_numpy(grid.coords.reshape(-1, grid.ndim)).to(device=device, dtype=dtype)
    log_start = _start_on_grid(start_fn, centres, grid, label)
    ratio = _wall_ratio(log_start)
    if ratio > wall_tol:
        lo_hi = ", ".join(f"[{lo:g}, {hi:g}]" for lo, hi in grid.bounds)
        msg = (f"the start density at t0 = {t0:g} ({label}) has p/max = {ratio:.3g} on the walls of the box "
               f"{lo_hi}; allowed: wall_tol = {wall_tol:g}. The reverse-SDE solve has zero-flux walls, which "
               "would fold the cut-off tails back into the box.")
        if start is None and hasattr(sde, "prior_std"):
            half = sde.prior_std() * math.sqrt(2 * math.log(1 / wall_tol))
            msg += (f" The prior N(0, {sde.prior_std():.3g}² I) needs a box of about ±{half:.3g}; if the data are "
                    "much narrower than that (VE: prior std ~50 against data features ~0.1), a uniform grid cannot "
                    "hold both: start at t0 < 1 from the exact marginal, model_densities(..., t0=t0, "
                    "start=lambda x: log p_t0(x)); the comparison then covers the model on [eps, t0].")
        else:
            msg += " Enlarge grid.bounds, or start at an earlier t0 where p_t0 is narrower."
        raise ValueError(msg)

    # ---------------------------------------------------------------- PF-ODE model, pointwise
    began = time.perf_counter()
    nll = pf_ode_nll(score_fn, sde, centres, eps=eps, t_end=t0, prior_log_prob=start_fn,
                     method=ODEMethod.DOPRI5, rtol=ode_rtol, atol=ode_atol, batch_size=ode_batch_size,
                     progress=progress)
    ode_seconds = time.perf_counter() - began
    log_q = -nll.nats.detach().to(torch.float64).cpu().numpy().reshape(grid.shape)
    if np.isnan(log_q).any() or np.isposinf(log_q).any():
        bad = np.count_nonzero(np.isnan(log_q) | np.isposinf(log_q))
        raise FloatingPointError(f"PF-ODE log-density is NaN/+inf at {bad} of {log_q.size} cells")
    if not np.isfinite(log_q).any():
        raise FloatingPointError("PF-ODE density is 0 at every cell (log q = −inf): the start density vanishes "
                                 "where the trajectories end")
    top = log_q.max()
    q_ode = np.exp(log_q - top)
    mass = grid.integrate(q_ode)
    q_ode /= mass
    ode_mass = float(mass * math.exp(top)) if top < 700 else math.inf

    # ---------------------------------------------------------------- reverse-SDE model, FPE on the grid
    began = time.perf_counter()
    reverse = _ReverseTimeSDE(score_fn, sde, eps, t0, device, dtype)
    scheme = ScharfetterGummel(reverse, grid)
    p = np.exp(log_start - log_start.max())
    p /= grid.integrate(p)
    nodes = _reverse_nodes(sde, grid, eps, t0, sde_steps)
    wild = 0
    with progress_bar(total=len(nodes) - 1, desc="reverse FPE", unit="step", disable=not progress, leave=False) as bar:
        for a, b in zip(nodes[:-1], nodes[1:]):
            p, n_wild = scheme.step(p, float(a), float(b - a))
            wild += n_wild > 0
            bar.update(1)
    sde_seconds = time.perf_counter() - began
    if not np.all(np.isfinite(p)) or p.min() < 0:
        raise FloatingPointError(f"reverse FPE solution lost finiteness/positivity (min {np.nanmin(p):.3g})")
    sde_mass = grid.integrate(p)
    q_sde = p / sde_mass

    for name, q in (("q_ODE", q_ode), ("q_SDE", q_sde)):
        with np.errstate(divide="ignore"):
            r = _wall_ratio(np.log(q))
        if r > wall_tol:
            warnings.warn(f"{name} has p/max = {r:.3g} on the walls of the box {grid.bounds} at t = eps = {eps:g} "
                          f"(allowed {wall_tol:g}); enlarge grid.bounds", BoundaryWarning, stacklevel=2)
    info = {
        "ode_method": "dopri5", "ode_rtol": ode_rtol, "ode_atol": ode_atol, "ode_nfe": nll.nfe,
        "ode_batch_size": ode_batch_size, "sde_steps": len(nodes) - 1, "sde_log_extrapolated_steps": wild,
        "sde_score_points": reverse.evaluations, "sde_mass_drift": float(sde_mass - 1.0),
        "ode_seconds": ode_seconds, "sde_seconds": sde_seconds, "device": str(device), "dtype": str(dtype),
        "n_cells": int(np.prod(grid.shape)),
    }
    log.info("model densities on %s cells, window [%g, %g]: PF-ODE %.2f s (%d NFE), reverse FPE %.2f s (%d steps)",
             "x".join(map(str, grid.shape)), eps, t0, ode_seconds, nll.nfe, sde_seconds, len(nodes) - 1)
    return ModelDensities(ode=q_ode, sde=q_sde, grid=grid, t0=t0, eps=eps,
                          start="prior" if start is None else "caller", ode_mass=ode_mass, info=info)


# ==================================================================== distances between gridded densities


@dataclass(frozen=True)
class DensityDistances:
    """Distances between two densities p, q on one grid (see :func:`density_distances`).

    tv = ½∫|p − q|;  kl = KL(p‖q) = ∫ p log(p/q) (q floored);  hellinger = sqrt(½∫(√p − √q)²) ∈ [0, 1];
    w2 = the 2-Wasserstein distance between the cell masses (on blocks of cells when coarsened);
    w2_block: cells per block along each axis used for w2 (1 = no coarsening).
    """

    tv: float
    kl: float
    hellinger: float
    w2: float
    w2_block: tuple[int, ...]

    def as_dict(self) -> dict:
        return {"tv": self.tv, "kl": self.kl, "hellinger": self.hellinger, "w2": self.w2,
                "w2_block": list(self.w2_block)}


def _check_density(v, grid: Grid, name: str) -> np.ndarray:
    try:
        a = np.array(v.detach().cpu() if isinstance(v, torch.Tensor) else v, dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be an array of numbers of shape {grid.shape}; got {type(v).__name__}") from None
    if a.shape != grid.shape:
        raise ValueError(f"{name} must have shape grid.shape = {grid.shape}; got {a.shape}")
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{name} must be finite; got {np.count_nonzero(~np.isfinite(a))} non-finite values")
    if a.min() < 0:
        raise ValueError(f"{name} must be nonnegative; got minimum {a.min():.3g}")
    if a.max() == 0:
        raise ValueError(f"{name} must have positive mass; got all zeros")
    return a / grid.integrate(a)


def _coarsen(mass: np.ndarray, grid: Grid, max_cells: int) -> tuple[np.ndarray, np.ndarray, tuple[int, ...]]:
    """Sum blocks of cells so that at most ~max_cells remain; block centres = mean of their cell centres."""
    per_axis = max(1, int(math.floor(max_cells ** (1 / grid.ndim) + 1e-9)))
    blocks = tuple(max(1, math.ceil(n / per_axis)) for n in grid.shape)
    axes = []
    for d, (b, ax) in enumerate(zip(blocks, grid.axes)):
        starts = np.arange(0, grid.shape[d], b)
        mass = np.add.reduceat(mass, starts, axis=d)
        axes.append(np.add.reduceat(ax, starts) / np.diff(np.append(starts, grid.shape[d])))
    centres = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1).reshape(-1, grid.ndim)
    return mass.reshape(-1), centres, blocks


def _w2(p: np.ndarray, q: np.ndarray, grid: Grid, max_cells: int) -> tuple[float, tuple[int, ...]]:
    import ot

    a, centres, blocks = _coarsen(p * grid.cell_volume, grid, max_cells)
    b, _, _ = _coarsen(q * grid.cell_volume, grid, max_cells)
    ia, ib = a > 0, b > 0
    a, b = a[ia] / a[ia].sum(), b[ib] / b[ib].sum()
    cost = ot.dist(centres[ia], centres[ib], metric="sqeuclidean")
    w2sq, logs = ot.emd2(a, b, cost, numItermax=10_000_000, log=True)
    if logs.get("warning"):
        raise RuntimeError(f"W2: the exact transport solve did not converge ({logs['warning']})")
    return math.sqrt(max(float(w2sq), 0.0)), blocks


def density_distances(
    p, q, grid: Grid, *, kl_floor: float = KL_FLOOR, w2_max_cells: int = W2_MAX_CELLS
) -> DensityDistances:
    r"""TV, KL, Hellinger and W2 between two densities on ``grid``.

    p, q: arrays (numpy or torch) of shape ``grid.shape``, finite, nonnegative, with positive mass;
    each is normalised to ``grid.integrate(·) = 1`` first. With dV the cell volume (midpoint rule):

        tv        = ½ Σ |p − q| dV                                  ∈ [0, 1]
        kl        = Σ_{p>0} p log(p / max(q, kl_floor · max q)) dV  (KL(p‖q), nats)
        hellinger = sqrt(½ Σ (√p − √q)² dV)                         ∈ [0, 1]
        w2        = sqrt(min_π Σ π_ij |x_i − y_j|²)                 (exact OT, POT ``ot.emd2``)

    **KL floor.** q is floored at ``kl_floor`` × max q (default 1e-12; the floored q is not
    renormalised, which changes the KL by < kl_floor × the box volume × max q). Where q underflows
    (exp(−NLL) of a far-tail cell) KL would be +inf; the floor bounds each such cell's term by
    p log(p / (1e-12 max q)), i.e. KL measures the mass of p on those cells rather than their exact
    log-ratio.

    **W2** treats each density as a discrete measure with the masses p dV at the cell centres and
    squared Euclidean cost. Grids with more than ``w2_max_cells`` (64² by default) cells are first
    coarsened by summing blocks of cells (the same blocks for p and q, placed at the mean of their
    cell centres), so the transport problem stays ~4096 × 4096 (a few seconds); ``w2_block`` reports
    the block size. Quantisation to the cells (or blocks) of width H biases W2² *upwards* by between 0
    and D·H²/4: a translation by (k + f) cells along an axis costs (k + f)² H² + f(1 − f) H² on the
    lattice, so a whole-cell shift is exact; for Gaussians the excess was 0.15–0.4 H² at D = 2.
    Compare W2 values computed on the same grid and blocks, or refine until W2² ≫ H².
    """
    if not isinstance(grid, Grid):
        raise ValueError(f"grid must be a fpe_lab.groundtruth.Grid; got {type(grid).__name__}")
    if isinstance(kl_floor, bool) or not isinstance(kl_floor, (int, float)) or not 0 < kl_floor < 1:
        raise ValueError(f"kl_floor must be a number in (0, 1); got {kl_floor!r}")
    if isinstance(w2_max_cells, bool) or not isinstance(w2_max_cells, int) or w2_max_cells < 2**grid.ndim:
        raise ValueError(f"w2_max_cells must be an int >= {2**grid.ndim}; got {w2_max_cells!r}")
    p = _check_density(p, grid, "p")
    q = _check_density(q, grid, "q")
    dv = grid.cell_volume
    tv = 0.5 * float(np.abs(p - q).sum() * dv)
    qf = np.maximum(q, kl_floor * q.max())
    pos = p > 0
    kl = float((p[pos] * (np.log(p[pos]) - np.log(qf[pos]))).sum() * dv)
    hel = math.sqrt(max(0.0, 0.5 * float(((np.sqrt(p) - np.sqrt(q)) ** 2).sum() * dv)))
    w2, blocks = _w2(p, q, grid, w2_max_cells)
    return DensityDistances(tv=min(tv, 1.0), kl=max(kl, 0.0), hellinger=min(hel, 1.0), w2=w2, w2_block=blocks)
