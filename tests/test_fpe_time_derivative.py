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
    fn = lambda x, t: drop(lin(torch.cat([x, t[:, None]], 1)))  # a lambda: eval mode cannot be applied
    x = _points(16)
    t = torch.full((16,), 0.5, dtype=torch.float64)
    _, d = FiniteDifferenceDt(h=1e-3)(fn, x, t)
    assert (d - lin.weight[:, 2].detach()).abs().max().item() > 10


@pytest.mark.parametrize("kwargs", [{"h": 0.0}, {"h": -1e-3}, {"h": 0.7}, {"eps": -0.1}, {"eps": 1.0}])
def test_bad_finite_difference_settings(kwargs):
    name = next(iter(kwargs))
    with pytest.raises(ValueError, match=name):
        FiniteDifferenceDt(**kwargs)
