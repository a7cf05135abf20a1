"""fpe_lab.losses regularizers behind one interface: FPE (points, estimators, determinism), conservative
(Chao et al.), high-order DSM (Lu et al.), importance-sampled time, and the jet path's shared forward."""

from __future__ import annotations

import math

import pytest
import torch
from scipy.integrate import quad

from fpe_lab.fpe import Hutchinson, Probe, ResidualEstimator, score_fpe_residual
from fpe_lab.gmm import GaussianMixture
from fpe_lab.losses import DSMWeighting, ScoreFPELoss, dsm_loss
from fpe_lab.model import ScoreModel
from fpe_lab.nets.jet import jet_score_fpe_residual
from fpe_lab.nets.mlp import TimeMLP
from fpe_lab.regularizers.base import Regularizer
from fpe_lab.regularizers.conservative import ConservativeRegularizer, ConservativeWeighting
from fpe_lab.regularizers.fpe import FPEPoints, FPERegularizer, FPEWeighting
from fpe_lab.regularizers.hodsm import HODSMRegularizer
from fpe_lab.sde import LinearSDE, SubVPSDE, VESDE, VPSDE
from fpe_lab.time_sampling import TimeSampling, importance_time_density
from tests.conftest import ALL_SDES, SDE_IDS

SDES = list(ALL_SDES)
IDS = list(SDE_IDS)
K_SE = 5  # tolerance of every Monte Carlo comparison: 5 standard errors at a fixed seed
F64 = torch.float64


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # tiny batches: intra-op threads only add contention on the shared 2-core machine
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _mixture() -> GaussianMixture:
    means = torch.tensor([[1.5, 0.0], [-1.0, 1.0], [0.0, -2.0]], dtype=F64)
    covs = torch.stack([torch.diag(torch.tensor(v, dtype=F64)) for v in ([0.2, 0.1], [0.3, 0.3], [0.05, 0.4])])
    covs[0, 0, 1] = covs[0, 1, 0] = 0.05
    return GaussianMixture([0.5, 0.3, 0.2], means, covs, dtype=F64)


def _model(seed: int = 0, sde=VPSDE(), dim: int = 2) -> ScoreModel:
    torch.manual_seed(seed)
    return ScoreModel(TimeMLP(dim=dim, width=16, depth=2, n_freq=4).to(F64), sde)


def _batch(sde, n: int, seed: int, t_min: float = 1e-2):
    g = torch.Generator().manual_seed(seed)
    x0 = _mixture().sample(n, g)
    t = t_min + (1 - t_min) * torch.rand(n, generator=g, dtype=F64)
    z = torch.randn(n, 2, generator=g, dtype=F64)
    return x0, t, z


def _mean_se(v: torch.Tensor) -> tuple[float, float]:
    return float(v.mean()), float(v.std() / math.sqrt(v.numel()))


def _grads(out: torch.Tensor, params: list[torch.Tensor]) -> list[torch.Tensor]:
    """d out / d params, zeros for parameters a Jacobian penalty does not see (the output bias)."""
    grads = torch.autograd.grad(out, params, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for g, p in zip(grads, params)]


# ---------------------------------------------------------------------------------------------- interface


def test_every_regularizer_is_a_regularizer_and_lam_zero_is_plain_dsm():
    sde, model = VPSDE(), _model()
    x0 = _mixture().sample(16, torch.Generator().manual_seed(0))
    plain = ScoreFPELoss(sde=sde)(model, x0, torch.Generator().manual_seed(1))
    for cls in (FPERegularizer, ConservativeRegularizer, HODSMRegularizer):
        assert isinstance(cls(lam=1.0), Regularizer)
        terms = ScoreFPELoss(sde=sde, regularizer=cls(lam=0.0))(model, x0, torch.Generator().manual_seed(1))
        assert torch.equal(terms.total, plain.total) and terms.reg.item() == 0.0
        active = ScoreFPELoss(sde=sde, regularizer=cls(lam=0.5))(model, x0, torch.Generator().manual_seed(1))
        torch.testing.assert_close(active.dsm, plain.dsm, rtol=1e-12, atol=0)  # float64 round-off: same draws
        torch.testing.assert_close(active.total, active.dsm + 0.5 * active.reg, rtol=1e-14, atol=0)  # round-off
        assert active.reg.item() > 0


# ---------------------------------------------------------------------------------------------- FPE


