"""fpe_lab.fpe: every score-FPE term against sympy, wrong scores against finite differences,
Hutchinson unbiasedness, conservativity, image-shaped inputs and bad input."""

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from analytic import gmm_terms
from analytic.marginals import Kind
from fpe_lab.fpe import (
    Estimate,
    ExactDivergence,
    Hutchinson,
    Probe,
    ResidualEstimator,
    curl_2d,
    divergence,
    jacobian,
    jacobian_asymmetry,
    jacobian_asymmetry_sq,
    log_density_fpe_residual,
    residual_sq,
    score_fpe_residual,
    score_fpe_terms,
)
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


def random_mixture(seed: int, n_comp: int, dim: int, min_var: float = 0.05):
    """Weights in [0.1, 1], means in a box of side 4, SPD covariances A Aᵀ + min_var I."""
    rng = np.random.default_rng(seed)
    a = rng.uniform(-1, 1, size=(n_comp, dim, dim))
    covs = a @ a.transpose(0, 2, 1) + min_var * np.eye(dim)
    return rng.uniform(0.1, 1.0, n_comp), rng.uniform(-2, 2, size=(n_comp, dim)), covs, rng


def points(rng, means, n):
    return means[rng.integers(0, len(means), n)] + 1.5 * rng.normal(size=(n, means.shape[1]))


def equation_scale(ref) -> np.ndarray:
    """Per-sample size of the terms, sqrt(‖∂_t s‖² + ‖½g²∇∇·s‖² + ‖½g²∇‖s‖²‖² + ‖∇⟨f,s⟩‖²)."""
    h = 0.5 * ref["g2"][:, None]
    parts = (ref["dt_s"], h * ref["grad_div_s"], h * ref["grad_sq_norm_s"], ref["grad_f_dot_s"])
    return np.sqrt(sum(np.sum(p**2, -1) for p in parts))


# float64 round-off in a third-order autograd chain and in the sympy ratios of p-derivatives,
# amplified by cov condition numbers up to ~1e3: 1e-9 of the equation's size is ~1e6 ulps of headroom
TERM_TOL = 1e-9


@pytest.mark.analytic
@HYPOTHESIS
@given(mix=st.tuples(st.integers(0, 2**31 - 1), st.integers(1, 4), st.sampled_from([1, 2, 3])),
       sde_index=st.integers(0, 2), t=st.floats(1e-3, 1.0))
def test_every_term_equals_sympy_and_exact_residual_vanishes(mix, sde_index, t):
    w, means, covs, rng = random_mixture(*mix)
    sde, kind, params = SDES[sde_index]
    x = points(rng, means, 12)
    ref = gmm_terms.mixture_terms(kind, params, w, means, covs, x, t)
    gmm = GaussianMixture(w, means, covs)
    terms = score_fpe_terms(gmm.score_fn(sde), sde, torch.tensor(x), t)
    scale = equation_scale(ref)[:, None]
    half_g2 = 0.5 * ref["g2"][:, None]
    np.testing.assert_allclose(terms.g2.numpy(), ref["g2"], rtol=1e-12)
    pairs = {
        "dt_s": (terms.dt_s, ref["dt_s"]),
        "½g²∇∇·s": (half_g2 * terms.grad_div_s.numpy(), half_g2 * ref["grad_div_s"]),
        "½g²∇‖s‖²": (half_g2 * terms.grad_sq_norm_s.numpy(), half_g2 * ref["grad_sq_norm_s"]),
        "∇⟨f,s⟩": (terms.grad_f_dot_s, ref["grad_f_dot_s"]),
        "∇∇·f": (terms.grad_div_f, ref["grad_div_f"]),
    }
    for name, (lib, r) in pairs.items():
        err = np.abs(np.asarray(lib) - r)
        assert np.all(err <= TERM_TOL * scale), f"{name}: max err/scale {np.max(err / scale):.2e}"
    s_scale = np.abs(ref["s"]).max() + 1
    np.testing.assert_allclose(terms.s.numpy(), ref["s"], rtol=TERM_TOL, atol=TERM_TOL * s_scale)
    div = divergence(gmm.score_fn(sde), torch.tensor(x), t).numpy()
    np.testing.assert_allclose(div, ref["div_s"], rtol=TERM_TOL, atol=TERM_TOL * s_scale**2)
    # The exact score solves the score FPE: residual ~ round-off relative to the size of its terms.
    r_terms = terms.residual.numpy()
    r_fast = score_fpe_residual(gmm.score_fn(sde), sde, torch.tensor(x), t).numpy()
    assert np.all(np.abs(r_terms) <= TERM_TOL * scale)
    assert np.all(np.abs(r_fast) <= TERM_TOL * scale)
    np.testing.assert_allclose(terms.scale.numpy(), scale[:, 0], rtol=1e-8)


