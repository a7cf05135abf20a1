"""Toy data sets as distributions: samples, exact densities and perturbed scores agree with each other."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import scipy.special
import scipy.stats
import torch

from fpe_lab.data import TOY_NAMES, CurveDistribution, toy_distribution
from fpe_lab.fpe import score_fpe_terms
from fpe_lab.groundtruth import Grid
from fpe_lab.sde import SubVPSDE, VESDE, VPSDE

CURVES = ("rings", "moons", "swissroll", "pinwheel")
SDES = [VPSDE(), VESDE(), SubVPSDE()]


def _sde_id(sde) -> str:
    return type(sde).__name__


def _seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _box_points(bounds, n: int) -> torch.Tensor:
    return torch.from_numpy(Grid(bounds, (n, n)).coords.reshape(-1, 2))


# ------------------------------------------------------------------------------------------ factory
def test_names_build_their_distribution():
    assert len(TOY_NAMES) == 8 and len(set(TOY_NAMES)) == 8
    for name in TOY_NAMES:
        d = toy_distribution(name)
        assert d.name == name
        assert (d.mixture is not None) == (name in ("8gaussians", "gmm", "imbalanced"))


@pytest.mark.parametrize("name", TOY_NAMES)
def test_bounds_resolve_the_width_on_256_cells(name):
    d = toy_distribution(name)
    assert d.cells_per_width(256) >= 4.0, d.cells_per_width(256)
    # the walls are ≥ 6 w (GMM: 7 sd) past the support of mu: a sample within 1 w of a wall needs a
    # 5-sd normal deviate, probability < 20k·3e-7 ≈ 6e-3 at this fixed seed
    x = d.sample(20_000, _seeded(0))
    for axis, (lo, hi) in enumerate(d.bounds):
        assert x[:, axis].min() > lo + d.width and x[:, axis].max() < hi - d.width


# ------------------------------------------------------------------------------------------ p_0
@pytest.fixture(scope="module")
def densities():
    """p_0 on a 96² grid over each set's bounds (≥ 1.8 cells per width; computed once)."""
    out = {}
    for name in TOY_NAMES:
        d = toy_distribution(name)
        grid = Grid(d.bounds, (96, 96))
        out[name] = (d, grid, d.density(grid))
    return out


@pytest.mark.parametrize("name", TOY_NAMES)
def test_density_integrates_to_one(densities, name):
    d, grid, p = densities[name]
    assert p.shape == grid.shape and p.dtype == np.float64 and (p >= 0).all()
    # Midpoint rule on a smooth density with ≥ 1.8 cells per width: error ~exp(−2π²(w/h)²) < 1e-27;
    # the mass beyond the walls (≥ 5 w past the support of mu) is < 1e-8.
    assert abs(grid.integrate(p) - 1) < 1e-8


@pytest.mark.parametrize("name", TOY_NAMES)
def test_density_is_exp_log_prob(densities, name):
    d, grid, p = densities[name]
    idx = np.random.default_rng(0).integers(0, p.size, 200)
    x = torch.from_numpy(grid.coords.reshape(-1, 2)[idx])
    np.testing.assert_allclose(p.reshape(-1)[idx], d.log_prob(x).exp().numpy(), rtol=1e-12)  # same float64 path


def _binned_chi2_pvalue(samples: torch.Tensor, log_prob, bounds, bins: int = 12, sub: int = 8) -> float:
    """Pearson χ² p-value of samples against a density over bins×bins cells of the box plus one overflow bin.

    Cell probabilities by the midpoint rule on sub×sub points per cell; cells with expectation < 5
    are pooled with the overflow bin.
    """
    fine = Grid(bounds, (bins * sub, bins * sub))
    p = log_prob(torch.from_numpy(fine.coords.reshape(-1, 2))).exp().numpy().reshape(fine.shape)
    prob = p.reshape(bins, sub, bins, sub).sum(axis=(1, 3)) * fine.cell_volume
    x = samples.numpy()
    (lo0, hi0), (lo1, hi1) = bounds
    counts, _, _ = np.histogram2d(x[:, 0], x[:, 1], bins=bins, range=[[lo0, hi0], [lo1, hi1]])
    n = len(x)
    expected, observed = prob.reshape(-1) * n, counts.reshape(-1)
    keep = expected >= 5
    exp_k = np.append(expected[keep], n - expected[keep].sum())
    obs_k = np.append(observed[keep], n - observed[keep].sum())
    return float(scipy.stats.chisquare(obs_k, exp_k).pvalue)