def test_fpe_hutchinson_probes_come_from_the_loss_generator():
    """Equal generator states give bitwise-equal losses although torch's global RNG moves in between."""
    sde, model = VPSDE(), _model()
    x0 = _mixture().sample(32, torch.Generator().manual_seed(0))
    for estimator in ResidualEstimator:
        loss = ScoreFPELoss(sde=sde, regularizer=FPERegularizer(lam=1.0, divergence=Hutchinson(1), estimator=estimator))
        torch.manual_seed(123)
        a = loss(model, x0, torch.Generator().manual_seed(7))
        torch.manual_seed(456)
        b = loss(model, x0, torch.Generator().manual_seed(7))
        assert torch.equal(a.total, b.total) and torch.equal(a.reg, b.reg)

    # the check can fail: a Hutchinson estimate on the global RNG differs between the two global seeds
    x, t = sde.perturb(x0, torch.full((32,), 0.3, dtype=F64), torch.randn(32, 2, dtype=F64)), torch.full((32,), 0.3, dtype=F64)
    r = []
    for seed in (123, 456):
        torch.manual_seed(seed)
        r.append(score_fpe_residual(model, sde, x, t, divergence=Hutchinson(1)))
    assert not torch.equal(r[0], r[1])


def _quartic_score(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """s = ∇(x₁² x₂² − ‖x‖²/2): J₁₂ = 4x₁x₂ varies in x, so a Rademacher divergence has error
    2v₁v₂J₁₂ with a large gradient; the score of no p_t, so R ≠ 0."""
    x1, x2 = x[:, 0], x[:, 1]
    return torch.stack([2 * x1 * x2**2 - x1, 2 * x1**2 * x2 - x2], dim=-1)


def test_fpe_unbiased_estimator_is_unbiased_and_squared_is_not():
    """⟨R̂₁, R̂₂⟩ averages to ‖R‖² (exact divergence); ‖R̂‖² lies above it by the probe variance."""
    sde, n = VPSDE(), 4000
    x = torch.tensor([[0.7, -0.4]], dtype=F64).expand(n, 2).contiguous()  # one point, n independent probe draws
    t = torch.full((n,), 0.4, dtype=F64)
    exact = FPERegularizer(lam=1.0, weighting=FPEWeighting.ONE).penalty_at(_quartic_score, sde, x[:1], t[:1]).item()
    g = torch.Generator().manual_seed(11)
    kw = dict(lam=1.0, weighting=FPEWeighting.ONE, divergence=Hutchinson(1))
    unbiased = FPERegularizer(**kw, estimator=ResidualEstimator.UNBIASED).penalty_at(_quartic_score, sde, x, t, g).detach()
    squared = FPERegularizer(**kw, estimator=ResidualEstimator.SQUARED).penalty_at(_quartic_score, sde, x, t, g).detach()
    m_u, se_u = _mean_se(unbiased)
    m_s, se_s = _mean_se(squared)
    assert se_u > 0 and abs(m_u - exact) < K_SE * se_u, (m_u, se_u, exact)
    assert m_s - exact > K_SE * se_s, (m_s, se_s, exact)  # the bias the unbiased form removes is resolved


def test_fpe_unbiased_with_exact_divergence_is_squared():
    sde, model = SubVPSDE(), _model()
    x0, t, z = _batch(sde, 16, 2)
    sq = FPERegularizer(lam=1.0)(model, sde, x0, t, z, None)
    unb = FPERegularizer(lam=1.0, estimator=ResidualEstimator.UNBIASED)(model, sde, x0, t, z, None)
    assert torch.equal(sq, unb)


# ---------------------------------------------------------------------------------------------- conservative


class _Linear(torch.nn.Module):
    """s(x, t) = A x (any t): J = A everywhere; a parameter so gradients can be checked."""

    def __init__(self, a: torch.Tensor) -> None:
        super().__init__()
        self.a = torch.nn.Parameter(a.clone())

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return x @ self.a.T


@pytest.mark.analytic
@pytest.mark.parametrize("sde", SDES, ids=IDS)
@pytest.mark.parametrize("probes", [None, 2])
def test_conservative_vanishes_at_exact_mixture_score(sde, probes):
    x0, t, z = _batch(sde, 128, 4, t_min=1e-3)
    score = _mixture().score_fn(sde)
    reg = ConservativeRegularizer(lam=1.0, weighting=ConservativeWeighting.ONE, probes=probes)
    pen = reg(score, sde, x0, t, z, torch.Generator().manual_seed(0))
    jac = torch.func.vmap(torch.func.jacrev(lambda y, s: score(y[None], s[None])[0]))(sde.perturb(x0, t, z), t)
    scale = jac.pow(2).sum((1, 2))  # ‖J‖²_F: what the round-off of J − Jᵀ is relative to
    assert pen.shape == (128,)
    assert torch.all(pen <= 1e-20 * scale)  # (1e-10 relative)²: float64 round-off with margin
    # the check can fail: the exact score of one time plus a rotation is not conservative
    rot = torch.tensor([[0.0, 1.0], [-1.0, 0.0]], dtype=F64)
    wrong = reg(lambda y, s: score(y, s) + y @ rot.T, sde, x0, t, z, torch.Generator().manual_seed(0))
    assert torch.all(wrong > 1.0)  # ‖J − Jᵀ‖² of the rotation alone is 8


@pytest.mark.analytic
@pytest.mark.parametrize("weighting", list(ConservativeWeighting))
def test_conservative_linear_field_closed_form(weighting):
    """s = A x: w(t) ‖A − Aᵀ‖²_F exactly; Hutchinson within K_SE standard errors of it."""
    sde, d, n = VESDE(), 4, 3000
    a = torch.randn(d, d, generator=torch.Generator().manual_seed(5), dtype=F64)
    closed = (a - a.T).pow(2).sum()
    g = torch.Generator().manual_seed(6)
    x0, z = torch.randn(n, d, generator=g, dtype=F64), torch.randn(n, d, generator=g, dtype=F64)
    t = 0.05 + 0.95 * torch.rand(n, generator=g, dtype=F64)
    w = weighting.weight(sde, t)
    field = _Linear(a)
    exact = ConservativeRegularizer(lam=1.0, weighting=weighting)(field, sde, x0, t, z, None)
    torch.testing.assert_close(exact, w * closed, rtol=1e-12, atol=0)  # float64 round-off
    for probe in Probe:
        est = ConservativeRegularizer(lam=1.0, weighting=weighting, probes=1, probe=probe)(field, sde, x0, t, z, g)
        ratio = (est / w).detach()  # per-sample estimates of ‖A − Aᵀ‖²_F
        m, se = _mean_se(ratio)
        assert se > 0 and abs(m - closed.item()) < K_SE * se, (probe, m, se, closed)
    with pytest.raises(AssertionError):  # the check can fail: a symmetric A gives 0, not the closed form
        sym = ConservativeRegularizer(lam=1.0, weighting=weighting)(_Linear(a + a.T), sde, x0, t, z, None)
        torch.testing.assert_close(sym, w * closed, rtol=1e-12, atol=0)


def test_conservative_rademacher_2d_is_exact_and_gradients_flow():
    """In 2-D a Rademacher probe gives ‖(J − Jᵀ)v‖² = ‖J − Jᵀ‖²_F for every v, so the JVP/VJP estimate
    and its parameter gradients must equal the exact Jacobian path's (float64 round-off)."""
    sde, model = VPSDE(), _model(seed=1)
    x0, t, z = _batch(sde, 32, 7)
    params = list(model.parameters())
    exact = ConservativeRegularizer(lam=1.0)(model, sde, x0, t, z, None)
    hutch = ConservativeRegularizer(lam=1.0, probes=3)(model, sde, x0, t, z, torch.Generator().manual_seed(0))
    torch.testing.assert_close(hutch, exact, rtol=1e-10, atol=0)  # float64 round-off of two derivative orders
    g_exact = _grads(exact.mean(), params)
    g_hutch = _grads(hutch.mean(), params)
    assert sum(g.abs().sum() for g in g_exact) > 0
    for a, b in zip(g_hutch, g_exact):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-14)  # float64 round-off (atol: entries that cancel to ~0)


