r"""Log-density Fokker–Planck solver: u = log p on a 1D/2D grid, for any drift f(x, t) and g(t).

Dividing the FPE ∂_t p = −∇·(f p) + ½g²Δp by p gives the equation of u = log p (docs/conventions.md,
"Ground-truth numerics"),

    ∂_t u = F(u, t) = −∇·f − f·∇u + ½g² (Δu + |∇u|²),

whose solution is smooth and *nearly quadratic* in the tails (u = −|x|²/(2σ²) + ... for Gaussian
tails), where p itself spans hundreds of orders of magnitude. Central differences are exact on
quadratics, so the score error stays about as small in the tails as near the modes — which solving for
p cannot give (its relative truncation error grows like (h |∇log p|)²).

**Space.** Cell-centred second-order central differences per axis,

    (D1 u)_i = (u_{i+1} − u_{i−1}) / 2h,   (D2 u)_i = (u_{i+1} − 2u_i + u_{i−1}) / h²,

with one ghost cell per wall filled by *quadratic extrapolation*, u_{−1} = 3u_0 − 3u_1 + u_2
(∂³u/∂n³ = 0: the Gaussian-tail behaviour; exact for Gaussian tails, so the wall adds no error there).
For tails that are not Gaussian (u with ∂³u ≠ 0 at the wall, e.g. a quartic potential) the ghost makes an
O(h) error in the few cells next to the walls (measured ~h^0.6 in the cells at p ~ 1e-20..1e-39·max of
tests/groundtruth/test_log_density.py::test_log_density_stationary_gradient_drift); it stays there
because the transport velocity −a_d points out of the box. Put the walls where p ≲ 1e-16·max.
F is evaluated pointwise at the cell centres; ∇·f comes from ``sde.div_drift`` if the SDE has it, else
from autograd through ``sde.drift``.

**Time (linearly implicit / IMEX, ADI).** The Jacobian of F splits into one tridiagonal operator per axis,

    J_d(u) = ½g² D2_d + a_d D1_d,   a_d = g² D1_d u − f_d

(implicit linear diffusion ½g²Δ and the linearised transport terms −f·∇u + ½g²|∇u|²; the source −∇·f is
explicit). Each step is one linearised trapezoidal ADI sweep (approximate factorisation),

    u^{n+1} = u^n + (I − ½k J_D)^{-1} ··· (I − ½k J_1)^{-1} k F(u^n, t_n + k/2),

D tridiagonal solves per step (all grid lines of an axis at once), second order in time. It is
A-stable but not L-stable, so the first ``DAMPED_STEPS`` steps (Rannacher start) use the L-stable
Richardson extrapolation of the linearly implicit Euler step Φ_k(u; t) = u + Π_d (I − k J_d)^{-1} k F(u, t),

    u^{n+1} = 2 Φ_{k/2}(Φ_{k/2}(u^n; t_n); t_n + k/2) − Φ_k(u^n; t_n),

also second order (R(z) → 0 as z → −∞, three sweeps). In the Jacobian the wall rows
use the one-sided outflow difference (the transport velocity −a_d points out of the box in the tails),
which keeps I − kJ_d diagonally dominant there; F itself uses the quadratic ghost. Steps are graded in
diffusion time as in :func:`~fpe_lab.groundtruth.finite_volume.step_times`.

**Normalisation.** u is only known up to the constant that mass conservation fixes; the outputs are
normalised by log Σ e^u·ΔV (the midpoint rule), which does not change the score.

**Initial data.** u_0 = log p_0 needs p_0 > 0: cells with p_0 < ``P0_FLOOR``·max p_0 (zeros included) are
raised to that floor, with a warning; the floor makes u_0 flat there (score 0), so scores are meaningful
only where p_t is far above the floor.
"""

from __future__ import annotations

import logging
import warnings

import numpy as np
import torch
from scipy.linalg.lapack import dgtsv
from scipy.special import logsumexp

