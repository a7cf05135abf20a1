"""fpe_lab.audit: closed forms for s = −x, the unbiased Hutchinson path equals fpe.residual_sq, exact
scores read zero, JSON round trip, figure, bad input."""

import json
import math

import numpy as np
import pytest
import torch
from matplotlib.figure import Figure

from fpe_lab.audit import AuditReport, audit, default_times, report_figure
from fpe_lab.fpe import Hutchinson, jacobian_asymmetry_sq, residual_sq
from fpe_lab.gmm import GaussianMixture
from fpe_lab.sde import SubVPSDE, VESDE, VPSDE


def minus_x(x, t):
    """The score of N(0, I): stationary under VP; under sub-VP R = −(g² − beta) x (closed form)."""
    return -x * (1 + 0 * t.reshape(-1, *([1] * (x.ndim - 1))))


def _x0(shape, seed=0):
    return torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


@pytest.mark.analytic
def test_minus_x_closed_forms_in_high_dimension():
    """s = −x on (n, 1, 4, 8) images (D = 32 > 16: the Hutchinson path). Per sample R = −(g² − beta) x,
    S² = (g⁴ + beta²)‖x‖², J = −I, and ‖σs + z‖² = ‖−σα x0 + (1 − σ²) z‖², so residual_rel =
    (g² − beta)²/(g⁴ + beta²) exactly, asymmetry = 0, E[dsm | x0] = σ²α²‖x0‖² + (1 − σ²)² D."""
    x0 = _x0((40, 1, 4, 8))
    times = [0.05, 0.3, 1.0]
    for sde in (VPSDE(), SubVPSDE()):
        rep = audit(minus_x, sde, x0, times, probes=1, batch_size=16, generator=torch.Generator().manual_seed(1))
        assert rep.probes == 1 and rep.dim == 32 and rep.points == 40
        t = torch.tensor(times, dtype=torch.float64)
        g2, beta = sde.diffusion(t) ** 2, sde.beta(t)
        want_rel = (g2 - beta) ** 2 / (g2**2 + beta**2)
        # −x has a diagonal Jacobian: Rademacher estimates are exact; float64 round-off
        np.testing.assert_allclose(rep.residual_rel, want_rel.numpy(), rtol=1e-10, atol=1e-14)
        np.testing.assert_allclose(rep.asymmetry, 0.0, atol=1e-14)
        alpha, sigma = sde.marginal(t)
        want_res = (g2 - beta) ** 2 * (alpha**2 * x0.pow(2).sum((1, 2, 3)).mean() + sigma**2 * 32)
        res, se = np.array(rep.residual), np.array(rep.residual_se)
        if isinstance(sde, VPSDE):
            # g² = beta up to the round-off of sqrt(beta)²: R is float64 round-off relative to the terms
            assert np.all(np.abs(res) <= 1e-24 * np.array(rep.term_scale))
        else:
            assert np.all(np.abs(res - want_res.numpy()) < 4 * se)  # E over z given x0: within 4 SE
        want_dsm = sigma**2 * alpha**2 * x0.pow(2).sum((1, 2, 3)).mean() + (1 - sigma**2) ** 2 * 32
        assert np.all(np.abs(np.array(rep.dsm) - want_dsm.numpy()) < 4 * np.array(rep.dsm_se))  # 4 SE
    # Can fail: the sub-VP residual is far from zero where g² − beta is not tiny (the z-test has power)
    assert np.all(res[:2] > 10 * se[:2])


def test_hutchinson_path_equals_residual_sq_unbiased_with_the_same_draws():
    """The audit draws z, then two probe sets (⟨R̂₁, R̂₂⟩), then the asymmetry probes from one generator;
    replaying those draws through fpe.residual_sq(UNBIASED) and jacobian_asymmetry_sq gives the same numbers."""
    m = torch.tensor(np.random.default_rng(3).normal(size=(24, 24)), dtype=torch.float64) / 5

    def score(x, t):  # non-conservative, nonlinear: every estimate is random
        flat = x.reshape(x.shape[0], -1)
        return (-flat + torch.tanh(flat @ m.T) * (1 + t)[:, None]).reshape(x.shape)

    sde, t, n = VESDE(), 0.4, 12
    x0 = _x0((n, 2, 3, 4))
    rep = audit(score, sde, x0, [t], probes=2, batch_size=n, generator=torch.Generator().manual_seed(9))
    gen = torch.Generator().manual_seed(9)
    z = torch.randn(x0.shape, generator=gen, dtype=torch.float64)
    _, sigma = sde.marginal(torch.tensor(t, dtype=torch.float64))
    xt = x0 + sigma * z
    res = residual_sq(score, sde, xt, t, divergence=Hutchinson(2, generator=gen))
    asym, jsq = jacobian_asymmetry_sq(score, xt, t, probes=2, generator=gen)
    # same probes, same operations: float64 round-off
    assert rep.residual[0] == pytest.approx(float(res.mean()), rel=1e-10)
    assert rep.residual_se[0] == pytest.approx(float(res.std() / math.sqrt(n)), rel=1e-8)
    assert rep.asymmetry[0] == pytest.approx(float(asym.mean() / jsq.mean()), rel=1e-10)
    assert rep.residual[0] > 3 * rep.residual_se[0]  # the defect shows
    assert rep.asymmetry[0] > 3 * rep.asymmetry_se[0]


