"""The sympy side (analytic/) on its own, and the library's SDE coefficients against it."""

import numpy as np
import pytest
import sympy as sp
import torch

from analytic import gmm_terms, marginals, score_fpe
from analytic.marginals import Kind
from fpe_lab.sde import SubVPSDE, VESDE, VPSDE

# Library SDE, the analytic kind, and its parameters; defaults and one non-default setting each.
SDE_PAIRS = [
    (VESDE(), Kind.VE, {"sigma_min": 0.01, "sigma_max": 50.0}),
    (VESDE(sigma_min=0.1, sigma_max=5.0), Kind.VE, {"sigma_min": 0.1, "sigma_max": 5.0}),
    (VPSDE(), Kind.VP, {"beta_min": 0.1, "beta_max": 20.0}),
    (VPSDE(beta_min=1.0, beta_max=3.0), Kind.VP, {"beta_min": 1.0, "beta_max": 3.0}),
    (SubVPSDE(), Kind.SUBVP, {"beta_min": 0.1, "beta_max": 20.0}),
    (SubVPSDE(beta_min=0.5, beta_max=8.0), Kind.SUBVP, {"beta_min": 0.5, "beta_max": 8.0}),
]
IDS = ["VE", "VE-custom", "VP", "VP-custom", "subVP", "subVP-custom"]


@pytest.mark.analytic
@pytest.mark.parametrize("dim", [1, 2])
def test_density_fpe_implies_score_fpe_symbolically(dim):
    d = score_fpe.derive(dim)
    assert d.log_identity == 0
    assert d.score_identity == [0] * dim
    assert d.holds
    # Not vacuous: the score residual of a general u is a nonzero expression (it vanishes only via the FPE).
    assert all(sp.simplify(r) != 0 for r in d.score_residual)


@pytest.mark.analytic
@pytest.mark.parametrize("kind", list(Kind))
def test_dsolve_moments_solve_their_odes(kind):
    mo = marginals.derive(kind)
    t = marginals.t
    assert sp.simplify(sp.diff(mo.alpha, t) - mo.a * mo.alpha) == 0
    assert sp.simplify(sp.diff(mo.sigma2, t) - 2 * mo.a * mo.sigma2 - mo.g2) == 0
    assert mo.alpha.subs(t, 0) == 1
    assert sp.simplify(mo.sigma2.subs(t, 0)) == 0


@pytest.mark.analytic
@pytest.mark.parametrize(("sde", "kind", "params"), SDE_PAIRS, ids=IDS)
@pytest.mark.parametrize("dtype", [torch.float64])
def test_library_marginal_and_coefficients_equal_sympy(sde, kind, params, dtype):
    t = np.concatenate([[0.0, 1e-4, 1e-3], np.linspace(0.01, 1.0, 50)])
    ref = marginals.coefficients(kind, **params)(t)
    tt = torch.tensor(t, dtype=dtype)
    alpha, sigma = sde.marginal(tt)
    # sympy's forms (e.g. 1 − exp(−B), r^{2t} − 1) lose ~1e-13 relative to cancellation at small t;
    # the library uses expm1, so 1e-11 relative bounds the round-off of the reference, not the library.
    np.testing.assert_allclose(alpha.numpy(), ref["alpha"], rtol=1e-11, atol=0)
    np.testing.assert_allclose(sigma.numpy(), ref["sigma"], rtol=1e-11, atol=1e-14)
    np.testing.assert_allclose((sde.diffusion(tt) ** 2).numpy(), ref["g2"], rtol=1e-11, atol=1e-14)
    np.testing.assert_allclose(sde.drift_coef(tt).numpy(), ref["a"], rtol=1e-12, atol=0)


@pytest.mark.analytic
def test_marginals_catch_a_wrong_schedule():
    """The comparison above can fail: Score SDE's VE sigma(t)² (not the exact transition) differs."""
    ref = marginals.coefficients(Kind.VE, sigma_min=0.01, sigma_max=50.0)(np.array([0.1, 0.5]))
    score_sde_sigma = 0.01 * (50.0 / 0.01) ** np.array([0.1, 0.5])
    assert not np.allclose(score_sde_sigma, ref["sigma"], rtol=1e-6)