from fpe_lab.groundtruth.diagnostics import ResolutionWarning, SolverBreakdown
from fpe_lab.groundtruth.finite_volume import diffusion_squared, step_times
from fpe_lab.groundtruth.grid import Grid
from fpe_lab.progress import progress_bar as tqdm

__all__ = [
    "P0_FLOOR", "DAMPED_STEPS", "LogDensityScheme", "initial_log_density", "solve_log_density", "central_gradient",
]

log = logging.getLogger(__name__)

# Relative floor for p0 before taking its log. Far below any band we report (1e-12·max) and any float64
# p_t we can compare with, yet not so low that the jump in u at the edge of a zero region (log 1e-100 ≈
# −230) makes the first steps needlessly stiff.
P0_FLOOR = 1e-100
# Rannacher start: the first steps (where the graded schedule resolves the initial layer and p0's
# unresolved scales make stiff modes) use the L-stable damped step; measured on the benchmark problems,
# 4 such steps keep the tails at t = 0.1 as accurate as damped steps throughout.
DAMPED_STEPS = 4


def _extend(u: np.ndarray) -> np.ndarray:
    """u along its last axis with one ghost cell per end, u_{−1} = 3u_0 − 3u_1 + u_2 (∂³u/∂n³ = 0)."""
    lo = 3 * u[..., 0] - 3 * u[..., 1] + u[..., 2]
    hi = 3 * u[..., -1] - 3 * u[..., -2] + u[..., -3]
    return np.concatenate([lo[..., None], u, hi[..., None]], axis=-1)


def _differences(u: np.ndarray, d: int, h: float) -> tuple[np.ndarray, np.ndarray]:
    """(D1 u, D2 u) along axis d with the quadratic ghost cells; each of the shape of u."""
    ext = _extend(np.moveaxis(u, d, -1))
    d1 = (ext[..., 2:] - ext[..., :-2]) / (2 * h)
    d2 = (ext[..., 2:] - 2 * ext[..., 1:-1] + ext[..., :-2]) / h**2
    return np.moveaxis(d1, -1, d), np.moveaxis(d2, -1, d)


def central_gradient(u: np.ndarray, grid: Grid) -> np.ndarray:
    """∇u by central differences with the quadratic ghost cells (one-sided 2nd order at the walls);
    u of shape grid.shape, returns (*grid.shape, D)."""
    return np.stack([_differences(u, d, h)[0] for d, h in enumerate(grid.dx)], axis=-1)


def initial_log_density(p0: np.ndarray, floor: float = P0_FLOOR) -> np.ndarray:
    """log p0 with cells below ``floor``·max p0 raised to the floor (warns with their number)."""
    low = p0 < floor * p0.max()
    if low.any():
        warnings.warn(
            f"log-density solver: p0 < {floor:g}·max at {int(low.sum())} of {p0.size} cells (zeros included); "
            f"they are raised to {floor:g}·max before taking the log, so scores are meaningful only where p_t "
            "is far above that floor",
            ResolutionWarning,
            stacklevel=3,
        )
    return np.log(np.maximum(p0, floor * p0.max()))


