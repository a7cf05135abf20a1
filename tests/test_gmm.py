"""fpe_lab.gmm.GaussianMixture against the sympy closed forms, plus sampling, stability and bad input."""

import math

import numpy as np
import pytest
import scipy.stats
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from analytic import gmm_terms
from analytic.marginals import Kind
from fpe_lab.gmm import GaussianMixture
from fpe_lab.sde import SubVPSDE, VESDE, VPSDE

SDES = [
    (VESDE(), Kind.VE, {"sigma_min": 0.01, "sigma_max": 50.0}),
    (VPSDE(), Kind.VP, {"beta_min": 0.1, "beta_max": 20.0}),
    (SubVPSDE(), Kind.SUBVP, {"beta_min": 0.1, "beta_max": 20.0}),
]
SDE_IDS = ["VE", "VP", "subVP"]
HYPOTHESIS = settings(max_examples=12, deadline=None, derandomize=True,
                      suppress_health_check=[HealthCheck.too_slow])


def random_mixture(seed: int, n_comp: int, dim: int):
    """Weights in [0.1, 1], means in a box of side 4, SPD covariances A Aᵀ + 0.05 I."""
    rng = np.random.default_rng(seed)
    a = rng.uniform(-1, 1, size=(n_comp, dim, dim))
    covs = a @ a.transpose(0, 2, 1) + 0.05 * np.eye(dim)
    return rng.uniform(0.1, 1.0, n_comp), rng.uniform(-2, 2, size=(n_comp, dim)), covs, rng


mixtures = st.tuples(st.integers(0, 2**31 - 1), st.integers(1, 4), st.sampled_from([1, 2, 3]))


@pytest.mark.analytic
@HYPOTHESIS
@given(mix=mixtures, sde_index=st.integers(0, 2), t=st.floats(1e-3, 1.0))
def test_score_and_log_prob_equal_sympy(mix, sde_index, t):
    w, means, covs, rng = random_mixture(*mix)
    sde, kind, params = SDES[sde_index]
    x = means[rng.integers(0, len(w), 16)] + 1.5 * rng.normal(size=(16, means.shape[1]))
    ref = gmm_terms.mixture_terms(kind, params, w, means, covs, x, t)
    gmm = GaussianMixture(w, means, covs)
    xt = torch.tensor(x)
    s = gmm.score(xt, t, sde).numpy()
    log_p = gmm.log_prob(xt, t, sde).numpy()
    scale = np.abs(ref["s"]).max() + 1.0
    # float64 round-off amplified by cov condition numbers (<~1e3) and exp/log: 1e-9 is ~1e5 ulps
    np.testing.assert_allclose(s, ref["s"], rtol=1e-9, atol=1e-9 * scale)
    np.testing.assert_allclose(log_p, ref["log_p"], rtol=1e-10, atol=1e-10)


@pytest.mark.analytic
def test_score_comparison_can_fail():
    """A deliberately wrong mixture (one weight changed) is caught by the same comparison."""
    w, means, covs, rng = random_mixture(3, 3, 2)
    x = rng.normal(size=(16, 2))
    sde, kind, params = SDES[1]
    ref = gmm_terms.mixture_terms(kind, params, w, means, covs, x, 0.2)
    w_bad = w.copy()
    w_bad[0] *= 1.5
    s = GaussianMixture(w_bad, means, covs).score(torch.tensor(x), 0.2, sde).numpy()
    assert not np.allclose(s, ref["s"], rtol=1e-9, atol=1e-9)


@pytest.mark.analytic
@pytest.mark.parametrize(("sde", "kind", "params"), SDES, ids=SDE_IDS)
def test_data_score_is_the_t0_limit(sde, kind, params):
    w, means, covs, rng = random_mixture(5, 3, 2)
    gmm = GaussianMixture(w, means, covs)
    x = torch.tensor(rng.normal(size=(8, 2)))
    # exact equality at t = 0: alpha(0) = 1, sigma(0) = 0 for all three SDEs (exact transitions)
    torch.testing.assert_close(gmm.score(x, 0.0, sde), gmm.score(x), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gmm.log_prob(x, 0.0, sde), gmm.log_prob(x), rtol=1e-12, atol=1e-12)