@pytest.mark.analytic
@pytest.mark.parametrize("kind", list(Kind))
def test_single_gaussian_residual_is_symbolically_zero(kind):
    assert gmm_terms.gaussian_residual_1d(kind) == 0


@pytest.mark.analytic
@pytest.mark.parametrize("kind", list(Kind))
def test_gaussian_residual_detects_a_wrong_variance(kind):
    """Not vacuous: with sigma² replaced by 2 sigma² the same residual is not zero."""
    mo = marginals.derive(kind)
    x, m = sp.symbols("x m", real=True)
    c = sp.Symbol("c", positive=True)
    s = -(x - mo.alpha * m) / (mo.alpha**2 * c + 2 * mo.sigma2)
    phi = mo.g2 / 2 * sp.diff(s, x) + mo.g2 / 2 * s**2 - mo.a * x * s - mo.a
    r = sp.diff(s, marginals.t) - sp.diff(phi, x)
    val = float(r.subs({x: 0.7, m: 0.2, c: 0.5, marginals.t: 0.3, **_defaults(kind)}))
    assert abs(val) > 1e-3


def _defaults(kind):
    match kind:
        case Kind.VE:
            return {marginals.sigma_min: 0.01, marginals.sigma_max: 50.0}
        case Kind.VP | Kind.SUBVP:
            return {marginals.beta_min: 0.1, marginals.beta_max: 20.0}


@pytest.mark.analytic
@pytest.mark.parametrize("kind", list(Kind))
@pytest.mark.parametrize(("n_comp", "dim"), [(1, 1), (3, 2), (4, 3)])
def test_reference_terms_cancel(kind, n_comp, dim):
    """The sympy reference is self-consistent: its residual is ~0 relative to its terms."""
    rng = np.random.default_rng(n_comp * 10 + dim)
    a = rng.uniform(-1, 1, size=(n_comp, dim, dim))
    covs = a @ a.transpose(0, 2, 1) + 0.1 * np.eye(dim)
    means = rng.normal(size=(n_comp, dim))
    x = rng.normal(size=(8, dim)) * 1.5
    params = _defaults(kind)
    ref = gmm_terms.mixture_terms(kind, {k.name: v for k, v in params.items()}, rng.uniform(0.2, 1, n_comp),
                                  means, covs, x, 0.4)
    half_g2 = 0.5 * ref["g2"][:, None]
    scale = np.sqrt(sum(np.sum(v**2, -1) for v in (ref["dt_s"], half_g2 * ref["grad_div_s"],
                                                    half_g2 * ref["grad_sq_norm_s"], ref["grad_f_dot_s"])))
    # float64 round-off in ratios of p-derivatives (condition ~1e2): far below 1e-10 of the term size
    assert np.all(np.abs(ref["residual"]).max(-1) <= 1e-10 * scale)
    assert np.all(np.abs(ref["log_residual"]) <= 1e-10 * (1 + np.abs(ref["dt_log_p"])))
    assert np.all(scale > 1e-3)


@pytest.mark.analytic
def test_bad_input_to_analytic_helpers():
    with pytest.raises(ValueError, match="dim"):
        gmm_terms.log_derivative_terms(4)
    with pytest.raises(ValueError, match="params"):
        marginals.coefficients(Kind.VP, sigma_min=0.1, sigma_max=2.0)
    with pytest.raises(ValueError, match="kind"):
        marginals.derive("VP")


@pytest.mark.analytic
@pytest.mark.parametrize("module", [score_fpe, marginals, gmm_terms], ids=lambda m: m.__name__)
def test_derivation_scripts_print(module, capsys):
    module.main()
    out = capsys.readouterr().out
    assert len(out.splitlines()) > 5
    assert "Traceback" not in out
