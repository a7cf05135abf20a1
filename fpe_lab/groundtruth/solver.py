r"""One public call for ground-truth perturbed densities: :func:`solve_fokker_planck`.

Solves the Fokker–Planck equation of dx = f(x, t) dt + g(t) dw,

    ∂_t p = −∇·(f p) + ½ g² Δp,   p(·, 0) = p_0,

on a 1D/2D :class:`~fpe_lab.groundtruth.grid.Grid` and returns p_t, log p_t and the score ∇ log p_t
at the requested times. The scheme is chosen by what the SDE allows (:class:`Method`):

* ``CONVOLUTION`` — SDEs with a Gaussian transition (objects with ``marginal(t)``, i.e.
  :class:`~fpe_lab.sde.LinearSDE`): exact convolution of p_0 with the kernel, exact score
  (:mod:`~fpe_lab.groundtruth.convolution`);
* ``FINITE_VOLUME`` — anything with ``drift(x, t)`` and ``diffusion(t)``: Scharfetter–Gummel finite
  volumes with split implicit steps and Richardson extrapolation, 2nd order in space and time,
  mass-conserving and positive (:mod:`~fpe_lab.groundtruth.finite_volume`);
* ``SEPARABLE`` — linear SDEs whose generator is c(t)·L₀ (VE, VP): the same SG discretisation,
  propagated exactly by one dense matrix exponential per axis (:mod:`~fpe_lab.groundtruth.propagator`);
  fast, but accurate only where p ≳ 1e-13·max;
* ``LOG_DENSITY`` — anything with ``drift``/``diffusion``: u = log p from
  ∂_t u = −∇·f − f·∇u + ½g²(Δu + |∇u|²), central differences (exact on Gaussian tails, quadratic ghost
  cells at the walls) and linearised trapezoidal ADI steps (L-stable start), 2nd order in space
  and time; the score error is about uniform down to p ≈ 1e-60·max (:mod:`~fpe_lab.groundtruth.log_density`).
  Not conservative (normalised at output) and it needs a positive, resolved p0 (or its exact ``log_p0``).
"""

from __future__ import annotations

import enum
import logging
import math
import warnings

import numpy as np
from scipy.special import logsumexp

from fpe_lab.groundtruth.convolution import (
    MIN_KERNEL_CELLS,
    convolve_marginal,
    marginal_coefficients,
    min_resolved_time,
)
from fpe_lab.groundtruth.diagnostics import (
    CURVATURE_TOL,
    WALL_TOL,
    ResolutionWarning,
    check_resolution,
    check_walls,
)
from fpe_lab.groundtruth.finite_volume import solve_density
from fpe_lab.groundtruth.grid import Grid
from fpe_lab.groundtruth.log_density import initial_log_density, solve_log_density
from fpe_lab.groundtruth.propagator import propagate_separable
from fpe_lab.groundtruth.solution import Solution
from fpe_lab.progress import progress_bar as tqdm

__all__ = ["Method", "solve_fokker_planck", "fd_score"]

log = logging.getLogger(__name__)


class Method(enum.Enum):
    """How :func:`solve_fokker_planck` computes p_t."""

    AUTO = "auto"  # CONVOLUTION when the SDE has a Gaussian transition (``marginal``), else FINITE_VOLUME
    CONVOLUTION = "convolution"
    FINITE_VOLUME = "finite_volume"
    SEPARABLE = "separable"  # time-changed exact separable propagator (VE, VP: generator c(t)·L0)
    LOG_DENSITY = "log_density"  # u = log p by linearly implicit ADI: flat score error into the far tails


def _has_gaussian_transition(sde) -> bool:
    return callable(getattr(sde, "marginal", None))


def _check_sde(sde) -> None:
    missing = [name for name in ("drift", "diffusion") if not callable(getattr(sde, name, None))]
    if missing:
        raise ValueError(
            f"sde must have callable drift(x, t) and diffusion(t); {type(sde).__name__} lacks {', '.join(missing)}"
        )


