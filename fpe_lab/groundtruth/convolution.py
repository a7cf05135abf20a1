r"""Exact p_t for linear SDEs: convolution of p_0 with the Gaussian transition kernel, in log space.

For f(x, t) = a(t) x the transition is x_t | x_0 ~ N(alpha x_0, sigma² I). With y = x/alpha and
s = sigma/alpha,

    q(y) = ∫ N(y; x_0, s² I) p_0(x_0) dx_0,      p_t(x) = alpha^{−D} q(x/alpha),
    ∇_x log p_t(x) = alpha^{−1} (E[x_0 | y] − y)/s²,
    E[x_0,d | y] = lo_d + ∫ (x_0,d − lo_d) N(y; x_0, s² I) p_0(x_0) dx_0 / q(y),

with lo_d the lower wall of the box, so that every integrand is a positive kernel times a positive
density. Each integral is therefore computed as a log-sum-exp: log q and the log numerators are finite
wherever any mass reaches, however far below 1e-308·max p_t falls (no −inf, no NaN score). The kernel
is separable, so the integrals are taken one axis at a time (a D-dimensional sum as D sums of one axis).

**Wide kernels (s ≥ 2 cells, or a p_0 the grid does not resolve).** The integral is the midpoint sum
over the cell centres; for a kernel wider than 2 cells and a p_0 that decays inside the box this is
spectrally accurate (error ~exp(−2π²(s/h)²) ≤ 1e-34). Per axis it is one dense product
exp(k − m_a) @ exp(u − n_c), k the log kernel (targets a × cells i), u the log density (cells i ×
other axes c), m_a and n_c their row and column maxima. Every term is a product of two numbers in
(0, 1], so the sum has componentwise relative accuracy unless terms underflowed: a sum below 1e-280
(where the ≤ n·2.2e-308 lost to underflow could exceed 1e-24 of it) is recomputed exactly by
log-sum-exp over its row of terms.

**Narrow kernels (s < 2 cells) and a resolved p_0.** The midpoint sum aliases (error 5e-4 at s = h,
O(1) below). Two sums replace it:

* the band-limited kernel: p_0 is taken as its band-limited (sinc) interpolant, which a p_0 resolved
  by the grid is, and the kernel becomes the Gaussian convolved with the sinc (closed form with the
  Faddeeva function). It has signed tails, so a result has an absolute round-off ~eps·max of what is
  summed: it is kept where it is ≥ 1e-6 of that maximum;
* below, the refined log-space sum: log p_0 is interpolated by local cubics (the Lagrange cubic through
  the 4 nearest cell centres) onto a fine grid of spacing h/r ≤ s/3 (r odd, so the cell centres are fine
  points), and the midpoint log-sum-exp is taken over the fine points within R = s·sqrt(2(U − L + 60))
  of y, U an upper bound of the interpolant and L the log integrand at the fine point nearest y (the
  points outside hold less than e^{−60} of the sum). Exact for Gaussian tails (log p_0 quadratic); in
  general its error is O(h⁴ ∂⁴ log p_0).

Both work one axis at a time: the axis-d sum of every column (the other axes) is scaled by that column's
maximum, summed band-limited, and (target, column) pairs below 1e-6 of the column's maximum are
recomputed by the refined sum; then cells where the whole-grid band-limited q is ≥ 1e-6·max q take the
D-dimensional band-limited sums (score from the kernel's derivative). The score numerator along axis d
uses the weight x_0,d − y_d + c_d (c_d ≥ every window radius, so it is ≥ 0 where it counts), which keeps
the cancellation in E[x_0 | y] − y at ~eps·c/s².

Accuracy, measured (tests/groundtruth/test_convolution.py): 1-D mixtures, kernels of 0.02–0.6 cells,
score error ≤ 4e-9 down to e^{−130}·max; 2-D, ≤ 1e-9 where p ≥ 1e-6·max. In 2-D far tails log p_0 has
kinks narrower than a cell where the tails of two components (or two squares of the checkerboard) cross;
no interpolation of the samples follows them, and the score error there is a few % of |score| (2-D
mixture at t = 0.01, 128²: 3%; checkerboard at t = 0.01, 256²: ≤ 0.18 on scores of 15–100, in 2% of the
cells, all below 1e-12·max). Walls: within ~8 s of a wall the box cuts p_0 off, as for every solver here.
Cost: ~n³ per axis like the dense products, plus ~250 fine points per refined pair (0.8 s for the
checkerboard at 256², t = 0.01; 12 s at 512², t = 0.001).

**Zeros in p_0.** A cell where p_0 = 0 may be a true zero or an underflow of a smooth density. Both
readings are computed — zeros as 0 (and, in the narrow-kernel tails, as unknown: the fine points whose
cubic stencil touches a zero are left out) and zeros as the largest value they could have had (5e-324 in
the caller's units) — and a cell where the two differ by more than 1e-10 in log q or in a log numerator
is *unresolved*: its log p_t and score are set to NaN and reported in the mask that
:func:`convolve_marginal` returns. Passing the exact ``log_p0`` (finite everywhere) leaves no cell
unresolved.

**Limits.** The kernel must span at least ``MIN_KERNEL_CELLS`` = 1e-3 cell: below, the band-limited
kernel's two terms of size ~h/s cancel to ~eps·h/s (1e-13 at the limit), and p_t is p_0 pushed by
alpha to within the grid's resolution anyway (t = 0 returns p_0 itself). :func:`min_resolved_time`
gives the smallest such time; the solver refuses earlier ones.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from scipy.special import logsumexp

from fpe_lab.groundtruth.grid import Grid

__all__ = ["convolve_marginal", "marginal_coefficients", "min_resolved_time", "MIN_KERNEL_CELLS"]

# Below this many cells per kernel width the midpoint sum of Gaussians aliases (its error
# ~exp(−2π²(s/h)²) is 5e-4 at s = h, 1e-34 at s = 2h); the band-limited kernel is used instead.
_BANDLIMIT_BELOW = 2.0
# A band-limited sum is kept where it is ≥ this·the maximum summed. Its absolute round-off ~1e-16·max
# grows relative to it below; measured on the 1-D mixture (VE, VP, t = 0.001 … 0.03, 256 cells) the
# refined log-space sum is the more accurate of the two below ~1e-6·max (score errors ≤ 1e-8 either side).
_BANDLIMIT_TRUST = 1e-6
# Smallest kernel width s = sigma/alpha in cells: the band-limited kernel subtracts two terms of size
# ~h/s, so its round-off is ~eps·h/s (2e-13 here); the solver refuses earlier times.
MIN_KERNEL_CELLS = 1e-3
# A dense sum of exp-shifted terms below this may have lost up to n·2.2e-308 to underflow (< 1e-24 of it
# for n ≤ 4096 cells): it is recomputed by an exact log-sum-exp.
_SAFE_SUM = 1e-280
# Fine spacing of the narrow-kernel tails: h/r ≤ s/_FINE_PER_S; the midpoint error of a Gaussian
# integrand of width s is then ~exp(−2π²·9) ≈ 1e-77.
_FINE_PER_S = 3.0
# Fine points whose log integrand is this far below L are left out (they hold < e^{−60}·n·r of the sum).
_WINDOW_MARGIN = 60.0
# A cell is unresolved when the zeros-as-0 and zeros-as-bound answers differ by more than this in log.
_UNKNOWN_RTOL = 1e-10
# log of the smallest positive float64: a value that underflowed to 0 was below it.
_LOG_TINY = math.log(5e-324)
# Elements per work array of the log-sum-exp fallbacks (~16 MiB of float64).
_CHUNK = 1 << 21


def _apply(mat: np.ndarray, arr: np.ndarray, axis: int) -> np.ndarray:
    """Contract ``mat`` (n_out, n_in) with ``arr`` along ``axis``."""
    return np.moveaxis(np.tensordot(mat, arr, axes=(1, axis)), 0, axis)


# ---------------------------------------------------------------------- wide kernels: dense log-sum-exp
def _log_matmul(logk: np.ndarray, u: np.ndarray) -> np.ndarray:
    """log Σ_i exp(logk[a, i] + u[i, c]) for logk (m, n) finite and u (n, C) (−inf allowed); (m, C)."""
    m = logk.max(axis=1)
    ncol = u.max(axis=0)
    has = np.isfinite(ncol)
    shift = np.where(has, ncol, 0.0)
    with np.errstate(divide="ignore", under="ignore", over="ignore", invalid="ignore"):
        total = np.exp(logk - m[:, None]) @ np.exp(u - shift[None, :])
        out = np.log(total) + m[:, None] + np.where(has, ncol, -np.inf)[None, :]
    redo = (total < _SAFE_SUM) & has[None, :]
    if redo.any():
        a, c = np.nonzero(redo)
        step = max(1, _CHUNK // logk.shape[1])
        with np.errstate(divide="ignore"):
            for k in range(0, len(a), step):
                aa, cc = a[k : k + step], c[k : k + step]
                out[aa, cc] = logsumexp(logk[aa] + u[:, cc].T, axis=1)
    return out


def _log_along(u: np.ndarray, axis: int, logk: np.ndarray) -> np.ndarray:
    """:func:`_log_matmul` along ``axis`` of an array of any rank."""
    moved = np.moveaxis(u, axis, 0)
    out = _log_matmul(logk, moved.reshape(moved.shape[0], -1))
    return np.moveaxis(out.reshape(logk.shape[0], *moved.shape[1:]), 0, axis)


def _log_kernel(y: np.ndarray, x: np.ndarray, s: float, h: float) -> np.ndarray:
    """log of h N(y_a − x_i; 0, s²), shape (len(y), len(x))."""
    return -((y[:, None] - x[None, :]) ** 2) / (2 * s * s) + math.log(h) - 0.5 * math.log(2 * math.pi * s * s)


def _wide(u: np.ndarray, grid: Grid, ys, s: float) -> tuple[np.ndarray, list[np.ndarray]]:
    """(log q, [log numerator_d]) by midpoint log-sum-exp sums, axis by axis; each of grid.shape. The
    numerator of axis d has the weight x_0,d − lo_d (the wall: ≥ h/2 > 0 at every cell)."""
    q = u
    nums: list[np.ndarray] = []
    for d, (x, h, (lo, _)) in enumerate(zip(grid.axes, grid.dx, grid.bounds)):
        logk = _log_kernel(ys[d], x, s, h)
        nums = [_log_along(v, d, logk) for v in nums]
        nums.append(_log_along(q, d, logk + np.log(x - lo)[None, :]))
        q = _log_along(q, d, logk)
    return q, nums


# ---------------------------------------------------------------------- narrow kernels
def _bandlimited_kernels(y: np.ndarray, x: np.ndarray, s: float, h: float):
    """Kernel of the Gaussian convolved with the band-limited (sinc) interpolant of the samples.

    G(d) = (h/π) ∫_0^{K} e^{−s²k²/2} cos(kd) dk,  K = π/h,
         = h [N_s(d) − e^{−s²K²/2}/(s√(2π)) Re(e^{−iKd} w(ζ))],  ζ = (−d + i s²K)/(s√2),
    with w the Faddeeva function; G → h N_s(d) (the midpoint kernel) for s ≫ h. Returns (G, G'),
    both divided by h/(s√(2π)) (the midpoint kernel's constant).
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
    norm = h / (s * math.sqrt(2 * math.pi))
    return g / norm, dg / norm


def _lse(v: np.ndarray) -> np.ndarray:
    """log Σ exp(v) along the last axis (−inf entries allowed; an all −inf row gives −inf)."""
    m = v.max(axis=-1)
    safe = np.where(np.isfinite(m), m, 0.0)
    with np.errstate(divide="ignore", under="ignore"):
        return np.log(np.exp(v - safe[..., None]).sum(axis=-1)) + np.where(np.isfinite(m), m, -np.inf)


def _stencil(tau: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Base node i0 (the stencil is i0−1 … i0+2) and the 4 Lagrange cubic weights at tau = (x − x_0)/h."""
    i0 = np.clip(np.floor(tau).astype(np.int64), 1, n - 3)
    t = tau - i0
    w = np.stack([-t * (t - 1) * (t - 2) / 6, (t + 1) * (t - 1) * (t - 2) / 2,
                  -(t + 1) * t * (t - 2) / 2, (t + 1) * t * (t - 1) / 6])
    return i0, w


def _cubic(u: np.ndarray, col: np.ndarray, i0: np.ndarray, w: np.ndarray) -> np.ndarray:
    """The cubic through u[i0−1 … i0+2, col] at the weights w; −inf where a stencil value is not finite."""
    vals = np.stack([u[i0 + k - 1, col] for k in range(4)])
    ok = np.isfinite(vals).all(axis=0)
    return np.where(ok, (w * np.where(np.isfinite(vals), vals, 0.0)).sum(axis=0), -np.inf)


def _cubic_bound(u: np.ndarray) -> np.ndarray:
    """Per column an upper bound of the cubic interpolant of u (n, C) (finite) over the fine grid.

    On a stencil with values in [m, M] the cubic is ≤ M + ((Σ|w| − 1)/2)(M − m); Σ|w| ≤ 1.25 on the middle
    interval, 1.625 on the outer ones and 6 at the half-cell extrapolations next to the walls.
    """
    n = u.shape[0]
    win = np.stack([u[k : n - 3 + k] for k in range(4)])  # (4, n − 3, C): stencils j … j+3
    hi, lo = win.max(axis=0), win.min(axis=0)
    excess = np.full(n - 3, 0.3125)
    excess[[0, -1]] = 2.5
    return (hi + excess[:, None] * (hi - lo)).max(axis=0)


class _Windows:
    """The refined fine grid of one axis and, per pair p = (target y_p, column col_p), the window of fine
    points that holds all but e^{−60} of its sums (module docstring).

    ``u`` (n, C) is the finite log density along the axis that sets the windows; ``radius`` (P,) is the
    window's half-width, at least the distance from y_p to any fine point that matters.
    """

    def __init__(self, u: np.ndarray, y: np.ndarray, col: np.ndarray, x: np.ndarray, h: float, lo: float, s: float):
        n = len(x)
        r = max(1, math.ceil(_FINE_PER_S * h / s))
        self.r = r + 1 - r % 2  # odd: the cell centres are fine points
        self.n, self.hf, self.nf, self.lo, self.s = n, h / self.r, n * self.r, lo, s
        self.y, self.col = y, col
        # the weighted sums carry a weight ≤ (box + window) against ≥ s where they matter: a few more e-folds
        margin = _WINDOW_MARGIN + math.log(1 + (x[-1] - x[0] + h) / s)
        fstar = np.clip(np.rint((y - lo) / self.hf - 0.5), 0, self.nf - 1).astype(np.int64)
        i0, w = self.stencil(fstar)
        lead = _cubic(u, col, i0, w) - (self.fine_x(fstar) - y) ** 2 / (2 * s * s)
        self.radius = s * np.sqrt(2 * np.maximum(_cubic_bound(u)[col] - lead + margin, 0.0))
        start = np.clip(np.ceil((y - self.radius - lo) / self.hf - 0.5), 0, self.nf - 1).astype(np.int64)
        stop = np.clip(np.floor((y + self.radius - lo) / self.hf - 0.5), 0, self.nf - 1).astype(np.int64)
        self.start, self.stop = np.minimum(start, fstar), np.maximum(stop, fstar)

    def fine_x(self, f: np.ndarray) -> np.ndarray:
        return self.lo + (f + 0.5) * self.hf

    def stencil(self, f: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return _stencil((f + 0.5) / self.r - 0.5, self.n)

    def _tables(self, inputs, cols: np.ndarray):
        """The cubic interpolants of the inputs on the whole fine grid of the columns ``cols``, or None when
        that is more than ``_CHUNK`` values per array."""
        if self.nf * len(cols) > _CHUNK:
            return None
        i0, w = self.stencil(np.arange(self.nf))
        tables = []
        for pair in inputs:
            row: list[np.ndarray | None] = []
            for u in pair:
                if u is None:
                    row.append(None)
                    continue
                t = np.full((u.shape[1], self.nf), np.nan)
                t[cols] = _cubic(u, cols[:, None], i0[None, :], w[:, None, :])
                row.append(t)
            tables.append(row)
        return tables

    def sums(self, inputs, weighted: int, offset: np.ndarray, pick: np.ndarray) -> list[np.ndarray]:
        """Log sums at the pairs ``pick`` (indices into the pairs).

        ``inputs``: list of (u_up, u_lo) (n, C) log arrays (u_up finite; u_lo ≤ u_up, −inf where unknown,
        or None when equal to u_up); the fine points whose cubic stencil touches a −inf of u_lo are left out
        of the lo sums. Returns, per input, up and lo of log ∫ N(y; x_0, s²) exp(ũ) dx_0 (midpoint sum over
        the window), then up and lo of the same with the weight (x_0 − y + offset) for input ``weighted``
        (``offset`` per pair, ≥ the radius, so the weight is ≥ 0 on the window).
        """
        s, nf = self.s, self.nf
        count = self.stop[pick] - self.start[pick] + 1
        out = [np.empty(len(pick)) for _ in range(2 * len(inputs) + 2)]
        norm = math.log(self.hf) - 0.5 * math.log(2 * math.pi * s * s)
        tables = self._tables(inputs, np.unique(self.col[pick]))
        order = np.argsort(count, kind="stable")  # similar window widths share a chunk
        k = 0
        while k < len(order):
            rows = order[k : k + max(1, _CHUNK // int(count[order[k]]))]
            width = int(count[rows[-1]])
            rows = rows[: max(1, 2 * _CHUNK // width)]
            k += len(rows)
            idx = pick[rows]
            f = self.start[idx, None] + np.arange(width)[None, :]
            inside = f <= self.stop[idx, None]
            f = np.minimum(f, nf - 1)
            dist = self.fine_x(f) - self.y[idx, None]
            logk = np.where(inside, -(dist**2) / (2 * s * s), -np.inf)
            col = self.col[idx, None]
            if tables is None:
                i0, w = self.stencil(f)
                cols = np.broadcast_to(col, f.shape)
            for j, (u_up, u_lo) in enumerate(inputs):
                if tables is None:
                    v_up = _cubic(u_up, cols, i0, w) + logk
                    v_lo = None if u_lo is None else _cubic(u_lo, cols, i0, w) + logk
                else:
                    v_up = tables[j][0][col, f] + logk
                    v_lo = None if u_lo is None else tables[j][1][col, f] + logk
                out[2 * j][rows] = _lse(v_up) + norm
                out[2 * j + 1][rows] = out[2 * j][rows] if v_lo is None else _lse(v_lo) + norm
                if j == weighted:
                    with np.errstate(divide="ignore"):
                        logw = np.log(np.maximum(dist + offset[idx, None], 0.0))
                    out[-2][rows] = _lse(v_up + logw) + norm
                    out[-1][rows] = out[-2][rows] if v_lo is None else _lse(v_lo + logw) + norm
        return out


def _bandlimited(p0: np.ndarray, grid: Grid, ys, s: float) -> tuple[np.ndarray, np.ndarray]:
    """(q, ∇_y q) with the band-limited kernels on the whole grid (the D-dimensional signed sums), q
    normalised as exp(log q) of the other paths."""
    kern, dkern = zip(*(_bandlimited_kernels(ys[d], x, s, h) for d, (x, h) in enumerate(zip(grid.axes, grid.dx))))
    with np.errstate(under="ignore"):
        q = p0
        for d in range(grid.ndim):
            q = _apply(kern[d], q, d)
        grads = []
        for c in range(grid.ndim):
            g = p0
            for d in range(grid.ndim):
                g = _apply(dkern[d] if d == c else kern[d], g, d)
            grads.append(g)
    scale = math.exp(grid.ndim * (sum(math.log(h) for h in grid.dx) / grid.ndim - 0.5 * math.log(2 * math.pi * s * s)))
    return q * scale, np.stack(grads, axis=-1) * scale


def _narrow_stage(inputs, weighted: int, axis: int, y: np.ndarray, x: np.ndarray, h: float, lo: float, s: float):
    """One axis of the narrow-kernel convolution, for log arrays of any rank.

    ``inputs``: list of (up, lo) log arrays (lo None when equal to up), contracted along ``axis``.
    Returns (outputs, offset): per input, (up, lo) of log ∫ N(y; x_0, s²) exp(u) dx_0, then (up, lo) of the
    same with the weight (x_0 − y_a + offset_a) for input ``weighted``; offset (len(y),) ≥ every window
    radius of the target, so that weight is ≥ 0 where it matters and E[x_0] − y = e^{num − q} − offset
    loses only ~eps·offset/s² to cancellation (offset ~ 10–40 s). Each column (the other axes) is scaled
    by its maximum and convolved with the band-limited kernel; pairs (target, column) below
    ``_BANDLIMIT_TRUST`` of their column's maximum are recomputed on the refined grid.
    """
    kern, dkern = _bandlimited_kernels(y, x, s, h)
    norm = math.log(h) - 0.5 * math.log(2 * math.pi * s * s)
    moved = [(np.moveaxis(up, axis, 0), None if low is None else np.moveaxis(low, axis, 0)) for up, low in inputs]
    rest = moved[0][0].shape[1:]
    flat = [(up.reshape(len(x), -1), None if low is None else low.reshape(len(x), -1)) for up, low in moved]
    n_cols = flat[0][0].shape[1]
    a = np.repeat(np.arange(len(y)), n_cols)
    c = np.tile(np.arange(n_cols), len(y))
    windows = _Windows(flat[0][0], y[a], c, x, h, lo, s)
    offset = windows.radius.reshape(len(y), n_cols).max(axis=1) + h
    outs, untrusted = [], np.zeros((len(y), n_cols), dtype=bool)
    for j, (up, _) in enumerate(flat):
        top = up.max(axis=0)
        with np.errstate(under="ignore"):
            v = np.exp(up - top[None, :])
        vals = [kern @ v]
        if j == weighted:
            vals.append(s * s * (dkern @ v) + offset[:, None] * vals[0])
        for val in vals:
            trusted = val >= _BANDLIMIT_TRUST * val.max(axis=0, keepdims=True)
            untrusted |= ~trusted
            with np.errstate(divide="ignore", invalid="ignore"):
                outs.append(np.where(trusted, np.log(val), np.nan) + top[None, :] + norm)
    # values of every input first, the weighted value last, as (up, lo)
    order = [k for k in range(len(outs)) if k != weighted + 1] + [weighted + 1]
    pairs = [(outs[k], outs[k].copy()) for k in order]
    if untrusted.any():
        pick = np.flatnonzero(untrusted.ravel())
        refined = windows.sums(flat, weighted, offset[a], pick)
        ra, rc = a[pick], c[pick]
        for k, (up, low) in enumerate(pairs):
            up[ra, rc] = refined[2 * k]
            low[ra, rc] = refined[2 * k + 1]
    return [tuple(np.moveaxis(v.reshape(len(y), *rest), 0, axis) for v in pair) for pair in pairs], offset


def _narrow(u_up, u_lo, grid: Grid, ys, s: float):
    """((log q up, lo), [(log numerator_d up, lo)], [offset_d]) for a narrow kernel and a resolved p0,
    axis by axis (:func:`_narrow_stage`)."""
    q = (u_up, u_lo)
    nums: list[tuple[np.ndarray, np.ndarray]] = []
    offsets: list[np.ndarray] = []
    for d, (x, h, (lo, _)) in enumerate(zip(grid.axes, grid.dx, grid.bounds)):
        out, offset = _narrow_stage([q, *nums], 0, d, ys[d], x, h, lo, s)
        q, nums = out[0], out[1:]
        offsets.append(offset)
    return q, nums, offsets


# ---------------------------------------------------------------------- the public call
def convolve_marginal(
    alpha: float, sigma: float, log_p0: np.ndarray, grid: Grid, p0_resolved: bool = True,
    zero_log_bound: float | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """log p_t, ∇ log p_t and the unresolved cells on the grid for x_t = alpha x_0 + sigma z, z ~ N(0, I).

    Args:
        alpha, sigma: the marginal coefficients at t (sigma/alpha ≥ ``MIN_KERNEL_CELLS`` cells).
        log_p0: (*grid.shape) log of the initial density, normalised so that ∫ exp(log_p0) = 1 on the
            grid; −inf where p0 = 0.
        p0_resolved: whether p0 is resolved by the grid (then narrow kernels use the band-limited kernel
            and the refined log-space sums; otherwise the midpoint sum is kept, aliasing and all).
        zero_log_bound: log of the largest value a zero of p0 may stand for, in log_p0's normalisation
            (module docstring, "Zeros"); None: log(5e-324).
    Returns:
        log_p: (*grid.shape), finite except NaN at unresolved cells;
        score: (*grid.shape, D), finite except NaN at unresolved cells;
        unresolved: (*grid.shape) bool.
    """
    s = sigma / alpha
    dim = grid.ndim
    if not s >= MIN_KERNEL_CELLS * min(grid.dx):
        raise ValueError(f"the kernel sigma/alpha = {s:.3g} is narrower than {MIN_KERNEL_CELLS:g} cell "
                         f"({min(grid.dx):.3g}); see min_resolved_time")
    ys = [x / alpha for x in grid.axes]
    zeros = bool(np.isneginf(log_p0).any())
    bound = _LOG_TINY if zero_log_bound is None else zero_log_bound
    u_up = np.where(np.isneginf(log_p0), bound, log_p0) if zeros else log_p0
    u_lo = log_p0 if zeros else None
    narrow = p0_resolved and s < _BANDLIMIT_BELOW * min(grid.dx)

    unresolved = np.zeros(grid.shape, dtype=bool)
    if not narrow:
        q, nums = _wide(u_up, grid, ys, s)
        offsets = [y - lo for y, (lo, _) in zip(ys, grid.bounds)]  # weight x_0 − lo = x_0 − y + (y − lo)
        if u_lo is not None:  # p0 has zeros
            q_lo, nums_lo = _wide(u_lo, grid, ys, s)
            pairs = list(zip([q, *nums], [q_lo, *nums_lo]))
    else:
        (q, q_lo), num_pairs, offsets = _narrow(u_up, u_lo, grid, ys, s)
        nums = [v for v, _ in num_pairs]
        pairs = [(q, q_lo), *num_pairs]
        bulk_q, bulk_grad = _bandlimited(np.exp(u_up), grid, ys, s)
        bulk = bulk_q >= _BANDLIMIT_TRUST * bulk_q.max()
    if zeros:
        with np.errstate(invalid="ignore"):
            for a, b in pairs:
                unresolved |= ~(a - b <= _UNKNOWN_RTOL)
    log_p = q - dim * math.log(alpha)
    score = np.empty((*grid.shape, dim))
    for d in range(dim):
        offset = np.expand_dims(offsets[d], tuple(a for a in range(dim) if a != d))
        score[..., d] = (np.exp(nums[d] - q) - offset) / (s * s * alpha)  # (E[x_0 | y] − y)/(s² alpha)
    if narrow:  # the whole-grid band-limited sums where they are accurate relative to the global maximum
        with np.errstate(divide="ignore"):
            log_p[bulk] = np.log(bulk_q[bulk]) - dim * math.log(alpha)
        score[bulk] = bulk_grad[bulk] / bulk_q[bulk, None] / alpha
        unresolved &= ~bulk
    log_p[unresolved] = np.nan
    score[unresolved] = np.nan
    return log_p, score, unresolved


def marginal_coefficients(sde, t: float) -> tuple[float, float]:
    """(alpha(t), sigma(t)) of a linear SDE as floats."""
    alpha, sigma = sde.marginal(torch.tensor(float(t), dtype=torch.float64))
    return float(alpha), float(sigma)


def min_resolved_time(sde, grid: Grid, t_hi: float = 1.0) -> float:
    """The smallest t in (0, t_hi] whose kernel sigma(t)/alpha(t) spans ``MIN_KERNEL_CELLS`` of the
    smallest cell (bisection in log t; sigma/alpha increases with t for VE, VP and sub-VP). Returns
    t_hi when even t_hi is narrower."""

    def width(t: float) -> float:
        alpha, sigma = marginal_coefficients(sde, t)
        return sigma / alpha

    need = MIN_KERNEL_CELLS * min(grid.dx)
    if width(t_hi) < need:
        return t_hi
    lo, hi = 1e-300, t_hi
    if width(lo) >= need:
        return lo
    for _ in range(200):
        mid = math.sqrt(lo * hi)
        if width(mid) >= need:
            hi = mid
        else:
            lo = mid
        if hi / lo - 1 < 1e-6:
            break
    return hi
