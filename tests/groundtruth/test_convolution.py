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
from tests.conftest import ALL_SDES

from .gt_problems import mixture_1d, mixture_2d, on_grid, score_error_bands

SDES = list(ALL_SDES)
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
        lp = on_grid(lambda x, t=t: gm.log_prob(x, t, sde), grid)
        s = on_grid(lambda x, t=t: gm.score(x, t, sde), grid)
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
        lp = on_grid(lambda x, t=t: gm.log_prob(x, t, sde), grid)
        bands = score_error_bands(sol.score[i], on_grid(lambda x, t=t: gm.score(x, t, sde), grid), lp)
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
    # the exact log p0: a density on the grid underflows to 0 far from a narrow component
    sol = solve_fokker_planck(sde, None, grid, [t], progress=False, log_p0=on_grid(gm.log_prob, grid))
    lp = on_grid(lambda x: gm.log_prob(x, t, sde), grid)
    bands = score_error_bands(sol.score[0], on_grid(lambda x: gm.score(x, t, sde), grid), lp)
    # midpoint (wide kernel): float64 round-off; band-limited (narrow kernel): the Faddeeva function's
    # ~1e-13 relative accuracy times (max/p = 1e6) times |G'/G| <~ π/h ≈ 63 gives ~6e-6
    assert bands[1e-6] < 1e-5, (t, type(sde).__name__, bands)


# ---------------------------------------------------------------------- log space: no −inf, no NaN
def test_wide_kernel_far_tails_are_finite_and_exact():
    """p_t far below the float range (e^{−1000}·max at the walls), where the sum is dominated by values of
    p0 below the float range too (kernel 2 cells ≈ the data's width): log p_t and the score are finite and
    exact from the exact log p0 (the sums over exp(log p0), which underflows there, were off by 6e-8 in log p)."""
    gm, grid, sde, t = mixture_1d(), Grid(((-26.0, 26.0),), (350,)), VESDE(), 0.4  # s = 2.0 cells
    sol = solve_fokker_planck(sde, None, grid, [t], progress=False, log_p0=on_grid(gm.log_prob, grid))
    lp = on_grid(lambda x: gm.log_prob(x, t, sde), grid)
    s = on_grid(lambda x: gm.score(x, t, sde), grid)
    assert lp.min() - lp.max() < -1000
    assert np.isfinite(sol.log_density).all() and np.isfinite(sol.score).all() and not sol.unresolved.any()
    # midpoint sums of integrands ≥ 1.6 cells wide: error ~exp(−2π²·1.6²) ≈ 1e-22, i.e. float64 round-off
    np.testing.assert_allclose(sol.log_density[0], lp, rtol=0, atol=1e-11)
    np.testing.assert_allclose(sol.score[0], s, rtol=1e-11, atol=1e-11)


