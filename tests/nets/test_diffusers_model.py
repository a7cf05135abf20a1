"""fpe_lab.nets.diffusers_model: the DDPM → VP mapping against the discrete products, loading a saved
UNet2DModel, derivatives through it (forward mode in t, double backward through attention), refusing
pickles that would run code, and bad input."""

import json
import pickle
import sys
from pathlib import Path

import pytest
import torch

from fpe_lab.fpe import FiniteDifferenceDt, ForwardModeDt, Hutchinson, divergence, residual_sq, score_fpe_terms
from fpe_lab.nets.diffusers_model import (
    AUDIT_EXTRA,
    DDPMSchedule,
    DiffusersModelError,
    MissingDiffusersError,
    find_unet_dir,
    is_diffusers_model,
    load_diffusers_score,
)
from fpe_lab.sde import SubVPSDE, VESDE, VPSDE


# ---------------------------------------------------------------------- the schedule (no diffusers needed)
@pytest.mark.analytic
def test_vp_limit_matches_the_discrete_products_within_the_stated_bounds():
    """At t_k = k/(N − 1): −log ᾱ_k − B(t_k) lies in [E1 + ½Σβ², E1 + ½Σβ²/(1 − β_end)] (module docstring),
    and alpha², sigma² of the VP SDE differ from ᾱ_k, 1 − ᾱ_k by at most e^{−B}·(upper bound)."""
    sched = DDPMSchedule()
    sde = sched.vp_sde()
    assert sde == VPSDE(beta_min=0.1, beta_max=20.0)
    t = torch.arange(sched.n_steps, dtype=torch.float64) / (sched.n_steps - 1)
    k = torch.arange(sched.n_steps, dtype=torch.float64)
    torch.testing.assert_close(sched.timestep(t), k, rtol=1e-15, atol=0)  # t (N − 1) = k up to float64 round-off
    abar = sched.alphas_cumprod()
    gap = -torch.log(abar) - sde.int_beta(t)
    lo, hi = sched.log_alpha_bound()
    slack = 1e-12  # float64 round-off of a 1000-term log-sum
    assert torch.all(gap >= lo - slack) and torch.all(gap <= hi + slack)
    assert hi.max() < 0.08 and lo[-1] > 0.06  # the continuous limit is off by O(1/N): ~0.07 in log ᾱ at t = 1
    alpha, sigma = sde.marginal(t)
    assert torch.all((alpha**2 - abar).abs() <= torch.exp(-sde.int_beta(t)) * hi + slack)
    assert torch.all((sigma**2 - (1 - abar)).abs() <= torch.exp(-sde.int_beta(t)) * hi + slack)
    # Can fail: a slightly wrong continuous schedule (beta_max 19.5) or time map (t·N) leaves the band
    wrong = VPSDE(beta_min=0.1, beta_max=19.5)
    assert not torch.all(-torch.log(abar) - wrong.int_beta(t) <= hi + slack)
    shifted = -torch.log(abar) - sde.int_beta(torch.arange(sched.n_steps, dtype=torch.float64) / sched.n_steps)
    assert not torch.all(shifted <= hi + slack)


def test_schedule_validation_and_scheduler_configs():
    with pytest.raises(ValueError, match="n_steps must be an int >= 2; got 1"):
        DDPMSchedule(n_steps=1)
    with pytest.raises(ValueError, match=r"beta_end must be a number in \(0, 1\); got 1.5"):
        DDPMSchedule(beta_end=1.5)
    s = DDPMSchedule.from_scheduler_config({"beta_start": 2e-4, "beta_end": 0.01, "num_train_timesteps": 500,
                                            "beta_schedule": "linear", "prediction_type": "epsilon"})
    assert s == DDPMSchedule(2e-4, 0.01, 500) and s.vp_sde() == VPSDE(beta_min=0.1, beta_max=5.0)
    with pytest.raises(DiffusersModelError, match="beta_schedule 'squaredcos_cap_v2'.*only linear betas"):
        DDPMSchedule.from_scheduler_config({"beta_schedule": "squaredcos_cap_v2"})
    with pytest.raises(DiffusersModelError, match="prediction_type 'v_prediction'; only 'epsilon'"):
        DDPMSchedule.from_scheduler_config({"prediction_type": "v_prediction"})


