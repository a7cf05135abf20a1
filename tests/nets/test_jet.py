"""The jet residual path (fpe_lab.nets.jet) against the generic autograd path and torch.func, in float64."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn
from torch.func import hessian, jacfwd

from fpe_lab.fpe import ExactDivergence, Hutchinson, score_fpe_residual, score_fpe_terms
from fpe_lab.model import ScoreModel
from fpe_lab.nets.jet import _silu_jet, _SiLUJet, jet_score_fpe_residual, score_jet
from fpe_lab.nets.mlp import TimeMLP
from fpe_lab.sde import SDE, SubVPSDE, VESDE, VPSDE
from tests.conftest import ALL_SDES

SDES = list(ALL_SDES)
EPS = 1e-5


def _model(dim: int, width: int, depth: int, sde, seed: int = 0) -> ScoreModel:
    torch.manual_seed(seed)
    net = TimeMLP(dim=dim, width=width, depth=depth, n_freq=4).double()
    # Default init gives a nearly linear net; larger weights make the second derivatives O(1).
    with torch.no_grad():
        for p in net.parameters():
            p.mul_(2.0)
    return ScoreModel(net, sde)


def _points(dim: int, b: int, t_lo: float, t_hi: float, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, dim, generator=g, dtype=torch.float64)
    t = t_lo + (t_hi - t_lo) * torch.rand(b, generator=g, dtype=torch.float64)
    return x, t


def _assert_residual_close(r_jet, r_ref, scale):
    # float64 round-off: R cancels terms of size `scale` (up to ~1e8 near t = eps); the two paths
    # round differently, so the difference is a few ulps of `scale` times the depth; 1e-12 leaves margin.
    err = (r_jet - r_ref).norm(dim=-1)
    assert (err <= 1e-12 * scale + 1e-300).all(), f"max relative error {(err / scale).max().item():.3e}"


@pytest.mark.parametrize("sde", SDES, ids=["ve", "vp", "subvp"])
@pytest.mark.parametrize("dim,width,depth", [(1, 8, 1), (2, 16, 2), (2, 32, 3), (3, 24, 3)])
@pytest.mark.parametrize("t_range", [(EPS, 2 * EPS), (0.99, 1.0)], ids=["t_near_eps", "t_near_1"])
def test_residual_matches_generic_path(sde, dim, width, depth, t_range):
    model = _model(dim, width, depth, sde)
    x, t = _points(dim, 16, *t_range)
    r_ref = score_fpe_residual(model, sde, x, t)
    scale = score_fpe_terms(model, sde, x, t).scale
    r_jet = jet_score_fpe_residual(model, sde, x, t)
    assert r_jet.shape == x.shape and r_jet.dtype == torch.float64
    _assert_residual_close(r_jet, r_ref, scale)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    dim=st.integers(1, 3),
    width=st.integers(1, 12),
    depth=st.integers(1, 3),
    sde_index=st.integers(0, 2),
    t=st.floats(EPS, 1.0),
    seed=st.integers(0, 2**16),
)
def test_residual_matches_generic_path_random_nets(dim, width, depth, sde_index, t, seed):
    sde = SDES[sde_index]
    model = _model(dim, width, depth, sde, seed=seed)
    x, _ = _points(dim, 4, 0.0, 1.0, seed=seed)
    scale = score_fpe_terms(model, sde, x, t).scale
    _assert_residual_close(jet_score_fpe_residual(model, sde, x, t), score_fpe_residual(model, sde, x, t), scale)


def test_residual_comparison_can_fail():
    """The tolerance above is tight enough to see a 1e-8 change of one weight or the wrong SDE."""
    sde = VPSDE()
    model = _model(2, 16, 2, sde)
    x, t = _points(2, 16, 0.3, 0.7)
    r_ref = score_fpe_residual(model, sde, x, t)
    scale = score_fpe_terms(model, sde, x, t).scale
    with pytest.raises(AssertionError):
        _assert_residual_close(jet_score_fpe_residual(model, SubVPSDE(), x, t), r_ref, scale)
    with torch.no_grad():
        model.net.hidden[1].weight[0, 0] += 1e-8
    with pytest.raises(AssertionError):
        _assert_residual_close(jet_score_fpe_residual(model, sde, x, t), r_ref, scale)


def test_scalar_time_and_exact_divergence_argument():
    sde = VESDE()
    model = _model(2, 16, 2, sde)
    x, _ = _points(2, 8, 0.1, 0.9)
    r_ref = score_fpe_residual(model, sde, x, 0.4)
    scale = score_fpe_terms(model, sde, x, 0.4).scale
    _assert_residual_close(jet_score_fpe_residual(model, sde, x, 0.4, divergence=ExactDivergence()), r_ref, scale)


@pytest.mark.parametrize("sde", SDES, ids=["ve", "vp", "subvp"])
def test_parameter_gradients_match_generic_path(sde):
    model = _model(2, 16, 2, sde)
    x, t = _points(2, 12, 0.05, 0.95)
    params = list(model.parameters())

    def grads(residual_fn):
        loss = residual_fn(model, sde, x, t, create_graph=True).pow(2).sum(-1).mean()
        return torch.autograd.grad(loss, params)

    for g_jet, g_ref in zip(grads(jet_score_fpe_residual), grads(score_fpe_residual)):
        # float64 round-off on gradients of size up to ~1e4 (VE: g² large); both are exact derivatives.
        torch.testing.assert_close(g_jet, g_ref, rtol=1e-9, atol=1e-9 * g_ref.abs().max().item())


def test_no_graph_without_create_graph():
    sde = VPSDE()
    model = _model(2, 8, 1, sde)
    x, t = _points(2, 4, 0.2, 0.8)
    assert not jet_score_fpe_residual(model, sde, x, t).requires_grad
    assert jet_score_fpe_residual(model, sde, x, t, create_graph=True).requires_grad


@pytest.mark.parametrize("sde", SDES, ids=["ve", "vp", "subvp"])
def test_with_score_returns_the_value_stream_and_the_same_residual(sde):
    """with_score's s is model(x, t) (the DSM forward it replaces) and its R is __call__'s R."""
    model = _model(2, 16, 2, sde)
    x, t = _points(2, 12, EPS, 1.0)
    s, r = jet_score_fpe_residual.with_score(model, sde, x, t)
    ref = model(x, t)
    # float64 round-off: the jet's value stream and the module's forward are the same ops, maybe reordered
    torch.testing.assert_close(s, ref, rtol=1e-13, atol=1e-13 * ref.abs().max().item())
    assert torch.equal(r, jet_score_fpe_residual(model, sde, x, t))
    assert not s.requires_grad and not r.requires_grad
    s_g, r_g = jet_score_fpe_residual.with_score(model, sde, x, t, create_graph=True)
    assert s_g.requires_grad and r_g.requires_grad
    # the check can fail: another time's score is not the value stream
    assert not torch.allclose(s, model(x, (t + 0.01).clamp(max=1.0)), rtol=1e-6, atol=0)


@pytest.mark.parametrize("dim", [1, 2, 3])
@pytest.mark.parametrize("sde", SDES, ids=["ve", "vp", "subvp"])
def test_streams_match_torch_func(dim, sde):
    model = _model(dim, 16, 2, sde, seed=dim)
    x, t = _points(dim, 4, 0.01, 0.99, seed=dim)
    jet = score_jet(model, x, t)
    for b in range(x.shape[0]):
        xb, tb = x[b], t[b : b + 1]

        def s_of_x(xx, tb=tb):
            return model(xx[None], tb)[0]

        def s_of_t(tt, xb=xb):
            return model(xb[None], tt)[0]

        # float64 round-off: every stream is an exact derivative computed in a different order.
        close = dict(rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(jet.value[b], s_of_x(xb), **close)
        torch.testing.assert_close(jet.jacobian[b], jacfwd(s_of_x)(xb), **close)
        torch.testing.assert_close(jet.hessian[b], hessian(s_of_x)(xb), **close)
        torch.testing.assert_close(jet.dt[b], jacfwd(s_of_t)(tb)[:, 0], **close)
        div = lambda xx: torch.diagonal(jacfwd(s_of_x)(xx)).sum()  # noqa: E731
        torch.testing.assert_close(jet.grad_div[b], torch.func.grad(div)(xb), **close)


def test_hessian_is_symmetric_unpacking():
    model = _model(3, 8, 1, VPSDE())
    x, t = _points(3, 5, 0.2, 0.8)
    h = score_jet(model, x, t).hessian
    assert h.shape == (5, 3, 3, 3)
    torch.testing.assert_close(h, h.transpose(-1, -2), rtol=0, atol=0)  # unpacked from one copy: exact


@pytest.mark.parametrize("dim", [1, 2, 3])
def test_fused_silu_jet_matches_plain_autograd(dim):
    """The hand-written backward of _SiLUJet against gradcheck and autograd of the plain _silu_jet."""
    g = torch.Generator().manual_seed(dim)
    k = 1 + dim + dim * (dim + 1) // 2
    z = (3 * torch.randn(5, 4, generator=g, dtype=torch.float64)).requires_grad_(True)
    dz = torch.randn(k, 5, 4, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: _SiLUJet.apply(a, b, dim), (z, dz))
    fused, plain = _SiLUJet.apply(z, dz, dim), _silu_jet(z, dz, dim)
    cot = [torch.randn(o.shape, generator=g, dtype=torch.float64) for o in plain]
    grads = [torch.autograd.grad(sum((o * c).sum() for o, c in zip(out, cot)), (z, dz)) for out in (fused, plain)]
    # float64 round-off: the same products summed in a different order.
    for a, b in zip(fused + grads[0], plain + grads[1]):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


class _CubicDriftSDE(SDE):
    """A non-linear drift f = −x³, to be rejected by the jet path."""

    def drift(self, x, t):
        return -(x**3)

    def diffusion(self, t):
        return torch.ones_like(t)

    def div_drift(self, x, t):
        return -3 * (x**2).sum(-1)


class _OtherNet(nn.Module):
    def forward(self, x, t):
        return x


def test_bad_inputs_raise_value_error():
    sde = VPSDE()
    model = _model(2, 8, 1, sde)
    x, t = _points(2, 4, 0.2, 0.8)
    with pytest.raises(ValueError, match="model must be .*TimeMLP.*_OtherNet"):
        jet_score_fpe_residual(ScoreModel(_OtherNet(), sde), sde, x, t)
    with pytest.raises(ValueError, match="model must be"):
        jet_score_fpe_residual(lambda x, t: x, sde, x, t)
    with pytest.raises(ValueError, match="sde must be .*LinearSDE.*_CubicDriftSDE"):
        jet_score_fpe_residual(model, _CubicDriftSDE(), x, t)
    with pytest.raises(ValueError, match="divergence must be .*Hutchinson"):
        jet_score_fpe_residual(model, sde, x, t, divergence=Hutchinson())
    with pytest.raises(ValueError, match=r"x must be .*\(b, 2\).*\(4, 3\)"):
        jet_score_fpe_residual(model, sde, torch.zeros(4, 3, dtype=torch.float64), t)
    with pytest.raises(ValueError, match=r"x must be .*\(4, 1, 2\)"):
        jet_score_fpe_residual(model, sde, torch.zeros(4, 1, 2, dtype=torch.float64), t)
    with pytest.raises(ValueError, match="t must lie in"):
        jet_score_fpe_residual(model, sde, x, torch.full((4,), 1.5, dtype=torch.float64))
    with pytest.raises(ValueError, match="x must be finite"):
        jet_score_fpe_residual(model, sde, torch.full((4, 2), float("nan"), dtype=torch.float64), t)
    with pytest.raises(ValueError, match="t has shape"):
        jet_score_fpe_residual(model, sde, x, torch.zeros(3, dtype=torch.float64))
    model.net.act = nn.Tanh()
    with pytest.raises(ValueError, match="act must be nn.SiLU.*Tanh"):
        jet_score_fpe_residual(model, sde, x, t)


@pytest.mark.gpu
def test_cuda_matches_cpu():
    sde = VPSDE()
    model = _model(2, 32, 3, sde)
    x, t = _points(2, 64, EPS, 1.0)
    r_cpu = jet_score_fpe_residual(model, sde, x, t)
    r_gpu = jet_score_fpe_residual(model.cuda(), sde, x.cuda(), t.cuda())
    scale = score_fpe_terms(model.cpu(), sde, x, t).scale
    _assert_residual_close(r_gpu.cpu(), r_cpu, scale)


@pytest.mark.slow
def test_train_step_benchmark_quick(tmp_path):
    """benchmarks/bench_train_step.py --quick runs, writes only --out, and the jet step allocates less."""
    script = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_train_step.py"
    out = tmp_path / "r.json"
    proc = subprocess.run([sys.executable, str(script), "--quick", "--out", str(out)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]
    (res,) = json.loads(out.read_text())["sizes"].values()
    assert set(res) == {"dsm", "fpe-generic", "fpe-jet", "fpe-jet-shared"}
    assert res["fpe-jet"]["peak_step_mib"] < res["fpe-generic"]["peak_step_mib"]