def test_wide_kernel_far_tails_2d():
    """2-D, a correlated mixture (not separable): finite and exact down to e^{−700}·max and below."""
    gm, grid, sde, t = mixture_2d(), Grid(((-28.0, 28.0),) * 2, (256, 256)), VESDE(), 0.5  # s = 3.2 cells
    sol = solve_fokker_planck(sde, None, grid, [t], progress=False, log_p0=on_grid(gm.log_prob, grid))
    lp = on_grid(lambda x: gm.log_prob(x, t, sde), grid)
    s = on_grid(lambda x: gm.score(x, t, sde), grid)
    assert lp.min() - lp.max() < -745  # p_t/max below the smallest float64
    assert np.isfinite(sol.log_density).all() and np.isfinite(sol.score).all() and not sol.unresolved.any()
    # midpoint sums of Gaussians ≥ 1.7 cells wide (s and p0 combined): exp(−2π²·1.7²) ≈ 1e-25, so round-off
    np.testing.assert_allclose(sol.log_density[0], lp, rtol=1e-12, atol=1e-10)
    np.testing.assert_allclose(sol.score[0], s, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("sde, t", [(VESDE(), 0.001), (VESDE(), 0.1), (VPSDE(), 0.001), (VPSDE(), 0.01)],
                         ids=["ve-0.001", "ve-0.1", "vp-0.001", "vp-0.01"])
def test_narrow_kernel_tails_are_finite_and_exact(sde, t):
    """Kernels of 0.02–0.6 cells: below 1e-6·max (where the band-limited sum is round-off) the log-space
    sum over log p0 refined by cubics is exact to ~1e-9 down to e^{−130}·max (NaN before)."""
    gm, grid = mixture_1d(), Grid(((-8.0, 8.0),), (256,))
    sol = solve_fokker_planck(sde, None, grid, [t], progress=False, log_p0=on_grid(gm.log_prob, grid))
    assert np.isfinite(sol.log_density).all() and np.isfinite(sol.score).all()
    lp = on_grid(lambda x: gm.log_prob(x, t, sde), grid)
    inner = slice(8, -8)  # within ~8 kernel widths of a wall the box cuts p0 off (true of every solver here)
    bands = score_error_bands(sol.score[0][inner], on_grid(lambda x: gm.score(x, t, sde), grid)[inner], lp[inner],
                              levels=(1e-6, 1e-14, 1e-50))
    # measured ≤ 4e-9 in every band: round-off of the band-limited sums above 1e-6·max, the cubics' error
    # on log p0 (nearly quadratic tails) below
    assert max(bands.values()) < 2e-8, bands
    assert lp[inner].min() - lp.max() < np.log(1e-50)


@pytest.mark.parametrize("sde", [VESDE(), VPSDE()], ids=lambda s: type(s).__name__)
def test_narrow_kernel_2d_is_finite_everywhere(sde):
    """2-D, t = 0.01 (kernel 0.02–0.4 cells): finite at every cell; exact where p ≥ 1e-6·max; in the far
    tails the cubics cannot follow the kinks of log p0 where two components' tails cross (narrower than a
    cell), which bounds the relative score error there."""
    gm, grid, t = mixture_2d(), Grid(((-8.0, 8.0),) * 2, (128, 128)), 0.01
    sol = solve_fokker_planck(sde, None, grid, [t], progress=False, log_p0=on_grid(gm.log_prob, grid))
    assert np.isfinite(sol.log_density).all() and np.isfinite(sol.score).all() and not sol.unresolved.any()
    lp = on_grid(lambda x: gm.log_prob(x, t, sde), grid)
    s = on_grid(lambda x: gm.score(x, t, sde), grid)
    inner = (slice(8, -8), slice(8, -8))
    bulk = score_error_bands(sol.score[0][inner], s[inner], lp[inner], levels=(1e-6,))[1e-6]
    assert bulk < 1e-8, bulk  # band-limited sums: measured 9e-10
    rel = np.abs(sol.score[0] - s).max(-1) / np.linalg.norm(s, axis=-1).clip(1.0)
    # measured 3% (VE) at the kinks, e^{−250}·max; a wrong tail (e.g. the midpoint sum's aliasing) is O(1)
    assert rel[inner].max() < 0.1, rel[inner].max()


def test_zeros_of_p0_leave_cells_unresolved_not_wrong():
    """A p0 that underflows to 0: cells whose p_t depends on values below the float range are NaN and
    marked, with one warning naming the remedy; every other cell is exact; log_p0 resolves them all."""
    import warnings

    gm, grid, sde, t = mixture_1d(), Grid(((-30.0, 30.0),), (600,)), VESDE(), 0.45
    p0 = on_grid(lambda x: gm.log_prob(x).exp(), grid)
    assert (p0 == 0).sum() > 100
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sol = solve_fokker_planck(sde, p0, grid, [t], progress=False)
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1 and messages[0].startswith(f"{sol.unresolved.sum()} grid cells are unresolved")
    assert "pass log_p0" in messages[0]
    bad = sol.unresolved[0]
    assert bad.any() and np.isnan(sol.score[0][bad]).all() and np.isnan(sol.log_density[0][bad]).all()
    lp = on_grid(lambda x: gm.log_prob(x, t, sde), grid)
    s = on_grid(lambda x: gm.score(x, t, sde), grid)
    # where resolved, the unknown values hold < 1e-10 of each sum (the criterion): score within ~1e-9
    np.testing.assert_allclose(sol.score[0][~bad], s[~bad], rtol=1e-8, atol=1e-8)
    assert (lp[bad] - lp.max()).max() < np.log(1e-300)  # only cells far below the float range


def test_times_below_the_grid_resolution_are_refused():
    """t = 1e-300 (kernel 1e-150 cell): a ValueError naming t and the smallest time the grid resolves, which
    itself solves to a normalised, exact p_t (zero mass before)."""
    from fpe_lab.groundtruth.convolution import MIN_KERNEL_CELLS, min_resolved_time

    gm, grid, sde = mixture_1d(), Grid(((-8.0, 8.0),), (256,)), VPSDE()
    log_p0 = on_grid(gm.log_prob, grid)
    t_min = min_resolved_time(sde, grid)
    with pytest.raises(ValueError, match=rf"t = 1e-300 is below what the grid resolves.*smallest time this grid "
                                         rf"resolves is t = {t_min:.3g}"):
        solve_fokker_planck(sde, None, grid, [1e-300, 0.5], progress=False, log_p0=log_p0)
    alpha, sigma = sde.marginal(torch.tensor(t_min, dtype=torch.float64))
    assert MIN_KERNEL_CELLS <= float(sigma / alpha) / grid.dx[0] < 1.001 * MIN_KERNEL_CELLS  # bisection to 1e-6
    sol = solve_fokker_planck(sde, None, grid, [t_min], progress=False, log_p0=log_p0)
    np.testing.assert_allclose(grid.integrate(sol.density[0]), 1.0, rtol=1e-12)  # normalised: p0's mass, moved
    lp = on_grid(lambda x: gm.log_prob(x, t_min, sde), grid)
    bands = score_error_bands(sol.score[0][8:-8], on_grid(lambda x: gm.score(x, t_min, sde), grid)[8:-8],
                              lp[8:-8], levels=(1e-6, 1e-100))
    # band-limited kernel at 1e-3 cell: its two terms cancel to ~eps·1e3 (measured 5e-9, 4e-7 at 1e-100)
    assert bands[1e-6] < 1e-7 and bands[1e-100] < 1e-5, bands
