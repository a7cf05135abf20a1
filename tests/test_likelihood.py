"""PF-ODE likelihood (fpe_lab.likelihood) against closed forms: an isotropic Gaussian and a mixture."""

import math

import pytest
import torch

from fpe_lab.fpe import ExactDivergence, Hutchinson, Probe
from fpe_lab.gmm import GaussianMixture
from fpe_lab.likelihood import FixedProbeHutchinson, UniformDequantization, bits_per_dim, pf_ode_nll
from fpe_lab.sampling import ODEMethod
from fpe_lab.sde import SubVPSDE, VESDE, VPSDE
from fpe_lab.shapes import append_dims, flat_dim

SDES = [VESDE(), VPSDE(), SubVPSDE()]


class IsoGaussian:
    """p_0 = N(mu, s0² I) on any shape (b, *dims); p_t = N(alpha mu, v I), v = alpha² s0² + sigma²."""

    def __init__(self, sde, mu=0.5, s0=0.7):
        self.sde, self.mu, self.s0 = sde, mu, s0

    def _mv(self, t, x):
        alpha, sigma = self.sde.marginal(torch.as_tensor(t, dtype=x.dtype))
        return alpha * self.mu, alpha**2 * self.s0**2 + sigma**2

    def score(self, x, t):
        m, v = self._mv(t, x)
        return -(x - append_dims(m, x.ndim)) / append_dims(v, x.ndim)

    def log_prob(self, x, t):
        m, v = self._mv(t, x)
        sq = (x - m).reshape(x.shape[0], -1).pow(2).sum(-1)
        return -0.5 * sq / v - 0.5 * flat_dim(x) * torch.log(2 * math.pi * v)


def mixture():
    return GaussianMixture(
        [0.3, 0.7], [[-1.0, 0.5], [1.5, -0.5]], [[[0.3, 0.1], [0.1, 0.2]], [[0.2, 0.0], [0.0, 0.4]]],
        dtype=torch.float64,
    )