@pytest.mark.analytic
@pytest.mark.parametrize(("sde", "kind", "params"), SDES, ids=SDE_IDS)
def test_stable_far_from_modes_and_at_tiny_t(sde, kind, params):
    w, means, covs, _ = random_mixture(11, 4, 3)
    gmm = GaussianMixture(w, means, covs)
    x = np.array([[50.0, 0.0, 0.0], [0.0, -50.0, 0.0], [30.0, 30.0, -30.0], [0.0, 0.0, 0.0]])
    for t in (1e-4, 1.0):
        ref = gmm_terms.mixture_terms(kind, params, w, means, covs, x, t)
        for dtype in (torch.float64, torch.float32):
            xt = torch.tensor(x, dtype=dtype)
            s, log_p = gmm.score(xt, t, sde), gmm.log_prob(xt, t, sde)
            assert s.dtype == dtype and log_p.dtype == dtype
            assert torch.isfinite(s).all() and torch.isfinite(log_p).all()
            # float32: eps 1.2e-7 times condition ~1e3 and |log p| up to ~1e5; float64: round-off as above
            rtol = 1e-3 if dtype == torch.float32 else 1e-9
            np.testing.assert_allclose(s.double().numpy(), ref["s"], rtol=rtol, atol=rtol)
            np.testing.assert_allclose(log_p.double().numpy(), ref["log_p"], rtol=rtol, atol=rtol)


def _mixture_cdf_1d(w, means, sds, x):
    return sum(wk * scipy.stats.norm.cdf(x, m, s) for wk, m, s in zip(w / w.sum(), means, sds))


@pytest.mark.analytic
def test_samples_pass_ks_against_the_data_density():
    w = np.array([0.2, 0.5, 0.3])
    means = np.array([[-2.0], [0.5], [3.0]])
    covs = np.array([[[0.3]], [[1.0]], [[0.1]]])
    gmm = GaussianMixture(w, means, covs)
    x = gmm.sample(4000, generator=torch.Generator().manual_seed(0)).numpy()[:, 0]
    p = scipy.stats.kstest(x, lambda v: _mixture_cdf_1d(w, means[:, 0], np.sqrt(covs[:, 0, 0]), v)).pvalue
    assert p > 1e-3  # fixed seed; a correct sampler fails with probability 1e-3
    # can fail: the same samples against a mixture with the first mean moved by 0.3
    bad = scipy.stats.kstest(x, lambda v: _mixture_cdf_1d(w, means[:, 0] + [0.3, 0, 0],
                                                          np.sqrt(covs[:, 0, 0]), v)).pvalue
    assert bad < 1e-3


@pytest.mark.analytic
def test_sample_moments_in_2d():
    w, means, covs, _ = random_mixture(2, 3, 2)
    gmm = GaussianMixture(w, means, covs)
    n = 20000
    x = gmm.sample(n, generator=torch.Generator().manual_seed(1)).numpy()
    wn = w / w.sum()
    mean = wn @ means
    cov = sum(wk * (c + np.outer(m, m)) for wk, m, c in zip(wn, means, covs)) - np.outer(mean, mean)
    se = np.sqrt(np.diag(cov) / n)
    assert np.all(np.abs(x.mean(0) - mean) < 4 * se)  # CLT: 4 standard errors