# ---------------------------------------------------------------------------------------------- HODSM


class _GaussScore(torch.nn.Module):
    """Exact score of data N(m, c² I) with c a parameter, one copy c_i per sample (per-sample gradients):
    s(x, t) = −(x − alpha m)/(alpha² c_i² + sigma²)."""

    def __init__(self, sde: LinearSDE, m: torch.Tensor, c: float, n: int) -> None:
        super().__init__()
        self.sde, self.m = sde, m
        self.c = torch.nn.Parameter(torch.full((n,), c, dtype=F64))

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        alpha, sigma = self.sde.marginal(t)
        v = alpha**2 * self.c**2 + sigma**2
        return -(x - alpha[:, None] * self.m) / v[:, None]


def _per_sample_grad(pen: torch.Tensor, p: torch.nn.Parameter) -> torch.Tensor:
    (g,) = torch.autograd.grad(pen.sum(), p)
    return g


@pytest.mark.parametrize("sde", SDES, ids=IDS)
@pytest.mark.parametrize("order", [2, 3])
@pytest.mark.parametrize("probes", [None, 4])
def test_hodsm_exact_gaussian_score_is_stationary_and_minimal(sde, order, probes):
    n, c, m = 20_000, 0.6, torch.tensor([0.5, -1.0], dtype=F64)
    g = torch.Generator().manual_seed(8)
    x0 = m + c * torch.randn(n, 2, generator=g, dtype=F64)
    z = torch.randn(n, 2, generator=g, dtype=F64)
    t = 0.02 + 0.98 * torch.rand(n, generator=g, dtype=F64)
    reg = HODSMRegularizer(lam=1.0, order=order, probes=probes)

    def penalty(model):  # the same probes for every model: paired comparisons
        return reg(model, sde, x0, t, z, torch.Generator().manual_seed(0))

    exact = _GaussScore(sde, m, c, n)
    pen = penalty(exact)
    mean, se = _mean_se(_per_sample_grad(pen, exact.c))
    assert abs(mean) < K_SE * se, (mean, se)  # ∂/∂c of the expected penalty is 0 at c' = c

    off = _GaussScore(sde, m, 1.3 * c, n)
    mean_off, se_off = _mean_se(_per_sample_grad(penalty(off), off.c))
    assert abs(mean_off) > K_SE * se_off, (mean_off, se_off)  # the check can fail: not stationary at 1.3c

    for factor in (0.5, 2.0):
        excess = (penalty(_GaussScore(sde, m, factor * c, n)) - pen).detach()  # paired
        mean_ex, se_ex = _mean_se(excess)
        assert mean_ex > K_SE * se_ex, (factor, mean_ex, se_ex)