@pytest.mark.analytic
@pytest.mark.parametrize(("sde", "kind", "params"), SDES, ids=SDE_IDS)
def test_log_density_residual_of_exact_mixture_vanishes(sde, kind, params):
    w, means, covs, rng = random_mixture(21, 3, 2)
    gmm = GaussianMixture(w, means, covs)
    x = points(rng, means, 10)
    t = 0.25
    ref = gmm_terms.mixture_terms(kind, params, w, means, covs, x, t)
    r = log_density_fpe_residual(lambda xx, tt: gmm.log_prob(xx, tt, sde), sde, torch.tensor(x), t).numpy()
    size = np.abs(ref["dt_log_p"]) + 0.5 * ref["g2"] * (np.abs(ref["div_s"]) + np.sum(ref["s"] ** 2, -1))
    assert np.all(np.abs(r) <= TERM_TOL * size)  # float64 round-off, as above
    assert np.all(np.abs(ref["log_residual"]) <= TERM_TOL * size)


# ----------------------------------------------------------------------------- wrong scores
def fd_residual(score_fn, sde, x: torch.Tensor, t: float, h: float = 1e-3) -> torch.Tensor:
    """R by central differences only (no autograd): ∂_t s, ∇·s, ∇·f and ∇φ each with step h.

    Truncation O(h²) per difference; round-off ~ eps |s| / h² ~ 1e-10 for h = 1e-3.
    """
    b, dim = x.shape
    tt = torch.full((b,), t, dtype=x.dtype)
    eye = torch.eye(dim, dtype=x.dtype)

    def div(fn, xx):
        return sum((fn(xx + h * eye[i])[:, i] - fn(xx - h * eye[i])[:, i]) / (2 * h) for i in range(dim))

    def phi(xx):
        s = score_fn(xx, tt)
        g2 = sde.diffusion(tt) ** 2
        div_s = div(lambda z: score_fn(z, tt), xx)
        div_f = div(lambda z: sde.drift(z, tt), xx)
        return 0.5 * g2 * (div_s + (s**2).sum(-1)) - (sde.drift(xx, tt) * s).sum(-1) - div_f

    dt_s = (score_fn(x, tt + h) - score_fn(x, tt - h)) / (2 * h)
    grad_phi = torch.stack([(phi(x + h * eye[j]) - phi(x - h * eye[j])) / (2 * h) for j in range(dim)], -1)
    return dt_s - grad_phi


def _skew(dim: int, rng) -> torch.Tensor:
    a = torch.tensor(rng.normal(size=(dim, dim)))
    return a - a.T


WRONG = ["other_time", "rotation"]


@pytest.mark.analytic
@pytest.mark.parametrize("wrong", WRONG)
@pytest.mark.parametrize("dim", [2, 3])
@pytest.mark.parametrize(("sde", "kind", "params"), SDES, ids=SDE_IDS)
def test_wrong_score_has_residual_matching_finite_differences(sde, kind, params, dim, wrong):
    w, means, covs, rng = random_mixture(31 + dim, 3, dim, min_var=0.3)
    gmm = GaussianMixture(w, means, covs)
    exact = gmm.score_fn(sde)
    match wrong:
        case "other_time":
            def score_fn(x, t):
                return exact(x, 0.8 * t)
        case "rotation":
            skew = 0.1 * _skew(dim, rng)

            def score_fn(x, t):
                return exact(x, t) + x @ skew.T.to(x)
    x = torch.tensor(points(rng, means, 16))
    t = 0.4
    r = score_fpe_residual(score_fn, sde, x, t)
    terms = score_fpe_terms(score_fn, sde, x, t)
    r_fd = fd_residual(score_fn, sde, x, t)
    size = terms.scale[:, None]
    rel = (r.norm(dim=-1) / terms.scale).numpy()
    # clearly nonzero: ~1e6 times the round-off level of the exact score's residual (TERM_TOL)
    assert np.median(rel) > 1e-3, f"residual of a wrong score should be clearly nonzero; median rel {np.median(rel):.2e}"
    # O(h²) truncation of nested central differences, h = 1e-3, on scores with cov eigenvalues >= 0.3
    assert torch.all((r - r_fd).abs() <= 1e-4 * size), f"max |R − R_fd|/scale {((r - r_fd).abs() / size).max():.2e}"
    torch.testing.assert_close(r, terms.residual, rtol=1e-10, atol=1e-10)  # two autograd routes, round-off


