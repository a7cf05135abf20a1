"""The log-density (u = log p) solver: flat score error into the far tails, observed orders, bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fpe_lab.gmm import GaussianMixture
from fpe_lab.groundtruth import Grid, Method, ResolutionWarning, solve_fokker_planck
from fpe_lab.groundtruth.log_density import central_gradient
from fpe_lab.sde import VESDE, VPSDE
from tests.conftest import ALL_SDES

from .gt_problems import mixture_1d, mixture_2d, on_grid, score_error_bands
from .test_finite_volume import MovingMixtureSDE, fitted_order

LD = Method.LOG_DENSITY
DEEP = (1e-3, 1e-6, 1e-10, 1e-12, 1e-30, 1e-60)
SDES = list(ALL_SDES)


def solve_mixture(sde, gm, grid, times, n_steps):
    """Solve from the exact log p0 (p0 itself underflows in the far tails) and return the solution."""
    return solve_fokker_planck(sde, None, grid, times, method=LD, n_steps=n_steps, progress=False,
                               log_p0=on_grid(gm.log_prob, grid))


def bands_at(sol, i, gm, sde, t, levels=DEEP):
    lp = on_grid(lambda x: gm.log_prob(x, t, sde), sol.grid)
    return score_error_bands(sol.score[i], on_grid(lambda x: gm.score(x, t, sde), sol.grid), lp, levels)


def test_central_gradient_exact_on_quadratics():
    """The quadratic ghost cells make D1 exact on quadratics up to the walls (Gaussian tails)."""
    grid = Grid(((-3.0, 5.0), (-2.0, 2.0)), (16, 12))
    x, y = grid.coords[..., 0], grid.coords[..., 1]
    u = -0.7 * x**2 + 0.3 * x * y - 1.1 * y**2 + 0.4 * x - 2.0
    exact = np.stack([-1.4 * x + 0.3 * y + 0.4, 0.3 * x - 2.2 * y], -1)
    np.testing.assert_allclose(central_gradient(u, grid), exact, rtol=0, atol=1e-12)  # float64 round-off
    cubic = u + 0.1 * x**3  # can fail: not exact on a cubic
    assert np.abs(central_gradient(cubic, grid) - exact - np.stack([0.3 * x**2, 0 * y], -1)).max() > 1e-3


@pytest.mark.analytic
@pytest.mark.parametrize("sde", SDES, ids=lambda s: type(s).__name__)
def test_log_density_flat_tails_1d(sde):
    """Exact mixture scores in 1D: the score error where p ≥ 1e-60·max is within 3× of that near the modes,
    including VE at t = 0.3 (young tails, where the density-form solvers lose 10×–1000×)."""
    gm, grid, times = mixture_1d(), Grid(((-8.0, 8.0),), (256,)), [0.3, 0.5]
    sol = solve_mixture(sde, gm, grid, times, 200)
    for i, t in enumerate(times):
        bands = bands_at(sol, i, gm, sde, t)
        # O(h²) with h = 1/16 against widths 0.4 .. 0.5: measured 1.3e-3 .. 7.8e-2 (VE at t = 0.3)
        assert bands[1e-3] < 0.1, bands
        # Flat: central differences are exact on the quadratic tails of u; measured ratio 1.00
        assert bands[1e-60] < 3 * bands[1e-3], bands
        assert np.exp(sol.log_density[i]).min() > 0
        assert abs(grid.integrate(sol.density[i]) - 1) < 1e-12  # normalised at output (round-off)
    wrong = on_grid(lambda x: gm.score(x, 0.3, sde), grid)  # can fail: another time's score is O(0.1) off
    lp = on_grid(lambda x: gm.log_prob(x, 0.5, sde), grid)
    assert score_error_bands(sol.score[1], wrong, lp)[1e-3] > 0.1


@pytest.mark.analytic
def test_log_density_space_order_in_tails_1d_ve():
    """Observed order over 3 resolutions, measured in the far tails (p ≥ 1e-30·max), VE at t = 0.3."""
    gm, sde, t = mixture_1d(), VESDE(), 0.3
    hs, errs = [], []
    for n in (128, 256, 512):
        sol = solve_mixture(sde, gm, Grid(((-8.0, 8.0),), (n,)), [t], 200)
        hs.append(16 / n)
        errs.append(bands_at(sol, 0, gm, sde, t, levels=(1e-30,))[1e-30])
    order = fitted_order(hs, errs)
    assert 1.8 < order < 2.3, (order, errs)  # second order (measured 1.89)


@pytest.mark.analytic
# VP/sub-VP: h = 0.25 against widths ~0.4 .. 1 is coarse on purpose (the bands measure the O(h²) error it gives)
@pytest.mark.filterwarnings("ignore:the grid does not resolve p0:fpe_lab.groundtruth.diagnostics.ResolutionWarning")
@pytest.mark.parametrize("sde", SDES, ids=lambda s: type(s).__name__)
def test_log_density_matches_exact_mixture_2d(sde):
    """Non-separable correlated 2D mixture: score error in bands down to 1e-12·max, flat within 10×."""
    gm, t = mixture_2d(), 0.5
    # VE spreads further than VP/sub-VP: a larger box keeps the walls below WALL_TOL.
    half = 11.0 if isinstance(sde, VESDE) else 8.0
    grid = Grid(((-half, half),) * 2, (64, 64) if half == 8.0 else (112, 112))
    sol = solve_mixture(sde, gm, grid, [0.2, t], 40)
    bands = bands_at(sol, 1, gm, sde, t, levels=(1e-3, 1e-6, 1e-10, 1e-12))
    # O(h²), h = 0.25 (VE 0.2) against widths 0.4 .. 1: measured 4.7e-3 (VP), 6.6e-3 (sub-VP), 6.7e-2 (VE)
    assert bands[1e-6] < 0.1, bands
    assert bands[1e-12] < 10 * bands[1e-3], bands  # the tail target (measured 1.2×, 1.3×, 3.3× VE)
    wrong = on_grid(lambda x: gm.score(x, 0.2, sde), grid)  # can fail: the t = 0.2 score is O(1) off
    lp = on_grid(lambda x: gm.log_prob(x, t, sde), grid)
    assert score_error_bands(sol.score[1], wrong, lp)[1e-3] > 0.2


@pytest.mark.analytic
# the order study starts at 32² (h = 0.5), coarser than the narrowest component on purpose
@pytest.mark.filterwarnings("ignore:the grid does not resolve p0:fpe_lab.groundtruth.diagnostics.ResolutionWarning")
def test_log_density_space_order_2d_vp():
    """Observed 2D order over 3 resolutions in the band p ≥ 1e-12·max."""
    gm, sde, t = mixture_2d(), VPSDE(), 0.5
    hs, errs = [], []
    for n in (32, 64, 128):
        sol = solve_mixture(sde, gm, Grid(((-8.0, 8.0),) * 2, (n, n)), [t], 120)
        hs.append(16 / n)
        errs.append(bands_at(sol, 0, gm, sde, t, levels=(1e-12,))[1e-12])
    order = fitted_order(hs, errs)
    assert 1.8 < order < 2.4, (order, errs)  # second order (measured 1.92; 60 steps: time error shows at 128²)


# the order studies start at 24² and 32² (h = 0.5, 0.375), coarser than the components on purpose
@pytest.mark.filterwarnings("ignore:the grid does not resolve p0:fpe_lab.groundtruth.diagnostics.ResolutionWarning")
# p/max ~2e-8 on the walls of [−6, 6]²: the error against the exact free-space solution includes any wall effect
@pytest.mark.filterwarnings("ignore:mass reaches the boundary:fpe_lab.groundtruth.diagnostics.BoundaryWarning")
def test_log_density_manufactured_time_dependent_drift():
    """User SDE with a nonlinear, non-separable, time-dependent drift and no div_drift (autograd path):
    exact moving mixture, observed order in space, and order 2 in time by self-convergence."""
    sde, t = MovingMixtureSDE(), 0.5
    hs, errs = [], []
    for n in (24, 48, 96):
        grid = Grid(((-6.0, 6.0), (-6.0, 6.0)), (n, n))
        sol = solve_fokker_planck(sde, None, grid, [t], method=LD, n_steps=40, progress=False,
                                  log_p0=on_grid(sde.exact(0.0).log_prob, grid))
        exact = sde.exact(t)
        bands = score_error_bands(sol.score[0], on_grid(exact.score, grid), on_grid(exact.log_prob, grid), (1e-10,))
        hs.append(12 / n)
        errs.append(bands[1e-10])
    order = fitted_order(hs, errs)
    assert 1.7 < order < 2.5, (order, errs)  # second order in space (measured 1.89)
    grid = Grid(((-6.0, 6.0), (-6.0, 6.0)), (32, 32))
    log_p0 = on_grid(sde.exact(0.0).log_prob, grid)
    sols = [solve_fokker_planck(sde, None, grid, [t], method=LD, n_steps=k, progress=False, log_p0=log_p0).score[0]
            for k in (8, 16, 32, 64)]
    diffs = [np.abs(a - b).max() for a, b in zip(sols[:-1], sols[1:])]
    order = fitted_order([1 / 8, 1 / 16, 1 / 32], diffs)
    assert 1.7 < order < 2.6, (order, diffs)  # linearised trapezoidal ADI: order 2 (measured 2.4)


# VP at t = 0.5 reaches the walls of the small [−5, 5] box; what is checked is the 1e-100 floor and the refusals
@pytest.mark.filterwarnings("ignore:mass reaches the boundary:fpe_lab.groundtruth.diagnostics.BoundaryWarning")
def test_log_density_inputs():
    grid = Grid(((-5.0, 5.0),), (32,))
    p0 = np.exp(-0.5 * grid.coords[..., 0] ** 2)
    with pytest.raises(ValueError, match="exactly one of p0 and log_p0"):
        solve_fokker_planck(VPSDE(), p0, grid, [0.5], method=LD, log_p0=np.log(p0), progress=False)
    with pytest.raises(ValueError, match="exactly one of p0 and log_p0"):
        solve_fokker_planck(VPSDE(), None, grid, [0.5], method=LD, progress=False)
    with pytest.raises(ValueError, match="log_p0 must be finite"):
        solve_fokker_planck(VPSDE(), None, grid, [0.5], method=LD, log_p0=np.where(np.arange(32) > 3, 0.0, -np.inf),
                            progress=False)
    with pytest.raises(ValueError, match=r"log_p0 must have shape grid.shape = \(32,\)"):
        solve_fokker_planck(VPSDE(), None, grid, [0.5], method=LD, log_p0=np.zeros(31), progress=False)
    with pytest.warns(ResolutionWarning, match="raised to 1e-100"):
        sol = solve_fokker_planck(VPSDE(), p0 * (np.abs(grid.coords[..., 0]) < 4.6), grid, [0.5], method=LD,
                                  n_steps=100, progress=False)
    assert np.all(np.isfinite(sol.score)) and sol.density.min() > 0
    # A p0 with jumps to zero (checkerboard) makes u = log p too steep for the linearised steps: the
    # solver must fail loudly, never return NaN.
    grid2 = Grid(((-4.0, 4.0),) * 2, (32, 32))
    a, b = grid2.coords[..., 0], grid2.coords[..., 1]
    board = ((np.abs(a) < 1.5) & (np.abs(b) < 1.5) & ((np.floor(a) + np.floor(b)) % 2 == 0)).astype(float)
    with pytest.warns(ResolutionWarning), pytest.raises(RuntimeError, match="log-density solve"):
        solve_fokker_planck(VPSDE(), board, grid2, [0.5], method=LD, n_steps=20, progress=False)

    class NoDivNoGrad:
        def drift(self, x, t):
            return torch.from_numpy(-x.detach().numpy())  # leaves autograd: ∇·f cannot be derived

        def diffusion(self, t):
            return torch.ones_like(torch.as_tensor(t, dtype=torch.float64))

    with pytest.raises(ValueError, match="div_drift"):
        solve_fokker_planck(NoDivNoGrad(), p0, grid, [0.5], method=LD, progress=False)


@pytest.mark.slow
def test_log_density_benchmark_problem_256():
    """The ground-truth benchmark problem (VP, 4 Gaussians, [−8, 8]², 256², t = 0.5): tail target and accuracy."""
    sds = [0.2, 0.3, 0.25, 0.35]
    gm = GaussianMixture(np.ones(4), np.array([[2, 0], [-2, 0], [0, 2], [0, -2.0]]),
                         np.array([np.eye(2) * s * s for s in sds]), dtype=torch.float64)
    grid, sde, t = Grid(((-8.0, 8.0), (-8.0, 8.0)), (256, 256)), VPSDE(), 0.5
    sol = solve_mixture(sde, gm, grid, [t], 100)
    bands = bands_at(sol, 0, gm, sde, t, levels=(1e-3, 1e-6, 1e-10, 1e-12))
    assert bands[1e-6] < 1e-3, bands  # the accuracy target (measured 5.4e-4 at 100 steps)
    assert bands[1e-10] < 10 * bands[1e-3], bands  # tail target (measured 1.1×)


# the order study starts at 20² (h = 0.16 against the width 0.2 of p0), coarse on purpose
@pytest.mark.filterwarnings("ignore:the grid does not resolve p0:fpe_lab.groundtruth.diagnostics.ResolutionWarning")
# p/max ~2e-9 on the walls of [−1.6, 1.6]² at t = 0.05; the check is the t = 1 steady state against the exact one
@pytest.mark.filterwarnings("ignore:mass reaches the boundary:fpe_lab.groundtruth.diagnostics.BoundaryWarning")
def test_log_density_stationary_gradient_drift():
    """dx = −∇U dt + g dw (U non-separable, quartic; no div_drift: ∇·f by autograd) relaxes to
    u = −2U/g² + c, a steady state of the u-equation; Hessian of U ≥ 13 I makes the relaxation error at
    t = 1 ~e^{−13}, so what remains is the scheme's O(h²) (central differences are not exact on quartics)."""

    class Gradient:
        def drift(self, x, t):
            a, b = x[:, 0], x[:, 1]  # U = 7(a² + b²) + (a + b)⁴/4 + a b
            return -torch.stack([14 * a + (a + b) ** 3 + b, 14 * b + (a + b) ** 3 + a], -1)

        def diffusion(self, t):
            return torch.full_like(torch.as_tensor(t, dtype=torch.float64), 1.2)

    hs, errs = [], []
    for n in (20, 40, 80):
        grid = Grid(((-1.6, 1.6), (-1.6, 1.6)), (n, n))
        a, b = grid.coords[..., 0], grid.coords[..., 1]
        stat_score = -2 * np.stack([14 * a + (a + b) ** 3 + b, 14 * b + (a + b) ** 3 + a], -1) / 1.2**2
        log_p0 = -((a - 0.3) ** 2 + (b + 0.2) ** 2) / (2 * 0.2**2)
        sol = solve_fokker_planck(Gradient(), None, grid, [0.05, 1.0], method=LD, n_steps=60, progress=False,
                                  log_p0=log_p0)
        assert np.abs(sol.score[0] - stat_score).max() > 1.0  # can fail: not yet stationary at t = 0.05
        hs.append(grid.dx[0])
        u_stat = -2 * (7 * (a**2 + b**2) + (a + b) ** 4 / 4 + a * b) / 1.2**2
        errs.append(score_error_bands(sol.score[1], stat_score, u_stat, (1e-10,))[1e-10])
    order = fitted_order(hs, errs)
    # Second order in the band p ≥ 1e-10·max (measured 2.5: 2.3e-2, 4.2e-3, 7.3e-4). Nearer the walls
    # (p ~ 1e-20 .. 1e-39 here) the quadratic ghost is not exact for this quartic u and the error there
    # falls only like ~h^0.6 (measured 4.5e-2, 2.6e-2, 1.7e-2): see the log_density module docstring.
    assert 1.8 < order < 3.0, (order, errs)