@pytest.mark.analytic
@pytest.mark.parametrize("sde", SDES, ids=lambda s: type(s).__name__)
def test_gaussian_nll_matches_closed_form_at_tight_tolerance(sde):
    gauss = IsoGaussian(sde)
    x = 0.5 + 0.7 * torch.randn(64, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    eps = 1e-3
    res = pf_ode_nll(gauss.score, sde, x, eps=eps, rtol=1e-9, atol=1e-9,
                     prior_log_prob=lambda y: gauss.log_prob(y, 1.0))
    true = -gauss.log_prob(x, eps)
    # RK45 at rtol=atol=1e-9 (measured max 6e-9, VE); RMS control does not bound each point: 100 x tol
    assert (res.nats - true).abs().max() < 1e-7
    assert res.nats.dtype == torch.float64 and res.nfe > 0
    assert res.settings["rtol"] == 1e-9 and res.settings["method"] == "RK45"


@pytest.mark.analytic
def test_mixture_nll_matches_exact_minus_log_p_eps():
    mix, sde = mixture(), VPSDE()
    x = mix.sample(40, torch.Generator().manual_seed(1))
    eps = 1e-3
    res = pf_ode_nll(mix.score_fn(sde), sde, x, eps=eps, rtol=1e-7, atol=1e-7,
                     prior_log_prob=lambda y: mix.log_prob(y, 1.0, sde))
    true = -mix.log_prob(x, eps, sde)
    # RK45 at 1e-7 (measured max 8e-7 nats; 2.6e-4 at 1e-5); per-point error not bounded by RMS control
    assert (res.nats - true).abs().max() < 1e-5
    # bits/dim is the same number in other units
    torch.testing.assert_close(res.bits_per_dim, res.nats / (2 * math.log(2)), rtol=0, atol=1e-12)


@pytest.mark.analytic
def test_default_prior_adds_only_the_prior_mismatch():
    """With the SDE's N(0, I) prior the VP error is the tiny mismatch log p_1 − log N(0, I) at x_T."""
    mix, sde = mixture(), VPSDE()
    x = mix.sample(40, torch.Generator().manual_seed(2))
    res = pf_ode_nll(mix.score_fn(sde), sde, x, eps=1e-3, rtol=1e-7, atol=1e-7)
    mismatch = mix.log_prob(res.x_T, 1.0, sde) - sde.prior_log_prob(res.x_T)
    # the solve is identical up to the prior term; 1e-4 as in the exact-prior test
    assert (res.nats - (-mix.log_prob(x, 1e-3, sde) + mismatch)).abs().max() < 1e-4
    # VP at t = 1 the mean of p_1 is alpha(1) mu with alpha(1) = exp(−5.025) = 6.6e-3: the mismatch is
    # first order in it, ~alpha |mu| |x_T| ~ 1e-2 nats, and nonzero
    assert 1e-4 < mismatch.abs().max() < 0.05


def test_wrong_score_gives_wrong_nll():
    mix, sde = mixture(), VPSDE()
    x = mix.sample(40, torch.Generator().manual_seed(3))
    late = lambda y, t: mix.score(y, (1.5 * t).clamp(max=1.0), sde)  # noqa: E731  score of a later time
    res = pf_ode_nll(late, sde, x, eps=1e-3, prior_log_prob=lambda y: mix.log_prob(y, 1.0, sde))
    gap = res.nats - (-mix.log_prob(x, 1e-3, sde))
    assert gap.mean() > 0.1  # a blurred score must cost likelihood (measured ~0.4 nats)


@pytest.mark.analytic
def test_image_shaped_input_with_exact_and_hutchinson_divergence():
    sde = VPSDE()
    gauss = IsoGaussian(sde)
    gen = torch.Generator().manual_seed(4)
    x = 0.5 + 0.7 * torch.randn(200, 1, 2, 2, generator=gen, dtype=torch.float64)
    true = -gauss.log_prob(x, 1e-3)
    exact = pf_ode_nll(gauss.score, sde, x, eps=1e-3, rtol=1e-8, atol=1e-8)
    flat = pf_ode_nll(gauss.score, sde, x.reshape(200, 4), eps=1e-3, rtol=1e-8, atol=1e-8)
    torch.testing.assert_close(exact.nats, flat.nats, rtol=0, atol=1e-9)  # same ODE, float64 round-off
    # N(0, I) prior vs exact p_1 (mean alpha(1) mu, alpha(1) = 6.6e-3): ~1e-2 nats; ODE error far below
    assert (exact.nats - true).abs().max() < 0.05
    hutch = pf_ode_nll(gauss.score, sde, x, eps=1e-3,
                       divergence=Hutchinson(probe=Probe.GAUSSIAN, generator=torch.Generator().manual_seed(5)))
    err = hutch.nats - exact.nats
    sem = err.std() / math.sqrt(err.numel())
    # (Gaussian probes: Rademacher ones are exact for this diagonal Jacobian −I/v)
    assert err.abs().max() > 1e-2  # the estimator is really random per point ...
    assert err.mean().abs() < 4 * sem  # ... and unbiased (CLT, 4 standard errors)
    assert hutch.settings["divergence"].endswith("probes fixed per solve")


def test_fixed_probe_hutchinson_is_v_transpose_jacobian_v():
    a = torch.tensor([[1.0, 2.0], [-3.0, 0.5]], dtype=torch.float64)
    x = torch.randn(5, 2, dtype=torch.float64).requires_grad_(True)
    s = x @ a.T  # J = a for every sample
    v = torch.tensor([[[1.0, -1.0]] * 5, [[2.0, 1.0]] * 5], dtype=torch.float64)
    est = FixedProbeHutchinson(v)(s, x)
    expected = ((v @ a.T) * v).sum(-1).mean(0)  # mean_j v_jᵀ a v_j
    torch.testing.assert_close(est, expected, rtol=0, atol=1e-12)  # float64 round-off
    s = x @ a.T
    assert not torch.allclose(est, ExactDivergence()(s, x))  # this pair of probes is not the trace


def test_chunked_solves_agree():
    sde = VESDE()
    gauss = IsoGaussian(sde)
    x = torch.randn(30, 2, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    one = pf_ode_nll(gauss.score, sde, x, eps=1e-3, rtol=1e-7, atol=1e-7)
    chunked = pf_ode_nll(gauss.score, sde, x, eps=1e-3, rtol=1e-7, atol=1e-7, batch_size=10)
    assert chunked.settings["n_chunks"] == 3 and chunked.nfe > one.nfe
    torch.testing.assert_close(one.nats, chunked.nats, rtol=0, atol=1e-4)  # two solves at tol 1e-7


def test_uniform_dequantization_offset_and_bins():
    deq = UniformDequantization(256, -1.0, 1.0)
    assert deq.offset_bits_per_dim == pytest.approx(7.0, abs=1e-12)  # log2(128), Score SDE's offset
    assert UniformDequantization(256, 0.0, 1.0).offset_bits_per_dim == pytest.approx(8.0, abs=1e-12)
    k = torch.randint(0, 256, (100, 3, 4, 4), generator=torch.Generator().manual_seed(7))
    x = (k / 255.0) * 2 - 1  # 8-bit image scaled to [-1, 1]
    y = deq.dequantize(x, torch.Generator().manual_seed(8))
    lo = -1 + k * deq.bin_width
    assert ((y >= lo) & (y < lo + deq.bin_width)).all()
    with pytest.raises(ValueError, match="levels"):
        deq.dequantize(x + 0.3 * deq.bin_width)
    with pytest.raises(ValueError, match="levels"):
        UniformDequantization(1)
    with pytest.raises(ValueError, match="low < high"):
        UniformDequantization(256, 1.0, "2")


@pytest.mark.analytic
def test_dequantized_bits_per_dim_include_offset():
    sde = VPSDE()
    gauss = IsoGaussian(sde, mu=0.0, s0=0.5)
    k = torch.randint(0, 256, (20, 1, 2, 2), generator=torch.Generator().manual_seed(9))
    x = (k / 255.0 * 2 - 1).to(torch.float64)
    deq = UniformDequantization()
    res = pf_ode_nll(gauss.score, sde, x, dequantization=deq, generator=torch.Generator().manual_seed(10))
    torch.testing.assert_close(res.bits_per_dim, bits_per_dim(res.nats, 4, 7.0), rtol=0, atol=1e-12)
    assert res.settings["offset_bits_per_dim"] == 7.0


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"eps": 0.0}, "eps"),
        ({"eps": 0.5, "t_end": 0.4}, "eps"),
        ({"rtol": 0.0}, "rtol"),
        ({"atol": float("nan")}, "atol"),
        ({"method": "RK45"}, "method"),
        ({"batch_size": 0}, "batch_size"),
    ],
)
def test_bad_arguments_raise(kwargs, match):
    sde = VPSDE()
    with pytest.raises(ValueError, match=match):
        pf_ode_nll(IsoGaussian(sde).score, sde, torch.zeros(3, 2, dtype=torch.float64), **kwargs)