@pytest.mark.analytic
def test_fd_reference_detects_a_sign_error():
    """The FD comparison can fail: R with the sign of ∇⟨f, s⟩ flipped does not match."""
    sde = VPSDE()
    w, means, covs, rng = random_mixture(40, 2, 2, min_var=0.3)
    exact = GaussianMixture(w, means, covs).score_fn(sde)

    def score_fn(x, t):
        return exact(x, 0.8 * t)

    x = torch.tensor(points(rng, means, 8))
    terms = score_fpe_terms(score_fn, sde, x, 0.4)
    wrong_r = terms.residual - 2 * terms.grad_f_dot_s
    r_fd = fd_residual(score_fn, sde, x, 0.4)
    assert not torch.all((wrong_r - r_fd).abs() <= 1e-4 * terms.scale[:, None])


@pytest.mark.analytic
def test_log_density_residual_is_consistent_with_score_residual():
    """∇_x (log-density residual of log q) = score residual of ∇ log q, for a *wrong* q too."""
    sde = SubVPSDE()
    w, means, covs, rng = random_mixture(50, 2, 2, min_var=0.3)
    gmm = GaussianMixture(w, means, covs)

    def log_q(x, t):
        return gmm.log_prob(x, 0.7 * t, sde)

    def score_q(x, t):
        return gmm.score(x, 0.7 * t, sde)

    x = torch.tensor(points(rng, means, 8))
    h = 1e-4
    eye = torch.eye(2, dtype=x.dtype)
    grad_r = torch.stack([
        (log_density_fpe_residual(log_q, sde, x + h * eye[j], 0.3) - log_density_fpe_residual(log_q, sde, x - h * eye[j], 0.3))
        / (2 * h) for j in range(2)], -1)
    r = score_fpe_residual(score_q, sde, x, 0.3)
    scale = score_fpe_terms(score_q, sde, x, 0.3).scale[:, None]
    assert torch.all(r.norm(dim=-1) > 1e-2 * scale[:, 0])  # clearly nonzero
    assert torch.all((grad_r - r).abs() <= 1e-6 * scale)  # O(h²) with h = 1e-4, round-off eps/h ~ 1e-12


# ----------------------------------------------------------------------------- Hutchinson
@pytest.mark.analytic
@pytest.mark.parametrize("probe", list(Probe))
def test_hutchinson_is_unbiased_within_4_standard_errors(probe):
    sde = VPSDE()
    w, means, covs, rng = random_mixture(60, 3, 3)
    gmm = GaussianMixture(w, means, covs)
    exact = gmm.score_fn(sde)

    def rotated(x, t):  # non-symmetric Jacobian with large off-diagonal entries: large probe variance
        return exact(x, t) + x @ (0.5 * _skew(3, np.random.default_rng(0))).T.to(x)

    n_pts, n_rep = 6, 2000
    x = torch.tensor(points(rng, means, n_pts))
    x_rep = x.repeat(n_rep, 1)  # n_rep independent single-probe estimates per point, one batched pass
    est = Hutchinson(1, probe, torch.Generator().manual_seed(1))
    div_exact = divergence(rotated, x, 0.3)
    div_h = divergence(rotated, x_rep, 0.3, est).reshape(n_rep, n_pts)
    r_exact = score_fpe_residual(rotated, sde, x, 0.3)
    r_h = score_fpe_residual(rotated, sde, x_rep, 0.3, divergence=est).reshape(n_rep, n_pts, 3)
    for sample, target in ((div_h, div_exact), (r_h, r_exact)):
        se = sample.std(0) / math.sqrt(n_rep)
        assert torch.all(se > 0)  # the estimator really is random here
        z = (sample.mean(0) - target) / se
        assert torch.all(z.abs() < 4), f"z-scores {z}"  # unbiased: |z| < 4 at this fixed seed
    # Can fail: a probe scaled by 1.1 (E[v vᵀ] = 1.21 I) is biased and caught by the same z-test.
    biased = (1.21 * div_h).mean(0)
    assert torch.any(((biased - div_exact) / (div_h.std(0) * 1.21 / math.sqrt(n_rep))).abs() > 4)