@pytest.mark.analytic
@pytest.mark.parametrize(("sde", "kind", "params"), SDES, ids=SDE_IDS)
def test_perturbed_mixture_matches_time_dependent_score(sde, kind, params):
    w, means, covs, rng = random_mixture(7, 2, 2)
    gmm = GaussianMixture(w, means, covs)
    x = torch.tensor(rng.normal(size=(8, 2)))
    pt = gmm.perturbed(sde, 0.37)
    # two routes to the same float64 numbers (cholesky of the same matrices): round-off only
    torch.testing.assert_close(pt.score(x), gmm.score(x, 0.37, sde), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(pt.log_prob(x), gmm.log_prob(x, 0.37, sde), rtol=1e-12, atol=1e-12)


def test_score_is_differentiable_in_x_and_t():
    w, means, covs, rng = random_mixture(4, 2, 2)
    gmm = GaussianMixture(w, means, covs)
    x = torch.tensor(rng.normal(size=(4, 2)), requires_grad=True)
    t = torch.full((4,), 0.3, dtype=torch.float64, requires_grad=True)
    gx, gt = torch.autograd.grad(gmm.log_prob(x, t, VPSDE()).sum(), (x, t))
    torch.testing.assert_close(gx, gmm.score(x.detach(), 0.3, VPSDE()), rtol=1e-12, atol=1e-12)
    assert torch.isfinite(gt).all() and gt.abs().sum() > 0


GOOD = dict(weights=[0.5, 0.5], means=[[0.0, 0.0], [1.0, 1.0]], covs=np.stack([np.eye(2), np.eye(2)]))


@pytest.mark.parametrize(
    ("change", "pattern"),
    [
        (dict(weights=[0.5, 0.5, 0.1]), "means must have shape"),
        (dict(weights=[[0.5, 0.5]]), "weights must have shape"),
        (dict(weights=[-0.1, 1.0]), "weights must be nonnegative"),
        (dict(weights=[math.nan, 1.0]), "weights must be finite"),
        (dict(weights=[math.inf, 1.0]), "weights must be finite"),
        (dict(weights=[0.0, 0.0]), "weights must not all be zero"),
        (dict(means=[[0.0, 0.0], [1.0, math.nan]]), "means must be finite"),
        (dict(covs=[np.eye(2), np.eye(3)]), "covs"),
        (dict(covs=np.eye(2)), r"covs must have shape \(K, D, D\) = \(2, 2, 2\)"),
        (dict(covs=[np.eye(2), np.array([[1.0, 2.0], [2.0, 1.0]])]), "positive definite.*covs\\[1\\]"),
        (dict(covs=[np.eye(2), np.array([[1.0, 0.5], [0.0, 1.0]])]), "covs must be symmetric"),
        (dict(covs=[np.eye(2), -np.eye(2)]), "positive definite"),
    ],
)
def test_bad_mixture_raises(change, pattern):
    with pytest.raises(ValueError, match=pattern):
        GaussianMixture(**{**GOOD, **change})


def test_bad_call_raises():
    gmm = GaussianMixture(**GOOD)
    x = torch.zeros(3, 2, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"x must have shape \(b, D\) with D = 2"):
        gmm.score(torch.zeros(3, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"x must have shape"):
        gmm.log_prob(torch.zeros(3, dtype=torch.float64))
    with pytest.raises(ValueError, match="x must be finite"):
        gmm.score(torch.tensor([[0.0, math.nan]], dtype=torch.float64))
    with pytest.raises(ValueError, match="t must lie in"):
        gmm.score(x, 1.5, VPSDE())
    with pytest.raises(ValueError, match="t must lie in"):
        gmm.score(x, torch.tensor([0.1, -0.2, 0.3]), VPSDE())
    with pytest.raises(ValueError, match="t must be finite"):
        gmm.log_prob(x, math.nan, VESDE())
    with pytest.raises(ValueError, match="t has shape"):
        gmm.score(x, torch.tensor([0.1, 0.2]), VPSDE())
    with pytest.raises(ValueError, match="sde must be given"):
        gmm.score(x, 0.5)
    with pytest.raises(ValueError, match="n must be"):
        gmm.sample(-1)
    with pytest.raises(ValueError, match="perturbed takes a scalar t"):
        gmm.perturbed(VPSDE(), [0.1, 0.2])


# ---------------------------------------------------------------------------------------------- t = 0
@pytest.mark.analytic
@pytest.mark.parametrize(("sde", "kind", "params"), SDES, ids=SDE_IDS)
def test_time_derivative_at_t0_is_the_limit_of_sympy_from_above(sde, kind, params):
    """∂_t s at t = 0 (forward-mode AD through sigma², not sigma) is finite and is the t → 0⁺ limit of the
    sympy ∂_t s: the gap to sympy at t = 1e-7 and 1e-8 shrinks 10× per decade (first order in t,
    ∂²_t s bounded) — before the fix it was NaN for VE and VP."""
    from fpe_lab.fpe import ForwardModeDt

    w, means, covs, rng = random_mixture(5, 3, 2)
    gmm = GaussianMixture(w, means, covs)
    x = means[rng.integers(0, 3, 16)] + 1.5 * rng.normal(size=(16, 2))
    _, dt_s0 = ForwardModeDt()(gmm.score_fn(sde), torch.tensor(x), torch.zeros(16, dtype=torch.float64))
    assert torch.isfinite(dt_s0).all()
    gaps = []
    for t in (1e-7, 1e-8):
        ref = gmm_terms.mixture_terms(kind, params, w, means, covs, x, t)["dt_s"]
        gaps.append(np.abs(dt_s0.numpy() - ref).max())
    scale = np.abs(ref).max()
    # measured gaps at 1e-8: 1e-8 (VE) to 7e-6 (VP) absolute, ~t·|∂²_t s|; ratio 10.0 for all three
    assert gaps[1] < 1e-5 * scale, gaps
    assert 9 < gaps[0] / gaps[1] < 11, gaps


@pytest.mark.analytic
@pytest.mark.parametrize(("sde", "kind", "params"), SDES, ids=SDE_IDS)
def test_exact_score_fpe_residual_vanishes_at_t0(sde, kind, params):
    """Was NaN for VE and VP (sigma ~ sqrt(t) differentiated at 0); now 0 up to float64 round-off."""
    from fpe_lab.fpe import log_density_fpe_residual, score_fpe_residual, score_fpe_terms

    w, means, covs, rng = random_mixture(5, 3, 2)
    gmm = GaussianMixture(w, means, covs)
    x = torch.tensor(means[rng.integers(0, 3, 32)] + 1.5 * rng.normal(size=(32, 2)))
    terms = score_fpe_terms(gmm.score_fn(sde), sde, x, 0.0)
    r = score_fpe_residual(gmm.score_fn(sde), sde, x, 0.0)
    assert torch.isfinite(terms.dt_s).all() and torch.isfinite(r).all()
    torch.testing.assert_close(r, terms.residual, rtol=0, atol=1e-12)
    # the terms are O(1..10) and do not vanish individually; their sum does, to round-off
    # (measured |R| ≤ 2e-15 with max scale 6): 1e-12 relative is ~1e4 ulps of headroom
    assert terms.dt_s.abs().max() > 1e-2
    assert (r.norm(dim=-1) / terms.scale).max() < 1e-12
    # the same for the log-density FPE
    lr = log_density_fpe_residual(lambda y, t: gmm.log_prob(y, t, sde), sde, x, 0.0)
    assert lr.abs().max() < 1e-12 * (1 + terms.scale.max())


@pytest.mark.parametrize(("sde", "kind", "params"), SDES, ids=SDE_IDS)
def test_perturbed_at_t0_is_the_data_mixture(sde, kind, params):
    w, means, covs, _ = random_mixture(6, 2, 2)
    gmm = GaussianMixture(w, means, covs)
    p0 = gmm.perturbed(sde, 0.0)
    assert torch.equal(p0.means, gmm.means) and torch.equal(p0.covs, gmm.covs)


def test_empty_batch_is_an_error_naming_the_shape():
    gmm = GaussianMixture(**GOOD)
    empty = torch.zeros(0, 2, dtype=torch.float64)
    for call in (lambda: gmm.score(empty), lambda: gmm.log_prob(empty), lambda: gmm.score(empty, 0.5, VPSDE()),
                 lambda: gmm.score_fn(VESDE())(empty, torch.zeros(0, dtype=torch.float64))):
        with pytest.raises(ValueError, match=r"x is an empty batch: shape \(0, 2\)"):
            call()
    assert gmm.sample(0).shape == (0, 2)  # no samples requested: not an input batch