def _dirac_posterior(sde, means, weights, x, t):
    """Data Σ_k π_k δ(x0 − μ_k): posterior p(k | x_t) and z_k = (x − alpha μ_k)/sigma, shapes (b, K), (b, K, D)."""
    alpha, sigma = sde.marginal(t)
    z_k = (x[:, None, :] - alpha[:, None, None] * means[None]) / sigma[:, None, None]
    logits = torch.log(weights)[None] - 0.5 * z_k.pow(2).sum(-1)
    return torch.softmax(logits, -1), z_k


class _DiracScore(torch.nn.Module):
    """Exact score of Σ_k π_k δ(x0 − a_i μ_k) with the scale a_i a per-sample parameter:
    s = Σ_k p(k | x) (alpha a μ_k − x)/sigma² = −E[z | x]/sigma."""

    def __init__(self, sde, means, weights, a: float, n: int) -> None:
        super().__init__()
        self.sde, self.means, self.weights = sde, means, weights
        self.a = torch.nn.Parameter(torch.full((n,), a, dtype=F64))

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        alpha, sigma = self.sde.marginal(t)
        mu = self.a[:, None, None] * self.means[None]
        z_k = (x[:, None, :] - alpha[:, None, None] * mu) / sigma[:, None, None]
        p = torch.softmax(torch.log(self.weights)[None] - 0.5 * z_k.pow(2).sum(-1), -1)
        return -(p[:, :, None] * z_k).sum(1) / sigma[:, None]


_MEANS = torch.tensor([[1.0, 0.0], [-0.5, 0.8], [0.0, -1.2]], dtype=F64)
_WEIGHTS = torch.tensor([0.5, 0.3, 0.2], dtype=F64)


@pytest.mark.analytic
@pytest.mark.parametrize("sde", SDES, ids=IDS)
def test_hodsm_moment_identities(sde):
    """The docstring's derivation on data with a finite posterior: −sigma s = E[z|x],
    sigma² ∇s + I = Cov[z|x], sigma³ ∇ tr ∇s = −E[d‖d‖² | x], d = z − E[z|x]."""
    n = 64
    g = torch.Generator().manual_seed(9)
    x = 1.5 * torch.randn(n, 2, generator=g, dtype=F64)
    t = 0.05 + 0.9 * torch.rand(n, generator=g, dtype=F64)
    score = _DiracScore(sde, _MEANS, _WEIGHTS, 1.0, n)
    p, z_k = _dirac_posterior(sde, _MEANS, _WEIGHTS, x, t)
    mean = (p[:, :, None] * z_k).sum(1)
    d = z_k - mean[:, None, :]
    cov = (p[:, :, None, None] * d[:, :, :, None] * d[:, :, None, :]).sum(1)
    kappa = (p[:, :, None] * d * d.pow(2).sum(-1, keepdim=True)).sum(1)

    sigma = sde.marginal(t)[1]
    xl = x.clone().requires_grad_(True)
    s = score(xl, t)
    jac = torch.stack([torch.autograd.grad(s[:, i].sum(), xl, create_graph=True)[0] for i in range(2)], 1)
    (grad_tr,) = torch.autograd.grad(torch.diagonal(jac, dim1=1, dim2=2).sum(), xl)
    tol = dict(rtol=1e-9, atol=1e-10)  # float64 round-off of up to third derivatives of a softmax
    torch.testing.assert_close(-sigma[:, None] * s.detach(), mean, **tol)
    torch.testing.assert_close(sigma[:, None, None] ** 2 * jac.detach() + torch.eye(2, dtype=F64), cov, **tol)
    torch.testing.assert_close(sigma[:, None] ** 3 * grad_tr, -kappa, **tol)
    assert kappa.abs().max() > 1e-2  # the third cumulant is not trivially zero here


