"""fpe_lab.losses: DSM against its closed form, the FPE regularizer at the exact score, the combined loss."""

from __future__ import annotations

import math

import pytest
import torch

from fpe_lab.fpe import score_fpe_residual, score_fpe_terms
from fpe_lab.gmm import GaussianMixture
from fpe_lab.losses import DSMWeighting, ScoreFPELoss, dsm_loss
from fpe_lab.model import ScoreModel
from fpe_lab.nets.mlp import TimeMLP
from fpe_lab.regularizers.fpe import FPEPoints, FPERegularizer, FPEWeighting
from fpe_lab.sde import SubVPSDE, VESDE, VPSDE
from tests.conftest import ALL_SDES, SDE_IDS

SDES = list(ALL_SDES)
IDS = list(SDE_IDS)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # tiny MLP batches: intra-op threads only add contention on the shared 2-core machine
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _mixture() -> GaussianMixture:
    means = torch.tensor([[1.5, 0.0], [-1.0, 1.0], [0.0, -2.0]], dtype=torch.float64)
    covs = torch.stack([torch.diag(torch.tensor(v, dtype=torch.float64)) for v in ([0.2, 0.1], [0.3, 0.3], [0.05, 0.4])])
    covs[0, 0, 1] = covs[0, 1, 0] = 0.05
    return GaussianMixture([0.5, 0.3, 0.2], means, covs, dtype=torch.float64)


def _model(seed: int = 0, dtype=torch.float64, sde=VPSDE()) -> ScoreModel:
    torch.manual_seed(seed)
    return ScoreModel(TimeMLP(dim=2, width=32, depth=2, n_freq=4).to(dtype), sde)


@pytest.mark.analytic
@pytest.mark.parametrize("sde", SDES, ids=IDS)
@pytest.mark.parametrize("weighting", list(FPEWeighting))
def test_regularizer_vanishes_at_exact_mixture_score(sde, weighting):
    gm = _mixture()
    g = torch.Generator().manual_seed(1)
    t = 1e-3 + (1 - 1e-3) * torch.rand(256, generator=g, dtype=torch.float64)
    x = sde.perturb(gm.sample(256, g), t, torch.randn(256, 2, generator=g, dtype=torch.float64))
    reg = FPERegularizer(lam=1.0, weighting=weighting)
    exact = reg.penalty_at(gm.score_fn(sde), sde, x, t)
    # the same weighted size of the terms that cancel in R: the scale the round-off is relative to
    scale = weighting.weight(sde, t) * score_fpe_terms(gm.score_fn(sde), sde, x, t).scale ** 2
    assert exact.shape == (256,)
    assert torch.all(exact <= 1e-20 * scale + 1e-300)  # ‖R‖² at float64 round-off: (1e-10 relative)²

    # a deliberately wrong score (the exact score of another time) is not a solution
    wrong = reg.penalty_at(lambda y, s: gm.score(y, (s * 1.2).clamp(max=1.0), sde), sde, x, t)
    assert torch.median(wrong / scale) > 1e-4


@pytest.mark.analytic
@pytest.mark.parametrize("sde", SDES, ids=IDS)
def test_dsm_closed_form_at_the_optimum(sde):
    """Data N(0, c² I): p_t = N(0, v I), v = alpha²c² + sigma², and at s = −x/v
    E sigma²‖s(x_t) + z/sigma‖² = D (1 − sigma²/v)  (DSM = explicit SM + const at the optimum)."""
    c, n, d, t0 = 0.7, 200_000, 2, 0.3
    g = torch.Generator().manual_seed(2)
    x0 = c * torch.randn(n, d, generator=g, dtype=torch.float64)
    z = torch.randn(n, d, generator=g, dtype=torch.float64)
    t = torch.full((n,), t0, dtype=torch.float64)
    alpha, sigma = sde.marginal(t[:1])
    v = alpha**2 * c**2 + sigma**2
    per = dsm_loss(lambda x, tt: -x / v, sde, x0, t, z, DSMWeighting.SIGMA2)
    expected = d * (1 - sigma**2 / v)
    sem = per.std() / math.sqrt(n)
    assert abs(per.mean() - expected) < 5 * sem  # CLT: 5 standard errors at a fixed seed
    # a wrong score s_w = −x/(1.2 v) costs exactly the explicit score-matching error on top:
    # sigma² E‖s_w − s‖² = D sigma² (1 − 1/1.2)² / v; the paired difference has its own (small) SEM
    excess = dsm_loss(lambda x, tt: -x / (1.2 * v), sde, x0, t, z, DSMWeighting.SIGMA2) - per
    expected_excess = d * sigma**2 * (1 - 1 / 1.2) ** 2 / v
    assert abs(excess.mean() - expected_excess) < 5 * excess.std() / math.sqrt(n)  # CLT, 5 SEM
    assert excess.mean() > 10 * excess.std() / math.sqrt(n)  # and it is clearly resolved
    # likelihood weighting is the sigma² loss rescaled by g²/sigma²
    lik = dsm_loss(lambda x, tt: -x / v, sde, x0, t, z, DSMWeighting.LIKELIHOOD)
    torch.testing.assert_close(lik, per * sde.diffusion(t) ** 2 / sigma**2, rtol=1e-12, atol=0)  # float64 round-off


