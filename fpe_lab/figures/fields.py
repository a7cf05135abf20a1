r"""Fields of a score model on a plotting grid: the box at time t, the score, its curl, log p_t.

Points are float64; the model is evaluated in float64 (its EMA weights cast by
:meth:`fpe_lab.figures.runs.Run.score_model`). The box at time t covers the support of
p_t = law of alpha(t) x_0 + sigma(t) z: the data box scaled by alpha(t), widened by 2.5 sigma(t).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from fpe_lab.fpe import ScoreFn, curl_2d
from fpe_lab.metrics.truth import Truth
from fpe_lab.sde import LinearSDE

__all__ = ["PlotGrid", "plot_grid", "score_on", "curl_on", "log_prob_on"]

_CHUNK = 4096  # points per model call: bounds memory of the autograd graphs


@dataclass(frozen=True)
class PlotGrid:
    """An n×n grid of points on the box [lo, hi]²; ``points`` (n², 2) float64, ``x``/``y`` axes (n,).
    Values of shape (n²,) reshape to (n, n) with rows along y (``imshow(origin="lower")`` layout)."""

    lo: float
    hi: float
    n: int

    @property
    def axis(self) -> np.ndarray:
        return np.linspace(self.lo, self.hi, self.n)

    @property
    def points(self) -> torch.Tensor:
        xx, yy = np.meshgrid(self.axis, self.axis, indexing="xy")
        return torch.from_numpy(np.stack([xx.ravel(), yy.ravel()], axis=-1))

    @property
    def extent(self) -> tuple[float, float, float, float]:
        return (self.lo, self.hi, self.lo, self.hi)

    def image(self, values: torch.Tensor | np.ndarray) -> np.ndarray:
        v = values.detach().numpy() if isinstance(values, torch.Tensor) else np.asarray(values)
        return v.reshape(self.n, self.n, *v.shape[1:])


def plot_grid(bounds, sde: LinearSDE, t: float, n: int) -> PlotGrid:
    """The square box of p_t for data in ``bounds`` ((lo, hi), (lo, hi)): half-width
    alpha(t)·max|bound| + 2.5 sigma(t) (p_t of the data box is below ~1e-3 of its peak outside)."""
    if not isinstance(n, int) or n < 4:
        raise ValueError(f"n must be an int >= 4 (points per axis); got {n!r}")
    alpha, sigma = (float(v) for v in sde.marginal(torch.tensor(t, dtype=torch.float64)))
    half = alpha * max(abs(v) for pair in bounds for v in pair) + 2.5 * sigma
    return PlotGrid(-half, half, n)


def _chunks(x: torch.Tensor):
    return x.split(_CHUNK)


def score_on(score_fn: ScoreFn, x: torch.Tensor, t: float) -> torch.Tensor:
    """s(x, t) for x (b, 2) float64; returns (b, 2) float64 without a graph."""
    out = []
    for c in _chunks(x):
        with torch.no_grad():
            out.append(score_fn(c, torch.full((c.shape[0],), t, dtype=c.dtype)).to(torch.float64))
    return torch.cat(out)


def curl_on(score_fn: ScoreFn, x: torch.Tensor, t: float) -> torch.Tensor:
    """Scalar curl ∂s_y/∂x − ∂s_x/∂y at x (b, 2); returns (b,) float64 (exact, by autograd)."""
    return torch.cat([curl_2d(score_fn, c, torch.full((c.shape[0],), t, dtype=c.dtype)).detach()
                      for c in _chunks(x)]).to(torch.float64)


def log_prob_on(truth: Truth, x: torch.Tensor, t: float) -> torch.Tensor:
    """log p_t(x) of the truth, (b,) float64."""
    return torch.cat([truth.log_prob(c, t) for c in _chunks(x)])