@pytest.mark.parametrize("sde", [VPSDE(), VESDE()], ids=["vp", "ve"])
@pytest.mark.parametrize("probes", [None, 4])
def test_hodsm_third_order_is_stationary_at_the_exact_score(sde, probes):
    """On data with a nonzero third cumulant, the order-3 penalty's gradient in a parameter of the
    exact-score family vanishes within K_SE standard errors at the truth, and not away from it."""
    n = 20_000
    g = torch.Generator().manual_seed(10)
    k = torch.multinomial(_WEIGHTS, n, replacement=True, generator=g)
    x0 = _MEANS[k]
    z = torch.randn(n, 2, generator=g, dtype=F64)
    t = 0.2 + 0.8 * torch.rand(n, generator=g, dtype=F64)  # above 0.2: sigma³∇tr∇s stays O(1), the SE small
    reg = HODSMRegularizer(lam=1.0, order=3, probes=probes)
    exact = _DiracScore(sde, _MEANS, _WEIGHTS, 1.0, n)
    mean, se = _mean_se(_per_sample_grad(reg(exact, sde, x0, t, z, torch.Generator().manual_seed(0)), exact.a))
    assert abs(mean) < K_SE * se, (mean, se)
    off = _DiracScore(sde, _MEANS, _WEIGHTS, 0.5, n)
    mean_off, se_off = _mean_se(_per_sample_grad(reg(off, sde, x0, t, z, torch.Generator().manual_seed(0)), off.a))
    assert abs(mean_off) > K_SE * se_off, (mean_off, se_off)


@pytest.mark.analytic
def test_hodsm_projected_form_on_a_linear_field():
    """s = A x, one point and one z: the probe form averages to the exact order-2 penalty plus the
    Rademacher variance of vᵀE2v, 2 Σ_{i≠j} Ẽ_ij² / D (Ẽ the symmetric part of E2), within K_SE SE."""
    sde, d, n = VPSDE(), 4, 4000
    g = torch.Generator().manual_seed(17)
    a = torch.randn(d, d, generator=g, dtype=F64)
    x0 = torch.randn(1, d, generator=g, dtype=F64).expand(n, d)
    z = torch.randn(1, d, generator=g, dtype=F64).expand(n, d)
    t = torch.full((n,), 0.3, dtype=F64)
    field = _Linear(a)
    exact = HODSMRegularizer(lam=1.0)(field, sde, x0[:1], t[:1], z[:1], None).item()
    sigma = sde.marginal(t[:1])[1].item()
    w = z[0] + sigma * field(sde.perturb(x0[:1], t[:1], z[:1]), t[:1])[0].detach()
    e2 = sigma**2 * a + torch.eye(d, dtype=F64) - torch.outer(w, w)
    sym = 0.5 * (e2 + e2.T)
    variance = (2 * (sym.pow(2).sum() - torch.diagonal(sym).pow(2).sum()) / d).item()
    proj = HODSMRegularizer(lam=1.0, probes=1)(field, sde, x0, t, z, g).detach()
    m, se = _mean_se(proj)
    assert abs(m - (exact + variance)) < K_SE * se, (m, se, exact, variance)
    assert abs(m - exact) > K_SE * se  # the check can fail: the probe variance is resolved


def test_hodsm_gradients_reach_network_parameters():
    sde, model = VPSDE(), _model()
    x0, t, z = _batch(sde, 16, 12)
    for order, probes in ((2, None), (3, None), (2, 2), (3, 2)):
        pen = HODSMRegularizer(lam=1.0, order=order, probes=probes)(model, sde, x0, t, z, torch.Generator().manual_seed(0))
        grads = _grads(pen.mean(), list(model.parameters()))
        assert all(torch.isfinite(gr).all() for gr in grads) and sum(gr.abs().sum() for gr in grads) > 0


class _Brownian(LinearSDE):
    """dx = dw: alpha = 1, sigma² = t, g² = 1, so g²/sigma² = 1/t — no closed form in TimeSampling's list,
    so IMPORTANCE uses the table; the exact law is q = 1/(t ln(1/eps)), t = eps^(1 − u)."""

    def drift_coef(self, t):
        return torch.zeros_like(t)

    def diffusion(self, t):
        return torch.ones_like(t)

    def marginal(self, t):
        return torch.ones_like(t), torch.sqrt(t)

    def prior_std(self):
        return 1.0


class _NoNoise(_Brownian):
    """g = 0: g²/sigma² vanishes, no importance density exists."""

    def diffusion(self, t):
        return torch.zeros_like(t)


# ---------------------------------------------------------------------------------------------- time sampling


