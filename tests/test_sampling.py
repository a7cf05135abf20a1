"""Reverse-SDE and PF-ODE samplers (fpe_lab.sampling) with exact scores."""

import pytest
import torch

from fpe_lab.gmm import GaussianMixture
from fpe_lab.metrics.sample_distance import noise_floor, sliced_wasserstein
from fpe_lab.sampling import LangevinCorrector, ODEMethod, pf_ode_sample, reverse_sde_sample
from fpe_lab.sde import VESDE, VPSDE
from fpe_lab.shapes import append_dims
from tests.conftest import ALL_SDES

SDES = list(ALL_SDES)
EPS = 1e-3
N = 1000


def mixture():
    return GaussianMixture(
        [0.3, 0.7], [[-1.0, 0.5], [1.5, -0.5]], [[[0.3, 0.1], [0.1, 0.2]], [[0.2, 0.0], [0.0, 0.4]]],
        dtype=torch.float64,
    )


def sw(a, b):
    # fixed projections so every comparison in a test uses the same 128 directions
    return sliced_wasserstein(a, b, n_projections=128, generator=torch.Generator().manual_seed(123))


def floor_of(p_eps, gen):
    return noise_floor(p_eps.sample, N, sw, repeats=5, generator=gen)


@pytest.mark.parametrize("sde", SDES, ids=lambda s: type(s).__name__)
def test_pf_ode_samples_match_mixture_and_a_wrong_score_does_not(sde):
    mix = mixture()
    gen = torch.Generator().manual_seed(0)
    p_eps = mix.perturbed(sde, EPS)
    floor = floor_of(p_eps, gen)
    x_T = sde.prior_sample((N, 2), gen, torch.float64)
    good = pf_ode_sample(mix.score_fn(sde), sde, x_T, eps=EPS)
    shifted = GaussianMixture(mix.weights, mix.means + 0.3, mix.covs)
    bad = pf_ode_sample(shifted.score_fn(sde), sde, x_T, eps=EPS)
    held_out = p_eps.sample(N, gen)
    # an exact sampler scores like two independent sets of N samples: floor + 3 spreads (fixed seed)
    assert sw(good.x, held_out) < floor.mean + 3 * floor.std
    assert sw(bad.x, held_out) > floor.mean + 5 * floor.std  # a 0.3 shift (SW ~ 0.3) is far above
    assert good.x.shape == x_T.shape and good.nfe > 0


@pytest.mark.parametrize("sde", [VESDE(), VPSDE()], ids=lambda s: type(s).__name__)
def test_reverse_sde_samples_match_mixture(sde):
    mix = mixture()
    gen = torch.Generator().manual_seed(1)
    p_eps = mix.perturbed(sde, EPS)
    floor = floor_of(p_eps, gen)
    x_T = sde.prior_sample((N, 2), gen, torch.float64)
    x = reverse_sde_sample(mix.score_fn(sde), sde, x_T, n_steps=200, eps=EPS, generator=gen)
    # Euler–Maruyama weak error O(h) at 200 steps is below the N = 1000 floor (fixed seed)
    assert sw(x, p_eps.sample(N, gen)) < floor.mean + 3 * floor.std
    wrong = reverse_sde_sample(lambda y, t: 0.5 * mix.score(y, t, sde), sde, x_T, n_steps=200, eps=EPS,
                               generator=gen)
    assert sw(wrong, p_eps.sample(N, gen)) > floor.mean + 5 * floor.std  # half the score: too wide


def test_langevin_corrector_keeps_the_law():
    sde, mix = VPSDE(), mixture()
    gen = torch.Generator().manual_seed(2)
    p_eps = mix.perturbed(sde, EPS)
    floor = floor_of(p_eps, gen)
    x_T = sde.prior_sample((N, 2), gen, torch.float64)
    x = reverse_sde_sample(mix.score_fn(sde), sde, x_T, n_steps=100, eps=EPS, generator=gen,
                           corrector=LangevinCorrector(snr=0.16, n_steps=1))
    assert sw(x, p_eps.sample(N, gen)) < floor.mean + 3 * floor.std  # PC sampling with the exact score
    assert torch.isfinite(x).all()


