"""evaluate (fpe_lab.metrics.evaluate) with exact scores, deliberately wrong scores, and a network."""

import json
import math

import numpy as np
import pytest
import torch

from fpe_lab.gmm import GaussianMixture
from fpe_lab.metrics import EvalReport, MixtureTruth, evaluate
from fpe_lab.model import ScoreModel
from fpe_lab.nets.mlp import TimeMLP
from fpe_lab.sde import VESDE, VPSDE

TIMES = (0.1, 0.5)


def mixture():
    return GaussianMixture(
        [0.3, 0.7], [[-1.0, 0.5], [1.5, -0.5]], [[[0.3, 0.1], [0.1, 0.2]], [[0.2, 0.0], [0.0, 0.4]]],
        dtype=torch.float64,
    )


def iso_gaussian():
    """One isotropic component: ∇log p_t = −(x − alpha mu)/v(t), J = −I/v, v = alpha² 0.25 + sigma²."""
    return GaussianMixture([1.0], [[0.5, -0.5]], [[[0.25, 0.0], [0.0, 0.25]]], dtype=torch.float64)


def quick(**kw):
    base = dict(times=TIMES, n_points=200, generator=torch.Generator().manual_seed(0), n_nll=0, n_samples=0,
                progress=False)
    return {**base, **kw}


@pytest.mark.analytic
def test_exact_score_scores_zero_and_report_round_trips_through_json():
    sde, mix = VPSDE(), mixture()
    report = evaluate(mix.score_fn(sde), sde, mix, MixtureTruth(mix, sde),
                      **quick(n_nll=60, n_samples=500, sde_steps=100), step=7)
    text = json.dumps(report.to_dict(), allow_nan=False)  # JSON-serialisable, no NaN
    again = EvalReport.from_dict(json.loads(text))
    assert json.loads(json.dumps(again.to_dict())) == json.loads(text) and again.step == 7
    assert report.times == TIMES and all(len(v) == len(TIMES) for v in report.per_time.metrics().values())
    m = report.mean
    # float64 round-off: the model is the truth's own function, terms O(1e2) cancel to ~1e-13
    assert m["score_error"] < 1e-24 and m["score_error_rel"] < 1e-24
    assert m["fpe_residual_rel"] < 1e-20 and m["fpe_term_scale"] > 1.0
    assert m["jacobian_asymmetry_rel"] < 1e-24 and m["curl_abs"] < 1e-12
    # the exact score minimises DSM at E‖sigma s + z‖² = D − sigma² E‖s‖² < D = 2 (no CLT issue: a check of scale)
    assert all(0 < v < 2 for v in report.per_time.dsm)
    nll = report.nll
    # RK45 at 1e-5 plus the N(0, I) prior mismatch (first order in alpha(1) = 6.6e-3): 0.02 nats
    assert abs(nll.gap_nats) < 0.02 and nll.nfe > 0 and nll.rtol == 1e-5
    assert nll.model_bits_per_dim == pytest.approx(nll.model_nats / (2 * math.log(2)))
    for d in (report.samples.sliced_wasserstein, report.samples.mmd2):
        # exact sampler: like two held-out sets (floor over 3 repeats), fixed seed
        assert d.ode_vs_data < d.floor + 3 * d.floor_std
        assert d.sde_vs_data < d.floor + 3 * d.floor_std
    assert report.dim == 2 and report.settings["dtype"] == "float64" and report.settings["divergence"] == "exact"


class _AsImages:
    """A D = C·H·W mixture seen as images: data (n, C, H, W), score_fn on images."""

    def __init__(self, mix, shape):
        self.mix, self.shape = mix, shape

    def sample(self, n, generator=None):
        return self.mix.sample(n, generator).reshape(n, *self.shape)

    def score_fn(self, sde):
        flat = self.mix.score_fn(sde)
        return lambda x, t: flat(x.reshape(x.shape[0], -1), t).reshape(x.shape)


