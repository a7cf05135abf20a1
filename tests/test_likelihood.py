"""PF-ODE likelihood (fpe_lab.likelihood) against closed forms: an isotropic Gaussian and a mixture."""

import math

import pytest
import torch

from fpe_lab.fpe import ExactDivergence, Hutchinson, Probe
from fpe_lab.gmm import GaussianMixture
from fpe_lab.likelihood import FixedProbeHutchinson, UniformDequantization, bits_per_dim, pf_ode_nll
from fpe_lab.sampling import ODEMethod
from fpe_lab.sde import VESDE, VPSDE
from fpe_lab.shapes import append_dims, flat_dim
from tests.conftest import ALL_SDES

SDES = list(ALL_SDES)


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


# ---------------------------------------------------------------- the torch DOPRI5 path (fpe_lab.ode)
@pytest.fixture
def one_thread():
    """Hundreds of evaluations on ~10² points: intra-op threads only add synchronisation (measured 2 vs
    40 ms per mixture score on 2 busy cores)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.mark.analytic
@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("sde", [VESDE(), VPSDE()], ids=lambda s: type(s).__name__)
def test_dopri5_mixture_nll_agrees_with_scipy_and_the_closed_form(sde):
    mix = mixture()
    x = mix.sample(24, torch.Generator().manual_seed(21))
    eps, tol = 1e-3, 1e-9
    true = -mix.log_prob(x, eps, sde)
    prior = lambda y: mix.log_prob(y, 1.0, sde)  # noqa: E731  exact p_1: no prior mismatch
    torch_path = pf_ode_nll(mix.score_fn(sde), sde, x, eps=eps, rtol=tol, atol=tol, method=ODEMethod.DOPRI5,
                            prior_log_prob=prior)
    scipy_path = pf_ode_nll(mix.score_fn(sde), sde, x, eps=eps, rtol=tol, atol=tol, method=ODEMethod.RK45,
                            prior_log_prob=prior)
    # float64, tol 1e-9: measured max |error| 1.0e-9 (VP), 3.8e-9 (VE) for the torch path, ≤ 5.2e-9 for
    # scipy's (sub-VP: 1.1e-9, in the slow-free sampling test below it is covered too); 1e-6 nats
    # leaves > 100× for the accumulation of local errors over the solve
    assert (torch_path.nats - true).abs().max() < 1e-6
    assert (torch_path.nats - scipy_path.nats).abs().max() < 1e-6
    torch.testing.assert_close(torch_path.x_T, scipy_path.x_T, rtol=0, atol=1e-6)
    assert torch_path.nats.dtype == torch.float64 and torch_path.nfe > 0
    assert torch_path.settings["method"] == "dopri5" and torch_path.settings["error_control"] == "per point"


@pytest.mark.analytic
@pytest.mark.usefixtures("one_thread")
def test_dopri5_per_point_control_bounds_a_hard_point_that_batch_rms_lets_through():
    """One point in a narrow mode (covariance 1e-4 I: its PF-ODE drift changes fast near t = eps) among
    300 in a broad one, rtol = atol = 1e-5. scipy's RMS over the batch lets the narrow point through with
    a 6.8e-3-nat error (~500× its error solved alone), and tail points of the broad mode with ~1e-3;
    per-point control bounds every point."""
    sde = VPSDE()
    mix = GaussianMixture([0.5, 0.5], [[-1.0, 0.0], [1.5, 0.0]],
                          [torch.eye(2).tolist(), (1e-4 * torch.eye(2)).tolist()], dtype=torch.float64)
    gen = torch.Generator().manual_seed(0)
    easy = torch.randn(300, 2, generator=gen, dtype=torch.float64) + torch.tensor([-1.0, 0.0], dtype=torch.float64)
    x = torch.cat([torch.tensor([[1.5, 0.0]], dtype=torch.float64), easy])
    eps, tol = 1e-5, 1e-5
    true = -mix.log_prob(x, eps, sde)
    prior = lambda y: mix.log_prob(y, 1.0, sde)  # noqa: E731
    err = {m: (pf_ode_nll(mix.score_fn(sde), sde, x, eps=eps, rtol=tol, atol=tol, method=m,
                          prior_log_prob=prior).nats - true).abs() for m in (ODEMethod.RK45, ODEMethod.DOPRI5)}
    # batch RMS (measured at this seed: hard 6.8e-3, worst easy 1.3e-3; over seeds 1, 2, 22 the worst
    # point was 1.4e-3 to 6.5e-3 nats): the tolerance does not bound single points
    assert err[ODEMethod.RK45][0] > 100 * tol and err[ODEMethod.RK45].max() > 100 * tol
    # per point: measured 1.4e-5 (hard) and ≤ 6.1e-5 (easy; ≤ 9.1e-5 over the seeds above); |y| ~ 1–10
    # nats so each step's local error is ≤ tol·(1 + |y|); 30 × tol allows for accumulation over the solve
    assert err[ODEMethod.DOPRI5].max() < 30 * tol


@pytest.mark.usefixtures("one_thread")
def test_dopri5_runs_in_the_model_dtype_float32():
    import copy

    from fpe_lab.model import ScoreModel
    from fpe_lab.nets.mlp import TimeMLP

    torch.manual_seed(0)
    sde = VPSDE()
    net = ScoreModel(TimeMLP(width=32, depth=2), sde).eval()
    seen = []

    def score(y, t):
        seen.append((y.dtype, t.dtype))
        return net(y, t)

    x = torch.randn(16, 2, generator=torch.Generator().manual_seed(23))
    res = pf_ode_nll(score, sde, x, eps=1e-3, rtol=1e-4, atol=1e-4, method=ODEMethod.DOPRI5)
    assert res.nats.dtype == torch.float32 and torch.isfinite(res.nats).all()
    assert set(seen) == {(torch.float32, torch.float32)}  # no float64 round trip at any evaluation
    ref = pf_ode_nll(copy.deepcopy(net).double(), sde, x.double(), eps=1e-3, rtol=1e-6, atol=1e-6,
                     method=ODEMethod.DOPRI5)
    # float32 at tol 1e-4 vs a float64 solve at 1e-6 (measured 4e-4 nats): tol × O(1–10) nats, accumulated
    assert (res.nats.double() - ref.nats).abs().max() < 5e-3


def test_t0_and_empty_batch_are_refused():
    sde = VPSDE()
    gauss = IsoGaussian(sde)
    with pytest.raises(ValueError, match="t = 0 is not allowed.*sigma\\(0\\) = 0"):
        pf_ode_nll(gauss.score, sde, torch.zeros(3, 2, dtype=torch.float64), eps=0.0)
    with pytest.raises(ValueError, match="t = 0 is not allowed"):
        pf_ode_nll(gauss.score, sde, torch.zeros(3, 2, dtype=torch.float64), eps=0, method=ODEMethod.DOPRI5)
    from fpe_lab.likelihood import dsm_nll_bound

    with pytest.raises(ValueError, match="t = 0 is not allowed"):
        dsm_nll_bound(gauss.score, sde, torch.zeros(3, 2, dtype=torch.float64), eps=0.0)
    empty = torch.zeros(0, 2, dtype=torch.float64)
    for call in (lambda: pf_ode_nll(gauss.score, sde, empty), lambda: dsm_nll_bound(gauss.score, sde, empty),
                 lambda: FixedProbeHutchinson.draw(empty)):
        with pytest.raises(ValueError, match=r"empty batch: shape \(0, 2\)"):
            call()