@pytest.mark.parametrize("sde", SDES, ids=IDS)
def test_importance_density_normalised_and_weights(sde):
    eps = 1e-4
    # ∫_eps^1 q = 1 by quadrature of the density formula (in log t: q ~ 1/t near eps)
    def q_of_log_t(u):
        t = torch.tensor([math.exp(u)], dtype=F64)
        return float(importance_time_density(sde, eps, t)) * math.exp(u)

    total, _ = quad(q_of_log_t, math.log(eps), 0.0, epsabs=0, epsrel=1e-12, limit=200)
    assert abs(total - 1) < 1e-9  # quadrature accuracy
    t, w = TimeSampling.IMPORTANCE.sample(10_000, eps, sde, torch.Generator().manual_seed(0), F64, "cpu")
    assert t.min() >= eps and t.max() <= 1
    torch.testing.assert_close(w, 1 / ((1 - eps) * importance_time_density(sde, eps, t)), rtol=1e-12, atol=0)  # round-off
    # the draws follow q: E_q[1/((1 − eps) q)] = 1 (the weights average to 1) and P(t ≤ 0.01) = ∫_eps^0.01 q
    m, se = _mean_se(w)
    assert abs(m - 1) < K_SE * se
    p_small, _ = quad(q_of_log_t, math.log(eps), math.log(0.01), epsabs=0, epsrel=1e-12, limit=200)
    frac = (t <= 0.01).double()
    assert abs(frac.mean().item() - p_small) < K_SE * math.sqrt(p_small * (1 - p_small) / t.numel())
    u_frac = (1e-2 - eps) / (1 - eps)  # what uniform draws would give: far off, so the check can fail
    assert abs(u_frac - p_small) > K_SE * math.sqrt(p_small * (1 - p_small) / t.numel())


@pytest.mark.parametrize("sde", SDES, ids=IDS)
def test_tabulated_antiderivative_matches_the_closed_form(sde):
    """LinearSDE's tabulated Φ = ∫ g²/sigma² (the default of any linear SDE) against VE/VP/sub-VP's closed forms."""
    t = torch.logspace(-4, 0, 200, dtype=F64)
    start = torch.tensor([1e-4], dtype=F64)
    exact = sde.rate_antiderivative(t) - sde.rate_antiderivative(start)
    table = LinearSDE.rate_antiderivative(sde, t) - LinearSDE.rate_antiderivative(sde, start)
    # trapezoids of r·t in log t, h = ln(1e6)/8192 ≈ 1.7e-3: O(h²) relative error (measured ≤ 7.4e-7 at t → 1 for VP)
    torch.testing.assert_close(table, exact, rtol=2e-6, atol=1e-6)
    assert (table - exact).abs().max() > 0  # really the table, not the closed form
    # the piecewise-linear inverse inverts the table to round-off
    torch.testing.assert_close(LinearSDE.rate_antiderivative_inverse(sde, LinearSDE.rate_antiderivative(sde, t)), t,
                               rtol=1e-9, atol=0)
    # the closed forms invert each other
    torch.testing.assert_close(sde.rate_antiderivative_inverse(sde.rate_antiderivative(t)), t, rtol=1e-10, atol=0)


def test_tabulated_sampling_follows_its_law():
    eps, n = 1e-4, 20_000
    t, w = TimeSampling.IMPORTANCE.sample(n, eps, _Brownian(), torch.Generator().manual_seed(21), F64, "cpu")
    closed = t * math.log(1 / eps) / (1 - eps)  # 1/((1 − eps) q) with q = 1/(t ln(1/eps))
    torch.testing.assert_close(w, closed, rtol=1e-3, atol=0)  # piecewise-constant density, as above
    p_small = math.log(0.01 / eps) / math.log(1 / eps)  # P(t ≤ 0.01) = 1/2
    frac = (t <= 0.01).double().mean().item()
    assert abs(frac - p_small) < K_SE * math.sqrt(p_small * (1 - p_small) / n)