class LogDensityScheme:
    """F(u, t), its per-axis tridiagonal Jacobians and the linearly implicit ADI step on ``grid``."""

    def __init__(self, sde, grid: Grid) -> None:
        self.sde = sde
        self.grid = grid
        self.x = torch.from_numpy(np.ascontiguousarray(grid.coords.reshape(-1, grid.ndim)))
        self._cache: dict[float, tuple[float, np.ndarray, np.ndarray]] = {}

    def coefficients(self, t: float) -> tuple[float, np.ndarray, np.ndarray]:
        """(g², f of shape (D, *grid.shape), ∇·f of shape grid.shape) at time t (the last few are cached)."""
        if t in self._cache:
            return self._cache[t]
        x, shape = self.x, self.grid.shape
        tt = torch.full((x.shape[0],), t, dtype=torch.float64)
        g2 = float(diffusion_squared(self.sde, np.array([t]))[0])
        if callable(getattr(self.sde, "div_drift", None)):
            with torch.no_grad():
                f = self.sde.drift(x, tt)
                div = self.sde.div_drift(x, tt)
        else:
            xg = x.clone().requires_grad_(True)
            with torch.enable_grad():
                f = self.sde.drift(xg, tt)
                if not isinstance(f, torch.Tensor) or not f.requires_grad:
                    raise ValueError(
                        "sde has no div_drift(x, t) and its drift(x, t) is not differentiable by autograd; "
                        "give the SDE a div_drift method"
                    )
                div = sum(
                    torch.autograd.grad(f[:, d].sum(), xg, retain_graph=d + 1 < x.shape[1])[0][:, d]
                    for d in range(x.shape[1])
                )
            f = f.detach()
        if not isinstance(f, torch.Tensor) or tuple(f.shape) != tuple(x.shape):
            got = tuple(f.shape) if hasattr(f, "shape") else type(f).__name__
            raise ValueError(f"sde.drift(x, t) must return a tensor of the shape of x {tuple(x.shape)}; got {got}")
        div = torch.as_tensor(div, dtype=torch.float64).detach().expand(x.shape[0])
        f_np = np.moveaxis(f.to(torch.float64).cpu().numpy().reshape(*shape, len(shape)), -1, 0)
        div_np = div.cpu().numpy().reshape(shape)
        if not (np.all(np.isfinite(f_np)) and np.all(np.isfinite(div_np))):
            raise ValueError(f"sde.drift / div_drift returned non-finite values at t = {t:g}")
        if len(self._cache) >= 4:
            self._cache.pop(next(iter(self._cache)))
        self._cache[t] = (g2, f_np, div_np)
        return self._cache[t]

    def rhs(self, u: np.ndarray, t: float) -> tuple[np.ndarray, list[np.ndarray]]:
        """F(u, t) = −∇·f + Σ_d [½g² D2_d u + ½g² (D1_d u)² − f_d D1_d u] and the transport
        coefficients a_d = g² D1_d u − f_d of the Jacobian."""
        g2, f, div = self.coefficients(t)
        out = -div.copy()
        coef = []
        for d, h in enumerate(self.grid.dx):
            d1, d2 = _differences(u, d, h)
            out += 0.5 * g2 * (d2 + d1 * d1) - f[d] * d1
            coef.append(g2 * d1 - f[d])
        return out, coef

    def _solve_axis(self, r: np.ndarray, d: int, a: np.ndarray, g2: float, k: float) -> np.ndarray:
        """(I − k J_d)^{-1} r along axis d, J_d = ½g² D2 + a D1 (wall rows: one-sided outflow D1, no D2)."""
        n, h = self.grid.shape[d], self.grid.dx[d]
        rm = np.moveaxis(r, d, -1)
        am = np.moveaxis(a, d, -1).reshape(-1, n)
        c = 0.5 * g2 / h**2
        # Entries of I − kJ per line: sub (i, i−1), diag (i, i), super (i, i+1).
        sub = -k * (c - am * (0.5 / h))
        sup = -2 * k * c - sub
        diag = np.full(am.shape, 1.0 + 2 * k * c)
        left, right = np.maximum(am[:, 0], 0.0) / h, np.minimum(am[:, -1], 0.0) / h
        diag[:, 0], sup[:, 0] = 1.0 + k * left, -k * left
        diag[:, -1], sub[:, -1] = 1.0 - k * right, k * right
        # Consecutive lines are independent: zero couplings across line ends in the flat system.
        sub[:, 0] = 0.0
        sup[:, -1] = 0.0
        dl, dd, du = sub.reshape(-1)[1:], diag.reshape(-1), sup.reshape(-1)[:-1]
        rhs = rm.reshape(-1, 1).copy()
        *_, x, info = dgtsv(dl, dd, du, rhs, 1, 1, 1, 1)
        if info != 0:
            raise SolverBreakdown(
                f"log-density solve broke down (singular tridiagonal system, LAPACK dgtsv info = {info}): u = log p "
                "is too steep for the steps; raise n_steps, pass the exact log_p0 instead of a p0 with zeros or "
                "underflowed tails, or use Method.FINITE_VOLUME"
            )
        return np.moveaxis(x.reshape(rm.shape), -1, d)

    def implicit_step(self, u: np.ndarray, t: float, k: float) -> np.ndarray:
        """Φ_k(u; t) = u + Π_d (I − k J_d)^{-1} k F(u, t)."""
        delta, coef = self.rhs(u, t)
        g2 = self.coefficients(t)[0]
        delta = k * delta
        for d, a in enumerate(coef):
            delta = self._solve_axis(delta, d, a, g2, k)
        return u + delta

    def damped_step(self, u: np.ndarray, t: float, k: float) -> np.ndarray:
        """Richardson-extrapolated linearly implicit Euler, t -> t + k: second order, L-stable (3 sweeps)."""
        half = self.implicit_step(self.implicit_step(u, t, 0.5 * k), t + 0.5 * k, 0.5 * k)
        return 2.0 * half - self.implicit_step(u, t, k)

    def trapezoidal_step(self, u: np.ndarray, t: float, k: float) -> np.ndarray:
        """Linearised trapezoidal rule, t -> t + k: u + Π_d (I − ½k J_d)^{-1} k F(u, t + k/2) (one sweep).

        Second order: (I − ½kJ)^{-1} k F(u, t + k/2) = kF + ½k²(JF + ∂_t F) + O(k³), and the factorisation
        error ¼k² J_1 J_2 multiplies an O(k) increment. A-stable, not L-stable (stiff modes flip sign
        instead of decaying), hence the damped start in :func:`solve_log_density`.
        """
        t_mid = t + 0.5 * k
        delta, coef = self.rhs(u, t_mid)
        g2 = self.coefficients(t_mid)[0]
        delta = k * delta
        for d, a in enumerate(coef):
            delta = self._solve_axis(delta, d, a, g2, 0.5 * k)
        return u + delta