@pytest.mark.analytic
def test_image_shaped_exact_score_reads_zero_within_its_standard_error():
    """D = 3·8·8 > EXACT_MAX_DIM: Hutchinson probes; the unbiased residual of the exact score is 0 in
    expectation, so it must lie within 3 standard errors of 0 (CLT over 64 points)."""
    shape = (3, 8, 8)
    d = 192
    g = torch.Generator().manual_seed(1)
    a = torch.randn(2, d, d, generator=g, dtype=torch.float64) / d**0.5
    covs = a @ a.transpose(-1, -2) * 0.3 + 0.05 * torch.eye(d, dtype=torch.float64)  # anisotropic: probes matter
    # overlapping components: J varies with x, so a probe's error ∇(vᵀJv − tr J) is not zero
    means = 0.1 * torch.randn(2, d, generator=g, dtype=torch.float64)
    mix = GaussianMixture([0.5, 0.5], means, covs, dtype=torch.float64)
    data = _AsImages(mix, shape)
    sde = VPSDE()
    report = evaluate(data.score_fn(sde), sde, data, None, **quick(n_points=64, batch_size=32))
    pt = report.per_time
    assert report.settings["divergence"] == "hutchinson(2)" and report.dim == d
    for t, r, se, scale in zip(report.times, pt.fpe_residual, pt.fpe_residual_se, pt.fpe_term_scale, strict=True):
        # 0 within 3 standard errors (CLT), plus the float64 round-off of terms that cancel: |R| ≲ 1e-9·S, i.e.
        # ‖R‖² ≲ 1e-18·S² (measured 4e-21·S² at t = 0.1, where the separated components make J locally
        # constant, so the probes add no spread and only round-off is left)
        assert abs(r) < 3 * se + 1e-18 * scale
        if t >= 0.5:  # overlapping components: the probes' spread is far above round-off, so the test has power
            assert se > 1e-12 * scale
    # the exact score is a gradient field: (J − Jᵀ)v = 0 per probe, so the estimate is 0 to round-off
    assert max(pt.jacobian_asymmetry_rel) < 1e-20
    assert pt.score_error is None and report.nll is None
    # a defect the probes must not hide: s + 0.05 (x − m)·|x| is not any density's score
    exact = data.score_fn(sde)
    bad = lambda x, t: exact(x, t) + 0.05 * x * x.abs()  # noqa: E731
    report = evaluate(bad, sde, data, None, **quick(n_points=64, batch_size=32))
    for r, se in zip(report.per_time.fpe_residual, report.per_time.fpe_residual_se):
        assert r > 5 * se  # CLT: far outside the spread
@pytest.mark.analytic
@pytest.mark.parametrize("theta", [0.2, 0.6])
def test_rotated_score_gives_closed_form_errors(theta):
    """s' = R_θ s of an isotropic Gaussian: ‖s' − s‖² = 2(1 − cos θ)‖s‖², J' = −R_θ/v:
    E‖J' − J'ᵀ‖²/E‖J'‖² = 4 sin²θ and |curl| = 2 sin θ / v(t)."""
    sde, mix = VESDE(), iso_gaussian()
    c, s = math.cos(theta), math.sin(theta)
    rot = torch.tensor([[c, -s], [s, c]], dtype=torch.float64)
    out = evaluate(lambda x, t: mix.score(x, t, sde) @ rot.T, sde, mix, MixtureTruth(mix, sde), **quick())
    pt = out.to_dict()["per_time"]
    v = [0.25 + sde.marginal(torch.tensor(t, dtype=torch.float64))[1].item() ** 2 for t in TIMES]
    # identities per sample, so only float64 round-off remains
    np.testing.assert_allclose(pt["score_error_rel"], 2 * (1 - c), rtol=1e-10)
    np.testing.assert_allclose(pt["jacobian_asymmetry_rel"], 4 * s * s, rtol=1e-10)
    np.testing.assert_allclose(pt["curl_abs"], [2 * s / vi for vi in v], rtol=1e-10)
    # VE (f = 0): R = g²(R_θ − I)(x − mu)/v², terms ∂_t s' and ½g²∇‖s'‖² each of norm g²‖x − mu‖/v²,
    # ∇(∇·s') = 0, so E‖R‖² / E[scale²] = 2(1 − cos θ)/2 = 1 − cos θ
    np.testing.assert_allclose(pt["fpe_residual_rel"], 1 - c, rtol=1e-8)  # float64 round-off of O(1e4) terms


