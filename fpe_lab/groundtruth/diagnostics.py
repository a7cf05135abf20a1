"""Warnings a ground-truth solve raises when its answer cannot be trusted.

* :class:`BoundaryWarning`: mass reaches the walls of the box. The finite-volume solver has zero-flux
  walls (mass piles up there instead of leaving), the convolution is free space (mass leaves the box);
  either way the solution near the wall is not the free-space p_t.
* :class:`ResolutionWarning`: the grid does not resolve the initial density or the transition kernel,
  or a field lost positivity/finiteness (negative p, log p = −inf where p underflowed).

They are ``UserWarning`` subclasses so callers can filter them or turn them into errors
(``warnings.simplefilter("error", BoundaryWarning)``).
"""

from __future__ import annotations

import warnings

import numpy as np

from fpe_lab.groundtruth.grid import Grid

__all__ = [
    "BoundaryWarning",
    "ResolutionWarning",
    "SolverBreakdown",
    "WALL_TOL",
    "CURVATURE_TOL",
    "check_walls",
    "check_resolution",
]

# p/max on the wall cells above which the walls change p_t noticeably; docs/conventions.md asks for
# p/max <~ 1e-16 at the walls; 1e-12 keeps the wall's effect below the tail accuracy we claim.
WALL_TOL = 1e-12
# max |h² Δ_h p0| / max p0 above which p0 is not resolved: a Gaussian of width w has h²|p''|/p = h²/w²
# at its mode, so 0.5 flags widths below ~1.4 cells (the SG/FD truncation error is then O(1)).
CURVATURE_TOL = 0.5


class BoundaryWarning(UserWarning):
    """Mass reaches the boundary of the box: enlarge ``Grid.bounds``."""


class ResolutionWarning(UserWarning):
    """The grid does not resolve p0 or the kernel, or a field lost positivity/finiteness."""


class SolverBreakdown(RuntimeError):
    """A time-stepping solve broke down (singular system, non-finite values); the message says what to change."""


def check_walls(grid: Grid, density: np.ndarray, times: np.ndarray, tol: float = WALL_TOL) -> float:
    """Warn when max over wall cells of p_t / max p_t exceeds ``tol`` at any time.

    ``density`` has shape (T, *grid.shape) (NaN at unresolved cells, which are left out); returns the
    worst ratio.
    """
    worst, worst_t = 0.0, None
    for p, t in zip(density, times):
        if not np.isfinite(p).any():
            continue
        # unresolved cells (NaN) are left out: the solver reports them separately
        peak = float(np.nanmax(p))
        walls = [np.abs(np.take(p, idx, axis=d)) for d in range(grid.ndim) for idx in (0, -1)]
        wall = max((float(np.nanmax(w)) for w in walls if np.isfinite(w).any()), default=0.0)
        ratio = wall / peak if peak > 0 else np.inf
        if ratio > worst:
            worst, worst_t = ratio, float(t)
    if worst > tol:
        warnings.warn(
            f"mass reaches the boundary: p/max = {worst:.3g} on the walls at t = {worst_t:g} "
            f"(allowed <= {tol:g}); enlarge the grid bounds {grid.bounds}",
            BoundaryWarning,
            stacklevel=3,
        )
    return worst


def check_resolution(grid: Grid, p0: np.ndarray, tol: float = CURVATURE_TOL) -> float:
    """Warn when p0 varies on the scale of a cell: max |Σ_d (p[i+1] − 2p[i] + p[i−1])| / max p > tol.

    Returns that ratio.
    """
    curv = np.zeros_like(p0)
    for d in range(grid.ndim):
        second = np.diff(p0, n=2, axis=d)
        sl = [slice(None)] * grid.ndim
        sl[d] = slice(1, -1)
        curv[tuple(sl)] += second
    ratio = float(np.abs(curv).max() / p0.max())
    if ratio > tol:
        warnings.warn(
            f"the grid does not resolve p0: max |h² Δp0| / max p0 = {ratio:.3g} > {tol:g}, i.e. p0 varies "
            f"within ~1 cell (cells {grid.dx}); refine the grid or smooth p0",
            ResolutionWarning,
            stacklevel=3,
        )
    return ratio