def solve_log_density(
    sde, u0: np.ndarray, grid: Grid, times: np.ndarray, n_steps: int, progress: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """Normalised log p_t and its central-difference score at each of ``times``.

    Returns (log_density of shape (T, *grid.shape), score of shape (T, *grid.shape, D)). ``u0`` is the
    finite log p0 on the grid, up to a constant (e.g. from :func:`initial_log_density`); about ``n_steps``
    steps in all, graded as in :func:`~fpe_lab.groundtruth.finite_volume.step_times`.
    """
    scheme = LogDensityScheme(sde, grid)
    schedule = step_times(sde, times, n_steps, tau0=(2 * min(grid.dx)) ** 2)
    total = sum(len(n) - 1 for n in schedule)
    log_p = np.empty((len(times), *grid.shape))
    score = np.empty((len(times), *grid.shape, grid.ndim))
    u = np.array(u0, dtype=np.float64)
    log_volume = np.log(grid.cell_volume)
    done = 0  # steps taken (a disabled tqdm bar does not count)
    with tqdm(total=total, desc="Fokker-Planck log p", unit="step", disable=not progress, leave=False) as bar:
        for j, nodes in enumerate(schedule):
            for t0, t1 in zip(nodes[:-1], nodes[1:]):
                step = scheme.damped_step if done < DAMPED_STEPS else scheme.trapezoidal_step
                u = step(u, float(t0), float(t1 - t0))
                done += 1
                bar.update(1)
            if not np.all(np.isfinite(u)):
                raise SolverBreakdown(
                    f"log-density solve lost finiteness by t = {float(times[j]):g}: the steps are too long for "
                    f"this grid and SDE; raise n_steps (now {n_steps}) or refine the grid"
                )
            log_p[j] = u - (logsumexp(u) + log_volume)
            score[j] = central_gradient(u, grid)
    return log_p, score