@pytest.mark.parametrize("name", TOY_NAMES)
def test_samples_follow_the_density(name):
    d = toy_distribution(name)
    x = d.sample(20_000, _seeded(1))
    pvalue = _binned_chi2_pvalue(x, d.log_prob, d.bounds)
    # Fixed seed, H0 true: fails with probability 1e-3 per seed. The midpoint bias of the cell
    # probabilities (~(h/w)²/24 ≈ 1 % per cell) is well below the counting noise (≈ 7 %).
    assert pvalue > 1e-3, pvalue
    # The test has power: the same samples smoothed by another w (total width √2 w) are rejected.
    wider = x + d.width * torch.randn(x.shape, generator=_seeded(2), dtype=x.dtype)
    assert _binned_chi2_pvalue(wider, d.log_prob, d.bounds) < 1e-6


# each set against one SDE (rotating through VP, VE, sub-VP); all pairs run under `slow`
PERTURBED_CASES = [(VPSDE(), 0.1), (VESDE(), 0.3), (SubVPSDE(), 0.2)]
ROTATED = [(name, *PERTURBED_CASES[i % 3]) for i, name in enumerate(TOY_NAMES)]
ALL_PAIRS = [(name, *case) for name in TOY_NAMES for case in PERTURBED_CASES]


@pytest.mark.parametrize(
    "name, sde, t",
    ROTATED + [pytest.param(*c, marks=pytest.mark.slow) for c in ALL_PAIRS if c not in ROTATED],
    ids=lambda v: _sde_id(v) if hasattr(v, "marginal") else str(v),
)
def test_perturbed_samples_follow_the_perturbed_density(name, sde, t):
    """x_t = alpha x_0 + sigma z with x_0 from ``sample`` against ``perturbed_log_prob``."""
    d = toy_distribution(name)
    alpha, sigma = (float(v) for v in sde.marginal(torch.tensor(t, dtype=torch.float64)))
    x0 = d.sample(20_000, _seeded(3))
    xt = alpha * x0 + sigma * torch.randn(x0.shape, generator=_seeded(4), dtype=x0.dtype)
    bounds = tuple((1.2 * lo, 1.2 * hi) for lo, hi in d.bounds)
    pvalue = _binned_chi2_pvalue(xt, lambda x: d.perturbed_log_prob(x, t, sde), bounds)
    assert pvalue > 1e-3, pvalue  # H0 true at a fixed seed; same reasoning as above


# ------------------------------------------------------------------------------------------ p_t
@pytest.mark.parametrize("name", TOY_NAMES)
def test_perturbed_at_time_zero_is_log_prob(name):
    d = toy_distribution(name)
    x = d.sample(300, _seeded(5))
    lp0 = d.log_prob(x)
    for sde in SDES:
        # sigma(0) = 0 and alpha(0) = 1 exactly: the same numbers, up to float64 round-off
        torch.testing.assert_close(d.perturbed_log_prob(x, 0.0, sde), lp0, rtol=0, atol=1e-12)
        torch.testing.assert_close(d.perturbed_score(x, 0.0, sde), d.score(x), rtol=0, atol=1e-10)
    # t → 0 under VE, p_t = p_0 ⊛ N(0, sigma² I) solves ∂p/∂(sigma²) = ½Δp, so
    # (log p_t − log p_0)/sigma² → ½(∇·s_0 + |s_0|²), computed here from ``score`` by autograd.
    sde, t = VESDE(), 1e-5
    sigma2 = float(sde.marginal(torch.tensor(t, dtype=torch.float64))[1]) ** 2  # ≈ 1.7e-8
    xg = x.clone().requires_grad_(True)
    s0 = d.score(xg)
    div = sum(torch.autograd.grad(s0[:, i].sum(), xg, retain_graph=True)[0][:, i] for i in range(2))
    expected = 0.5 * (div + s0.pow(2).sum(-1)).detach()
    rate = (d.perturbed_log_prob(x, t, sde) - lp0) / sigma2
    # O(sigma²·|∂⁴ log p|) ≈ 1.7e-8/w⁴ ≲ 1e-5 relative; round-off 1e-15/(sigma²·|rate|) ≲ 1e-7·(1 + 1/|rate|)
    assert ((rate - expected).abs() / (1 + expected.abs())).max() < 1e-4


