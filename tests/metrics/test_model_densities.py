"""PF-ODE and reverse-SDE model densities on a grid (fpe_lab.metrics.model_densities) and the
distances between gridded densities.

Problem: the two-component 2-D mixture of ``conftest.mixture_2d`` (narrowest direction sd 0.37),
eps = 1e-3, float64. For the VP/sub-VP window [eps, 1] the box is ±6.5 (p_1 ≈ N(0, I) has
p/max = 1.3e-9 < 1e-8 on its walls). Numbers in comments were measured on the shared 2-core CPU with
`OMP_NUM_THREADS=1 .venv/bin/python -m pytest tests/metrics/test_model_densities.py -q -m "slow or not slow"`.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.special import ndtr

from fpe_lab.gmm import GaussianMixture
from fpe_lab.groundtruth import BoundaryWarning, Grid
from fpe_lab.metrics import DensityDistances, ModelDensities, density_distances, model_densities
from fpe_lab.model import ScoreModel
from fpe_lab.nets.mlp import TimeMLP
from fpe_lab.sde import SubVPSDE, VESDE, VPSDE

EPS = 1e-3
BOX = 6.5


def box_grid(n: int, half: float = BOX) -> Grid:
    return Grid(((-half, half), (-half, half)), (n, n))


def exact_density(mix: GaussianMixture, sde, grid: Grid, t: float) -> np.ndarray:
    """p_t at the cell centres, normalised on the grid."""
    x = torch.from_numpy(grid.coords.reshape(-1, grid.ndim))
    p = mix.log_prob(x, t, sde).exp().numpy().reshape(grid.shape)
    return p / grid.integrate(p)


def tv(p: np.ndarray, q: np.ndarray, grid: Grid) -> float:
    return 0.5 * float(np.abs(p - q).sum() * grid.cell_volume)


def exact_start(mix: GaussianMixture, sde, t0: float):
    return lambda x: mix.log_prob(x, t0, sde)


def run(mix, sde, grid, *, t0=1.0, score=None, **kw) -> ModelDensities:
    return model_densities(score or mix.score_fn(sde), sde, grid, eps=EPS, t0=t0,
                           start=exact_start(mix, sde, t0), **kw)


# ============================================================ exact score: both models reproduce p_eps


@pytest.mark.parametrize("sde", [VPSDE(), SubVPSDE()], ids=["vp", "subvp"])
def test_exact_score_reproduces_p_eps_and_the_sde_floor_falls_with_the_grid(sde, mixture_2d):
    """Window [1e-3, 1], exact p_1 as start, 50 FPE steps; TV against the exact p_eps (measured):

    | N  | VP q_ODE | VP q_SDE | sub-VP q_ODE | sub-VP q_SDE |
    | 32 | 2.6e-7   | 3.1e-2   | 2.9e-7       | 6.1e-2       |
    | 48 | 2.6e-7   | 1.5e-2   | 2.8e-7       | 3.4e-2       |
    | 64 | 2.5e-7   | 8.1e-3   | 2.8e-7       | 2.1e-2       |

    q_ODE is exact pointwise up to the DOPRI5 tolerance (1e-5), whatever the grid; q_SDE carries the
    finite-volume error: second order for VP (×3.9 per halving of h), nearer first order for sub-VP,
    whose g² ≈ 2β B(t) vanishes near t = 0, so the reverse FPE is drift-dominated there and SG fluxes
    upwind (×2.9 per halving). The time error of 50 steps is small beside it (200 steps changed VP's
    64² value by 5%, to 8.5e-3).
    """
    ode_tv, sde_tv = [], []
    for n in (32, 48, 64):
        grid = box_grid(n)
        md = run(mixture_2d, sde, grid, sde_steps=50)
        p_eps = exact_density(mixture_2d, sde, grid, EPS)
        ode_tv.append(tv(md.ode, p_eps, grid))
        sde_tv.append(tv(md.sde, p_eps, grid))
        assert md.ode.shape == md.sde.shape == grid.shape
        assert grid.integrate(md.ode) == pytest.approx(1.0, abs=1e-12)  # normalised: round-off
        assert grid.integrate(md.sde) == pytest.approx(1.0, abs=1e-12)  # normalised: round-off
        assert md.sde.min() >= 0  # SG + Richardson/log-extrapolation keep p positive
        assert abs(md.info["sde_mass_drift"]) < 1e-12  # zero-flux walls: mass conserved to round-off
        assert md.ode_mass == pytest.approx(1.0, abs=1e-4)  # box holds p_eps; ODE + quadrature error
    assert max(ode_tv) < 1e-5  # DOPRI5 at rtol = atol = 1e-5 per point; measured ≤ 2.9e-7
    assert sde_tv[0] > sde_tv[1] > sde_tv[2]  # grid convergence
    assert sde_tv[2] < (1.2e-2 if isinstance(sde, VPSDE) else 3e-2)  # measured 8.1e-3 / 2.1e-2 at 64²
    assert sde_tv[0] / sde_tv[2] > 2.5  # better than first order over h/4 → h (measured 3.9 VP, 2.9 sub-VP)


@pytest.mark.slow
def test_vp_sde_floor_is_second_order_on_finer_grids(mixture_2d):
    """VP, [1e-3, 1], 100 FPE steps, N = 64, 96, 128: TV(q_SDE, p_eps) measured 8.5e-3, 3.8e-3,
    2.1e-3 (observed order 2.0); TV(q_ODE, p_eps) 2.5e-7 at every N."""
    sde = VPSDE()
    out = []
    for n in (64, 96, 128):
        grid = box_grid(n)
        md = run(mixture_2d, sde, grid, sde_steps=100)
        p_eps = exact_density(mixture_2d, sde, grid, EPS)
        out.append((2 * BOX / n, tv(md.ode, p_eps, grid), tv(md.sde, p_eps, grid)))
    h, ode_tv, sde_tv = map(np.array, zip(*out))
    assert ode_tv.max() < 1e-5  # ODE tolerance, not the grid
    order = np.polyfit(np.log(h), np.log(sde_tv), 1)[0]
    assert 1.6 < order < 2.6  # Scharfetter–Gummel + Richardson: second order in h and k
    assert sde_tv[-1] < 3e-3  # measured 2.1e-3 at 128²


def test_prior_start_gap_is_the_prior_mismatch(mixture_2d):
    """Started from the prior N(0, I) instead of p_1, the exact-score PF-ODE is a bijection carrying
    the prior to q_ODE and p_1 to p_eps, so TV(q_ODE, p_eps) = TV(N(0, I), p_1) exactly (TV is invariant
    under bijections). Measured on 40²: 2.035e-3 and 2.040e-3 (q_SDE: 1.8e-2, its grid error)."""
    sde = VPSDE()
    grid = box_grid(40)
    md = model_densities(mixture_2d.score_fn(sde), sde, grid, eps=EPS, sde_steps=25)
    assert md.start == "prior" and md.t0 == 1.0 and md.eps == EPS
    prior = np.exp(-0.5 * (grid.coords**2).sum(-1))
    prior /= grid.integrate(prior)
    mismatch = tv(prior, exact_density(mixture_2d, sde, grid, 1.0), grid)
    assert 1e-3 < mismatch < 2e-2  # alpha(1) = 6.6e-3: p_1 is N(0, I) shifted by ~1e-2
    # quadrature of TV for the smooth p_1 and for the narrower p_eps differ: measured rel. diff 2e-3
    assert tv(md.ode, exact_density(mixture_2d, sde, grid, EPS), grid) == pytest.approx(mismatch, rel=0.05)


def test_ve_must_start_from_an_exact_marginal(mixture_2d):
    sde = VESDE()
    grid = box_grid(32, 7.0)
    with pytest.raises(ValueError, match=r"t0 < 1.*exact marginal"):
        model_densities(mixture_2d.score_fn(sde), sde, grid, eps=EPS)
    # t0 = 0.5: sigma(0.5) = 0.71, p_0.5 fits in ±7 (p/max 2.2e-9 on the walls)
    md = run(mixture_2d, sde, grid, t0=0.5, sde_steps=50)
    p_eps = exact_density(mixture_2d, sde, grid, EPS)
    assert md.start == "caller" and md.t0 == 0.5
    assert tv(md.ode, p_eps, grid) < 1e-5  # ODE tolerance; measured 3.9e-9
    assert tv(md.sde, p_eps, grid) < 6e-2  # FV error on 32² with h = 0.44; measured 4.3e-2


def test_one_dimensional_grid(float64):
    """The same machinery on a 1-D grid: one Gaussian under VP, window [1e-3, 1] (256 cells: cheap)."""
    sde = VPSDE()
    mix = GaussianMixture([1.0], [[0.5]], [[[0.09]]])
    grid = Grid(((-7.0, 7.0),), (256,))
    md = run(mix, sde, grid, sde_steps=50)
    p_eps = exact_density(mix, sde, grid, EPS)
    assert tv(md.ode, p_eps, grid) < 1e-5  # ODE tolerance; measured 1.3e-6
    assert tv(md.sde, p_eps, grid) < 1e-2  # sd 0.3 over 5.5 cells: FV error; measured 1.4e-3


# ============================================================ a score that violates the FPE


def lagged(mix: GaussianMixture, sde, lag: float):
    """s(x, t) = ∇ log p_{t+lag}(x) (t + lag capped at 1): a field that is not the score of any
    diffusion of p_start, so the PF-ODE and reverse-SDE models part."""
    return lambda x, t: mix.score(x, (t + lag).clamp(max=1.0), sde)


def test_lagged_score_opens_an_ode_sde_gap(mixture_2d):
    """VP, [1e-3, 1], 64², 50 steps. TV(q_ODE, q_SDE), measured: exact score 8.1e-3 (the floor),
    lag 0.02: 1.9e-2, lag 0.05: 4.1e-2, lag 0.1: 5.0e-2. (The gap peaks near lag 0.1: at lag 0.2 both models are
    blurred towards the same broad density and it falls back to 3.6e-2.)"""
    sde = VPSDE()
    grid = box_grid(64)
    floor = tv(*(lambda m: (m.ode, m.sde))(run(mixture_2d, sde, grid, sde_steps=50)), grid)
    gaps = []
    for lag in (0.05, 0.1):
        md = run(mixture_2d, sde, grid, score=lagged(mixture_2d, sde, lag), sde_steps=50)
        gaps.append(tv(md.ode, md.sde, grid))
    assert floor < 1.2e-2  # grid floor, see the convergence test
    assert gaps[0] > 3 * floor  # well above the floor (measured 5×)
    assert gaps[1] > gaps[0]  # grows with the lag


@pytest.mark.slow
def test_lagged_score_gap_grows_with_the_lag_on_a_finer_grid(mixture_2d):
    """96²: floor 3.6e-3; lags 0.02, 0.05, 0.1 give gaps 2.3e-2, 4.4e-2, 5.2e-2 (6×, 12×, 14× floor)."""
    sde = VPSDE()
    grid = box_grid(96)
    md = run(mixture_2d, sde, grid, sde_steps=50)
    floor = tv(md.ode, md.sde, grid)
    gaps = []
    for lag in (0.02, 0.05, 0.1):
        md = run(mixture_2d, sde, grid, score=lagged(mixture_2d, sde, lag), sde_steps=50)
        gaps.append(tv(md.ode, md.sde, grid))
    assert floor < 5e-3  # measured 3.6e-3
    assert gaps[0] > 4 * floor  # well above the floor (measured 6×)
    assert gaps[0] < gaps[1] < gaps[2]  # monotone in the lag up to 0.1


# ============================================================ arguments, network scores


def test_network_score_in_float32_runs_and_infers_device_and_dtype():
    """An untrained ScoreModel(TimeMLP) in float32: dtype/device come from its parameters; the results
    are float64 densities normalised on the grid, finite and nonnegative."""
    torch.manual_seed(0)
    sde = VPSDE()
    model = ScoreModel(TimeMLP(2, 16, 2), sde)
    grid = box_grid(16)
    with pytest.warns(BoundaryWarning, match="on the walls of the box"):  # an untrained net piles mass on the walls
        md = model_densities(model, sde, grid, eps=1e-2, sde_steps=10, ode_rtol=1e-4, ode_atol=1e-4)
    assert md.info["dtype"] == "torch.float32" and md.info["device"] == "cpu"
    for q in (md.ode, md.sde):
        assert q.dtype == np.float64 and np.isfinite(q).all() and q.min() >= 0
        assert grid.integrate(q) == pytest.approx(1.0, abs=1e-12)  # normalised: round-off


def test_model_densities_rejects_bad_arguments(mixture_2d):
    sde = VPSDE()
    score = mixture_2d.score_fn(sde)
    grid = box_grid(16)
    with pytest.raises(ValueError, match="0 < eps < t0 <= 1"):
        model_densities(score, sde, grid, eps=0.5, t0=0.5)
    with pytest.raises(ValueError, match="0 < eps < t0 <= 1"):
        model_densities(score, sde, grid, eps=0.0)
    with pytest.raises(ValueError, match="law at t = 1 only"):
        model_densities(score, sde, grid, t0=0.5)
    with pytest.raises(ValueError, match="sde_steps"):
        model_densities(score, sde, grid, sde_steps=0)
    with pytest.raises(ValueError, match="Grid"):
        model_densities(score, sde, (16, 16))
    with pytest.raises(ValueError, match="shape"):
        model_densities(score, sde, grid, start=lambda x: x[:, 0:1])
    with pytest.raises(ValueError, match="NaN"):
        model_densities(score, sde, grid, start=lambda x: torch.full_like(x[:, 0], math.nan))
    with pytest.raises(ValueError, match=r"p/max = .* on the walls"):  # VP prior in a ±3 box
        model_densities(score, sde, box_grid(16, 3.0))


# ============================================================ distances


def gaussian_grid(grid: Grid, mean, cov) -> np.ndarray:
    x = grid.coords - np.asarray(mean)
    ci = np.linalg.inv(cov)
    p = np.exp(-0.5 * np.einsum("...i,ij,...j->...", x, ci, x)) / (2 * np.pi * math.sqrt(np.linalg.det(cov)))
    return p


def test_identical_densities_are_at_distance_zero():
    grid = box_grid(24, 4.0)
    p = gaussian_grid(grid, [0.3, -0.2], np.diag([0.5, 0.8]))
    d = density_distances(p, 3.0 * p, grid)  # normalisation is part of the call
    assert isinstance(d, DensityDistances)
    assert d.tv < 1e-15 and d.hellinger < 1e-7 and d.w2 < 1e-7  # round-off (sqrt of ~1e-16)
    assert abs(d.kl) < 1e-14  # round-off
    assert d.w2_block == (1, 1)


def test_equal_covariance_gaussians_against_closed_forms():
    """N(m1, S), N(m2, S): TV = 2Φ(δ/2) − 1, KL = δ²/2, H² = 1 − exp(−δ²/8) with δ the Mahalanobis
    distance, W2 = |m1 − m2|. The shift is 5 cells along x, so the discrete W2 is the shift itself."""
    grid = box_grid(64, 6.0)
    h = grid.dx[0]
    cov = np.array([[0.6, 0.15], [0.15, 0.4]])
    shift = np.array([5 * h, 0.0])
    p = gaussian_grid(grid, [-0.4, 0.1], cov)
    q = gaussian_grid(grid, np.array([-0.4, 0.1]) + shift, cov)
    d = density_distances(p, q, grid)
    delta = math.sqrt(shift @ np.linalg.solve(cov, shift))
    # |p − q| has a kink where p = q: the midpoint rule is O(h²) there (measured 1.6e-6)
    assert d.tv == pytest.approx(2 * ndtr(delta / 2) - 1, abs=1e-5)
    # smooth integrands over Gaussians with sd >= 3.3 cells: midpoint rule near spectral (measured 1.3e-9)
    assert d.kl == pytest.approx(delta**2 / 2, rel=1e-7)
    assert d.hellinger == pytest.approx(math.sqrt(1 - math.exp(-delta**2 / 8)), rel=1e-7)
    # a shift by whole cells maps cell masses onto cell masses; only the p/max ~ 1e-12 edges differ
    assert d.w2 == pytest.approx(5 * h, rel=1e-6)


def test_w2_of_an_off_grid_shift_and_of_different_covariances_with_coarsening():
    """96² on ±5, coarsened to 48² blocks of H = 0.208. Cell quantisation adds to W2² between 0 and
    D·H²/4: a translation by (k + f) cells moves a share f of the mass k + 1 cells and 1 − f of it k
    cells, so W2² = (k + f)² H² + f (1 − f) H² per axis exactly."""
    grid = box_grid(96, 5.0)
    p = gaussian_grid(grid, [0.0, 0.0], 0.5 * np.eye(2))
    d = density_distances(p, gaussian_grid(grid, [0.37, 0.0], 0.5 * np.eye(2)), grid)
    assert d.w2_block == (2, 2)
    big_h = 2 * grid.dx[0]
    f = 0.37 / big_h % 1.0
    # exact for a translation up to the tails the box cuts (p/max ~ 1e-19 at the walls)
    assert d.w2 == pytest.approx(math.sqrt(0.37**2 + f * (1 - f) * big_h**2), rel=1e-9)

    q = gaussian_grid(grid, [0.37, 0.0], 0.3 * np.eye(2))
    d = density_distances(p, q, grid)
    exact2 = 0.37**2 + 2 * (math.sqrt(0.5) - math.sqrt(0.3)) ** 2  # Bures: |δ|² + ‖Σ1^½ − Σ2^½‖²_F
    # quantisation excess in [0, D H²/4] (measured 0.33 H²); 1e-9: the LP's round-off
    assert exact2 - 1e-9 <= d.w2**2 <= exact2 + 2 * big_h**2 / 4
    # KL and Hellinger closed forms for unequal covariances (midpoint rule, near spectral accuracy).
    # The default floor (1e-12 max q) changes this KL by 1.4e-6 relative: q falls below it where p/max
    # is still ~6e-8; a tiny floor gives the exact integral
    d = density_distances(p, q, grid, kl_floor=1e-250)
    s1, s2 = 0.5, 0.3
    kl = 0.5 * (2 * s1 / s2 + 0.37**2 / s2 - 2 + 2 * math.log(s2 / s1))
    bc = (2 * math.sqrt(s1 * s2) / (s1 + s2)) * math.exp(-0.37**2 / (4 * (s1 + s2)))
    assert d.kl == pytest.approx(kl, rel=1e-7)
    assert d.hellinger == pytest.approx(math.sqrt(1 - bc), rel=1e-7)


def test_kl_floor_keeps_kl_finite_where_q_vanishes():
    grid = box_grid(16, 2.0)
    p = np.ones(grid.shape)
    q = np.ones(grid.shape)
    q[:, :8] = 0.0  # q has no mass on half of p's support
    d = density_distances(p, q, grid)
    # p = 1/16 on the box (area 16), q = 1/8 on half: KL = ½ log(½) + ½ log((1/16)/(1e-12 · 1/8))
    expected = 0.5 * math.log(0.5) + 0.5 * math.log((1 / 16) / (1e-12 / 8))
    assert d.kl == pytest.approx(expected, rel=1e-12)  # round-off
    assert d.tv == pytest.approx(0.5, rel=1e-12)  # round-off
    assert math.isfinite(d.w2)


def test_density_distances_rejects_bad_inputs():
    grid = box_grid(16, 2.0)
    good = np.ones(grid.shape)
    with pytest.raises(ValueError, match="shape"):
        density_distances(np.ones((16, 15)), good, grid)
    bad = good.copy()
    bad[3, 3] = math.nan
    with pytest.raises(ValueError, match="finite"):
        density_distances(good, bad, grid)
    bad[3, 3] = -1.0
    with pytest.raises(ValueError, match="nonnegative"):
        density_distances(bad, good, grid)
    with pytest.raises(ValueError, match="positive mass"):
        density_distances(good, np.zeros(grid.shape), grid)
    with pytest.raises(ValueError, match="Grid"):
        density_distances(good, good, (16, 16))
    with pytest.raises(ValueError, match="kl_floor"):
        density_distances(good, good, grid, kl_floor=0.0)
