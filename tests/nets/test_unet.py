"""Properties of the image U-Net that the score-FPE regularizer relies on (fpe_lab/nets/unet.py)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import jvp

from fpe_lab.fpe import ExactDivergence, Hutchinson, score_fpe_residual
from fpe_lab.model import ScoreModel
from fpe_lab.nets.unet import TimeEmbedding, UNet, UNetConfig, UNetSize
from fpe_lab.sde import SubVPSDE, VESDE, VPSDE


def micro_config(**kw) -> UNetConfig:
    """Every block type (res, attention, down/up-sampling) on a 1×4×4 image: D = 16, so exact checks are cheap."""
    base = dict(in_channels=1, image_size=4, channels=4, channel_mult=(1, 2), num_res_blocks=1,
                attn_resolutions=(4, 2), dropout=0.0, num_groups=2)
    base.update(kw)
    return UNetConfig(**base)


def make_net(cfg: UNetConfig, seed: int = 0) -> UNet:
    torch.manual_seed(seed)
    return UNet(cfg).double().eval()


@pytest.mark.parametrize("emb", list(TimeEmbedding))
def test_samples_never_interact(emb):
    net = make_net(micro_config(image_size=8, attn_resolutions=(8, 4), time_embedding=emb))
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(3, 1, 8, 8, generator=gen, dtype=torch.float64)
    t = torch.rand(3, generator=gen, dtype=torch.float64)
    out = net(x, t)
    x2, t2 = x.clone(), t.clone()
    x2[2] += 5.0
    t2[2] = 0.9
    out2 = net(x2, t2)
    alone = net(x[:1], t[:1])
    # float64 round-off; a different batch composition may change the conv kernel's summation order
    assert torch.allclose(out[:2], out2[:2], rtol=0, atol=1e-12)
    assert torch.allclose(out[:1], alone, rtol=0, atol=1e-12)
    assert (out[2] - out2[2]).abs().max() > 1e-3  # the changed sample does change


def test_interaction_check_can_fail():
    """Negative control: a train-mode BatchNorm couples samples, and the same comparison detects it."""
    torch.manual_seed(0)
    coupled = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Conv2d(4, 1, 1)).double().train()
    x = torch.randn(3, 1, 8, 8, dtype=torch.float64)
    x2 = x.clone()
    x2[2] += 5.0
    assert (coupled(x)[:2] - coupled(x2)[:2]).abs().max() > 1e-3


def test_double_backward_and_forward_ad_gradcheck():
    """Reverse, reverse-over-reverse and forward-mode derivatives in x and t agree with finite differences."""
    net = make_net(micro_config())
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(1, 1, 4, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    t = (0.3 + 0.4 * torch.rand(1, generator=gen, dtype=torch.float64)).requires_grad_(True)
    # torch's own float64 tolerances (central differences with eps = 1e-6: O(eps²) truncation)
    # fast_mode: compares random projections of the Jacobians (same tolerances, far fewer evaluations)
    assert torch.autograd.gradcheck(net, (x, t), check_forward_ad=True, fast_mode=True)
    assert torch.autograd.gradgradcheck(net, (x, t), fast_mode=True)


def test_forward_mode_dt_equals_reverse_mode():
    """∂_t n by one JVP in t equals the reverse-mode derivative ∂_t ⟨v, n⟩ per sample."""
    net = make_net(micro_config(image_size=8, attn_resolutions=(4,)))
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(4, 1, 8, 8, generator=gen, dtype=torch.float64)
    t = torch.rand(4, generator=gen, dtype=torch.float64).requires_grad_(True)
    v = torch.randn(4, 1, 8, 8, generator=gen, dtype=torch.float64)
    _, dt_n = jvp(lambda tt: net(x, tt), (t.detach(),), (torch.ones_like(t),))
    (rev,) = torch.autograd.grad((net(x, t) * v).sum(), t)
    fwd = (dt_n * v).flatten(1).sum(-1)
    # float64 round-off relative to the size of the derivative (frequencies up to 1000 make it large)
    assert torch.allclose(fwd, rev, rtol=1e-9, atol=1e-9 * rev.abs().max().item())
    assert not torch.allclose(fwd, -rev)  # the comparison is not vacuous


@pytest.mark.parametrize(
    "sde",
    [pytest.param(VESDE(), marks=pytest.mark.slow), VPSDE(), pytest.param(SubVPSDE(), marks=pytest.mark.slow)],
    ids=["VE", "VP", "subVP"],
)
def test_hutchinson_residual_is_unbiased(sde):
    """E over probes of the Hutchinson residual equals the exact residual (R is linear in ∇·s)."""
    model = ScoreModel(make_net(micro_config()), sde)
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(2, 1, 4, 4, generator=gen, dtype=torch.float64)
    t = torch.tensor([0.3, 0.7], dtype=torch.float64)
    exact = score_fpe_residual(model, sde, x, t, divergence=ExactDivergence())
    probes = Hutchinson(1, generator=torch.Generator().manual_seed(5))
    draws = torch.stack([score_fpe_residual(model, sde, x, t, divergence=probes) for _ in range(24)])
    mean, se = draws.mean(0), draws.std(0) / draws.shape[0] ** 0.5
    # CLT: 6 standard errors over 32 components (Gaussian false alarm ~1e-7; t-tail at 23 dof ~1e-4);
    # plus float64 round-off
    slack = 6 * se + 1e-9 * exact.abs().max()
    assert ((mean - exact).abs() <= slack).all()
    assert (se > 0).any()  # the estimator does vary
    # the check can fail: a residual that drops the divergence term (½g²∇∇·s) is detected
    wrong = score_fpe_residual(model, sde, x, t, divergence=lambda s, xx: 0.0 * ExactDivergence()(s, xx))
    assert ((mean - wrong).abs() > slack).any()


def test_fpe_regularizer_trains_through_tiny_cifar_unet():
    """The Hutchinson residual of the tiny preset at CIFAR size gives finite parameter gradients."""
    torch.manual_seed(0)
    net = UNet(UNetConfig.preset(UNetSize.TINY, in_channels=3, image_size=32))
    sde = VPSDE()
    model = ScoreModel(net, sde)
    x = torch.randn(2, 3, 32, 32)
    t = torch.tensor([1e-3, 0.5])
    r = score_fpe_residual(model, sde, x, t, divergence=Hutchinson(1), create_graph=True)
    r.pow(2).mean().backward()
    grads = [p.grad for p in net.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert sum(int(g.abs().sum() > 0) for g in grads) == len(grads)  # every parameter receives gradient


def test_presets_and_shapes():
    for size in UNetSize:
        cfg = UNetConfig.preset(size, in_channels=1, image_size=8)
        assert cfg.image_size == 8 and cfg.in_channels == 1
    net = make_net(micro_config())
    with pytest.raises(ValueError, match=r"x must have shape \(b, 1, 4, 4\)"):
        net(torch.zeros(2, 3, 4, 4, dtype=torch.float64), torch.zeros(2, dtype=torch.float64))
    with pytest.raises(ValueError, match="t must have shape"):
        net(torch.zeros(2, 1, 4, 4, dtype=torch.float64), torch.zeros(3, dtype=torch.float64))


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(channels=6, num_groups=4), "num_groups=4 must divide"),
        (dict(image_size=6, channel_mult=(1, 2, 2)), "image_size must be divisible"),
        (dict(dropout=1.0), "dropout must be in"),
        (dict(channel_mult=()), "channel_mult must be"),
        (dict(num_res_blocks=0), "num_res_blocks must be an integer >= 1"),
        (dict(time_embedding="fourier"), "time_embedding must be a TimeEmbedding"),
    ],
)
def test_bad_config(kw, match):
    with pytest.raises(ValueError, match=match):
        micro_config(**kw)


@pytest.mark.gpu
def test_gpu_smoke_residual_bf16_network():
    """On CUDA: a DSM forward under bf16 autocast and the fp32 Hutchinson residual both run."""
    dev = torch.device("cuda")
    net = UNet(UNetConfig.preset(UNetSize.TINY)).to(dev)
    sde = VPSDE()
    model = ScoreModel(net, sde)
    x, t = torch.randn(4, 3, 32, 32, device=dev), torch.rand(4, device=dev) * 0.9 + 0.05
    with torch.autocast("cuda", dtype=torch.bfloat16):
        n = net(x, t)
    assert n.dtype == torch.bfloat16 and torch.isfinite(n.float()).all()
    r = score_fpe_residual(model, sde, x, t, divergence=Hutchinson(1), create_graph=True)
    r.pow(2).mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in net.parameters())


def test_dt_under_dropout_uses_one_mask():
    """Train-mode dropout: the JVP's ∂_t n is the derivative of the *same* masked network as its value
    (unlike a finite difference across separate dropout draws): it equals reverse mode under the same seed."""
    net = make_net(micro_config(image_size=8, attn_resolutions=(4,), dropout=0.3)).train()
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(2, 1, 8, 8, generator=gen, dtype=torch.float64)
    t = torch.rand(2, generator=gen, dtype=torch.float64).requires_grad_(True)
    v = torch.randn(2, 1, 8, 8, generator=gen, dtype=torch.float64)
    torch.manual_seed(7)
    n_fwd, dt_n = jvp(lambda tt: net(x, tt), (t.detach(),), (torch.ones_like(t),))
    torch.manual_seed(7)
    n_rev = net(x, t)
    (rev,) = torch.autograd.grad((n_rev * v).sum(), t)
    assert torch.equal(n_fwd, n_rev.detach())  # same dropout mask
    # float64 round-off relative to the derivative's size
    assert torch.allclose((dt_n * v).flatten(1).sum(-1), rev, rtol=1e-9, atol=1e-9 * rev.abs().max().item())
    torch.manual_seed(8)
    assert not torch.equal(net(x, t.detach()), n_rev.detach())  # dropout is active