def test_bad_points_raise():
    sde = VPSDE()
    with pytest.raises(ValueError, match="x must"):
        pf_ode_nll(IsoGaussian(sde).score, sde, torch.zeros(3))
    with pytest.raises(ValueError, match="finite"):
        pf_ode_nll(IsoGaussian(sde).score, sde, torch.full((3, 2), float("nan")))


def test_non_finite_score_is_an_error_not_a_nan():
    sde = VPSDE()
    with pytest.raises(FloatingPointError, match="non-finite"):
        pf_ode_nll(lambda x, t: x / 0.0, sde, torch.ones(3, 2, dtype=torch.float64))


@pytest.mark.slow
@pytest.mark.analytic
def test_mixture_nll_error_shrinks_with_tolerance():
    mix, sde = mixture(), VPSDE()
    x = mix.sample(500, torch.Generator().manual_seed(11))
    true = -mix.log_prob(x, 1e-5, sde)
    errs = []
    for tol in (1e-5, 1e-8):
        res = pf_ode_nll(mix.score_fn(sde), sde, x, eps=1e-5, rtol=tol, atol=tol, method=ODEMethod.RK45,
                         prior_log_prob=lambda y: mix.log_prob(y, 1.0, sde))
        errs.append((res.nats - true).abs().max().item())
    assert errs[1] < 1e-4 < errs[0] * 10  # REFERENCE §4: 2.4e-2 at 1e-5, 3.2e-6 at 1e-8 (2,000 points)
    assert errs[1] < errs[0] / 100


@pytest.mark.gpu
def test_cuda_tensors_give_the_cpu_result():
    from fpe_lab.sampling import pf_ode_sample

    sde = VPSDE()
    gauss = IsoGaussian(sde)
    x = torch.randn(32, 3, 2, 2, generator=torch.Generator().manual_seed(12), dtype=torch.float64)
    cpu = pf_ode_nll(gauss.score, sde, x, eps=1e-3, rtol=1e-7, atol=1e-7)
    gpu = pf_ode_nll(gauss.score, sde, x.cuda(), eps=1e-3, rtol=1e-7, atol=1e-7)
    assert gpu.nats.is_cuda
    # same float64 ODE; only reduction order differs between devices
    torch.testing.assert_close(gpu.nats.cpu(), cpu.nats, rtol=0, atol=1e-6)
    out = pf_ode_sample(gauss.score, sde, x.cuda(), eps=1e-3)
    assert out.x.is_cuda and torch.isfinite(out.x).all()


def test_fast_exact_divergence_equals_fpe_exact_divergence():
    from fpe_lab.likelihood import _freeze
    from fpe_lab.model import ScoreModel
    from fpe_lab.nets.mlp import TimeMLP

    torch.manual_seed(0)
    net = ScoreModel(TimeMLP(width=32, depth=2), VPSDE()).double()
    x = torch.randn(50, 2, dtype=torch.float64).requires_grad_(True)
    t = torch.full((50,), 0.3, dtype=torch.float64)
    ref = ExactDivergence()(net(x, t), x)
    fast = _freeze(ExactDivergence(), x)
    assert not isinstance(fast, ExactDivergence)
    torch.testing.assert_close(fast(net(x, t), x), ref.detach(), rtol=0, atol=1e-12)  # float64 round-off
