"""The result of a ground-truth solve: p_t, log p_t and ∇ log p_t on a grid at the solved times."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch
from scipy.interpolate import RegularGridInterpolator

from fpe_lab.groundtruth.grid import Grid

if TYPE_CHECKING:
    from fpe_lab.groundtruth.solver import Method

__all__ = ["Solution"]

# Requested t matches a solved time within this: times are stored as float64 copies of the caller's
# numbers, so anything above round-off is a different time.
_TIME_ATOL = 1e-12


@dataclass(frozen=True)
class Solution:
    """Fields of the FPE solution on ``grid`` at ``times``.

    Attributes:
        grid: the grid.
        times: (T,) solved times, increasing.
        log_density: (T, *grid.shape) log p_t (natural log), finite except at unresolved cells.
        score: (T, *grid.shape, D) ∇_x log p_t, finite except at unresolved cells.
        method: the scheme that produced it (a :class:`~fpe_lab.groundtruth.solver.Method`).
    ``density`` is exp(log_density), shape (T, *grid.shape), integrating to ~1 over the box.
    ``unresolved`` (T, *grid.shape) bool marks the cells whose log p_t or score is not finite (NaN, or
    −inf where p0 or a p-based solver's p_t is 0); the solver warns once when there are any.
    """

    grid: Grid
    times: np.ndarray
    log_density: np.ndarray
    score: np.ndarray
    method: Method
    _interp: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def density(self) -> np.ndarray:
        with np.errstate(under="ignore"):
            return np.exp(self.log_density)

    @property
    def unresolved(self) -> np.ndarray:
        """(T, *grid.shape) bool: log p_t or a score component is not finite there."""
        return ~np.isfinite(self.log_density) | ~np.isfinite(self.score).all(axis=-1)

    def _time_index(self, t) -> int:
        t = float(t)
        hit = np.flatnonzero(np.abs(self.times - t) <= _TIME_ATOL)
        if hit.size == 0:
            raise ValueError(f"t must be one of the solved times {self.times.tolist()}; got {t!r}")
        return int(hit[0])

    def _points(self, x) -> tuple[np.ndarray, torch.Tensor | None]:
        like = x if isinstance(x, torch.Tensor) else None
        pts = x.detach().cpu().to(torch.float64).numpy() if like is not None else np.asarray(x, dtype=np.float64)
        if pts.ndim != 2 or pts.shape[1] != self.grid.ndim:
            raise ValueError(f"x must have shape (n, {self.grid.ndim}); got shape {pts.shape}")
        if not np.all(np.isfinite(pts)):
            raise ValueError("x must be finite")
        for d, (lo, hi) in enumerate(self.grid.bounds):
            if pts.shape[0] and (pts[:, d].min() < lo or pts[:, d].max() > hi):
                raise ValueError(
                    f"x[:, {d}] must lie in the grid box [{lo}, {hi}]; got values in "
                    f"[{pts[:, d].min():g}, {pts[:, d].max():g}]"
                )
        return pts, like

    def _interpolator(self, key: str, i: int) -> RegularGridInterpolator:
        if (key, i) not in self._interp:
            values = self.log_density[i] if key == "log" else self.score[i]
            # Cubic along each axis (4th-order accurate interpolation of smooth fields); points between the
            # outermost cell centre and the wall (half a cell) use the boundary cubic.
            self._interp[(key, i)] = RegularGridInterpolator(
                self.grid.axes, values, method="cubic", bounds_error=False, fill_value=None
            )
        return self._interp[(key, i)]

    @staticmethod
    def _out(values: np.ndarray, like: torch.Tensor | None):
        if like is None:
            return values
        return torch.as_tensor(values, dtype=torch.float64, device=like.device)

    def log_prob_at(self, x, t):
        """log p_t at points x of shape (n, D) inside the box; t one of ``times``. Returns (n,),
        numpy for numpy/array-like x, torch float64 (on x's device) for torch x."""
        pts, like = self._points(x)
        return self._out(self._interpolator("log", self._time_index(t))(pts), like)

    def score_at(self, x, t):
        """∇_x log p_t at points x of shape (n, D); returns (n, D), numpy or torch float64 like x."""
        pts, like = self._points(x)
        return self._out(self._interpolator("score", self._time_index(t))(pts), like)
