"""Uniform cell-centred grids in 1D and 2D, the domain of the ground-truth solvers."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

__all__ = ["Grid", "MIN_CELLS"]

MIN_CELLS = 8


@dataclass(frozen=True)
class Grid:
    """Cells of width dx_d = (hi_d − lo_d)/n_d on the box Π_d [lo_d, hi_d]; values live at cell centres.

    Args:
        bounds: ((lo, hi),) in 1D or ((lo_x, hi_x), (lo_y, hi_y)) in 2D, lo < hi, finite.
        shape: (n,) or (n_x, n_y), at least ``MIN_CELLS`` cells per axis.
    Arrays on the grid have shape ``grid.shape`` with axis d the d-th coordinate ("ij" indexing).
    """

    bounds: tuple[tuple[float, float], ...]
    shape: tuple[int, ...]

    def __post_init__(self) -> None:
        try:
            bounds = tuple((float(lo), float(hi)) for lo, hi in self.bounds)
        except (TypeError, ValueError):
            raise ValueError(f"bounds must be a sequence of (lo, hi) pairs; got {self.bounds!r}") from None
        shape = tuple(self.shape)
        if len(bounds) not in (1, 2):
            raise ValueError(f"bounds must describe 1 or 2 axes; got {len(bounds)} axes: {self.bounds!r}")
        if len(shape) != len(bounds):
            raise ValueError(f"shape must have one entry per axis ({len(bounds)}); got shape={self.shape!r}")
        for d, ((lo, hi), n) in enumerate(zip(bounds, shape)):
            if not (math.isfinite(lo) and math.isfinite(hi)) or lo >= hi:
                raise ValueError(f"bounds[{d}] must be finite with lo < hi; got ({lo}, {hi})")
            if not isinstance(n, (int, np.integer)) or n < MIN_CELLS:
                raise ValueError(f"shape[{d}] must be an int >= {MIN_CELLS} cells; got {n!r}")
        object.__setattr__(self, "bounds", bounds)
        object.__setattr__(self, "shape", tuple(int(n) for n in shape))

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def dx(self) -> tuple[float, ...]:
        """Cell widths per axis."""
        return tuple((hi - lo) / n for (lo, hi), n in zip(self.bounds, self.shape))

    @property
    def axes(self) -> tuple[np.ndarray, ...]:
        """Cell-centre coordinates per axis, each of shape (n_d,)."""
        return tuple(lo + (np.arange(n) + 0.5) * h for (lo, _), n, h in zip(self.bounds, self.shape, self.dx))

    @property
    def coords(self) -> np.ndarray:
        """Cell centres, shape (*shape, D)."""
        return np.stack(np.meshgrid(*self.axes, indexing="ij"), axis=-1)

    @property
    def cell_volume(self) -> float:
        return float(np.prod(self.dx))

    def integrate(self, values: np.ndarray) -> float | np.ndarray:
        """Midpoint-rule integral over the box of ``values`` with trailing axes ``shape``."""
        axes = tuple(range(-self.ndim, 0))
        return values.sum(axis=axes) * self.cell_volume