def test_weightings_are_the_documented_formulas():
    sde, t = VESDE(), torch.tensor([1e-3, 0.5, 1.0], dtype=torch.float64)
    _, sigma = sde.marginal(t)
    g2 = sde.diffusion(t) ** 2
    torch.testing.assert_close(DSMWeighting.SIGMA2.weight(sde, t), sigma**2, rtol=1e-14, atol=0)  # identical formula
    torch.testing.assert_close(DSMWeighting.LIKELIHOOD.weight(sde, t), g2, rtol=1e-14, atol=0)
    torch.testing.assert_close(FPEWeighting.NORMALIZED.weight(sde, t), sigma**6 / g2**2, rtol=1e-12, atol=0)
    torch.testing.assert_close(FPEWeighting.G2.weight(sde, t), g2, rtol=1e-14, atol=0)
    torch.testing.assert_close(FPEWeighting.ONE.weight(sde, t), torch.ones_like(t), rtol=0, atol=0)


@pytest.mark.parametrize("points", list(FPEPoints))
def test_combined_loss_terms_and_points(points):
    sde = VPSDE()
    model = _model()
    reg = FPERegularizer(lam=0.3, points=points, n_points=16)
    loss = ScoreFPELoss(sde=sde, eps=1e-3, regularizer=reg)
    x0 = _mixture().sample(64, torch.Generator().manual_seed(3))
    terms = loss(model, x0, torch.Generator().manual_seed(4))
    torch.testing.assert_close(terms.total, terms.dsm + 0.3 * terms.reg, rtol=1e-14, atol=0)  # float64 round-off

    # recompute by hand from the same generator stream: t, z (then the permutation and z' when resampled)
    g = torch.Generator().manual_seed(4)
    t, z, weight = loss.draw(x0, g)
    assert torch.equal(weight, torch.ones_like(t))  # uniform time: no importance weight
    torch.testing.assert_close(terms.dsm, dsm_loss(model, sde, x0, t, z).mean(), rtol=1e-12, atol=0)
    x_r = sde.perturb(x0, t, z)
    if points is FPEPoints.RESAMPLED:
        perm = torch.randperm(64, generator=g)
        x_r = sde.perturb(x0[perm], t, torch.randn(x0.shape, generator=g, dtype=x0.dtype))
    r = score_fpe_residual(model, sde, x_r[:16], t[:16])
    w = FPEWeighting.NORMALIZED.weight(sde, t[:16])
    torch.testing.assert_close(terms.reg, (w * r.pow(2).sum(-1)).mean(), rtol=1e-10, atol=0)  # float64 round-off

    # the FPE term alone has a nonzero parameter gradient (create_graph=True reached the weights)
    grads = torch.autograd.grad(terms.reg, list(model.parameters()), allow_unused=True)
    assert any(gr is not None and gr.abs().sum() > 0 for gr in grads)


def test_plain_dsm_and_lam_zero_report_zero_fpe():
    sde, model = VESDE(), _model(sde=VESDE())
    x0 = torch.randn(32, 2, dtype=torch.float64)
    for reg in (None, FPERegularizer(lam=0.0)):
        terms = ScoreFPELoss(sde=sde, regularizer=reg)(model, x0, torch.Generator().manual_seed(0))
        assert terms.reg.item() == 0.0 and torch.equal(terms.total, terms.dsm)


def test_jet_residual_path_gives_the_same_loss():
    jet = pytest.importorskip("fpe_lab.nets.jet")
    sde, model = SubVPSDE(), _model(sde=SubVPSDE())
    x0 = _mixture().sample(32, torch.Generator().manual_seed(5))
    generic = ScoreFPELoss(sde=sde, regularizer=FPERegularizer(lam=1.0))(model, x0, torch.Generator().manual_seed(6))
    fast = ScoreFPELoss(sde=sde, regularizer=FPERegularizer(lam=1.0, residual=jet.jet_score_fpe_residual))(
        model, x0, torch.Generator().manual_seed(6)
    )
    torch.testing.assert_close(fast.reg, generic.reg, rtol=1e-9, atol=0)  # float64 round-off of two derivative orders


@pytest.mark.parametrize("sde", SDES, ids=IDS)
@pytest.mark.parametrize("fpe_weighting", list(FPEWeighting))
@pytest.mark.parametrize("weighting", list(DSMWeighting))
def test_smallest_time_is_finite_in_float32(sde, fpe_weighting, weighting):
    eps = 1e-5
    model = _model(dtype=torch.float32, sde=sde)
    x0 = _mixture().sample(64, torch.Generator().manual_seed(7)).float()
    t = torch.full((64,), eps)
    z = torch.randn(64, 2, generator=torch.Generator().manual_seed(8))
    dsm = dsm_loss(model, sde, x0, t, z, weighting).mean()
    fpe = FPERegularizer(lam=1.0, weighting=fpe_weighting)(model, sde, x0, t, z, None).mean()
    total = dsm + fpe
    assert torch.isfinite(total), (dsm, fpe)
    grads = torch.autograd.grad(total, list(model.parameters()))
    assert all(torch.isfinite(gr).all() for gr in grads)


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: FPERegularizer(lam=-0.1), "lam"),
        (lambda: FPERegularizer(lam=float("nan")), "lam"),
        (lambda: FPERegularizer(lam=1.0, weighting="g2"), "weighting"),
        (lambda: FPERegularizer(lam=1.0, points="perturbed"), "points"),
        (lambda: FPERegularizer(lam=1.0, n_points=0), "n_points"),
        (lambda: ScoreFPELoss(sde=VPSDE(), eps=0.0), "eps"),
        (lambda: ScoreFPELoss(sde=VPSDE(), eps=1.0), "eps"),
        (lambda: ScoreFPELoss(sde=VPSDE(), weighting="sigma2"), "weighting"),
    ],
)
def test_bad_input(make, match):
    with pytest.raises(ValueError, match=match):
        make()
