r"""Exact separable propagators after a time change, for generators of the form c(t)·L₀.

For a linear SDE f = a(t) x whose coefficients satisfy a(t) = −kappa·c(t) with c = ½g² (VP: kappa = 1,
c = beta/2; VE: kappa = 0), the FPE is

    ∂_t p = c(t) L₀ p,   L₀ p = Σ_d ∂_d (kappa x_d p + ∂_d p),

one constant operator in the new time theta(t) = ∫_0^t c. L₀ is a sum of commuting one-axis
operators, so with the Scharfetter–Gummel discretisation A_d of each axis (D = 1, v = −kappa x)

    P_t = U_1 P_0 U_2ᵀ,   U_d = expm(theta(t) A_d)   (n × n dense, a few n³ products).

This is the same spatial discretisation as the finite-volume solver without any time-stepping error,
and it serves every t from one matrix per axis. Its limit: a dense matrix exponential has absolute
round-off ~eps·max in its entries, so p (and the score) lose accuracy where p ≲ 1e-13·max; cells at or
below that round-off are floored at the smallest positive float (their log p is not meaningful). Use
the convolution (exact) or the finite-volume solver (relative accuracy) for the far tails.
sub-VP (g² not proportional to a) does not have this form and is rejected.
"""

from __future__ import annotations

import numpy as np
import scipy.linalg
import torch
from scipy.integrate import cumulative_simpson

from fpe_lab.groundtruth.finite_volume import bernoulli, diffusion_squared
from fpe_lab.groundtruth.grid import Grid

__all__ = ["time_change", "propagate_separable"]

# a(t) = −kappa c(t) must hold to this relative accuracy (float64 evaluation of the schedules).
_RATIO_RTOL = 1e-9


def time_change(sde, t_max: float) -> tuple[float, np.ndarray, np.ndarray]:
    """(kappa, fine times, theta at those times) with a(t) = −kappa ½g²(t) and theta = ∫ ½g².

    Raises ValueError when the SDE has no ``drift_coef`` or a/c is not constant on [0, t_max].
    """
    drift_coef = getattr(sde, "drift_coef", None)
    if not callable(drift_coef):
        raise ValueError(
            f"method=Method.SEPARABLE needs a linear SDE with drift_coef(t); {type(sde).__name__} has none"
        )
    ts = np.linspace(0.0, max(t_max, 1e-12), 4097)
    c = 0.5 * diffusion_squared(sde, ts)
    a = np.asarray(drift_coef(torch.as_tensor(ts)), dtype=np.float64).reshape(-1)
    positive = c > 0
    kappa = float(np.median(-a[positive] / c[positive])) if positive.any() else 0.0
    if np.abs(a + kappa * c).max() > _RATIO_RTOL * max(np.abs(a).max(), np.abs(c).max()):
        raise ValueError(
            "method=Method.SEPARABLE needs a generator c(t)·L0, i.e. drift_coef(t) = −kappa·½g(t)² with a "
            f"constant kappa; {type(sde).__name__} has a/(½g²) varying in [{(-a[positive] / c[positive]).min():.3g}, "
            f"{(-a[positive] / c[positive]).max():.3g}] (sub-VP is not of this form): use FINITE_VOLUME"
        )
    theta = cumulative_simpson(c, x=ts, initial=0.0)  # 4097 nodes: quadrature error far below round-off
    return kappa, ts, theta


def _generator_1d(n: int, h: float, lo: float, kappa: float) -> np.ndarray:
    """Dense SG generator of ∂_x(kappa x p + ∂_x p) with zero-flux walls, shape (n, n)."""
    faces = lo + h * np.arange(1, n)
    pe = -kappa * faces * h  # v h / D with D = 1
    right, left = bernoulli(-pe) / h**2, bernoulli(pe) / h**2
    a = np.zeros((n, n))
    i = np.arange(n - 1)
    a[i + 1, i] += right
    a[i, i] -= right
    a[i, i + 1] += left
    a[i + 1, i + 1] -= left
    return a


def propagate_separable(sde, p0: np.ndarray, grid: Grid, times: np.ndarray) -> np.ndarray:
    """p_t at ``times`` (shape (T, *grid.shape)) by the time-changed exact separable propagator."""
    kappa, ts, theta = time_change(sde, float(times[-1]))
    gens = [_generator_1d(n, h, lo, kappa) for n, h, (lo, _) in zip(grid.shape, grid.dx, grid.bounds)]
    out = np.empty((len(times), *grid.shape))
    for j, t in enumerate(times):
        th = float(np.interp(t, ts, theta))
        p = p0
        for d, gen in enumerate(gens):
            u = scipy.linalg.expm(th * gen)
            p = np.moveaxis(np.tensordot(u, p, axes=(1, d)), 0, d)
        out[j] = np.maximum(p, np.finfo(np.float64).tiny)
    return out
