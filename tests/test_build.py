"""fpe_lab.build: the configuration decides the objects, for points and images alike."""

from __future__ import annotations

import pytest
import torch

from fpe_lab import build
from fpe_lab.config import SDEConfig, SDEKind, digits, toy2d
from fpe_lab.fpe import Hutchinson
from fpe_lab.nets.mlp import TimeMLP
from fpe_lab.nets.unet import UNet
from fpe_lab.regularizers.conservative import ConservativeRegularizer
from fpe_lab.regularizers.fpe import FPERegularizer
from fpe_lab.regularizers.hodsm import HODSMRegularizer
from fpe_lab.sde import SubVPSDE, VESDE, VPSDE


def test_sde_coefficients_come_from_the_configuration():
    assert build.build_sde(SDEConfig(kind=SDEKind.VP, beta_min=0.2, beta_max=10.0)) == VPSDE(0.2, 10.0)
    assert build.build_sde(SDEConfig(kind=SDEKind.SUBVP)) == SubVPSDE()
    assert build.build_sde(SDEConfig(kind=SDEKind.VE, sigma_min=0.02, sigma_max=10.0)) == VESDE(0.02, 10.0)


def test_points_get_an_mlp_and_images_a_unet_of_the_configured_size():
    c = toy2d().override({("model", "width"): 32, ("model", "depth"): 2})
    model = build.build_model(c, build.build_sde(c.sde))
    assert isinstance(model.net, TimeMLP) and model(torch.zeros(3, 2), torch.full((3,), 0.5)).shape == (3, 2)
    d = digits().override({("model", "width"): 8})
    unet = build.build_model(d, build.build_sde(d.sde))
    assert isinstance(unet.net, UNet) and unet.net.config.channels == 8
    assert unet(torch.zeros(2, 1, 8, 8), torch.full((2,), 0.5)).shape == (2, 1, 8, 8)
    # the seed decides the initialisation, and building leaves the global RNG alone
    state = torch.get_rng_state()
    a, b = build.build_model(c, build.build_sde(c.sde)), build.build_model(c, build.build_sde(c.sde))
    assert torch.equal(torch.get_rng_state(), state)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


@pytest.mark.parametrize("kind, cls", [("fpe", FPERegularizer), ("conservative", ConservativeRegularizer),
                                       ("hodsm", HODSMRegularizer)])
def test_each_regularizer_kind_builds_its_class(kind, cls):
    c = toy2d().override({("loss", "reg", "kind"): kind, ("loss", "reg", "lam"): 0.3})
    loss = build.build_loss(c, build.build_sde(c.sde))
    assert isinstance(loss.regularizer, cls) and loss.regularizer.lam == 0.3
    none = build.build_loss(c.override({("loss", "reg", "kind"): "none"}), build.build_sde(c.sde))
    assert none.regularizer is None


def test_images_divide_lam_by_d_and_use_hutchinson_probes():
    c = digits().override({("loss", "reg", "probes"): 3})
    reg = build.build_loss(c, build.build_sde(c.sde)).regularizer
    assert reg.lam == pytest.approx(0.1 / 64) and isinstance(reg.divergence, Hutchinson)
    assert reg.divergence.n_probes == 3


@pytest.mark.parametrize("kind", ["conservative", "hodsm"])
def test_jacobian_regularizers_use_probes_on_images_and_the_exact_jacobian_on_points(kind):
    """On images (--divergence hutchinson in the preset) no D×D Jacobian is formed: probes, as for the residual."""
    image = digits().override({("loss", "reg", "kind"): kind, ("loss", "reg", "probes"): 2})
    point = toy2d().override({("loss", "reg", "kind"): kind})
    assert build.build_loss(image, build.build_sde(image.sde)).regularizer.probes == 2
    assert build.build_loss(point, build.build_sde(point.sde)).regularizer.probes is None


def test_cuda_without_cuda_is_a_clear_error():
    if torch.cuda.is_available():
        pytest.skip("CUDA is available")
    with pytest.raises(ValueError, match="CUDA is not available"):
        build.resolve_device(toy2d().override({("device",): "cuda"}).device)