# ----------------------------------------------------------------------------- conservativity
@pytest.mark.analytic
def test_curl_of_gradient_is_zero_and_of_rotation_is_known():
    sde = VESDE()
    w, means, covs, rng = random_mixture(70, 3, 2)
    exact = GaussianMixture(w, means, covs).score_fn(sde)
    x = torch.tensor(points(rng, means, 20))
    jac = jacobian(exact, x, 0.2)
    # float64 round-off of the two mixed second derivatives, relative to the Jacobian's size
    assert torch.all(curl_2d(exact, x, 0.2).abs() <= 1e-12 * jac.abs().amax((-1, -2)))
    assert torch.all(jacobian_asymmetry(exact, x, 0.2) <= 1e-12 * jac.abs().amax((-1, -2)))
    omega = 0.7

    def rot(x, t):  # gradient field + ω(−y, x): curl 2ω, ‖J − Jᵀ‖_F = 2√2 |ω|
        return exact(x, t) + omega * torch.stack([-x[:, 1], x[:, 0]], -1)

    torch.testing.assert_close(curl_2d(rot, x, 0.2), torch.full((20,), 2 * omega, dtype=x.dtype), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(jacobian_asymmetry(rot, x, 0.2),
                               torch.full((20,), 2 * math.sqrt(2) * omega, dtype=x.dtype), rtol=1e-10, atol=1e-10)
    skew = _skew(3, rng)
    x3 = torch.randn(5, 3, dtype=torch.float64)
    asym = jacobian_asymmetry(lambda x, t: x @ skew.T + x**2, x3, 0.5)
    torch.testing.assert_close(asym, torch.linalg.matrix_norm(2 * skew).expand(5), rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------------- images, dtypes
def _pixel_score(sde):
    """Exact score of a product density: every pixel an independent 1D two-component mixture."""
    gm1 = GaussianMixture([0.3, 0.7], [[-1.0], [1.5]], [[[0.2]], [[0.5]]])

    def score_fn(x, t):
        per = x[0].numel()
        return gm1.score(x.reshape(-1, 1), t.repeat_interleave(per), sde).reshape(x.shape)

    return score_fn


@pytest.mark.parametrize(("sde", "kind", "params"), SDES, ids=SDE_IDS)
def test_hutchinson_residual_on_image_shaped_input(sde, kind, params):
    score_fn = _pixel_score(sde)
    x = torch.randn(3, 2, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)
    exact_terms = score_fpe_terms(score_fn, sde, x, t)
    scale = exact_terms.scale.reshape(3, 1, 1, 1)
    for probe in Probe:
        r = score_fpe_residual(score_fn, sde, x, t, divergence=Hutchinson(2, probe, torch.Generator().manual_seed(2)))
        assert r.shape == x.shape
        if probe is Probe.RADEMACHER:
            # diagonal Jacobian: v_i² = 1 makes the Rademacher estimate exact; float64 round-off
            assert torch.all(r.abs() <= 1e-10 * scale)
        else:
            assert torch.isfinite(r).all()
    r_exact = score_fpe_residual(score_fn, sde, x, t)
    assert torch.all(r_exact.abs() <= 1e-10 * scale)  # exact score: round-off only
    wrong = score_fpe_residual(lambda xx, tt: score_fn(xx, 0.5 * tt), sde, x, t,
                               divergence=Hutchinson(1, Probe.RADEMACHER, torch.Generator().manual_seed(3)))
    assert wrong.abs().amax() > 1e-2 * scale.max()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dtypes_are_kept_and_float32_agrees(dtype):
    sde = VPSDE()
    w, means, covs, rng = random_mixture(80, 2, 2, min_var=0.3)
    gmm = GaussianMixture(w, means, covs)
    x64 = torch.tensor(points(rng, means, 8))
    terms64 = score_fpe_terms(gmm.score_fn(sde), sde, x64, 0.5)
    r = score_fpe_residual(gmm.score_fn(sde), sde, x64.to(dtype), 0.5)
    assert r.dtype == dtype
    # float32: eps 1.2e-7 through a third-order chain with condition ~1e2; float64: round-off
    tol = 1e-4 if dtype == torch.float32 else 1e-10
    assert torch.all(r.double().abs() <= tol * terms64.scale[:, None])


def test_create_graph_trains_through_the_residual():
    from fpe_lab.model import ScoreModel
    from fpe_lab.nets.mlp import TimeMLP

    torch.manual_seed(0)
    model = ScoreModel(TimeMLP(dim=2, width=16, depth=2, n_freq=2), VPSDE()).double()
    x = torch.randn(8, 2, dtype=torch.float64)
    r = score_fpe_residual(model, VPSDE(), x, torch.rand(8, dtype=torch.float64) * 0.9 + 0.05, create_graph=True)
    r.pow(2).mean().backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert sum(g.abs().sum() for g in grads) > 0
    assert not score_fpe_residual(model, VPSDE(), x, 0.5).requires_grad  # default: detached


def test_bad_input_raises():
    sde = VPSDE()
    gmm = GaussianMixture([1.0], [[0.0, 0.0]], [np.eye(2)])
    x = torch.zeros(4, 2, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"score_fn\(x, t\) must return the shape of x"):
        score_fpe_residual(lambda xx, tt: xx[:, :1], sde, x, 0.5)
    with pytest.raises(ValueError, match=r"x must be a floating tensor of shape \(b, \*dims\)"):
        score_fpe_residual(gmm.score_fn(sde), sde, torch.zeros(4, dtype=torch.float64), 0.5)
    with pytest.raises(ValueError, match="x must be a floating tensor"):
        score_fpe_terms(gmm.score_fn(sde), sde, torch.zeros(4, 2, dtype=torch.long), 0.5)
    with pytest.raises(ValueError, match="x must be finite"):
        score_fpe_residual(gmm.score_fn(sde), sde, torch.full((4, 2), math.nan, dtype=torch.float64), 0.5)
    with pytest.raises(ValueError, match="t must lie in"):
        score_fpe_residual(gmm.score_fn(sde), sde, x, 1.2)
    with pytest.raises(ValueError, match="t must lie in"):
        score_fpe_terms(gmm.score_fn(sde), sde, x, torch.tensor([0.1, 0.2, -0.1, 0.3]))
    with pytest.raises(ValueError, match="t has shape"):
        score_fpe_residual(gmm.score_fn(sde), sde, x, torch.tensor([0.1, 0.2]))
    with pytest.raises(ValueError, match="D = 2"):
        score_fpe_residual(gmm.score_fn(sde), sde, torch.zeros(4, 3, dtype=torch.float64), 0.5)
    with pytest.raises(ValueError, match=r"log_prob_fn\(x, t\) must return shape \(4,\)"):
        log_density_fpe_residual(lambda xx, tt: xx.sum(-1, keepdim=True), sde, x, 0.5)
    with pytest.raises(ValueError, match="jacobian needs x of shape"):
        jacobian(lambda xx, tt: xx, torch.zeros(2, 1, 2, 2, dtype=torch.float64), 0.5)
    with pytest.raises(ValueError, match="curl_2d needs x of shape"):
        curl_2d(lambda xx, tt: xx, torch.zeros(2, 3, dtype=torch.float64), 0.5)
    with pytest.raises(ValueError, match="n_probes must be an int >= 1"):
        Hutchinson(0)
    with pytest.raises(ValueError, match="probe must be a fpe_lab.fpe.Probe"):
        Hutchinson(1, "gaussian")


def test_exact_divergence_matches_jacobian_trace():
    w, means, covs, rng = random_mixture(90, 3, 3)
    fn = GaussianMixture(w, means, covs).score_fn(SubVPSDE())
    x = torch.tensor(points(rng, means, 6))
    jac = jacobian(fn, x, 0.3)
    # same derivatives by two loops of reverse passes: round-off only
    torch.testing.assert_close(divergence(fn, x, 0.3), torch.diagonal(jac, dim1=-2, dim2=-1).sum(-1), rtol=1e-12, atol=1e-12)
    assert repr(ExactDivergence()) == "ExactDivergence()"


@pytest.mark.analytic
def test_standard_normal_is_stationary_for_vp_but_not_subvp():
    """N(0, I) is VP's stationary law: both residuals vanish for s = −x; sub-VP (g² < beta) moves it,
    with log-density residual ½(g² − beta)(‖x‖² − D) in closed form."""
    x = torch.randn(6, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    t = torch.linspace(0.1, 0.9, 6, dtype=torch.float64)

    def log_p(xx, tt):
        return -0.5 * (xx**2).sum(-1)

    def score(xx, tt):
        return -xx

    vp, sub = VPSDE(), SubVPSDE()
    # float64 round-off of O(beta ‖x‖²) terms
    assert log_density_fpe_residual(log_p, vp, x, t).abs().max() < 1e-12
    assert score_fpe_residual(score, vp, x, t).abs().max() < 1e-12
    expected = 0.5 * (sub.diffusion(t) ** 2 - sub.beta(t)) * ((x**2).sum(-1) - 3)
    torch.testing.assert_close(log_density_fpe_residual(log_p, sub, x, t), -expected, rtol=1e-12, atol=1e-12)
    # score residual = ∇ of the log-density residual: −(g² − beta) x
    torch.testing.assert_close(score_fpe_residual(score, sub, x, t),
                               -(sub.diffusion(t) ** 2 - sub.beta(t))[:, None] * x, rtol=1e-12, atol=1e-12)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_residual_on_cuda_matches_cpu(dtype):
    """Same operator on CUDA: exact and Hutchinson residuals equal the CPU ones (same probes)."""
    sde = VPSDE()
    w, means, covs, rng = random_mixture(100, 3, 2, min_var=0.3)
    gmm = GaussianMixture(w, means, covs)
    x = torch.tensor(points(rng, means, 32), dtype=dtype)
    t = torch.linspace(0.05, 0.95, 32, dtype=dtype)
    results = {}
    for device in ("cpu", "cuda"):
        g = GaussianMixture(gmm.weights.to(device), gmm.means.to(device), gmm.covs.to(device))
        est = Hutchinson(2, Probe.GAUSSIAN, torch.Generator().manual_seed(5))
        xd, td = x.to(device), t.to(device)
        results[device] = (score_fpe_residual(g.score_fn(sde), sde, xd, td).cpu(),
                           score_fpe_residual(g.score_fn(sde), sde, xd, td, divergence=est).cpu())
    scale = score_fpe_terms(gmm.score_fn(sde), sde, x.double(), t.double()).scale[:, None]
    # float32: eps 1.2e-7 through a third-order chain (different kernels on the two devices)
    tol = 1e-4 if dtype == torch.float32 else 1e-10
    for cpu, cuda in zip(results["cpu"], results["cuda"]):
        assert torch.all((cpu.double() - cuda.double()).abs() <= tol * scale)


# ----------------------------------------------------------------------------- unbiased ‖R‖² and asymmetry
def _block_score(sde, block: int = 4):
    """Exact score of a product density on images: every group of ``block`` consecutive pixels is an
    independent ``block``-D two-component mixture with full covariances (block-diagonal Jacobian with
    nonzero off-diagonal entries, so a Rademacher divergence estimate is random). Returns (score_fn, gmm)."""
    rng = np.random.default_rng(11)
    a = rng.uniform(-1, 1, size=(2, block, block))
    gmm = GaussianMixture([0.4, 0.6], rng.uniform(-1, 1, size=(2, block)), a @ a.transpose(0, 2, 1) + 0.05 * np.eye(block))

    def score_fn(x, t):
        per = x[0].numel() // block
        return gmm.score(x.reshape(-1, block), t.repeat_interleave(per), sde).reshape(x.shape)

    return score_fn, gmm


@pytest.mark.analytic
def test_unbiased_residual_of_exact_score_is_zero_on_images_and_squared_is_not():
    sde = VPSDE()
    score_fn, gmm = _block_score(sde)
    b, shape = 32, (3, 32, 32)  # D = 3072
    gen = torch.Generator().manual_seed(0)
    x0 = gmm.sample(b * 3072 // 4, gen).reshape(b, *shape)
    t = 0.3
    alpha, sigma = sde.marginal(torch.tensor(t, dtype=torch.float64))
    x = alpha * x0 + sigma * torch.randn(x0.shape, generator=gen, dtype=torch.float64)
    small = x[:2, :1, :1, :8]  # D = 8: the exact divergence (D reverse passes) stays cheap
    exact = residual_sq(score_fn, sde, small, t, estimator=ResidualEstimator.SQUARED)
    scale = score_fpe_terms(score_fn, sde, small, t).scale
    assert torch.all(exact <= (1e-10 * scale) ** 2)  # exact score: float64 round-off of R only
    est = {e: Estimate(residual_sq(score_fn, sde, x, t, estimator=e, divergence=Hutchinson(1, generator=torch.Generator().manual_seed(1))))
           for e in ResidualEstimator}
    unbiased, squared = est[ResidualEstimator.UNBIASED], est[ResidualEstimator.SQUARED]
    assert unbiased.se > 0 and squared.se > 0  # the probes really are random here
    assert abs(unbiased.mean) < 3 * unbiased.se  # E = ‖R‖² = 0: within 3 SE at this fixed seed
    # Can fail: the same z-test rejects ‖R̂‖², whose mean is E‖R̂ − R‖² > 0 (measured z ≈ 80)
    assert squared.mean > 20 * squared.se


def test_residual_estimators_on_a_defective_score_match_the_exact_divergence_value():
    """With a smooth non-conservative defect (R ≠ 0) in D = 3: the exact-divergence value is ‖R‖² for
    both estimators; with Hutchinson, ⟨R̂₁, R̂₂⟩ averages to ‖R‖² and ‖R̂‖² to ‖R‖² + ‖R̂ − R‖²."""
    sde = VESDE()
    w, means, covs, rng = random_mixture(120, 2, 3)
    exact = GaussianMixture(w, means, covs).score_fn(sde)
    m = torch.tensor(rng.normal(size=(3, 3)))

    def defective(x, t):
        return exact(x, t) + 0.3 * torch.tanh(x @ m.T) * (1 + t)[:, None]

    n_pts, n_rep, t = 5, 2000, 0.4
    x = torch.tensor(points(rng, means, n_pts))
    r = score_fpe_residual(defective, sde, x, t)
    truth = r.pow(2).sum(-1)
    for e in ResidualEstimator:
        for div in (None, ExactDivergence()):
            # float64 round-off: the same R, squared
            torch.testing.assert_close(residual_sq(defective, sde, x, t, estimator=e, divergence=div), truth, rtol=1e-12, atol=0)
    x_rep = x.repeat(n_rep, 1)
    unbiased = residual_sq(defective, sde, x_rep, t, divergence=Hutchinson(1, generator=torch.Generator().manual_seed(2))).reshape(n_rep, n_pts)
    squared = residual_sq(defective, sde, x_rep, t, estimator=ResidualEstimator.SQUARED,
                          divergence=Hutchinson(1, generator=torch.Generator().manual_seed(3))).reshape(n_rep, n_pts)
    r_hat = score_fpe_residual(defective, sde, x_rep, t, divergence=Hutchinson(1, generator=torch.Generator().manual_seed(3)))
    # same probes (same seed, one draw): ‖R̂‖² is the square of score_fpe_residual's R̂, float64 round-off
    torch.testing.assert_close(squared.reshape(-1), r_hat.pow(2).sum(-1), rtol=1e-10, atol=1e-12 * truth.max().item())
    noise = (r_hat - r.repeat(n_rep, 1)).pow(2).sum(-1).reshape(n_rep, n_pts)  # ‖R̂ − R‖²
    se = lambda v: v.std(0) / math.sqrt(n_rep)  # noqa: E731
    assert torch.all(se(unbiased) > 0) and torch.all(noise.mean(0) > 0)  # the divergence estimate is random
    # unbiased: within 4 SE per point at this fixed seed (5 points)
    assert torch.all(((unbiased.mean(0) - truth) / se(unbiased)).abs() < 4)
    # ‖R̂‖² − ‖R‖² − ‖R̂ − R‖² = 2⟨R, R̂ − R⟩ has mean 0: within 4 SE
    assert torch.all(((squared - noise).mean(0) - truth).abs() < 4 * se(squared - noise))
    # Can fail: the biased form misses ‖R‖² by many SE at some point
    assert torch.any(((squared.mean(0) - truth) / se(squared)) > 4)


@pytest.mark.analytic
def test_jacobian_asymmetry_sq_exact_and_hutchinson_on_a_linear_field():
    """s(x) = A x with A non-symmetric: J = A, ‖J − Jᵀ‖²_F = ‖A − Aᵀ‖²_F, ‖J‖²_F = ‖A‖²_F (closed form)."""
    a = torch.tensor(np.random.default_rng(5).normal(size=(6, 6)))

    def linear(x, t):  # image-shaped (b, 1, 2, 3): A acts on the flattened 6 coordinates
        return (x.reshape(x.shape[0], -1) @ a.T).reshape(x.shape) * (1 + 0 * t)[:, None, None, None]

    want_asym = (a - a.T).pow(2).sum()
    want_norm = a.pow(2).sum()
    x = torch.randn(4, 1, 2, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    asym, norm = jacobian_asymmetry_sq(linear, x, 0.5)
    assert asym.shape == norm.shape == (4,)
    torch.testing.assert_close(asym, want_asym.expand(4), rtol=1e-12, atol=0)  # float64 round-off
    torch.testing.assert_close(norm, want_norm.expand(4), rtol=1e-12, atol=0)
    n_rep = 4000
    for probe in Probe:
        h_asym, h_norm = jacobian_asymmetry_sq(linear, x[:1].repeat(n_rep, 1, 1, 1), 0.5, probes=2, probe=probe,
                                               generator=torch.Generator().manual_seed(7))
        for est, want in ((h_asym, want_asym), (h_norm, want_norm)):
            e = Estimate(est)
            assert e.se > 0  # random probes
            assert abs(e.mean - want) < 4 * e.se  # unbiased: within 4 SE at this fixed seed
            # Can fail: a probe scaled by 1.1 (E v vᵀ = 1.21 I) is caught by the same test
            assert abs(1.21 * e.mean - want) > 4 * 1.21 * e.se
    # a gradient field (the exact mixture score) has no asymmetry: float64 round-off of mixed derivatives
    w, means, covs, rng = random_mixture(130, 2, 3)
    exact = GaussianMixture(w, means, covs).score_fn(VPSDE())
    xg = torch.tensor(points(rng, means, 5))
    asym, norm = jacobian_asymmetry_sq(exact, xg, 0.3)
    assert torch.all(asym <= 1e-24 * norm) and torch.all(norm > 0)
    h_asym, _ = jacobian_asymmetry_sq(exact, xg, 0.3, probes=3, generator=torch.Generator().manual_seed(1))
    assert torch.all(h_asym <= 1e-24 * norm)  # J v = Jᵀ v up to float64 round-off


def test_unbiased_residual_sq_trains_and_its_gradient_is_unbiased():
    """create_graph=True: ⟨R̂₁, R̂₂⟩ is differentiable in the parameters, and averaged over probe draws its
    gradient matches the gradient of the exact ‖R‖² (the gradient of an unbiased estimate is unbiased)."""
    from fpe_lab.model import ScoreModel
    from fpe_lab.nets.mlp import TimeMLP

    torch.manual_seed(0)
    sde = VPSDE()
    model = ScoreModel(TimeMLP(dim=3, width=8, depth=1, n_freq=2), sde).double()
    params = list(model.parameters())
    x = torch.randn(2, 3, dtype=torch.float64).repeat(25, 1)  # 50 rows: 25 probe draws at each of 2 points
    t = torch.full((50,), 0.4, dtype=torch.float64)

    def grad(estimator, divergence=None):
        per = residual_sq(model, sde, x, t, create_graph=True, estimator=estimator, divergence=divergence)
        assert per.requires_grad
        return torch.cat([g.reshape(-1) for g in torch.autograd.grad(per.sum(), params)])

    g_exact = grad(ResidualEstimator.UNBIASED)
    for estimator in ResidualEstimator:
        # 16 independent chunks: their spread gives the standard error of the mean gradient
        chunks = torch.stack([grad(estimator, Hutchinson(1, generator=torch.Generator().manual_seed(10 + i)))
                              for i in range(16)])
        se = chunks.std(0) / 4
        big = g_exact.abs() > 10 * se  # components the test resolves
        assert big.sum() > 10
        z = ((chunks.mean(0) - g_exact) / se)[big].abs().max()
        if estimator is ResidualEstimator.UNBIASED:
            assert z < 5  # unbiased: within 5 SE over ~80 components at these fixed seeds (measured max 2.8)
        else:
            assert z > 5  # Can fail: the gradient of ‖R̂‖² carries the gradient of Var R̂ (measured max 15)


def test_estimate_mean_and_standard_error():
    v = torch.tensor([1.0, 2.0, 4.0], dtype=torch.float64)
    e = Estimate(v)
    assert e.mean == pytest.approx(7 / 3, rel=1e-15)  # float64 round-off
    assert e.se == pytest.approx(math.sqrt(((1 - 7 / 3) ** 2 + (2 - 7 / 3) ** 2 + (4 - 7 / 3) ** 2) / 2 / 3), rel=1e-14)
    assert Estimate(torch.tensor([3.0])).se == 0.0
    assert Estimate(torch.tensor([1.0, 2.0], dtype=torch.float32)).values.dtype == torch.float64
    with pytest.raises(ValueError, match=r"values must be a floating tensor of shape \(b,\) with b >= 1; got shape \(0,\)"):
        Estimate(torch.zeros(0))
    with pytest.raises(ValueError, match="values must be a floating tensor"):
        Estimate(torch.zeros(2, 2))
    with pytest.raises(ValueError, match="values must be finite; got non-finite value nan"):
        Estimate(torch.tensor([1.0, math.nan]))


def test_empty_batch_and_bad_estimator_arguments_raise():
    sde = VPSDE()
    fn = GaussianMixture([1.0], [[0.0, 0.0]], [np.eye(2)]).score_fn(sde)
    empty = torch.zeros(0, 2, dtype=torch.float64)
    for f in (score_fpe_residual, score_fpe_terms, residual_sq):
        with pytest.raises(ValueError, match=r"x must hold at least one sample \(b >= 1\); got an empty batch of shape \(0, 2\)"):
            f(fn, sde, empty, 0.5)
    x = torch.zeros(3, 2, dtype=torch.float64)
    with pytest.raises(ValueError, match="estimator must be a fpe_lab.fpe.ResidualEstimator.*got 'unbiased'"):
        residual_sq(fn, sde, x, 0.5, estimator="unbiased")
    with pytest.raises(ValueError, match="probes must be None .exact. or an int >= 1; got 0"):
        jacobian_asymmetry_sq(fn, x, 0.5, probes=0)
    with pytest.raises(ValueError, match="probes must be None .exact. or an int >= 1; got True"):
        jacobian_asymmetry_sq(fn, x, 0.5, probes=True)
    with pytest.raises(ValueError, match=r"residual_sq \(the residual of score_fn\) must be finite"):
        residual_sq(lambda xx, tt: xx / 0.0 * 0.0, sde, x, 0.5)
