r"""Exact p_t for linear SDEs: convolution of p_0 with the Gaussian transition kernel.

For f(x, t) = a(t) x the transition is x_t | x_0 ~ N(alpha x_0, sigma² I). With y = x/alpha,

    q(y) = ∫ N(y; x_0, s² I) p_0(x_0) dx_0,   s = sigma/alpha,
    p_t(x) = alpha^{−D} q(x/alpha),   ∇_x log p_t(x) = alpha^{−1} ∇_y log q(x/alpha).

p_0 is known at cell centres, so the integral is the midpoint sum over the grid; for a kernel wider
than a cell and a p_0 that decays inside the box this is spectrally accurate. The Gaussian kernel is
separable, so the sum is one dense (n_target × n_source) kernel matrix per axis applied along that
axis: n³ flops per axis, about an FFT's cost at n = 256, and it evaluates at the scaled points x/alpha
directly (no resampling). Unlike an FFT, every term is a product of nonnegative numbers, so q keeps
*componentwise relative* accuracy (no absolute round-off floor of eps·max): log p_t and the score are
exact to round-off down to p ≈ 1e-300·max. Each kernel row is shifted by its largest entry over the
support of p_0 so nothing underflows before the logarithm. The score uses the kernel's derivative
(−(y − x_0)/s²)·N, not finite differences.

When the kernel is narrower than 2 cells (small t) the midpoint sum aliases; then p_0 is taken as its
band-limited (sinc) interpolant, which a p_0 resolved by the grid is, and the kernel becomes the
Gaussian convolved with the sinc (closed form with the Faddeeva function). That kernel has signed
tails, so the result has absolute round-off ~eps·max: cells below 1e-14·max get log p = −inf and a
NaN score (the solver warns).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from fpe_lab.groundtruth.grid import Grid

__all__ = ["convolve_marginal", "marginal_coefficients"]

# Below this many cells per kernel width the midpoint sum of Gaussians aliases (its error
# ~exp(−2π²(s/h)²) is 5e-4 at s = h, 1e-34 at s = 2h); the band-limited kernel is used instead.
_BANDLIMIT_BELOW = 2.0
# ~100 eps: the round-off of a signed sum of O(n) terms of size <= max q.
_NOISE_FLOOR = 1e-14


def _apply(mat: np.ndarray, arr: np.ndarray, axis: int) -> np.ndarray:
    """Contract ``mat`` (n_out, n_in) with ``arr`` along ``axis``."""
    return np.moveaxis(np.tensordot(mat, arr, axes=(1, axis)), 0, axis)


def _kernels(y: np.ndarray, x: np.ndarray, s: float, support: np.ndarray):
    """Shifted kernel K[a, i] = exp(−((y_a − x_i)² − m_a)/(2s²)), its y-derivative, and the shift m_a/(2s²)."""
    diff = y[:, None] - x[None, :]
    sq = diff**2
    m = np.where(support[None, :], sq, np.inf).min(axis=1)
    k = np.where(support[None, :], np.exp(-(sq - m[:, None]) / (2 * s * s)), 0.0)
    return k, -diff / (s * s) * k, m / (2 * s * s)


def _bandlimited_kernels(y: np.ndarray, x: np.ndarray, s: float, h: float):
    """Kernel of the Gaussian convolved with the band-limited (sinc) interpolant of the samples.

    G(d) = (h/π) ∫_0^{K} e^{−s²k²/2} cos(kd) dk,  K = π/h,
         = h [N_s(d) − e^{−s²K²/2}/(s√(2π)) Re(e^{−iKd} w(ζ))],  ζ = (−d + i s²K)/(s√2),
    with w the Faddeeva function; G → h N_s(d) (the midpoint kernel) for s ≫ h. Returns (G, G', 0).
    """
    from scipy.special import wofz

    d = y[:, None] - x[None, :]
    kk = math.pi / h
    zeta = (-d + 1j * s * s * kk) / (s * math.sqrt(2))
    c = math.exp(-0.5 * (s * kk) ** 2) / (s * math.sqrt(2 * math.pi))
    phase = np.exp(-1j * kk * d)
    wz = wofz(zeta)
    normal = np.exp(-0.5 * (d / s) ** 2) / (s * math.sqrt(2 * math.pi))
    g = h * (normal - c * (phase * wz).real)
    dw = -2 * zeta * wz + 2j / math.sqrt(math.pi)  # w'(ζ); dζ/dd = −1/(s√2)
    dg = h * (-d / (s * s) * normal - c * (-1j * kk * phase * wz - phase * dw / (s * math.sqrt(2))).real)
    # normalised as the midpoint kernel below: divide by h·N_s's constant there
    norm = h / (s * math.sqrt(2 * math.pi))
    return g / norm, dg / norm, np.zeros(len(y))


def convolve_marginal(
    alpha: float, sigma: float, p0: np.ndarray, grid: Grid, p0_resolved: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """log p_t and ∇ log p_t on the grid for x_t = alpha x_0 + sigma z, z ~ N(0, I).

    Args:
        alpha, sigma: the marginal coefficients at t (sigma > 0).
        p0: (*grid.shape) nonnegative density normalised so that ``grid.integrate(p0) == 1``.
        p0_resolved: whether p0 is resolved by the grid (then it is band-limited and narrow kernels use
            the band-limited kernel; otherwise the positive midpoint kernel is kept, aliasing and all).
    Returns:
        log_p: (*grid.shape), −inf where q underflows below ~1e-308 of the shifted scale;
        score: (*grid.shape, D).
    """
    s = sigma / alpha
    narrow = p0_resolved and s < _BANDLIMIT_BELOW * min(grid.dx)
    kern, dkern, shift = [], [], []
    for d, x in enumerate(grid.axes):
        other = tuple(a for a in range(grid.ndim) if a != d)
        support = (p0.sum(axis=other) if other else p0) > 0
        if narrow:
            k, dk, m = _bandlimited_kernels(x / alpha, x, s, grid.dx[d])
        else:
            k, dk, m = _kernels(x / alpha, x, s, support)
        kern.append(k)
        dkern.append(dk)
        shift.append(m)

    q = p0
    for d in range(grid.ndim):
        q = _apply(kern[d], q, d)
    grads = []
    for c in range(grid.ndim):
        g = p0
        for d in range(grid.ndim):
            g = _apply(dkern[d] if d == c else kern[d], g, d)
        grads.append(g)

    total_shift = sum(np.expand_dims(m, tuple(a for a in range(grid.ndim) if a != d)) for d, m in enumerate(shift))
    dim = grid.ndim
    log_norm = math.log(grid.cell_volume) - 0.5 * dim * math.log(2 * math.pi * s * s) - dim * math.log(alpha)
    with np.errstate(divide="ignore", invalid="ignore"):
        log_p = np.log(q) - total_shift + log_norm
        score = np.stack([g / q for g in grads], axis=-1) / alpha
    if narrow:
        # The signed band-limited sum has absolute round-off ~eps·max q: below _NOISE_FLOOR·max the
        # cell carries no information; mark it (log p = −inf, score NaN; the solver warns).
        noise = q <= _NOISE_FLOOR * q.max()
        log_p[noise] = -np.inf
        score[noise] = np.nan
    return log_p, score


def marginal_coefficients(sde, t: float) -> tuple[float, float]:
    """(alpha(t), sigma(t)) of a linear SDE as floats."""
    alpha, sigma = sde.marginal(torch.tensor(float(t), dtype=torch.float64))
    return float(alpha), float(sigma)