def _check_times(times) -> np.ndarray:
    try:
        t = np.asarray(times, dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"times must be a 1D sequence of numbers in [0, 1]; got {times!r}") from None
    t = np.atleast_1d(t)
    if t.ndim != 1 or t.size == 0:
        raise ValueError(f"times must be a nonempty 1D sequence in [0, 1]; got shape {t.shape}")
    if not np.all(np.isfinite(t)) or t.min() < 0 or t.max() > 1:
        raise ValueError(f"times must be finite and lie in [0, 1]; got {t.tolist()}")
    if np.any(np.diff(t) <= 0):
        raise ValueError(f"times must be strictly increasing; got {t.tolist()}")
    return t


def _check_p0(p0, grid: Grid) -> tuple[np.ndarray, float]:
    try:
        p = np.array(p0, dtype=np.float64)
    except (TypeError, ValueError, RuntimeError):
        raise ValueError(f"p0 must be an array of numbers of shape {grid.shape}; got {type(p0).__name__}") from None
    if p.shape != grid.shape:
        raise ValueError(f"p0 must have shape grid.shape = {grid.shape}; got {p.shape}")
    if not np.all(np.isfinite(p)):
        raise ValueError(f"p0 must be finite; got {np.count_nonzero(~np.isfinite(p))} non-finite values")
    if p.min() < 0:
        raise ValueError(f"p0 must be nonnegative; got minimum {p.min():.3g}")
    if p.max() == 0:
        raise ValueError("p0 must not be all zero (it is normalised to a density)")
    mass = float(grid.integrate(p))
    return p / mass, mass


def _check_log_p0(log_p0, grid: Grid) -> np.ndarray:
    try:
        u = np.array(log_p0, dtype=np.float64)
    except (TypeError, ValueError, RuntimeError):
        raise ValueError(
            f"log_p0 must be an array of numbers of shape {grid.shape}; got {type(log_p0).__name__}"
        ) from None
    if u.shape != grid.shape:
        raise ValueError(f"log_p0 must have shape grid.shape = {grid.shape}; got {u.shape}")
    if not np.all(np.isfinite(u)):
        raise ValueError(
            "log_p0 must be finite (log of a positive density); "
            f"got {np.count_nonzero(~np.isfinite(u))} non-finite values"
        )
    return u - (logsumexp(u) + np.log(grid.cell_volume))


def unresolved_message(count: int, times: list[float], method: Method) -> str:
    """One line: how many cells are unresolved, when, why and the remedy."""
    when = ", ".join(f"{v:g}" for v in times)
    if method in (Method.FINITE_VOLUME, Method.SEPARABLE) and any(v > 0 for v in times):
        why = (f"p_t underflowed to 0 there ({method.name} solves for p): use Method.CONVOLUTION (linear SDEs) or "
               "Method.LOG_DENSITY for the far tails")
    else:
        why = ("p0 is 0 there or nearby, so p_t there depends on values of p0 below the float range: pass log_p0 "
               "(the exact log-density, finite everywhere) instead of p0")
    return f"{count} grid cells are unresolved (log p or score not finite) at t = {when}: {why}"


def _check_kernel_widths(sde, grid: Grid, t: np.ndarray) -> None:
    """ValueError for a time > 0 whose kernel sigma/alpha is narrower than MIN_KERNEL_CELLS of a cell."""
    h = min(grid.dx)
    for ti in t[t > 0]:
        alpha, sigma = marginal_coefficients(sde, float(ti))
        width = sigma / alpha if alpha > 0 else math.inf
        if not width >= MIN_KERNEL_CELLS * h:
            t_min = min_resolved_time(sde, grid)
            raise ValueError(
                f"t = {float(ti):g} is below what the grid resolves: its transition kernel sigma/alpha = {width:.3g} "
                f"is {width / h:.3g} cells wide, and the convolution needs at least {MIN_KERNEL_CELLS:g} cell "
                f"({MIN_KERNEL_CELLS * h:.3g}); the smallest time this grid resolves is t = {t_min:.3g} "
                "(t = 0 gives p0 itself; a finer grid resolves earlier times)"
            )


def fd_score(log_p: np.ndarray, grid: Grid) -> np.ndarray:
    """∇ log p by second-order central differences (one-sided at the walls); shape (*grid.shape, D)."""
    with np.errstate(invalid="ignore"):
        if grid.ndim > 1:
            grads = np.gradient(log_p, *grid.dx, edge_order=2)
        else:
            grads = [np.gradient(log_p, grid.dx[0], edge_order=2)]
    return np.stack(grads, axis=-1)