@pytest.mark.parametrize("name", TOY_NAMES)
def test_perturbed_score_is_autograd_of_perturbed_log_prob(name):
    d = toy_distribution(name)
    x = d.sample(40, _seeded(6))
    lo, hi = d.bounds[0]
    far = torch.tensor([[2 * hi, 0.0], [lo, hi], [0.0, 0.0], [0.5 * hi, -3 * hi]], dtype=torch.float64)
    x = torch.cat([x, far]).requires_grad_(True)
    for sde in SDES:
        for t in (0.0, 0.02, 0.3, 1.0):
            (auto,) = torch.autograd.grad(d.perturbed_log_prob(x, t, sde).sum(), x)
            exact = d.perturbed_score(x.detach(), t, sde)
            scale = 1 + exact.abs()
            # float64 round-off, amplified by cancellation in (E[alpha y|x] − x)/s² and in Φ differences
            assert ((auto - exact).abs() / scale).max() < 1e-9, (sde, t)


@pytest.mark.parametrize("name", TOY_NAMES)
def test_perturbed_score_solves_the_score_fpe(name):
    """∂_t s = ∇[½g²∇·s + ½g²‖s‖² − ⟨f,s⟩ − ∇·f] holds for perturbed_score, checked by fpe_lab.fpe."""
    d = toy_distribution(name)
    x = d.sample(16, _seeded(7))
    for sde, t in [(VPSDE(), 0.05), (VESDE(), 0.5), (SubVPSDE(), 0.2)]:
        terms = score_fpe_terms(d.score_fn(sde), sde, x, t)
        # float64 round-off of derivatives up to third order of a logsumexp, relative to the terms
        assert (terms.residual.abs().max() / terms.scale.abs().max()) < 1e-9
    # it can fail: the VP-perturbed score does not solve the VE equation
    wrong = score_fpe_terms(d.score_fn(VPSDE()), VESDE(), x, 0.5)
    assert wrong.residual.abs().max() / wrong.scale.abs().max() > 1e-2


@pytest.mark.analytic
@pytest.mark.parametrize("name", ["8gaussians", "gmm"])
def test_mixtures_equal_their_gaussian_mixture(name):
    d = toy_distribution(name)
    gm = d.mixture
    x = d.sample(200, _seeded(8))
    torch.testing.assert_close(d.log_prob(x), gm.log_prob(x), rtol=0, atol=1e-12)  # same formula, round-off
    for sde in SDES:
        for t in (0.01, 0.4, 1.0):
            torch.testing.assert_close(d.perturbed_log_prob(x, t, sde), gm.log_prob(x, t, sde), rtol=0, atol=1e-12)
            torch.testing.assert_close(d.perturbed_score(x, t, sde), gm.score(x, t, sde), rtol=1e-12, atol=1e-10)


@pytest.mark.analytic
def test_eight_gaussians_are_ffjord_layout():
    gm = toy_distribution("8gaussians").mixture
    radii = gm.means.norm(dim=-1)
    torch.testing.assert_close(radii, torch.full((8,), 4 / math.sqrt(2), dtype=torch.float64))
    torch.testing.assert_close(gm.covs, torch.eye(2, dtype=torch.float64).expand(8, 2, 2) / 8)  # sd 0.5/√2


@pytest.mark.analytic
def test_checkerboard_matches_scipy_closed_form():
    """Independent numpy/scipy evaluation of Σ_k (1/8) Π_d [Φ((hi−x)/s) − Φ((lo−x)/s)] / (2 alpha)."""
    d = toy_distribution("checkerboard")
    x = torch.cat([d.sample(200, _seeded(9)), _box_points(d.bounds, 12)])
    corners = np.array([[2 * i - 4, 2 * j - 4] for i in range(4) for j in range(4) if (i + j) % 2 == 0], float)
    for alpha, sigma, t, sde in [(1.0, 0.0, 0.0, VPSDE())] + [
        (*(float(v) for v in s.marginal(torch.tensor(t, dtype=torch.float64))), t, s)
        for s, t in [(VPSDE(), 0.3), (VESDE(), 0.1)]
    ]:
        s = math.sqrt(alpha**2 * d.width**2 + sigma**2)
        xn = x.numpy()[:, None, :]
        lo, hi = alpha * corners[None], alpha * (corners[None] + 2)
        upper, lower = (hi - xn) / s, (lo - xn) / s
        # right of the middle take the difference of survival functions (no cancellation near 1)
        fac = np.where(lower > 0, scipy.stats.norm.sf(lower) - scipy.stats.norm.sf(upper),
                       scipy.stats.norm.cdf(upper) - scipy.stats.norm.cdf(lower))
        ref = np.log((fac.prod(-1) / (2 * alpha) ** 2).sum(-1) / 8)
        got = d.perturbed_log_prob(x, t, sde).numpy()
        mask = ref > -30  # further out the difference of two tiny tails loses digits in the reference
        np.testing.assert_allclose(got[mask], ref[mask], rtol=0, atol=1e-11)  # float64 round-off of Φ differences


