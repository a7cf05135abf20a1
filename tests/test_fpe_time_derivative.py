"""∂_t s inside the residual: forward-mode JVP (default) vs the clipped finite-difference option."""

import numpy as np
import pytest
import torch

from fpe_lab.fpe import FiniteDifferenceDt, ForwardModeDt, score_fpe_residual
from fpe_lab.gmm import GaussianMixture
from fpe_lab.sde import SubVPSDE, VESDE, VPSDE

MIX = GaussianMixture([0.4, 0.6], [[1.0, -0.5], [-1.0, 0.5]], [[[0.3, 0.1], [0.1, 0.2]], [[0.25, 0.0], [0.0, 0.4]]])


def _points(n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return 2 * torch.randn(n, 2, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("sde", [VESDE(), VPSDE(), SubVPSDE()], ids=str)
def test_finite_difference_dt_converges_at_second_order(sde):
    x = _points()
    t = torch.full((x.shape[0],), 0.4, dtype=torch.float64)
    score_fn = MIX.score_fn(sde)
    _, exact = ForwardModeDt()(score_fn, x, t)
    hs = [4e-3, 2e-3, 1e-3]
    errs = [(FiniteDifferenceDt(h=h)(score_fn, x, t)[1] - exact).abs().max().item() for h in hs]
    order = np.polyfit(np.log(hs), np.log(errs), 1)[0]
    # central difference: error ~ h² s''' (round-off ~1e-16/h is far below at these h in float64)
    assert 1.8 < order < 2.2, (errs, order)


def test_finite_difference_residual_of_exact_score_is_small_and_jvp_is_exact():
    sde = VPSDE()
    x = _points()
    t = torch.full((x.shape[0],), 0.3, dtype=torch.float64)
    scale = MIX.score(x, t, sde).abs().max().item()
    r_jvp = score_fpe_residual(MIX.score_fn(sde), sde, x, t)
    assert r_jvp.abs().max().item() < 1e-10 * scale  # exact derivatives: float64 round-off
    r_fd = [
        score_fpe_residual(MIX.score_fn(sde), sde, x, t, time_derivative=FiniteDifferenceDt(h=h)).abs().max().item()
        for h in (1e-3, 1e-4)
    ]
    # the FD residual is the stencil's O(h²) error: nonzero, and 100× smaller for 10× smaller h (±20%)
    assert r_fd[1] > 1e-9 * scale
    assert 80 < r_fd[0] / r_fd[1] < 120, r_fd


@pytest.mark.parametrize("sde", [VESDE(), VPSDE(), SubVPSDE()], ids=str)
def test_stencil_never_steps_below_eps(sde):
    """The paper's stencil t − 1e-3 < 0 gave NaN for VP; the clipped one stays inside [eps, 1]."""
    seen = []

    def score_fn(x, t):
        seen.append(t.detach().clone())
        return MIX.score(x, t, sde)

    x = _points(8)
    t = torch.full((8,), 1e-5, dtype=torch.float64)
    s, dt_s = FiniteDifferenceDt(h=1e-3, eps=1e-5)(score_fn, x, t)
    assert torch.isfinite(dt_s).all()
    assert min(v.min().item() for v in seen) >= 1e-5
    t1 = torch.ones(8, dtype=torch.float64)
    assert torch.isfinite(FiniteDifferenceDt()(score_fn, x, t1)[1]).all()
    assert max(v.max().item() for v in seen) <= 1.0


def test_extra_evaluations_run_without_dropout_and_mode_is_restored():
    torch.manual_seed(0)

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(3, 2).double()
            self.drop = torch.nn.Dropout(0.5)

        def forward(self, x, t):
            return self.drop(self.lin(torch.cat([x, t[:, None]], 1)))

    net = Net().train()
    x = _points(16)
    t = torch.full((16,), 0.5, dtype=torch.float64)
    fd = FiniteDifferenceDt(h=1e-3)
    _, d1 = fd(net, x, t)
    _, d2 = fd(net, x, t)
    # the net is linear in t without dropout: ∂_t s = W[:, 2] exactly (float64 round-off / h)
    expected = net.lin.weight[:, 2].detach().expand(16, 2)
    assert torch.allclose(d1, expected, atol=1e-9) and torch.allclose(d2, expected, atol=1e-9)
    assert net.training and net.drop.training


def test_dropout_noise_would_be_amplified_without_eval_mode():
    """Control: the same stencil with dropout on gives O(1/h) garbage — what eval mode prevents."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(3, 2).double()
    drop = torch.nn.Dropout(0.5).train()
    fn = lambda x, t: drop(lin(torch.cat([x, t[:, None]], 1)))  # noqa: E731 - a lambda: eval mode cannot be applied
    x = _points(16)
    t = torch.full((16,), 0.5, dtype=torch.float64)
    _, d = FiniteDifferenceDt(h=1e-3)(fn, x, t)
    assert (d - lin.weight[:, 2].detach()).abs().max().item() > 10


@pytest.mark.parametrize("kwargs", [{"h": 0.0}, {"h": -1e-3}, {"h": 0.7}, {"eps": -0.1}, {"eps": 1.0}])
def test_bad_finite_difference_settings(kwargs):
    name = next(iter(kwargs))
    with pytest.raises(ValueError, match=name):
        FiniteDifferenceDt(**kwargs)


def _dt(score_fn, x, t):
    """Exact ∂_t s by one forward-mode JVP."""
    return torch.func.jvp(lambda u: score_fn(x, u), (t,), (torch.ones_like(t),))[1]


def _dtt(score_fn, x, t):
    """Exact ∂²_t s by forward-over-forward (the mixture is analytic in t on [0, 1] via sigma²)."""
    return torch.func.jvp(lambda u: _dt(score_fn, x, u), (t,), (torch.ones_like(t),))[1]


@pytest.mark.analytic
@pytest.mark.parametrize("sde", [VESDE(), VPSDE(), SubVPSDE()], ids=["VE", "VP", "subVP"])
@pytest.mark.parametrize("where", ["eps", "eps+h/4", "1-h/3", "1"])
def test_finite_difference_dt_value_at_the_clipped_ends(sde, where):
    """The *value* of the clipped stencil at and near the ends, against the exact ∂_t s of a mixture.

    With h = 1e-3, eps = 1e-5 the stencil is (s(hi) − s(lo)) / (hi − lo), lo = max(t − h, eps),
    hi = min(t + h, 1): at t = eps a forward difference (lo = t), at t = 1 a backward one (hi = t),
    close to the ends an asymmetric one. Taylor's theorem with t's neighbours gives

        FD − ∂_t s = ((hi − t) − (t − lo))/2 · ∂²_t s(t) + O(h²),               (first order, not second)
        |FD − ∂_t s| ≤ ((hi − t)² + (t − lo)²) / (2 (hi − lo)) · max_[lo, hi] |∂²_t s|,

    both with the exact ∂²_t s (forward-over-forward AD). Tolerances: the bound holds exactly; its max is
    taken over 9 points of [lo, hi], hence 5% slack (∂²_t s varies by < 1% across a 1e-3 stencil here).
    The leading term predicts the error to O(h)·|∂³_t s/∂²_t s| relative: measured ≤ 7e-3 at h = 1e-3, so
    2%. At t = eps and t = 1 halving h halves the error (first order: ratio 2 ± 5%; a central stencil
    would give 4).
    Measured at t = eps for VP: |FD − ∂_t s| = 1.26 against |∂_t s| up to 12.7 — 10% error, so the clipped
    stencil near t = 0 is much less accurate than its O(h²) interior.
    """
    eps = 1e-5
    x = _points()
    score_fn = MIX.score_fn(sde)

    def stencil(h):
        t0 = {"eps": eps, "eps+h/4": eps + h / 4, "1-h/3": 1 - h / 3, "1": 1.0}[where]
        seen = []

        def recording(xx, tt):
            seen.append(float(tt[0]))
            return score_fn(xx, tt)

        t = torch.full((x.shape[0],), t0, dtype=torch.float64)
        _, approx = FiniteDifferenceDt(h=h, eps=eps)(recording, x, t)
        lo, hi = max(t0 - h, eps), min(t0 + h, 1.0)
        assert seen[1:] == pytest.approx([hi, lo], rel=0, abs=1e-15)  # the clipped stencil, as documented
        return t0, t, lo, hi, approx

    h = 1e-3
    t0, t, lo, hi, approx = stencil(h)
    exact = _dt(score_fn, x, t)
    err = approx - exact
    taus = torch.linspace(lo, hi, 9, dtype=torch.float64)
    max_dtt = max(_dtt(score_fn, x, torch.full_like(t, float(tau))).abs().max().item() for tau in taus)
    bound = ((hi - t0) ** 2 + (t0 - lo) ** 2) / (2 * (hi - lo)) * max_dtt
    assert err.abs().max().item() <= 1.05 * bound
    lead = (hi + lo - 2 * t0) / 2 * _dtt(score_fn, x, t)
    assert lead.norm() > 0  # one-sided or asymmetric: a nonzero first-order term
    assert (err - lead).norm() <= 0.02 * lead.norm()
    if where in ("eps", "1"):  # purely one-sided at the same t for every h: the error is ∝ h
        _, _, _, _, approx_half = stencil(h / 2)
        ratio = err.norm() / (approx_half - exact).norm()
        assert 1.9 < ratio < 2.1, ratio
