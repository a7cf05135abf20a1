"""The D-dimensional Gaussian-mixture data set (fpe_lab.data.mixture): a fixed law, exact score and
moments in float64, and a run on it through the command line."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from fpe_lab import build
from fpe_lab import run as cli
from fpe_lab.config import toy2d
from fpe_lab.data.mixture import MEAN_RADIUS, SD_RANGE, MixtureData, mixture_data
from fpe_lab.metrics.truth import MixtureTruth
from fpe_lab.nets.mlp import TimeMLP
from fpe_lab.sde import VESDE, VPSDE


def test_the_law_is_fixed_by_dim_and_components():
    a, b = mixture_data(32, 4), mixture_data(32, 4)
    assert torch.equal(a.means, b.means) and torch.equal(a.sds, b.sds)
    assert a.means.dtype == a.sds.dtype == a.mixture.means.dtype == torch.float64
    assert a.means.shape == (4, 32) and a.sds.shape == (4,)
    # unit vectors times 2, up to float64 round-off of the normalisation
    assert torch.allclose(a.means.norm(dim=-1), torch.full((4,), MEAN_RADIUS, dtype=torch.float64), rtol=1e-14)
    assert ((a.sds >= SD_RANGE[0]) & (a.sds <= SD_RANGE[1])).all()
    assert torch.equal(a.mixture.weights, torch.full((4,), 0.25, dtype=torch.float64))
    eye = torch.eye(32, dtype=torch.float64)
    assert torch.equal(a.mixture.covs, a.sds[:, None, None] ** 2 * eye)  # isotropic components
    assert not torch.equal(mixture_data(32, 3).means, a.means[:3]) or not torch.equal(mixture_data(32, 3).sds, a.sds[:3])
    assert mixture_data(1, 2).means.abs().eq(MEAN_RADIUS).all()  # D = 1: u = ±1


def test_sampling_equals_the_general_mixture_sampler():
    data = mixture_data(16, 5)
    fast = data.sample(300, torch.Generator().manual_seed(3))
    general = data.mixture.sample(300, torch.Generator().manual_seed(3))
    assert fast.shape == (300, 16) and fast.dtype == torch.float64
    # sd·z vs the Cholesky factor sqrt(sd²)·z: equal up to one rounding of sqrt
    assert torch.allclose(fast, general, rtol=1e-14, atol=1e-14)
    assert data.sample(0).shape == (0, 16)


def _isotropic_score(data: MixtureData, sde, x: torch.Tensor, t: float) -> torch.Tensor:
    """An independent closed form: s = Σ_k r_k (−(x − alpha mu_k)/v_k), v_k = alpha² sd_k² + sigma²."""
    alpha, var = sde.marginal_var(torch.tensor(t, dtype=torch.float64))
    v = alpha**2 * data.sds**2 + var  # (K,)
    diff = x[:, None, :] - alpha * data.means[None]  # (b, K, D)
    log_r = torch.log(data.weights) - 0.5 * diff.pow(2).sum(-1) / v - 0.5 * data.dim * torch.log(2 * math.pi * v)
    r = torch.softmax(log_r, dim=-1)
    return -(r[..., None] * diff / v[:, None]).sum(1)


@pytest.mark.parametrize("sde", [VPSDE(), VESDE()], ids=["vp", "ve"])
@pytest.mark.parametrize("t", [0.01, 0.2, 1.0])
def test_score_is_the_gradient_of_log_p_t_at_d32(sde, t):
    data = mixture_data(32, 4)
    truth = MixtureTruth(data.mixture, sde)
    alpha, sigma = sde.marginal(torch.tensor(t, dtype=torch.float64))
    g = torch.Generator().manual_seed(0)
    x = (alpha * data.sample(64, g) + sigma * torch.randn(64, 32, generator=g, dtype=torch.float64)).requires_grad_()
    (grad,) = torch.autograd.grad(data.mixture.log_prob(x, t, sde).sum(), x)  # the truth detaches x
    score = truth.score(x.detach(), t)
    assert score.dtype == torch.float64
    scale = score.norm(dim=-1).max()
    # float64 round-off of triangular solves and logsumexp (relative 1e-16 per op, D = 32 terms)
    assert (score - grad).norm(dim=-1).max() <= 1e-10 * scale
    assert (score - _isotropic_score(data, sde, x.detach(), t)).norm(dim=-1).max() <= 1e-10 * scale
    # the check can fail: the score at another time (t/2) misses by > 1000× the tolerance (at VP t = 1
    # every law is ≈ N(0, I), so another law would not do)
    wrong = truth.score(x.detach(), 0.5 * t)
    assert (wrong - grad).norm(dim=-1).max() > 1e-7 * scale


def _moments_within(x: torch.Tensor, mean: torch.Tensor, cov: torch.Tensor, k: float) -> bool:
    """Sample mean and covariance entries within k standard errors of the closed forms."""
    n = x.shape[0]
    m = x.mean(0)
    ok_mean = ((m - mean).abs() <= k * x.std(0) / math.sqrt(n)).all()
    c = x - m
    prod = c[:, :, None] * c[:, None, :]  # (n, D, D) per-sample products
    se = prod.std(0) / math.sqrt(n)
    ok_cov = ((prod.mean(0) - cov).abs() <= k * se + 1e-12).all()
    return bool(ok_mean and ok_cov)


def test_sample_mean_and_covariance_match_the_closed_form():
    data = mixture_data(32, 4)
    x = data.sample(20000, torch.Generator().manual_seed(1))
    # 5 standard errors over 32 + 32² entries: a false alarm has probability < 1e-3 (fixed seed besides)
    assert _moments_within(x, data.mean(), data.cov(), k=5.0)
    # the check can fail: components 10% wider are rejected
    wider = MixtureData(means=data.means, sds=1.1 * data.sds)
    assert not _moments_within(x, wider.mean(), wider.cov(), k=5.0)
    # and the closed form is the mixture's: Cov = Σ w (sd² I + mu muᵀ) − m mᵀ against the general covs
    w, mu = data.mixture.weights, data.mixture.means
    general = torch.einsum("k,kij->ij", w, data.mixture.covs + mu[:, :, None] * mu[:, None, :]) - torch.outer(w @ mu, w @ mu)
    assert torch.allclose(data.cov(), general, rtol=1e-14, atol=1e-14)  # float64 round-off of two sum orders


@pytest.mark.parametrize("call, match", [
    (lambda: mixture_data(0, 4), "dim must be an integer >= 1; got 0"),
    (lambda: mixture_data(2.5, 4), "dim must be an integer >= 1; got 2.5"),
    (lambda: mixture_data(4, 0), "components must be an integer >= 1; got 0"),
    (lambda: mixture_data(4, True), "components must be an integer >= 1; got True"),
    (lambda: mixture_data(4, 2).sample(-1), "n must be an integer >= 0; got -1"),
])
def test_bad_input_names_the_field(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_build_makes_the_mixture_and_a_d_dimensional_mlp():
    config = toy2d().override({("data", "name"): "mixture", ("data", "dim"): 32, ("data", "components"): 3,
                               ("loss", "reg", "residual_path"): "generic"})
    assert config.dim == 32 and config.data.shape == (32,)
    data = build.build_data(config)
    assert isinstance(data, MixtureData) and data.dim == 32 and data.n_components == 3
    assert build.build_eval_data(config).mixture.dim == 32
    model = build.build_model(config, build.build_sde(config.sde))
    assert isinstance(model.net, TimeMLP) and model.net.dim == 32
    assert build.batch_sampler(config, data)(torch.Generator().manual_seed(0)).shape == (config.optim.batch, 32)


def test_a_three_step_hutchinson_run_reports_the_residual_and_the_score_error(tmp_path: Path):
    rc = cli.main(["toy2d", "--data", "mixture", "--data-dim", "32", "--divergence", "hutchinson",
                   "--fpe-residual-path", "generic", "--fpe-estimator", "unbiased", "--per-dim", "--steps", "3",
                   "--width", "16", "--depth", "1", "--batch", "16", "--eval-points", "8", "--eval-nll-points", "4",
                   "--eval-samples", "0", "--eval-times", "0.1", "0.5", "--out", str(tmp_path)])
    assert rc == 0
    (folder,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    report = json.loads((folder / "metrics.json").read_text())
    config = json.loads((folder / "config.json").read_text())
    assert config["data"] == {"name": "mixture", "dim": 32, "components": 4, "data_dir": None, "hflip": False,
                              "data_shape": None, "rank": 0}
    assert report["dim"] == 32 and report["step"] == 3
    assert report["settings"]["divergence"] == "hutchinson(2)"  # D = 32 > 16: Hutchinson residual
    pt = report["per_time"]
    for key in ("fpe_residual", "fpe_residual_rel", "score_error", "score_error_rel"):
        assert len(pt[key]) == 2 and all(math.isfinite(v) for v in pt[key]), key
    assert all(v > 0 for v in pt["score_error"])
    assert math.isfinite(report["nll"]["gap_nats"])
