"""The exact (convolution) solver against closed-form Gaussian-mixture marginals for VE, VP and sub-VP."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fpe_lab.gmm import GaussianMixture
from fpe_lab.groundtruth import Grid, Method, solve_fokker_planck
from fpe_lab.sde import SubVPSDE, VESDE, VPSDE
from .gt_problems import mixture_1d, mixture_2d, on_grid, score_error_bands

SDES = [VESDE(), VPSDE(), SubVPSDE()]
# VE: sigma(0.4) = 0.30 spans > 2 cells on both grids; sigma(0.5) = 0.71 keeps p/max < 1e-12 at the walls of [−10, 10]
TIMES = [0.4, 0.5]

pytestmark = pytest.mark.analytic


@pytest.mark.parametrize("sde", SDES, ids=lambda s: type(s).__name__)
@pytest.mark.parametrize("dim", [1, 2])
def test_convolution_matches_exact_mixture(sde, dim):
    gm = mixture_1d() if dim == 1 else mixture_2d()
    grid = Grid(((-10.0, 10.0),) * dim, (500,) if dim == 1 else (160, 160))
    p0 = on_grid(lambda x: gm.log_prob(x).exp(), grid)
    sol = solve_fokker_planck(sde, p0, grid, TIMES, progress=False)
    assert sol.method is Method.CONVOLUTION
    for i, t in enumerate(TIMES):
        lp = on_grid(lambda x: gm.log_prob(x, t, sde), grid)
        s = on_grid(lambda x: gm.score(x, t, sde), grid)
        bands = score_error_bands(sol.score[i], s, lp, levels=(1e-3, 1e-10, 1e-100))
        # Midpoint sums of Gaussians wider than ~2 cells are exact to float64 round-off (error
        # ~exp(−2π²(w/h)²)); round-off grows like eps·|x|/s² into the tails, hence 1e-9.
        assert max(bands[1e-3], bands[1e-10]) < 1e-9, bands
        # Far tails: the integrand kernel·p0 narrows to ~s·w/sqrt(s² + w²) ≈ 2 cells (VE, t = 0.4, 2D),
        # midpoint error ~exp(−2π²·2²) ≈ 1e-7 relative: still exact far beyond any FD solver.
        assert bands[1e-100] < 1e-5, bands
        mask = lp - lp.max() >= np.log(1e-100)
        assert np.abs(sol.log_density[i] - lp)[mask].max() < 1e-6  # same quadrature argument as the tails


def test_convolution_detects_a_wrong_sde():
    """The check can fail: solving with the wrong schedule gives an O(1) score error."""
    gm, grid = mixture_1d(), Grid(((-8.0, 8.0),), (400,))
    p0 = on_grid(lambda x: gm.log_prob(x).exp(), grid)
    sol = solve_fokker_planck(VPSDE(beta_max=10.0), p0, grid, [0.3], progress=False)
    s = on_grid(lambda x: gm.score(x, 0.3, VPSDE()), grid)
    lp = on_grid(lambda x: gm.log_prob(x, 0.3, VPSDE()), grid)
    assert score_error_bands(sol.score[0], s, lp)[1e-3] > 0.1


@pytest.mark.parametrize("sde", [VESDE(), VPSDE()], ids=lambda s: type(s).__name__)
def test_small_t_uses_the_bandlimited_kernel(sde):
    """Kernels narrower than a cell (sigma/alpha down to 0.02 h) stay exact for a resolved p0."""
    gm, grid, times = mixture_1d(), Grid(((-8.0, 8.0),), (256,)), [0.001, 0.01]
    p0 = on_grid(lambda x: gm.log_prob(x).exp(), grid)
    sol = solve_fokker_planck(sde, p0, grid, times, progress=False)
    for i, t in enumerate(times):
        lp = on_grid(lambda x: gm.log_prob(x, t, sde), grid)
        bands = score_error_bands(sol.score[i], on_grid(lambda x: gm.score(x, t, sde), grid), lp)
        # signed kernel: absolute round-off ~eps·max in p, so score error ~eps·(max/p)/h:
        # 2e-9 at p = 1e-6·max, 2e-5 at 1e-10·max (measured 4e-9, 1.5e-5)
        assert bands[1e-6] < 1e-7, bands
        assert bands[1e-10] < 1e-3, bands
    # The check can fail: the plain midpoint kernel aliases at these widths (O(1) error).
    import fpe_lab.groundtruth.convolution as conv

    old = conv._BANDLIMIT_BELOW
    conv._BANDLIMIT_BELOW = 0.0
    try:
        bad = solve_fokker_planck(sde, p0, grid, times[:1], progress=False)
    finally:
        conv._BANDLIMIT_BELOW = old
    lp = on_grid(lambda x: gm.log_prob(x, times[0], sde), grid)
    assert score_error_bands(bad.score[0], on_grid(lambda x: gm.score(x, times[0], sde), grid), lp)[1e-3] > 0.1


def test_solution_interpolates_and_keeps_array_type():
    gm, grid = mixture_2d(), Grid(((-8.0, 8.0), (-8.0, 8.0)), (128, 128))
    sde, t = VPSDE(), 0.3
    p0 = on_grid(lambda x: gm.log_prob(x).exp(), grid)
    sol = solve_fokker_planck(sde, p0, grid, [0.1, t], progress=False)
    x = torch.tensor([[0.13, -0.71], [1.9, 2.2], [-3.0, 0.4]], dtype=torch.float64)
    lp, s = sol.log_prob_at(x, t), sol.score_at(x, t)
    assert isinstance(lp, torch.Tensor) and lp.dtype == torch.float64 and lp.shape == (3,)
    assert isinstance(s, torch.Tensor) and s.shape == (3, 2)
    # Cubic interpolation of smooth fields with h = 0.125 (width ~0.5): O(h⁴ f'''') ≈ 1e-4 relative.
    torch.testing.assert_close(lp, gm.log_prob(x, t, sde), rtol=0, atol=2e-3)
    torch.testing.assert_close(s, gm.score(x, t, sde), rtol=0, atol=2e-2)
    lp_np = sol.log_prob_at(x.numpy(), t)
    assert isinstance(lp_np, np.ndarray)
    np.testing.assert_allclose(lp_np, lp.numpy(), rtol=0, atol=1e-15)  # same interpolant
    with pytest.raises(ValueError, match="solved times"):
        sol.log_prob_at(x, 0.2)
    with pytest.raises(ValueError, match="grid box"):
        sol.score_at(np.array([[9.0, 0.0]]), t)
    with pytest.raises(ValueError, match="shape"):
        sol.score_at(np.zeros((3, 3)), t)


@settings(max_examples=25, deadline=None)
@given(
    k=st.integers(1, 3),
    seed=st.integers(0, 2**31 - 1),
    t=st.floats(0.002, 1.0),
    sde_index=st.integers(0, 2),
)
def test_convolution_exact_for_random_mixtures(k, seed, t, sde_index):
    """Property: for any 1D mixture with widths ≥ 4 cells, any t and SDE, the score is exact to ~1e-9."""
    sde = [VESDE(), VPSDE(), SubVPSDE()][sde_index]
    if sde_index == 0:
        t = min(t, 0.45)  # VE: sigma(0.45) ≈ 0.47 keeps the walls of [−12, 12] at p/max < 1e-12
    rng = np.random.default_rng(seed)
    gm = GaussianMixture(
        rng.uniform(0.2, 1.0, k), rng.uniform(-2.5, 2.5, (k, 1)), rng.uniform(0.2, 0.8, (k, 1, 1)) ** 2,
        dtype=torch.float64,
    )
    grid = Grid(((-12.0, 12.0),), (480,))  # h = 0.05: the narrowest component spans 4 cells
    p0 = on_grid(lambda x: gm.log_prob(x).exp(), grid)
    sol = solve_fokker_planck(sde, p0, grid, [t], progress=False)
    lp = on_grid(lambda x: gm.log_prob(x, t, sde), grid)
    bands = score_error_bands(sol.score[0], on_grid(lambda x: gm.score(x, t, sde), grid), lp)
    # midpoint (wide kernel): float64 round-off; band-limited (narrow kernel): the Faddeeva function's
    # ~1e-13 relative accuracy times (max/p = 1e6) times |G'/G| <~ π/h ≈ 63 gives ~6e-6
    assert bands[1e-6] < 1e-5, (t, type(sde).__name__, bands)
