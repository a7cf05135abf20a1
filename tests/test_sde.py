"""fpe_lab.sde: marginals against Euler-Maruyama simulation (KS), shapes/dtypes incl. images, priors,
printed equations and bad input. (Closed-form agreement with sympy is in test_analytic.py.)"""

import math

import numpy as np
import pytest
import scipy.stats
import torch

from fpe_lab.fpe import ExactDivergence
from fpe_lab.sde import SubVPSDE, VESDE, VPSDE
from tests.conftest import ALL_SDES

SDES = list(ALL_SDES)
IDS = ["VE", "VP", "subVP"]


def euler_maruyama(sde, x0: torch.Tensor, t_end: float, n_steps: int, gen: torch.Generator) -> torch.Tensor:
    """Simulate dx = f dt + g dw from 0 to t_end using only drift() and diffusion()."""
    x = x0.clone()
    dt = t_end / n_steps
    for i in range(n_steps):
        t = torch.full((x.shape[0],), i * dt, dtype=x.dtype)
        g = sde.diffusion(t)[:, None]
        x = x + sde.drift(x, t) * dt + g * math.sqrt(dt) * torch.randn(x.shape, generator=gen, dtype=x.dtype)
    return x


@pytest.fixture
def one_thread():
    """400 tiny sequential steps: intra-op threads only add synchronisation (15x slower when cores are busy)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.mark.analytic
@pytest.mark.parametrize("sde", SDES, ids=IDS)
@pytest.mark.parametrize("t_end", [0.3, 1.0])
def test_simulated_x_t_passes_ks_against_the_marginal(sde, t_end, one_thread):
    gen = torch.Generator().manual_seed(0)
    n = 4000
    x0 = torch.full((n, 1), 1.5, dtype=torch.float64)
    xt = euler_maruyama(sde, x0, t_end, 400, gen)[:, 0].numpy()
    alpha, sigma = (v.item() for v in sde.marginal(torch.tensor(t_end, dtype=torch.float64)))
    # KS at n = 4000 resolves CDF errors ~0.03; Euler-Maruyama's weak error O(dt) ~ 2.5e-3 is far below.
    p = scipy.stats.kstest(xt, "norm", args=(alpha * 1.5, sigma)).pvalue
    assert p > 1e-3  # fixed seed; a correct marginal fails with probability 1e-3
    # can fail: the same samples against a standard deviation 20% too large
    assert scipy.stats.kstest(xt, "norm", args=(alpha * 1.5, 1.2 * sigma)).pvalue < 1e-3


@pytest.mark.analytic
def test_ve_marginal_is_the_exact_transition_not_score_sde_sigma():
    sde = VESDE()
    t = torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64)
    _, sigma = sde.marginal(t)
    assert sigma[0] == 0
    expected = 0.01 * torch.sqrt((50.0 / 0.01) ** (2 * t) - 1)
    torch.testing.assert_close(sigma, expected, rtol=1e-12, atol=0)  # float64 round-off
    assert sde.prior_std() == pytest.approx(math.sqrt(50.0**2 - 0.01**2), rel=1e-14)


@pytest.mark.parametrize("sde", SDES, ids=IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(5, 2), (3, 2, 4, 4)], ids=["points", "images"])
def test_methods_keep_shape_and_dtype(sde, dtype, shape):
    x = torch.randn(shape, dtype=dtype)
    t = torch.linspace(0.1, 0.9, shape[0], dtype=dtype)
    f = sde.drift(x, t)
    assert f.shape == x.shape and f.dtype == dtype
    a = sde.drift_coef(t)
    torch.testing.assert_close(f, a.reshape(-1, *[1] * (x.ndim - 1)) * x)  # f = a(t) x, any rank
    for v in (sde.diffusion(t), sde.div_drift(x, t), *sde.marginal(t)):
        assert v.shape == (shape[0],) and v.dtype == dtype and torch.isfinite(v).all()
    d = int(np.prod(shape[1:]))
    torch.testing.assert_close(sde.div_drift(x, t), a * d)
    # ∇·f agrees with an autograd divergence of drift() (float64 only: exact to round-off)
    if dtype == torch.float64:
        xg = x.clone().requires_grad_(True)
        div = ExactDivergence()(sde.drift(xg, t), xg)
        torch.testing.assert_close(div, sde.div_drift(x, t), rtol=1e-12, atol=1e-12)
    s = sde.prior_sample(shape, generator=torch.Generator().manual_seed(0), dtype=dtype)
    assert s.shape == shape and s.dtype == dtype
    assert sde.prior_log_prob(s).shape == (shape[0],)


@pytest.mark.parametrize("sde", SDES, ids=IDS)
def test_scalar_time_and_prior(sde):
    alpha, sigma = sde.marginal(0.5)
    assert alpha.ndim == 0 and sigma.ndim == 0 and 0 < sigma
    x = torch.randn(4, 3, dtype=torch.float64)
    ref = scipy.stats.norm.logpdf(x.numpy(), scale=sde.prior_std()).sum(-1)
    np.testing.assert_allclose(sde.prior_log_prob(x).numpy(), ref, rtol=1e-12)  # float64 round-off
    s = sde.prior_sample((20000, 1), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    # CLT for the sample standard deviation: SE ≈ std / sqrt(2n); 4 standard errors
    assert abs(s.std().item() - sde.prior_std()) < 4 * sde.prior_std() / math.sqrt(2 * 20000)
    # the prior is the marginal at t = 1 up to the data (alpha(1) x_0 is negligible for VP/sub-VP)
    assert sde.marginal(1.0)[1].item() == pytest.approx(sde.prior_std(), rel=1e-3)


@pytest.mark.parametrize(("sde", "needle"), list(zip(SDES, ["VE SDE: dx = g(t) dw", "VP SDE: dx = −½ beta(t) x dt",
                                                       "sub-VP SDE"], strict=True)), ids=IDS)
def test_prints_its_equation(sde, needle):
    assert needle in str(sde) and "x_t|x_0 ~ N(" in str(sde)


def test_bad_input_raises():
    sde = VPSDE()
    for bad_t in (-0.1, 1.5, torch.tensor([0.2, 1.01])):
        with pytest.raises(ValueError, match="t must lie in"):
            sde.marginal(bad_t)
    for bad_t in (math.nan, math.inf):
        with pytest.raises(ValueError, match="t must be finite"):
            VESDE().diffusion(torch.tensor([bad_t]))
    with pytest.raises(ValueError, match="t must lie in"):
        SubVPSDE().drift(torch.zeros(2, 2), torch.tensor([0.5, 2.0]))
    with pytest.raises(ValueError, match="sigma_max must exceed sigma_min"):
        VESDE(sigma_min=1.0, sigma_max=0.5)
    with pytest.raises(ValueError, match="sigma_min must be a finite positive number"):
        VESDE(sigma_min=-0.1)
    with pytest.raises(ValueError, match="beta_min must be a finite positive number"):
        VPSDE(beta_min=math.nan)
    with pytest.raises(ValueError, match="beta_max must be >= beta_min"):
        SubVPSDE(beta_min=5.0, beta_max=1.0)
    with pytest.raises(ValueError, match="beta_max must be a finite positive number"):
        VPSDE(beta_max=True)


# ---------------------------------------------------------------------------------------------- t = 0
@pytest.mark.analytic
@pytest.mark.parametrize("sde", SDES, ids=IDS)
def test_every_method_is_defined_at_t0_with_the_limit_value(sde):
    """t = 0 is the data itself: alpha = 1, sigma = 0 exactly; f, g, ∇·f take their (finite) values there."""
    t0 = torch.zeros(3, dtype=torch.float64)
    x = torch.randn(3, 2, dtype=torch.float64)
    alpha, sigma = sde.marginal(t0)
    assert torch.equal(alpha, torch.ones(3, dtype=torch.float64)) and torch.equal(sigma, torch.zeros_like(sigma))
    alpha_v, var = sde.marginal_var(t0)
    assert torch.equal(alpha_v, alpha) and torch.equal(var, torch.zeros_like(var))
    g0 = {VESDE: 0.01 * math.sqrt(2 * math.log(5000.0)), VPSDE: math.sqrt(0.1), SubVPSDE: 0.0}[type(sde)]
    torch.testing.assert_close(sde.diffusion(t0), torch.full((3,), g0, dtype=torch.float64), rtol=1e-14, atol=0)
    a0 = 0.0 if isinstance(sde, VESDE) else -0.05
    torch.testing.assert_close(sde.drift(x, t0), a0 * x, rtol=1e-14, atol=0)
    torch.testing.assert_close(sde.div_drift(x, t0), torch.full((3,), 2 * a0, dtype=torch.float64), rtol=1e-14, atol=0)


@pytest.mark.analytic
@pytest.mark.parametrize("sde", SDES, ids=IDS)
def test_marginal_var_is_sigma_squared_and_smooth_at_t0(sde):
    t = torch.linspace(0.0, 1.0, 41, dtype=torch.float64)
    alpha, sigma = sde.marginal(t)
    alpha_v, var = sde.marginal_var(t)
    torch.testing.assert_close(alpha_v, alpha, rtol=1e-14, atol=0)
    torch.testing.assert_close(var, sigma**2, rtol=1e-12, atol=1e-300)  # float64 round-off of sqrt/square
    # d sigma²/dt at t = 0 from the moment ODE d sigma²/dt = 2 a sigma² + g², sigma(0) = 0: exactly g(0)²
    z = torch.zeros(1, dtype=torch.float64)
    _, dvar = torch.func.jvp(lambda tt: sde.marginal_var(tt)[1], (z,), (torch.ones_like(z),))
    torch.testing.assert_close(dvar, sde.diffusion(z) ** 2, rtol=1e-12, atol=1e-15)
    # ... and at interior t, against the same ODE (2 a sigma² + g²)
    ti = torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)
    _, dvar_i = torch.func.jvp(lambda tt: sde.marginal_var(tt)[1], (ti,), (torch.ones_like(ti),))
    ode = 2 * sde.drift_coef(ti) * sde.marginal_var(ti)[1] + sde.diffusion(ti) ** 2
    torch.testing.assert_close(dvar_i, ode, rtol=1e-10, atol=0)


@pytest.mark.parametrize("sde", [VESDE(), VPSDE()], ids=["VE", "VP"])
def test_sigma_itself_has_no_derivative_at_t0(sde):
    """Why marginal_var exists: sigma ~ sqrt(c t) has d sigma/dt = inf at t = 0, and sigma² formed from it
    under forward-mode AD is 0·inf = NaN (the root cause of the NaN score-FPE residual at t = 0)."""
    z = torch.zeros(1, dtype=torch.float64)
    _, dsigma = torch.func.jvp(lambda tt: sde.marginal(tt)[1], (z,), (torch.ones_like(z),))
    assert torch.isinf(dsigma).all()
    _, dsq = torch.func.jvp(lambda tt: sde.marginal(tt)[1] ** 2, (z,), (torch.ones_like(z),))
    assert torch.isnan(dsq).all()


@pytest.mark.parametrize("sde", SDES, ids=IDS)
def test_empty_batch_is_an_error_naming_the_shape(sde):
    x0 = torch.zeros(0, 2, dtype=torch.float64)
    t0 = torch.zeros(0, dtype=torch.float64)
    calls = [
        lambda: sde.drift(x0, t0), lambda: sde.drift(x0, 0.5), lambda: sde.div_drift(x0, 0.5),
        lambda: sde.diffusion(t0), lambda: sde.marginal(t0), lambda: sde.marginal_var(t0),
        lambda: sde.drift_coef(t0), lambda: sde.prior_log_prob(x0),
    ]
    for call in calls:
        with pytest.raises(ValueError, match=r"empty batch: shape \(0(, 2)?,?\)"):
            call()
    # a request for zero prior samples is not an input batch: an empty tensor, like GaussianMixture.sample(0)
    assert sde.prior_sample((0, 2)).shape == (0, 2)