@pytest.mark.analytic
@pytest.mark.parametrize("sde", SDES, ids=lambda s: type(s).__name__)
def test_pf_ode_flow_of_a_centred_gaussian_is_a_rescaling(sde):
    """p_0 = N(0, s0² I): v(t) = alpha² s0² + sigma², the flow keeps x / sqrt(v) fixed, on any shape."""
    s0 = 0.6

    def var(t, like):
        alpha, sigma = sde.marginal(torch.as_tensor(t, dtype=like.dtype))
        return alpha**2 * s0**2 + sigma**2

    score = lambda x, t: -x / append_dims(var(t, x), x.ndim)  # noqa: E731
    x_T = torch.randn(16, 3, 2, 2, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    out = pf_ode_sample(score, sde, x_T, eps=EPS, rtol=1e-9, atol=1e-9, method=ODEMethod.DOP853)
    expected = x_T * torch.sqrt(var(EPS, x_T) / var(1.0, x_T))
    # DOP853 at rtol=atol=1e-9; x_eps is O(1), so 1e-6 leaves 1e3 x tol for the RMS control
    torch.testing.assert_close(out.x, expected, rtol=0, atol=1e-6)
    wrong = pf_ode_sample(lambda x, t: 1.1 * score(x, t), sde, x_T, eps=EPS)
    assert (wrong.x - expected).abs().max() > 1e-2


@pytest.mark.analytic
def test_reverse_sde_variance_of_a_centred_gaussian():
    sde, s0 = VPSDE(), 0.6
    alpha, sigma = sde.marginal(torch.tensor(EPS, dtype=torch.float64))
    v_eps = alpha**2 * s0**2 + sigma**2

    def score(x, t):
        a, s = sde.marginal(t)
        return -x / append_dims(a**2 * s0**2 + s**2, x.ndim)

    gen = torch.Generator().manual_seed(4)
    x_T = sde.prior_sample((20000, 1, 2), gen, torch.float64)
    x = reverse_sde_sample(score, sde, x_T, n_steps=200, eps=EPS, generator=gen)
    var = x.pow(2).mean()
    # CLT: sd of the mean of 40k squares is sqrt(2/40000) v = 0.007 v; EM bias O(h) adds ~1%: 4% total
    assert abs(var / v_eps - 1) < 0.04
    assert x.shape == (20000, 1, 2)


def test_reverse_sde_is_reproducible_at_a_fixed_seed():
    sde, mix = VPSDE(), mixture()
    x_T = sde.prior_sample((50, 2), torch.Generator().manual_seed(5), torch.float64)
    a = reverse_sde_sample(mix.score_fn(sde), sde, x_T, n_steps=20, generator=torch.Generator().manual_seed(6))
    b = reverse_sde_sample(mix.score_fn(sde), sde, x_T, n_steps=20, generator=torch.Generator().manual_seed(6))
    assert torch.equal(a, b)


@pytest.mark.parametrize(
    "kwargs, match",
    [({"n_steps": 0}, "n_steps"), ({"eps": 0.0}, "eps"), ({"eps": 0.5, "t_end": 0.2}, "eps")],
)
def test_reverse_sde_bad_arguments(kwargs, match):
    sde = VPSDE()
    with pytest.raises(ValueError, match=match):
        reverse_sde_sample(lambda x, t: -x, sde, torch.zeros(4, 2), **kwargs)


def test_bad_starts_and_settings():
    sde = VPSDE()
    with pytest.raises(ValueError, match="x_T"):
        pf_ode_sample(lambda x, t: -x, sde, torch.zeros(4))
    with pytest.raises(ValueError, match="x_T"):
        reverse_sde_sample(lambda x, t: -x, sde, torch.full((4, 2), float("inf")))
    with pytest.raises(ValueError, match="rtol"):
        pf_ode_sample(lambda x, t: -x, sde, torch.zeros(4, 2), rtol=-1.0)
    with pytest.raises(ValueError, match="method"):
        pf_ode_sample(lambda x, t: -x, sde, torch.zeros(4, 2), method="RK45")
    with pytest.raises(ValueError, match="snr"):
        LangevinCorrector(snr=0.0)


def test_diverging_score_raises_instead_of_returning_nan():
    sde = VPSDE()
    with pytest.raises(FloatingPointError):
        reverse_sde_sample(lambda x, t: x * float("inf"), sde, torch.ones(4, 2), n_steps=3)
    with pytest.raises(FloatingPointError):
        pf_ode_sample(lambda x, t: x * float("nan"), sde, torch.ones(4, 2))


# ---------------------------------------------------------------- the torch DOPRI5 path (fpe_lab.ode)
@pytest.fixture
def one_thread():
    """Hundreds of evaluations on ~10² points: intra-op threads only add synchronisation."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.mark.analytic
@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("sde", SDES, ids=lambda s: type(s).__name__)
def test_dopri5_samples_agree_with_scipy_and_the_closed_form(sde):
    """The exact flow of N(0, s0² I) (a rescaling) and scipy's RK45 on a mixture, at tight tolerance."""
    s0 = 0.6

    def var(t, like):
        alpha, sigma = sde.marginal(torch.as_tensor(t, dtype=like.dtype))
        return alpha**2 * s0**2 + sigma**2

    score = lambda x, t: -x / append_dims(var(t, x), x.ndim)  # noqa: E731
    x_T = torch.randn(16, 3, 2, 2, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    out = pf_ode_sample(score, sde, x_T, eps=EPS, rtol=1e-9, atol=1e-9, method=ODEMethod.DOPRI5)
    expected = x_T * torch.sqrt(var(EPS, x_T) / var(1.0, x_T))
    # per-sample control at 1e-9, |x| ~ 1: 1e-6 leaves 1e3 × tol for accumulation (as the DOP853 test)
    torch.testing.assert_close(out.x, expected, rtol=0, atol=1e-6)

    mix = mixture()
    x_T = sde.prior_sample((64, 2), torch.Generator().manual_seed(8), torch.float64)
    ours = pf_ode_sample(mix.score_fn(sde), sde, x_T, eps=EPS, rtol=1e-9, atol=1e-9, method=ODEMethod.DOPRI5)
    ref = pf_ode_sample(mix.score_fn(sde), sde, x_T, eps=EPS, rtol=1e-9, atol=1e-9, method=ODEMethod.RK45)
    # both near the exact flow to ~1e-8 (x ~ 1); 1e-6 as above
    torch.testing.assert_close(ours.x, ref.x, rtol=0, atol=1e-6)
    assert ours.nfe > 0 and ours.x.dtype == torch.float64


def test_drifts_at_t0_and_refusals():
    sde, mix = VPSDE(), mixture()
    x = torch.randn(5, 2, dtype=torch.float64)
    t0 = torch.zeros(5, dtype=torch.float64)
    from fpe_lab.sampling import probability_flow_drift, reverse_sde_drift

    # t = 0 is allowed where the score is: the exact mixture score gives f − ½g(0)² ∇log p_0
    expected = sde.drift(x, t0) - 0.5 * 0.1 * mix.score(x)
    torch.testing.assert_close(probability_flow_drift(mix.score_fn(sde), sde, x, t0), expected, rtol=1e-14, atol=0)
    assert torch.isfinite(reverse_sde_drift(mix.score_fn(sde), sde, x, t0)).all()
    with pytest.raises(ValueError, match="t = 0 is not allowed"):
        pf_ode_sample(mix.score_fn(sde), sde, x, eps=0.0)
    with pytest.raises(ValueError, match="t = 0 is not allowed"):
        reverse_sde_sample(mix.score_fn(sde), sde, x, eps=0.0)
    empty = torch.zeros(0, 2, dtype=torch.float64)
    for call in (lambda: pf_ode_sample(mix.score_fn(sde), sde, empty),
                 lambda: pf_ode_sample(mix.score_fn(sde), sde, empty, method=ODEMethod.DOPRI5),
                 lambda: reverse_sde_sample(mix.score_fn(sde), sde, empty),
                 lambda: probability_flow_drift(mix.score_fn(sde), sde, empty, 0.5),
                 lambda: reverse_sde_drift(mix.score_fn(sde), sde, empty, torch.zeros(0, dtype=torch.float64)),
                 lambda: LangevinCorrector()(mix.score_fn(sde), empty, torch.zeros(0), None)):
        with pytest.raises(ValueError, match=r"empty batch: shape \(0, 2\)"):
            call()


def test_dopri5_non_finite_score_raises():
    sde = VPSDE()
    with pytest.raises(FloatingPointError, match="non-finite"):
        pf_ode_sample(lambda x, t: x * float("nan"), sde, torch.ones(4, 2), method=ODEMethod.DOPRI5)