@pytest.mark.parametrize("sde", SDES + [_Brownian()], ids=IDS + ["tabulated"])
def test_importance_sampling_keeps_expected_dsm_and_lowers_variance(sde):
    """Data N(0, c² I), exact score: E_{t~U} g²/sigma² · D(1 − sigma²/v) by quadrature; the likelihood-weighted
    DSM loss under UNIFORM and IMPORTANCE both match it within K_SE SE; IMPORTANCE has far lower variance."""
    c, d, n, eps = 0.7, 2, 100_000, 1e-4

    def integrand(u):  # in log t
        t = torch.tensor([math.exp(u)], dtype=F64)
        alpha, sigma = sde.marginal(t)
        v = alpha**2 * c**2 + sigma**2
        return float(sde.diffusion(t) ** 2 / sigma**2 * d * (1 - sigma**2 / v)) * math.exp(u) / (1 - eps)

    expected, _ = quad(integrand, math.log(eps), 0.0, epsabs=0, epsrel=1e-10, limit=200)
    g = torch.Generator().manual_seed(13)
    x0 = c * torch.randn(n, d, generator=g, dtype=F64)

    def exact_score(x, t):
        alpha, sigma = sde.marginal(t)
        return -x / (alpha**2 * c**2 + sigma**2)[:, None]

    variances = {}
    for sampling in TimeSampling:
        loss = ScoreFPELoss(sde=sde, eps=eps, weighting=DSMWeighting.LIKELIHOOD, time_sampling=sampling)
        state = g.get_state()
        t, z, weight = loss.draw(x0, g)
        per = weight * dsm_loss(exact_score, sde, x0, t, z, DSMWeighting.LIKELIHOOD)
        g.set_state(state)
        torch.testing.assert_close(loss(exact_score, x0, g).dsm, per.mean(), rtol=1e-12, atol=0)  # same draws
        m, se = _mean_se(per)
        assert abs(m - expected) < K_SE * se, (sampling, m, se, expected)
        variances[sampling] = per.var().item()
    assert variances[TimeSampling.IMPORTANCE] < variances[TimeSampling.UNIFORM] / 10, variances


def test_importance_weights_reach_the_regularizer_term():
    """Under IMPORTANCE each penalty entry i is multiplied by the weight of its DSM time t_i."""
    sde, model = VPSDE(), _model()
    x0 = _mixture().sample(16, torch.Generator().manual_seed(18))
    reg = ConservativeRegularizer(lam=0.3, n_points=8)
    loss = ScoreFPELoss(sde=sde, eps=1e-3, regularizer=reg, time_sampling=TimeSampling.IMPORTANCE)
    terms = loss(model, x0, torch.Generator().manual_seed(19))
    g = torch.Generator().manual_seed(19)
    t, z, weight = loss.draw(x0, g)
    assert not torch.allclose(weight, torch.ones_like(weight))  # the check can fail: weights are not 1
    pen = reg(model, sde, x0, t, z, g)
    torch.testing.assert_close(terms.reg, (weight[:8] * pen).mean(), rtol=1e-12, atol=0)  # float64 round-off
    torch.testing.assert_close(terms.dsm, (weight * dsm_loss(model, sde, x0, t, z)).mean(), rtol=1e-12, atol=0)


@pytest.mark.parametrize("sde", SDES, ids=IDS)
def test_float32_at_the_smallest_time_is_finite(sde):
    """eps = 1e-5 in float32: importance weights, and each regularizer with its gradients, stay finite."""
    t, w = TimeSampling.IMPORTANCE.sample(4096, 1e-5, sde, torch.Generator().manual_seed(0), torch.float32, "cpu")
    assert t.dtype == torch.float32 and torch.isfinite(w).all() and t.min() >= 1e-5 and (w > 0).all()
    torch.manual_seed(0)
    model = ScoreModel(TimeMLP(dim=2, width=16, depth=2, n_freq=4), sde)
    x0 = _mixture().sample(16, torch.Generator().manual_seed(1)).float()
    t = torch.full((16,), 1e-5)
    z = torch.randn(16, 2, generator=torch.Generator().manual_seed(2))
    for reg in (
        ConservativeRegularizer(lam=1.0),
        ConservativeRegularizer(lam=1.0, probes=1),
        HODSMRegularizer(lam=1.0, order=3),
        HODSMRegularizer(lam=1.0, order=3, probes=1),
        FPERegularizer(lam=1.0, divergence=Hutchinson(1), estimator=ResidualEstimator.UNBIASED),
    ):
        pen = reg(model, sde, x0, t, z, torch.Generator().manual_seed(3))
        assert torch.isfinite(pen).all(), reg
        assert all(torch.isfinite(gr).all() for gr in _grads(pen.mean(), list(model.parameters()))), reg


# ---------------------------------------------------------------------------------------------- jet path


def _two_pass(model, sde, x, t, divergence=None, create_graph=False):
    """The jet residual as a plain function: the loss cannot take s from it."""
    return jet_score_fpe_residual(model, sde, x, t, divergence=divergence, create_graph=create_graph)