# ---------------------------------------------------------------------- models on disk
def _tiny_unet(sample_size=8, in_channels=1, **overrides):
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    kw = dict(sample_size=sample_size, in_channels=in_channels, out_channels=in_channels, block_out_channels=(8, 16),
              layers_per_block=1, norm_num_groups=4, attention_head_dim=8,
              down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"))
    kw.update(overrides)
    return diffusers.UNet2DModel(**kw)


@pytest.fixture(scope="module")
def saved_unet(tmp_path_factory):
    unet = _tiny_unet()
    folder = tmp_path_factory.mktemp("unet")
    unet.save_pretrained(folder)
    return unet, folder


def test_load_gives_minus_eps_over_sigma(saved_unet):
    unet, folder = saved_unet
    assert is_diffusers_model(folder) and find_unet_dir(folder) == (folder, None)
    model = load_diffusers_score(folder, dtype=torch.float64)
    assert model.sde == VPSDE() and not model.training and model.net.image_shape == (1, 8, 8)
    x = torch.randn(3, 1, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([0.05, 0.4, 0.9], dtype=torch.float64)
    with torch.no_grad():
        eps = unet.double()(x, t * 999).sample
        s = model(x, t)
    _, sigma = VPSDE().marginal(t)
    # diffusers' embedding runs in float32, ours in float64: float32 round-off of the time embedding
    torch.testing.assert_close(s, -eps / sigma[:, None, None, None], rtol=1e-5, atol=1e-5 * eps.abs().max().item())
    # Can fail: the score at the wrong time index differs by much more
    with torch.no_grad():
        other = -unet(x, t * 1000).sample / sigma[:, None, None, None]
    assert (other - s).abs().max() > 1e-3 * s.abs().max()


def test_pipeline_folder_takes_its_schedule_from_the_scheduler_config(saved_unet, tmp_path):
    _, folder = saved_unet
    pipe = tmp_path / "pipe"
    (pipe / "unet").mkdir(parents=True)
    (pipe / "scheduler").mkdir()
    for name in ("config.json", "diffusion_pytorch_model.safetensors"):
        (pipe / "unet" / name).write_bytes((folder / name).read_bytes())
    (pipe / "scheduler" / "scheduler_config.json").write_text(json.dumps(
        {"_class_name": "DDPMScheduler", "beta_start": 1e-4, "beta_end": 0.01, "num_train_timesteps": 1000,
         "beta_schedule": "linear", "prediction_type": "epsilon"}))
    assert find_unet_dir(pipe) == (pipe / "unet", pipe / "scheduler" / "scheduler_config.json")
    assert find_unet_dir(pipe / "unet") == (pipe / "unet", pipe / "scheduler" / "scheduler_config.json")
    model = load_diffusers_score(pipe)
    assert model.sde == VPSDE(beta_min=0.1, beta_max=10.0) and model.net.schedule == DDPMSchedule(1e-4, 0.01, 1000)
    with pytest.raises(DiffusersModelError, match=r"maps onto VPSDE\(beta_min=0.1, beta_max=10.0\).*got sde=VPSDE\(beta_min=0.1, beta_max=20.0\)"):
        load_diffusers_score(pipe, sde=VPSDE())
    # an explicit schedule wins over the folder's
    assert load_diffusers_score(pipe, schedule=DDPMSchedule()).sde == VPSDE()


def test_residual_through_the_unet_forward_mode_and_double_backward(saved_unet):
    """∂_t s by forward mode equals a central difference; ∇(uᵀJu) (double backward through attention,
    one fixed Rademacher probe u) equals the central difference of uᵀJu along a direction; the
    unbiased residual runs and is finite."""
    _, folder = saved_unet
    model = load_diffusers_score(folder, dtype=torch.float64)
    sde = model.sde
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 1, 8, 8, dtype=torch.float64, generator=gen)
    t = torch.tensor([0.3, 0.6], dtype=torch.float64)

    def probe():  # the same probe u at every call
        return Hutchinson(1, generator=torch.Generator().manual_seed(5))

    terms = score_fpe_terms(model, sde, x, t, divergence=probe())
    _, dt = ForwardModeDt()(model, x, t)
    torch.testing.assert_close(terms.dt_s, dt.detach(), rtol=0, atol=0)
    # t enters as k = 999 t through sinusoids of frequency up to 1 in k: ∂³_t s ~ 1e9 |s|, so h = 1e-7
    _, dt_fd = FiniteDifferenceDt(h=1e-7)(model, x, t)
    # central difference: truncation h²/6·∂³_t s ~ 1e-6 and round-off eps·|s|/h ~ 1e-9, relative to |∂_t s|
    torch.testing.assert_close(terms.dt_s, dt_fd, rtol=1e-5, atol=1e-5 * dt_fd.abs().max().item())
    v = torch.randn(x.shape, dtype=torch.float64, generator=gen)
    h = 1e-4
    fd = (divergence(model, x + h * v, t, probe()) - divergence(model, x - h * v, t, probe())) / (2 * h)
    want = (terms.grad_div_s * v).sum((1, 2, 3))
    # O(h²) truncation and round-off eps·|uᵀJu|/h: 1e-5 relative to the directional change
    torch.testing.assert_close(want, fd, rtol=1e-5, atol=1e-5 * fd.abs().max().item())
    # Can fail: the derivative along another direction differs
    assert (want - (terms.grad_div_s * v.flip(-1)).sum((1, 2, 3))).abs().max() > 1e-3 * fd.abs().max()
    res = residual_sq(model, sde, x, t, divergence=Hutchinson(2, generator=gen))
    assert res.shape == (2,) and torch.isfinite(res).all()


def test_positional_embedding_matches_diffusers():
    diffusers = pytest.importorskip("diffusers")
    from diffusers.models.embeddings import Timesteps

    from fpe_lab.nets.diffusers_model import _PositionalTimesteps

    k = torch.tensor([0.0, 1.5, 37.0, 998.0])
    for dim, flip, shift in ((32, True, 0.0), (33, False, 1.0)):
        ref = Timesteps(dim, flip, shift)(k)
        ours = _PositionalTimesteps(dim, flip, shift)(k.double())
        assert ours.dtype == torch.float64
        # diffusers computes in float32: float32 round-off of arguments up to ~1e3
        torch.testing.assert_close(ours.float(), ref, rtol=0, atol=2e-4)
    assert diffusers is not None


# ---------------------------------------------------------------------- refusing code and bad input
class _WritesMarker:
    """Unpickling this calls Path.write_text(marker, 'ran'): a stand-in for arbitrary code."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "ran"))


def test_a_pickle_that_would_run_code_is_refused(saved_unet, tmp_path):
    _, folder = saved_unet
    evil = tmp_path / "evil"
    evil.mkdir()
    (evil / "config.json").write_text((folder / "config.json").read_text())
    marker = tmp_path / "marker.txt"
    (evil / "diffusion_pytorch_model.bin").write_bytes(pickle.dumps({"conv_in.weight": _WritesMarker(marker)}))
    with pytest.raises(DiffusersModelError, match="refusing to load .*diffusion_pytorch_model.bin: it is not a plain tensor state dict"):
        load_diffusers_score(evil)
    assert not marker.exists()
    # Can fail: the payload is live (plain unpickling runs it)
    pickle.loads((evil / "diffusion_pytorch_model.bin").read_bytes())
    assert marker.read_text() == "ran"


def test_a_bin_state_dict_loads_with_weights_only(saved_unet, tmp_path):
    unet, folder = saved_unet
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "config.json").write_text((folder / "config.json").read_text())
    torch.save(unet.state_dict(), plain / "diffusion_pytorch_model.bin")
    model = load_diffusers_score(plain)
    assert torch.equal(model.net.unet.conv_in.weight, unet.conv_in.weight.float())


def test_bad_requests_name_both_sides(saved_unet, tmp_path):
    _, folder = saved_unet
    for sde in (VESDE(), SubVPSDE(), VPSDE(beta_max=10.0)):
        with pytest.raises(DiffusersModelError, match=r"maps onto VPSDE\(beta_min=0.1, beta_max=20.0\).*got sde="
                           + type(sde).__name__):
            load_diffusers_score(folder, sde=sde)
    model = load_diffusers_score(folder)
    with pytest.raises(DiffusersModelError, match=r"takes images of shape \(b, 1, 8, 8\).*got x of shape \(2, 3, 8, 8\)"):
        model(torch.zeros(2, 3, 8, 8), torch.full((2,), 0.5))
    with pytest.raises(DiffusersModelError, match="is not a diffusers UNet2DModel folder"):
        load_diffusers_score(tmp_path)
    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    (no_weights / "config.json").write_text((folder / "config.json").read_text())
    with pytest.raises(DiffusersModelError, match="has a UNet2DModel config.json but no weights"):
        load_diffusers_score(no_weights)
    (no_weights / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel"}))
    with pytest.raises(DiffusersModelError, match="describes a diffusers UNet2DConditionModel; only UNet2DModel"):
        load_diffusers_score(no_weights)
    fourier = tmp_path / "fourier"
    fourier.mkdir()
    cfg = json.loads((folder / "config.json").read_text())
    cfg["time_embedding_type"] = "fourier"
    (fourier / "config.json").write_text(json.dumps(cfg))
    (fourier / "diffusion_pytorch_model.safetensors").write_bytes((folder / "diffusion_pytorch_model.safetensors").read_bytes())
    with pytest.raises(DiffusersModelError, match="time_embedding_type 'fourier' .a VE / NCSN.. model. cannot use the DDPM"):
        load_diffusers_score(fourier)
    other = tmp_path / "other"
    _tiny_unet(block_out_channels=(8, 8)).save_pretrained(other)
    cfg = json.loads((other / "config.json").read_text())
    cfg["block_out_channels"] = [8, 16]
    (other / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(DiffusersModelError, match="the weights do not fit config.json"):
        load_diffusers_score(other)


def test_missing_diffusers_names_the_extra(saved_unet, monkeypatch):
    _, folder = saved_unet
    monkeypatch.setitem(sys.modules, "diffusers", None)  # import diffusers → ImportError
    with pytest.raises(MissingDiffusersError, match=r'pip install -e "\.\[audit\]"') as info:
        load_diffusers_score(folder)
    assert isinstance(info.value, ImportError) and len(str(info.value).splitlines()) == 1
    assert AUDIT_EXTRA in str(info.value)
