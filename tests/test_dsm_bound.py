"""The DSM variational bound (fpe_lab.likelihood.dsm_nll_bound) against its closed-form expectation."""

import math

import pytest
import torch

from fpe_lab.gmm import GaussianMixture
from fpe_lab.likelihood import dsm_nll_bound
from fpe_lab.sde import SubVPSDE, VESDE, VPSDE

MIX = GaussianMixture([0.3, 0.7], [[1.0, 0.0], [-0.5, 0.5]], [[[0.2, 0.05], [0.05, 0.1]], [[0.3, 0.0], [0.0, 0.15]]])


def _mean_sem(v):
    return v.mean().item(), v.std().item() / math.sqrt(v.numel())


@pytest.mark.parametrize("sde", [VPSDE(), SubVPSDE(), VESDE()], ids=str)
def test_exact_score_bound_equals_entropy_plus_prior_kl(sde):
    """E_{x0} L = H(p_eps) + KL(p_1 ‖ π) for the exact score; both sides by Monte Carlo (CLT, 4 SE)."""
    eps = 1e-2
    gen = torch.Generator().manual_seed(0)
    x0 = MIX.sample(4000, gen)
    bound = dsm_nll_bound(MIX.score_fn(sde), sde, x0, eps=eps, n_times=32, generator=gen).nats
    x_eps = MIX.perturbed(sde, eps).sample(20000, gen)
    entropy = -MIX.log_prob(x_eps, eps, sde)
    x_1 = MIX.perturbed(sde, 1.0).sample(20000, gen)
    kl = MIX.log_prob(x_1, 1.0, sde) - sde.prior_log_prob(x_1)
    (m_b, se_b), (m_h, se_h), (m_k, se_k) = _mean_sem(bound), _mean_sem(entropy), _mean_sem(kl)
    assert abs(m_b - (m_h + m_k)) < 4 * math.sqrt(se_b**2 + se_h**2 + se_k**2), (m_b, m_h, m_k)


def test_a_wrong_score_raises_the_bound():
    """The bound is minimised by the true score: a score at the wrong time costs ≥ 10 SE more."""
    sde, eps = VPSDE(), 1e-2
    x0 = MIX.sample(2000, torch.Generator().manual_seed(1))
    exact = dsm_nll_bound(MIX.score_fn(sde), sde, x0, eps=eps, generator=torch.Generator().manual_seed(2)).nats
    wrong = lambda x, t: MIX.score(x, (1.3 * t).clamp(max=1.0), sde)  # noqa: E731
    worse = dsm_nll_bound(wrong, sde, x0, eps=eps, generator=torch.Generator().manual_seed(2)).nats
    diff = worse - exact  # same noise (same seed): a paired comparison
    m, se = _mean_sem(diff)
    assert m > 10 * se and m > 0.01, (m, se)


@pytest.mark.parametrize("kwargs, match", [({"n_times": 0}, "n_times"), ({"eps": 0.0}, "eps"), ({"eps": 1.0}, "eps")])
def test_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        dsm_nll_bound(MIX.score_fn(VPSDE()), VPSDE(), torch.zeros(2, 2, dtype=torch.float64), **kwargs)