def _from_density(density: np.ndarray, grid: Grid) -> tuple[np.ndarray, np.ndarray]:
    """log p and its finite-difference score for densities of shape (T, *grid.shape)."""
    with np.errstate(divide="ignore"):
        log_p = np.log(density)
    return log_p, np.stack([fd_score(lp, grid) for lp in log_p])


def solve_fokker_planck(
    sde,
    p0,
    grid: Grid,
    times,
    *,
    method: Method = Method.AUTO,
    n_steps: int = 200,
    wall_tol: float = WALL_TOL,
    progress: bool = True,
    log_p0=None,
) -> Solution:
    r"""p_t, log p_t and ∇ log p_t of the FPE ∂_t p = −∇·(f p) + ½g²Δp at ``times``.

    Main arguments:
        sde: any object with ``drift(x, t)`` (torch, x (b, D) float64, t (b,)) -> (b, D) and
            ``diffusion(t)`` (t (b,)) -> g (b,) with g >= 0, not identically 0. An object that also has
            ``marginal(t)`` -> (alpha, sigma) (a linear SDE such as VESDE/VPSDE/SubVPSDE) is solved exactly
            by default.
        p0: nonnegative array of shape ``grid.shape``, the initial density at the cell centres
            (normalised internally); it should vanish towards the walls.
            Pass ``p0=None`` together with ``log_p0`` to start from a log-density instead.
        grid: the 1D/2D :class:`Grid`.
        times: increasing times in [0, 1] (t = 0 returns p0 and its finite-difference score).

    Other arguments:
        method: :class:`Method`; ``CONVOLUTION`` needs ``sde.marginal``, ``SEPARABLE`` ``sde.drift_coef``
            with drift_coef = −kappa·½g² (VE, VP).
        n_steps: about how many time steps the finite-volume solver takes to ``times[-1]`` (>= 1).
        wall_tol: a :class:`BoundaryWarning` is raised when p/max on the wall cells exceeds this.
        progress: show a tqdm progress bar.
        log_p0: finite array of shape ``grid.shape``, log p0 up to a constant (instead of p0). Use it when
            p0 underflows in the tails (e.g. log_prob of a mixture): ``CONVOLUTION`` and ``LOG_DENSITY`` then
            work from the exact tails (no cell is unresolved); FINITE_VOLUME and SEPARABLE use exp(log_p0).

    Returns:
        :class:`Solution` with ``density``/``log_density`` of shape (T, *grid.shape) and ``score`` of
        shape (T, *grid.shape, D).

    Accuracy: CONVOLUTION works in log space (:mod:`~fpe_lab.groundtruth.convolution`): log p_t and the
    score are finite at every cell, with relative accuracy however small p_t is, once the kernel
    sigma/alpha spans 2 cells; for narrower kernels (small t) and a resolved p0 it uses the band-limited
    kernel where p_t ≥ 1e-6·max and a log-sum-exp over log p0 refined by local cubics below (exact for
    Gaussian tails). Times whose kernel is narrower than 1e-3 cell are refused (ValueError naming the
    smallest time the grid resolves). A p0 with zeros (underflow) leaves the cells whose p_t depends on
    values below the float range unresolved: NaN, ``Solution.unresolved``, one ResolutionWarning; pass
    ``log_p0`` to avoid it. FINITE_VOLUME and SEPARABLE are second order; they solve for p, so in
    "young" tails (little added variance compared with the distance from the data: VE or any SDE at
    small t, fast-moving tails) the relative error grows like (h·|∇log p|)² and the score error there
    exceeds the bulk's; check with a finer grid (benchmarks/RESULTS.md, "Ground truth").
    LOG_DENSITY solves for log p instead: second order with an about uniform score error from the modes
    down to p ≈ 1e-60·max (1D and 2D, VE/VP/sub-VP, tests/groundtruth/test_log_density.py), but it
    needs p0 > 0: cells below 1e-100·max are raised to that floor with a ResolutionWarning, and a p0
    with jumps to zero (checkerboard) is too steep for it (RuntimeError; use FINITE_VOLUME or CONVOLUTION).

    Raises:
        ValueError: bad input, or (CONVOLUTION) a time > 0 below
        :func:`~fpe_lab.groundtruth.convolution.min_resolved_time`.

    Warns:
        BoundaryWarning: mass reaches the walls. ResolutionWarning: p0 or the kernel is not resolved,
        or cells are unresolved (one warning with their number, the times and the remedy).
    """
    if not isinstance(grid, Grid):
        raise ValueError(f"grid must be a fpe_lab.groundtruth.Grid; got {type(grid).__name__}")
    _check_sde(sde)
    t = _check_times(times)
    if (p0 is None) == (log_p0 is None):
        raise ValueError("give exactly one of p0 and log_p0 (pass p0=None to start from log_p0)")
    if log_p0 is not None:
        u0 = _check_log_p0(log_p0, grid)
        p = np.exp(u0)
        zero_log_bound = None  # log_p0 is finite: no zeros
    else:
        p, mass = _check_p0(p0, grid)
        with np.errstate(divide="ignore"):
            u0 = np.log(p)
        # a zero of the caller's p0 stands for a value below the smallest float, 5e-324, in its units
        zero_log_bound = math.log(5e-324) - math.log(mass)
    if not isinstance(method, Method):
        raise ValueError(f"method must be a Method ({', '.join(m.name for m in Method)}); got {method!r}")
    if isinstance(n_steps, bool) or not isinstance(n_steps, (int, np.integer)) or n_steps < 1:
        raise ValueError(f"n_steps must be an int >= 1; got {n_steps!r}")
    if not (isinstance(wall_tol, (int, float)) and 0 < wall_tol < 1):
        raise ValueError(f"wall_tol must be a number in (0, 1); got {wall_tol!r}")
    if method is Method.AUTO:
        method = Method.CONVOLUTION if _has_gaussian_transition(sde) else Method.FINITE_VOLUME
    p0_resolved = check_resolution(grid, p) <= CURVATURE_TOL

    log_p = np.empty((len(t), *grid.shape))
    score = np.empty((len(t), *grid.shape, grid.ndim))
    match method:
        case Method.CONVOLUTION:
            if not _has_gaussian_transition(sde):
                raise ValueError(
                    f"method=Method.CONVOLUTION needs an SDE with a Gaussian transition (a marginal(t) method); "
                    f"{type(sde).__name__} has none: use Method.FINITE_VOLUME"
                )
            _check_kernel_widths(sde, grid, t)
            bar = tqdm(t, desc="Gaussian convolution", unit="time", disable=not progress, leave=False)
            for i, ti in enumerate(bar):
                if ti == 0:
                    continue
                log_p[i], score[i], _ = convolve_marginal(*marginal_coefficients(sde, ti), u0, grid, p0_resolved,
                                                          zero_log_bound)
        case Method.FINITE_VOLUME:
            log_p[:], score[:] = _from_density(solve_density(sde, p, grid, t, int(n_steps), progress=progress)[0], grid)
        case Method.SEPARABLE:
            log_p[:], score[:] = _from_density(propagate_separable(sde, p, grid, t), grid)
        case Method.LOG_DENSITY:
            if log_p0 is None:
                u0 = initial_log_density(p)
            log_p[:], score[:] = solve_log_density(sde, u0, grid, t, int(n_steps), progress=progress)
    for j in np.flatnonzero(t == 0):
        if log_p0 is not None:
            log_p[j] = u0
        else:
            with np.errstate(divide="ignore"):
                log_p[j] = np.log(p)
        score[j] = fd_score(log_p[j], grid)

    with np.errstate(under="ignore"):
        check_walls(grid, np.exp(log_p), t, wall_tol)
    bad = ~np.isfinite(score).all(axis=-1) | ~np.isfinite(log_p)
    if bad.any():
        times_bad = [float(t[i]) for i in range(len(t)) if bad[i].any()]
        warnings.warn(
            f"{unresolved_message(int(bad.sum()), times_bad, method)} (Solution.unresolved marks them)",
            ResolutionWarning,
            stacklevel=2,
        )
    log.debug("solved %s on %s at times %s with %s", sde, grid, t.tolist(), method)
    return Solution(grid=grid, times=t, log_density=log_p, score=score, method=method)
