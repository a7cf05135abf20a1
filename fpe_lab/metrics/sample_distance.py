r"""Distances between two sample sets, and their noise floor.

* Sliced Wasserstein-2 (Bonneel et al. 2015):

      SW₂(P, Q)² = E_θ W₂(θ·P, θ·Q)²,   θ uniform on the unit sphere S^{D−1},

  estimated with ``n_projections`` random directions; each 1-D W₂ between the empirical measures of
  the projections is computed *exactly* (quantile functions, unequal sizes allowed). For a pure
  shift Q = P + δ, SW₂² = ‖δ‖²/D.
* MMD with the Gaussian kernel k(x, y) = (1/L) Σ_ℓ exp(−‖x − y‖² / (2ℓ²)) over ``bandwidths`` ℓ
  (Gretton et al. 2012), the unbiased U-statistic estimate of

      MMD² = E k(X, X') + E k(Y, Y') − 2 E k(X, Y).

  It can be slightly negative when P = Q.

Both are biased by finite samples: two independent sets from the *same* distribution have distance
> 0. :func:`noise_floor` measures that floor, the value a perfect sampler would score at that size.
Samples have shape (n, *dims) and are flattened to (n, D).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

__all__ = ["sliced_wasserstein", "GaussianKernel", "mmd2", "Floor", "noise_floor"]


def _flat(x: torch.Tensor, name: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor) or x.ndim < 2 or x.shape[0] < 2:
        raise ValueError(f"{name} must be a tensor of shape (n, *dims) with n >= 2; got "
                         f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
    if not torch.isfinite(x).all():
        raise ValueError(f"{name} must be finite; got non-finite entries")
    return x.reshape(x.shape[0], -1).to(torch.float64)


def _pair(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = _flat(x, "x"), _flat(y, "y")
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"x and y must have the same number of coordinates; got {x.shape[1]} and {y.shape[1]}")
    return x, y


def _w2_squared_1d(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Exact W₂² between empirical measures, batched: a (P, n), b (P, m) -> (P,).

    W₂² = ∫_0^1 (F_a⁻¹(u) − F_b⁻¹(u))² du; both quantile functions are constant between the
    breakpoints {i/n} ∪ {j/m}, so the integral is a finite sum.
    """
    a, _ = a.sort(dim=-1)
    b, _ = b.sort(dim=-1)
    n, m = a.shape[-1], b.shape[-1]
    if n == m:
        return (a - b).pow(2).mean(-1)
    levels = torch.cat([torch.arange(1, n + 1, dtype=a.dtype) / n, torch.arange(1, m + 1, dtype=a.dtype) / m])
    levels = torch.unique(levels)  # sorted, ends at 1
    widths = torch.diff(levels, prepend=levels.new_zeros(1))
    mid = levels - widths / 2
    ia = torch.clamp(torch.ceil(mid * n).long() - 1, 0, n - 1)
    ib = torch.clamp(torch.ceil(mid * m).long() - 1, 0, m - 1)
    return ((a[:, ia] - b[:, ib]).pow(2) * widths).sum(-1)


def sliced_wasserstein(
    x: torch.Tensor, y: torch.Tensor, *, n_projections: int = 256, generator: torch.Generator | None = None
) -> float:
    """SW₂(x, y) = sqrt(mean_θ W₂(θ·x, θ·y)²) over ``n_projections`` uniform directions θ.

    x: (n, *dims), y: (m, *dims); the directions come from ``generator`` (fix it to compare runs).
    """
    if not isinstance(n_projections, int) or n_projections < 1:
        raise ValueError(f"n_projections must be an int >= 1; got {n_projections!r}")
    x, y = _pair(x, y)
    theta = torch.randn(n_projections, x.shape[1], generator=generator, dtype=torch.float64)
    theta = theta / theta.norm(dim=-1, keepdim=True)
    return math.sqrt(float(_w2_squared_1d(theta @ x.T, theta @ y.T).mean()))


@dataclass(frozen=True)
class GaussianKernel:
    """k(x, y) = (1/L) Σ_ℓ exp(−‖x − y‖² / (2ℓ²)) over the bandwidths ℓ (a characteristic kernel)."""

    bandwidths: tuple[float, ...] = (0.1, 0.2, 0.5, 1.0, 2.0)

    def __post_init__(self) -> None:
        bw = tuple(self.bandwidths)
        if not bw or not all(isinstance(b, (int, float)) and math.isfinite(b) and b > 0 for b in bw):
            raise ValueError(f"bandwidths must be a nonempty tuple of finite positive numbers; got {self.bandwidths!r}")
        object.__setattr__(self, "bandwidths", tuple(float(b) for b in bw))

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Gram matrix k(x_i, y_j) for x (n, D), y (m, D): shape (n, m)."""
        sq = torch.cdist(x, y).pow(2)
        total = torch.zeros_like(sq)
        for b in self.bandwidths:
            total = total + torch.exp(-sq / (2 * b * b))
        return total / len(self.bandwidths)


def mmd2(x: torch.Tensor, y: torch.Tensor, *, kernel: GaussianKernel = GaussianKernel()) -> float:
    """Unbiased MMD² estimate between x (n, *dims) and y (m, *dims) under ``kernel``.

    (1/(n(n−1))) Σ_{i≠i'} k(x_i, x_i') + (1/(m(m−1))) Σ_{j≠j'} k(y_j, y_j') − (2/(nm)) Σ_{i,j} k(x_i, y_j).
    """
    x, y = _pair(x, y)
    n, m = x.shape[0], y.shape[0]
    kxx, kyy, kxy = kernel(x, x), kernel(y, y), kernel(x, y)
    return float((kxx.sum() - kxx.diagonal().sum()) / (n * (n - 1))
                 + (kyy.sum() - kyy.diagonal().sum()) / (m * (m - 1))
                 - 2 * kxy.mean())


@dataclass(frozen=True)
class Floor:
    """Mean and standard deviation of a distance between independent same-law sample sets."""

    mean: float
    std: float
    repeats: int


def noise_floor(
    sample: Callable[[int, torch.Generator | None], torch.Tensor],
    n: int,
    distance: Callable[[torch.Tensor, torch.Tensor], float],
    *,
    repeats: int = 3,
    generator: torch.Generator | None = None,
) -> Floor:
    """The distance between two independent sets of n samples of one law, over ``repeats`` pairs.

    ``sample(n, generator) -> (n, *dims)``; ``distance(x, y) -> float`` (e.g. a partial of
    :func:`sliced_wasserstein` with a fixed generator). A sampler that matches the law exactly scores
    about ``mean`` against n held-out samples.
    """
    if not isinstance(n, int) or n < 2:
        raise ValueError(f"n must be an int >= 2; got {n!r}")
    if not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats must be an int >= 1; got {repeats!r}")
    vals = torch.tensor([distance(sample(n, generator), sample(n, generator)) for _ in range(repeats)],
                        dtype=torch.float64)
    std = float(vals.std()) if repeats > 1 else 0.0
    return Floor(float(vals.mean()), std, repeats)