@pytest.mark.parametrize("sde", SDES, ids=IDS)
@pytest.mark.parametrize("weighting", list(DSMWeighting))
def test_jet_shared_value_stream_gives_the_same_loss_and_gradients(sde, weighting):
    model = _model(seed=2, sde=sde)
    x0 = _mixture().sample(32, torch.Generator().manual_seed(14))
    calls = []
    hook = model.register_forward_hook(lambda *args: calls.append(1))
    results = []
    for residual in (jet_score_fpe_residual, _two_pass):
        calls.clear()
        loss = ScoreFPELoss(sde=sde, eps=1e-3, weighting=weighting, regularizer=FPERegularizer(lam=0.7, residual=residual))
        terms = loss(model, x0, torch.Generator().manual_seed(15))
        grads = torch.autograd.grad(terms.total, list(model.parameters()))
        results.append((terms, grads, len(calls)))
    hook.remove()
    (shared, g_shared, n_shared), (two, g_two, n_two) = results
    assert (n_shared, n_two) == (0, 1)  # the shared path runs no forward pass of its own
    for name in ("total", "dsm", "reg"):
        torch.testing.assert_close(getattr(shared, name), getattr(two, name), rtol=1e-12, atol=0)  # float64 round-off
    for a, b in zip(g_shared, g_two):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-13)  # float64 round-off (atol: entries near 0)


def test_jet_not_shared_on_a_subset_or_resampled_points():
    sde, model = VPSDE(), _model()
    x0 = _mixture().sample(16, torch.Generator().manual_seed(16))
    calls = []
    hook = model.register_forward_hook(lambda *args: calls.append(1))
    for reg in (
        FPERegularizer(lam=1.0, residual=jet_score_fpe_residual, n_points=8),
        FPERegularizer(lam=1.0, residual=jet_score_fpe_residual, points=FPEPoints.RESAMPLED),
    ):
        calls.clear()
        ScoreFPELoss(sde=sde, regularizer=reg)(model, x0, torch.Generator().manual_seed(0))
        assert len(calls) == 1
    hook.remove()


# ---------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: FPERegularizer(lam=1.0, estimator="unbiased"), "estimator"),
        (lambda: ConservativeRegularizer(lam=-1.0), "lam"),
        (lambda: ConservativeRegularizer(lam=1.0, weighting="sigma4"), "weighting"),
        (lambda: ConservativeRegularizer(lam=1.0, probes=0), "probes"),
        (lambda: ConservativeRegularizer(lam=1.0, probe="rademacher"), "probe"),
        (lambda: ConservativeRegularizer(lam=1.0, n_points=0), "n_points"),
        (lambda: HODSMRegularizer(lam=1.0, order=4), "order"),
        (lambda: HODSMRegularizer(lam=True), "lam"),
        (lambda: HODSMRegularizer(lam=1.0, probes=0), "probes"),
        (lambda: ScoreFPELoss(sde=VPSDE(), time_sampling="importance"), "time_sampling"),
        (lambda: ScoreFPELoss(sde=VPSDE(), regularizer=object()), "regularizer"),
        (lambda: ScoreFPELoss(sde=_NoNoise(), time_sampling=TimeSampling.IMPORTANCE), "finite and positive"),
    ],
)
def test_bad_input(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_regularizer_with_a_wrong_shape_is_an_error():
    class Bad(Regularizer):
        lam = 1.0

        @classmethod
        def from_config(cls, config, options, lam):
            return cls()

        def __call__(self, score_fn, sde, x0, t, z, generator):
            return torch.zeros(x0.shape[0] + 1, dtype=x0.dtype)

    x0 = torch.randn(4, 2, dtype=F64)
    with pytest.raises(ValueError, match=r"per-sample penalty of shape \(m,\)"):
        ScoreFPELoss(sde=VPSDE(), regularizer=Bad())(_model(), x0, torch.Generator().manual_seed(0))


@pytest.mark.gpu
def test_cuda_loss_with_a_cuda_generator_is_finite_and_reproducible():
    """Every regularizer, resampled points, Hutchinson probes and importance-sampled time on CUDA data with
    the loss's CUDA generator: finite, on the device, and bitwise reproducible from the generator state."""
    sde = VPSDE()
    model = _model(sde=sde).cuda()
    x0 = _mixture().sample(32, torch.Generator().manual_seed(0)).cuda()
    regs = (
        FPERegularizer(lam=0.5, points=FPEPoints.RESAMPLED, divergence=Hutchinson(1), estimator=ResidualEstimator.UNBIASED),
        FPERegularizer(lam=0.5, residual=jet_score_fpe_residual),
        ConservativeRegularizer(lam=0.5, probes=2),
        HODSMRegularizer(lam=0.5, order=3, probes=1),
    )
    for reg in regs:
        loss = ScoreFPELoss(sde=sde, eps=1e-5, regularizer=reg, time_sampling=TimeSampling.IMPORTANCE)
        a = loss(model, x0, torch.Generator(device="cuda").manual_seed(1))
        b = loss(model, x0, torch.Generator(device="cuda").manual_seed(1))
        assert a.total.device.type == "cuda" and a.is_finite(), reg
        assert torch.equal(a.total, b.total), reg