@pytest.mark.analytic
def test_rings_quadrature_matches_bessel_closed_form():
    """A uniform circle of radius R ⊛ N(0, s²): p = exp(−(r − R)²/2s²) I0e(rR/s²) / (2π s²)."""
    d = toy_distribution("rings")
    x = torch.cat([d.sample(300, _seeded(10)), _box_points(d.bounds, 24)])
    r = x.norm(dim=-1).numpy()
    for sde, t in [(VPSDE(), 0.0), (VPSDE(), 0.05), (VESDE(), 0.4)]:
        alpha, sigma = (float(v) for v in sde.marginal(torch.tensor(t, dtype=torch.float64)))
        s2 = alpha**2 * d.width**2 + sigma**2
        terms = [
            np.log(0.25 / (2 * np.pi * s2)) - (r - alpha * R) ** 2 / (2 * s2)
            + np.log(scipy.special.i0e(r * alpha * R / s2))
            for R in (3.0, 2.25, 1.5, 0.75)
        ]
        ref = scipy.special.logsumexp(np.stack(terms), axis=0)
        got = d.perturbed_log_prob(x, t, sde).numpy()
        np.testing.assert_allclose(got, ref, rtol=0, atol=1e-10)  # quadrature error ≪ 1e-10 (see below)


# ------------------------------------------------------------------------------------------ quadrature
def _quadrature_error(d: CurveDistribution, finer: CurveDistribution, sde, t) -> tuple[float, float]:
    """max |Δ log p_t| over a 48² grid on 1.2× the bounds: everywhere, and where p_t ≥ e^-30 max."""
    x = _box_points(tuple((1.2 * lo, 1.2 * hi) for lo, hi in d.bounds), 48)
    a, b = d.perturbed_log_prob(x, t, sde), finer.perturbed_log_prob(x, t, sde)
    err = (a - b).abs()
    return err.max().item(), err[b > b.max() - 30].max().item()


@pytest.mark.parametrize("name", CURVES)
def test_quadrature_is_converged(name):
    """Halving the panels changes log p_t by < 1e-8 on 1.2× the box (round-off where p ≥ e^-30 max)."""
    d = toy_distribution(name)
    finer = dataclasses.replace(d, panel_width=d.panel_width / 2)
    for sde, t in [(VPSDE(), 0.0), (VPSDE(), 0.05), (VESDE(), 0.2)]:
        everywhere, bulk = _quadrature_error(d, finer, sde, t)
        # measured: ≤ 3e-9 in the far corners (p ~ e^-300 max, where the integrand along a convex curve
        # narrows to w/sqrt(1 + d·curvature)), ≤ 1e-13 where p ≥ e^-30 max (float64 round-off)
        assert everywhere < 1e-8 and bulk < 1e-11, (sde, t, everywhere, bulk)
    # the check can fail: a coarse rule (panels of 4 w, 4 nodes) is visibly off
    coarse = dataclasses.replace(d, panel_width=4.0, order=4)
    assert _quadrature_error(coarse, d, VPSDE(), 0.0)[0] > 1e-3


@pytest.mark.parametrize("name", CURVES)
def test_panel_pruning_changes_nothing_but_round_off(name, monkeypatch):
    """Skipping panels bounded below e^-45·p gives the full quadrature sum, also for per-point times."""
    import fpe_lab.data.toy as toy

    d = toy_distribution(name)
    x = torch.cat([d.sample(500, _seeded(15)), _box_points(tuple((2 * lo, 2 * hi) for lo, hi in d.bounds), 20)])
    t = torch.rand(x.shape[0], generator=_seeded(16), dtype=torch.float64) ** 3  # many small times
    cases = [(VPSDE(), t), (VESDE(), t), (VPSDE(), 0.0)]
    monkeypatch.setattr(toy, "_PRUNE_CHUNK", 16)  # small patches: most panels are dropped
    pruned = [(d.perturbed_log_prob(x, tt, sde), d.perturbed_score(x, tt, sde)) for sde, tt in cases]
    everything = lambda x, a, v, node_feat, *rest: torch.arange(node_feat.shape[0])  # noqa: E731
    monkeypatch.setattr(toy, "_panels_needed", everything)
    for (sde, tt), (lp, s) in zip(cases, pruned):
        full_lp, full_s = d.perturbed_log_prob(x, tt, sde), d.perturbed_score(x, tt, sde)
        # dropped mass < 1e-16 relative by construction; the rest is summation-order round-off
        torch.testing.assert_close(lp, full_lp, rtol=0, atol=1e-12)
        torch.testing.assert_close(s, full_s, rtol=1e-10, atol=1e-9)