def test_exact_score_reads_zero_and_a_rotation_does_not():
    sde = VPSDE()
    gmm = GaussianMixture([0.3, 0.7], [[-1.0, 0.5], [1.0, 0.0]], 0.2 * torch.eye(2).repeat(2, 1, 1))
    x0 = gmm.sample(30, torch.Generator().manual_seed(0))
    exact = gmm.score_fn(sde)
    rep = audit(exact, sde, x0, [0.01, 0.2, 1.0], batch_size=7)
    assert rep.probes is None
    # float64 round-off of a third-order chain, relative to the size of the terms
    assert max(rep.residual_rel) < 1e-20 and max(rep.asymmetry) < 1e-20
    omega = 0.5

    def rotated(x, t):  # + ω(−y, x): ‖J − Jᵀ‖²_F = 8ω² per point
        return exact(x, t) + omega * torch.stack([-x[:, 1], x[:, 0]], -1)

    bad = audit(rotated, sde, x0, [0.2], batch_size=30)
    assert bad.residual_rel[0] > 1e-3 and bad.asymmetry[0] > 1e-3
    _, jsq = jacobian_asymmetry_sq(rotated, sde.marginal(torch.tensor(0.2, dtype=torch.float64))[0] * x0
                                   + sde.marginal(torch.tensor(0.2, dtype=torch.float64))[1]
                                   * torch.randn(x0.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64), 0.2)
    # same z (default generator seed 0): ratio of means with ‖J − Jᵀ‖² = 8ω² exactly; float64 round-off
    assert bad.asymmetry[0] == pytest.approx(8 * omega**2 / float(jsq.mean()), rel=1e-10)


def test_report_json_round_trip_summary_and_figure():
    rep = audit(minus_x, SubVPSDE(), _x0((6, 3)), [0.1, 1.0])
    back = AuditReport.from_dict(json.loads(json.dumps(rep.to_dict())))
    assert back == rep
    text = rep.summary()
    assert "D = 3" in text and len(text.splitlines()) == 5
    fig = report_figure(rep)
    assert isinstance(fig, Figure) and len(fig.axes) == 4
    d = rep.to_dict()
    del d["dsm"]
    with pytest.raises(ValueError, match=r"missing \['dsm'\]"):
        AuditReport.from_dict(d)
    d = rep.to_dict()
    d["residual"] = d["residual"][:1]
    with pytest.raises(ValueError, match=r"residual must be a tuple with one value per time \(2\); got 1 values"):
        AuditReport.from_dict(d)
    d = rep.to_dict()
    d["dsm"][0] = float("nan")
    with pytest.raises(ValueError, match="dsm must hold finite floats; got nan"):
        AuditReport.from_dict(d)


def test_default_times_and_bad_input():
    times = default_times(1e-3, 4)
    np.testing.assert_allclose(times, [1e-3, 1e-2, 1e-1, 1.0], rtol=1e-12)  # float64 round-off of logspace
    x0 = _x0((4, 3))
    sde = VPSDE()
    cases = [
        (dict(times=[0.5, 1.2]), r"times must be a non-empty list of numbers in \[eps, 1\] = \[0.001, 1\]; got \[0.5, 1.2\]"),
        (dict(times=[0.5, 0.1]), r"times must be strictly increasing; got \[0.5, 0.1\]"),
        (dict(times=[]), "times must be a non-empty list"),
        (dict(points=5), r"points must be an int in \[1, 4\] \(the rows of x0\); got 5"),
        (dict(probes=0), "probes must be an integer >= 1; got 0"),
        (dict(batch_size=0), "batch_size must be an integer >= 1; got 0"),
        (dict(eps=0.0), "eps must be a number in \\(0, 1\\); got 0.0"),
    ]
    for kw, msg in cases:
        with pytest.raises(ValueError, match=msg):
            audit(minus_x, sde, x0, **kw)
    with pytest.raises(ValueError, match="sde must be a fpe_lab.sde.LinearSDE"):
        audit(minus_x, "vp", x0)
    with pytest.raises(ValueError, match=r"x0 must be a floating tensor of shape \(n, \*dims\) with n >= 1; got shape \(0, 3\)"):
        audit(minus_x, sde, torch.zeros(0, 3))
    with pytest.raises(ValueError, match="x0 must be finite"):
        audit(minus_x, sde, torch.full((2, 3), math.inf))
    with pytest.raises(ValueError, match="score_fn gave a non-finite residual ‖R‖² at t = 0.5"):
        audit(lambda x, t: x / 0.0, sde, x0, [0.5])
    with pytest.raises(ValueError, match="n must be an int >= 2"):
        default_times(1e-3, 1)
