"""evaluate (fpe_lab.metrics.evaluate) with exact scores, deliberately wrong scores, and a network."""

import json
import math

import numpy as np
import pytest
import torch

from fpe_lab.gmm import GaussianMixture
from fpe_lab.metrics import PER_TIME_METRICS, MixtureTruth, evaluate
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
def test_exact_score_scores_zero_and_schema_is_json():
    sde, mix = VPSDE(), mixture()
    out = evaluate(mix.score_fn(sde), sde, mix, MixtureTruth(mix, sde),
                   **quick(n_nll=60, n_samples=500, sde_steps=100))
    text = json.dumps(out, allow_nan=False)  # JSON-serialisable, no NaN
    assert json.loads(text) == out
    assert set(out) == {"times", "per_time", "mean", "nll", "samples", "settings"}
    assert out["times"] == list(TIMES) and set(out["per_time"]) == set(PER_TIME_METRICS)
    assert all(len(v) == len(TIMES) for v in out["per_time"].values())
    m = out["mean"]
    # float64 round-off: the model is the truth's own function, terms O(1e2) cancel to ~1e-13
    assert m["score_error"] < 1e-24 and m["score_error_rel"] < 1e-24
    assert m["fpe_residual_rel"] < 1e-20 and m["fpe_term_scale"] > 1.0
    assert m["jacobian_asymmetry_rel"] < 1e-24 and m["curl_abs"] < 1e-12
    nll = out["nll"]
    # RK45 at 1e-5 plus the N(0, I) prior mismatch (first order in alpha(1) = 6.6e-3): 0.02 nats
    assert abs(nll["gap_nats"]) < 0.02 and nll["nfe"] > 0 and nll["rtol"] == 1e-5
    assert nll["model_bits_per_dim"] == pytest.approx(nll["model_nats"] / (2 * math.log(2)))
    for name in ("sliced_wasserstein", "mmd2"):
        d = out["samples"][name]
        # exact sampler: like two held-out sets (floor over 3 repeats), fixed seed
        assert d["ode_vs_data"] < d["floor"] + 3 * d["floor_std"]
        assert d["sde_vs_data"] < d["floor"] + 3 * d["floor_std"]
    assert out["settings"]["dim"] == 2 and out["settings"]["dtype"] == "float64"


@pytest.mark.analytic
@pytest.mark.parametrize("theta", [0.2, 0.6])
def test_rotated_score_gives_closed_form_errors(theta):
    """s' = R_θ s of an isotropic Gaussian: ‖s' − s‖² = 2(1 − cos θ)‖s‖², J' = −R_θ/v:
    E‖J' − J'ᵀ‖²/E‖J'‖² = 4 sin²θ and |curl| = 2 sin θ / v(t)."""
    sde, mix = VESDE(), iso_gaussian()
    c, s = math.cos(theta), math.sin(theta)
    rot = torch.tensor([[c, -s], [s, c]], dtype=torch.float64)
    out = evaluate(lambda x, t: mix.score(x, t, sde) @ rot.T, sde, mix, MixtureTruth(mix, sde), **quick())
    pt = out["per_time"]
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
    out = evaluate(late, sde, mix, MixtureTruth(mix, sde), **quick(times=(0.05, 0.3), n_nll=40))
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
                   **quick(n_points=100, n_nll=20, n_samples=50, sde_steps=10, floor_repeats=2))
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
    by_toy = evaluate(exact, sde, toy, ToyTruth(toy, sde), **quick())
    # the toy truth is the same closed form (8gaussians is a mixture): float64 round-off
    assert by_toy["mean"]["score_error_rel"] < 1e-20
    grid = Grid(((-8.0, 8.0), (-8.0, 8.0)), (256, 256))
    sol = solve_fokker_planck(sde, toy.density(grid), grid, np.array(TIMES), progress=False)
    by_grid = evaluate(exact, sde, toy, GridTruth(sol), **quick(n_points=100))
    # grid truth: cubic interpolation of the exact-convolution 256² solution (REFERENCE §3: ~1e-9
    # score error; measured 4e-10 relative here), so 1e-6 leaves room for interpolation between cells
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
    with pytest.raises(ValueError, match="data"):
        evaluate(mix.score_fn(sde), sde, object(), MixtureTruth(mix, sde), **quick())
    with pytest.raises(FloatingPointError, match="non-finite"):
        evaluate(lambda x, t: x * float("nan"), sde, mix, MixtureTruth(mix, sde), **quick())