def test_score_of_another_time_is_caught_everywhere():
    sde, mix = VPSDE(), mixture()
    late = lambda x, t: mix.score(x, (1.5 * t).clamp(max=1.0), sde)  # noqa: E731
    out = evaluate(late, sde, mix, MixtureTruth(mix, sde), **quick(times=(0.05, 0.3), n_nll=40)).to_dict()
    pt = out["per_time"]
    assert min(pt["score_error_rel"]) > 5e-3  # a later (blurred) score is wrong (measured 0.013, 0.085) ...
    assert min(pt["fpe_residual_rel"]) > 1e-3  # ... and breaks the FPE (∂_t s 1.5x off; measured 0.21, 0.014) ...
    assert max(pt["jacobian_asymmetry_rel"]) < 1e-24  # ... but still a gradient field
    assert out["nll"]["gap_nats"] > 0.1  # and it costs likelihood (measured ~0.4 nats)


def test_network_in_float32_smoke():
    sde, mix = VPSDE(), mixture()
    torch.manual_seed(0)
    model = ScoreModel(TimeMLP(width=16, depth=2, n_freq=2), sde).eval()
    out = evaluate(model, sde, mix, MixtureTruth(mix, sde), dtype=torch.float32,
                   **quick(n_points=100, n_nll=20, n_samples=50, sde_steps=10, floor_repeats=2)).to_dict()
    json.dumps(out, allow_nan=False)
    assert out["settings"]["dtype"] == "float32"
    assert out["mean"]["score_error_rel"] > 0.05  # an untrained network is far from the truth
    assert out["samples"]["sliced_wasserstein"]["floor"] > 0


def test_toy_truth_and_grid_truth_agree_with_closed_form():
    from fpe_lab.data.toy import toy_distribution
    from fpe_lab.groundtruth import Grid
    from fpe_lab.groundtruth.solver import solve_fokker_planck
    from fpe_lab.metrics import GridTruth, ToyTruth

    sde = VPSDE()
    toy = toy_distribution("8gaussians")
    mix = toy.mixture
    exact = mix.score_fn(sde)
    by_toy = evaluate(exact, sde, toy, ToyTruth(toy, sde), **quick()).to_dict()
    # the toy truth is the same closed form (8gaussians is a mixture): float64 round-off
    assert by_toy["mean"]["score_error_rel"] < 1e-20
    grid = Grid(((-8.0, 8.0), (-8.0, 8.0)), (256, 256))
    sol = solve_fokker_planck(sde, toy.density(grid), grid, np.array(TIMES), progress=False)
    by_grid = evaluate(exact, sde, toy, GridTruth(sol), **quick(n_points=100)).to_dict()
    # grid truth: cubic interpolation of the exact-convolution 256² solution (~1e-9 score error, see
    # docs/conventions.md; measured 4e-10 relative here), so 1e-6 leaves room for interpolation between cells
    assert by_grid["mean"]["score_error_rel"] < 1e-6
    assert by_grid["mean"]["score_error_rel"] > by_toy["mean"]["score_error_rel"]


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"times": ()}, "times"),
        ({"times": (1e-4, 0.5)}, "times must lie"),
        ({"eps": 0.0}, "eps"),
        ({"n_points": 1}, "n_points"),
        ({"n_samples": 1}, "n_samples"),
        ({"sde_steps": 0}, "sde_steps"),
    ],
)
def test_bad_arguments(kw, match):
    sde, mix = VPSDE(), mixture()
    with pytest.raises(ValueError, match=match):
        evaluate(mix.score_fn(sde), sde, mix, MixtureTruth(mix, sde), **quick(**kw))


def test_bad_data_truth_and_nan_scores():
    sde, mix = VPSDE(), mixture()
    with pytest.raises(ValueError, match="truth"):
        evaluate(mix.score_fn(sde), sde, mix, mix, **quick())
    with pytest.raises(ValueError, match="probes"):
        evaluate(mix.score_fn(sde), sde, mix, MixtureTruth(mix, sde), **quick(probes=1))
    with pytest.raises(ValueError, match="data"):
        evaluate(mix.score_fn(sde), sde, object(), MixtureTruth(mix, sde), **quick())
    with pytest.raises(FloatingPointError, match="non-finite"):
        evaluate(lambda x, t: x * float("nan"), sde, mix, MixtureTruth(mix, sde), **quick())