def test_panel_pruning_threshold_matters(monkeypatch):
    """The check above can fail: pruning at 1 nat instead of 45, point by point, visibly changes log p."""
    import fpe_lab.data.toy as toy

    d = toy_distribution("moons")
    x = d.sample(100, _seeded(17))
    full = d.log_prob(x)
    monkeypatch.setattr(toy, "_PRUNE_NATS", 1.0)
    monkeypatch.setattr(toy, "_PRUNE_CHUNK", 1)  # one point per chunk: panels kept for that point only
    assert (d.log_prob(x) - full).abs().max() > 1e-6


# ------------------------------------------------------------------------------------------ sampling
@pytest.mark.parametrize("name", TOY_NAMES)
def test_sampling_is_deterministic_for_a_seed(name):
    d = toy_distribution(name)
    a, b = d.sample(500, _seeded(11)), d.sample(500, _seeded(11))
    assert a.shape == (500, 2) and a.dtype == torch.float64
    assert torch.equal(a, b)
    assert not torch.equal(a, d.sample(500, _seeded(12)))
    assert d.sample(0, _seeded(11)).shape == (0, 2)


# ------------------------------------------------------------------------------------------ bad input
def test_bad_input_raises_value_error():
    with pytest.raises(ValueError, match="name must be one of checkerboard, 8gaussians, gmm, rings"):
        toy_distribution("spirals")
    with pytest.raises(ValueError, match="bad parameters"):
        toy_distribution("rings", radius=2.0)
    with pytest.raises(ValueError, match="w must be a finite positive"):
        toy_distribution("moons", w=-0.1)
    with pytest.raises(ValueError, match="order must be an int"):
        toy_distribution("swissroll", order=0)
    d = toy_distribution("checkerboard")
    for n in (-1, 2.5, True):
        with pytest.raises(ValueError, match="n must be a nonnegative int"):
            d.sample(n)
    for x in (torch.zeros(3, 3), torch.zeros(4), torch.zeros(2, 2, 2)):
        with pytest.raises(ValueError, match=r"x must have shape \(n, 2\)"):
            d.log_prob(x)
    with pytest.raises(ValueError, match="x must be a torch.Tensor"):
        d.log_prob(np.zeros((3, 2)))
    with pytest.raises(ValueError, match="x must be finite"):
        d.perturbed_score(torch.tensor([[0.0, float("nan")]]), 0.5, VPSDE())
    with pytest.raises(ValueError, match="t must lie in"):
        d.perturbed_log_prob(torch.zeros(3, 2), 1.5, VPSDE())
    with pytest.raises(ValueError, match="sde must be a linear SDE"):
        d.perturbed_log_prob(torch.zeros(3, 2), 0.5, object())
    with pytest.raises(ValueError, match="grid must be a 2D"):
        d.density(Grid(((-1.0, 1.0),), (16,)))


# ------------------------------------------------------------------------------------------ slow
@pytest.mark.slow
@pytest.mark.parametrize("name", TOY_NAMES)
def test_density_on_the_suggested_256_grid(name):
    """At the resolution the solvers use: mass 1 and samples consistent on 24² bins with 200k samples."""
    d = toy_distribution(name)
    grid = Grid(d.bounds, (256, 256))
    assert abs(grid.integrate(d.density(grid)) - 1) < 1e-8  # midpoint rule spectrally exact; tail mass < 1e-8
    pvalue = _binned_chi2_pvalue(d.sample(200_000, _seeded(13)), d.log_prob, d.bounds, bins=24, sub=16)
    assert pvalue > 1e-3, pvalue  # H0 true at a fixed seed


# ------------------------------------------------------------------------------------------ gpu
@pytest.mark.gpu
@pytest.mark.parametrize("name", TOY_NAMES)
def test_cuda_points_give_the_cpu_values(name):
    d = toy_distribution(name)
    x = d.sample(256, _seeded(14))
    sde = VPSDE()
    lp = d.perturbed_log_prob(x.cuda(), 0.1, sde)
    s = d.perturbed_score(x.cuda(), 0.1, sde)
    assert lp.device.type == "cuda" and s.device.type == "cuda"
    # same float64 formulas; different reduction orders on the two devices: round-off only
    torch.testing.assert_close(lp.cpu(), d.perturbed_log_prob(x, 0.1, sde), rtol=0, atol=1e-10)
    torch.testing.assert_close(s.cpu(), d.perturbed_score(x, 0.1, sde), rtol=1e-10, atol=1e-9)
