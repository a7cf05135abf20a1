"""Every data set through one door (fpe_lab.data.load): samples of the configured shape, the exact truth where
it exists, dequantization where pixels are quantized; image-shaped mixtures train the U-Net against exact truth."""

from __future__ import annotations

import json

import pytest
import torch

from fpe_lab import data as data_sets
from fpe_lab import run as cli
from fpe_lab.config import Dataset, toy2d
from fpe_lab.data.mixture import lowrank_mixture_data, mixture_data
from fpe_lab.sde import VPSDE
from tests.conftest import ALL_DATASETS
from tests.fake_cifar import write_fake_cifar10


def _config(name: Dataset, tmp_path):
    changes = {("data", "name"): name}
    if name is Dataset.CIFAR10:
        changes[("data", "data_dir")] = str(write_fake_cifar10(tmp_path, n_per_batch=2))
    if name in (Dataset.CIFAR10, Dataset.DIGITS, Dataset.DIGITS_GMM):
        changes[("loss", "reg", "fpe", "residual_path")] = "generic"
    return toy2d().override(changes).data


@pytest.mark.parametrize("name", ALL_DATASETS, ids=[d.value for d in ALL_DATASETS])
def test_every_data_set_samples_its_shape_and_says_what_truth_it_has(name, tmp_path):
    config = _config(name, tmp_path)
    for split in data_sets.Split:
        data = data_sets.load(config, split)
        x = data.sample(3, torch.Generator().manual_seed(0))
        assert tuple(x.shape) == (3, *config.shape) and bool(torch.isfinite(x).all())
        truth, deq = data.truth(VPSDE()), data.dequantization()
        assert (truth is None) == name.is_image and (deq is None) == (not name.is_image)  # real images: bits/dim
        if truth is not None:  # the truth's score is the gradient of its log-density, along a random direction
            xt = x.reshape(3, -1).double()
            v = torch.randn(xt.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
            h = 1e-5
            fd = (truth.log_prob(xt + h * v, 0.3) - truth.log_prob(xt - h * v, 0.3)) / (2 * h)
            # central difference: O(h²) truncation plus ~1e-16/h round-off of log p, both < 1e-6 relative here
            torch.testing.assert_close((truth.score(xt, 0.3) * v).sum(-1), fd, rtol=1e-6, atol=1e-6)


def test_lowrank_mixture_keeps_the_isotropic_law_and_adds_directions():
    iso, low0, low = mixture_data(12, 3), lowrank_mixture_data((12,), 3, 0), lowrank_mixture_data((3, 2, 2), 3, 2)
    assert torch.equal(low0.mixture.means, iso.means) and torch.equal(low0.mixture.noise_var, iso.sds**2)
    g = torch.Generator().manual_seed(4)
    torch.testing.assert_close(low0.sample(5, g), iso.sample(5, torch.Generator().manual_seed(4)), rtol=0, atol=0)
    norms = low.mixture.factors.norm(dim=1)  # each extra direction has its drawn standard deviation
    assert low.mixture.factors.shape == (3, 12, 2) and bool(((norms >= 0.5) & (norms <= 1.0)).all())
    x = low.sample(4000, torch.Generator().manual_seed(5)).reshape(4000, -1)
    cov = torch.cov(x.T)
    w, mu, u = low.mixture.weights, low.mixture.means, low.mixture.factors
    second = torch.einsum("k,kij->ij", w, u @ u.transpose(1, 2) + low.mixture.noise_var[:, None, None] * torch.eye(12,
                          dtype=torch.float64) + mu[:, :, None] * mu[:, None, :])
    want = second - torch.outer(w @ mu, w @ mu)
    assert (cov - want).abs().max() < 0.15  # CLT: 4000 samples of O(1) entries, ~5 standard errors


@pytest.mark.parametrize("bad, match", [
    ({"name": "gmm", "data_shape": [3, 8, 8]}, "apply to data mixture only"),
    ({"name": "mixture", "data_shape": [3, 8, 4]}, "must be square images"),
    ({"name": "mixture", "data_shape": [3, 8, 8], "dim": 5}, "give either data_dim or data_shape"),
    ({"name": "mixture", "rank": 65}, r"mixture_rank must be an integer in \[0, 64\]"),
    ({"name": "mixture", "data_shape": [3, 128, 128]}, "at most 12288"),
])
def test_bad_mixture_shapes_are_refused(bad, match):
    with pytest.raises(ValueError, match=match):
        toy2d().from_dict({"data": bad})


@pytest.mark.parametrize("args", [
    ["toy2d", "--data", "mixture", "--data-shape", "3,32,32", "--mixture-rank", "4", "--model", "tiny",
     "--fpe-residual-path", "generic", "--divergence", "hutchinson", "--per-dim"],
    ["digits", "--data", "digits-gmm"],
], ids=["mixture-3x32x32", "digits-gmm"])
def test_a_unet_on_image_shaped_mixtures_is_measured_against_the_exact_truth(args, tmp_path):
    rc = cli.main([*args, "--width", "8", "--depth", "1", "--steps", "2", "--batch", "4", "--eval-points", "4",
                   "--eval-nll-points", "2", "--eval-samples", "0", "--eval-times", "0.5", "--eval-rtol", "1e-2",
                   "--eval-batch", "4", "--out", str(tmp_path)])
    assert rc == 0
    (folder,) = tmp_path.iterdir()
    m = json.loads((folder / "metrics.json").read_text())
    assert all(map(torch.isfinite, torch.tensor(m["per_time"]["score_error"])))
    assert m["nll"]["true_nats"] is not None and torch.isfinite(torch.tensor(m["nll"]["gap_nats"]))
    assert json.loads((folder / "config.json").read_text())["model"]["unet"] == "tiny"  # the U-Net was used
