"""fpe_lab.nets.diffusers_model: the tabulated VP SDE against each diffusers scheduler's alphas_cumprod,
scores from epsilon-, v- and sample-prediction against a synthetic network with an exact score, the
linear schedule's closed-form limit, loading a saved UNet2DModel, derivatives through it (forward mode in
t, double backward through attention), refusing pickles that would run code, and bad input."""

import json
import pickle
import sys
from pathlib import Path

import pytest
import torch

from fpe_lab.fpe import FiniteDifferenceDt, ForwardModeDt, Hutchinson, divergence, residual_sq, score_fpe_terms
from fpe_lab.model import ScoreModel
from fpe_lab.nets.diffusers_model import (
    AUDIT_EXTRA,
    DDPMSchedule,
    DiffusersEpsNet,
    DiffusersModelError,
    DiffusersSchedule,
    MissingDiffusersError,
    find_unet_dir,
    is_diffusers_model,
    load_diffusers_score,
)
from fpe_lab.sde import SubVPSDE, TabulatedVPSDE, VESDE, VPSDE


# ---------------------------------------------------------------------- the linear schedule's closed-form limit
@pytest.mark.analytic
def test_vp_limit_matches_the_discrete_products_within_the_stated_bounds():
    """At t_k = k/(N − 1): −log ᾱ_k − B(t_k) lies in [E1 + ½Σβ², E1 + ½Σβ²/(1 − β_end)] (docs/derivations.md),
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
    s = DiffusersSchedule.from_scheduler_config({"beta_start": 2e-4, "beta_end": 0.01, "num_train_timesteps": 500,
                                                 "beta_schedule": "linear", "prediction_type": "epsilon"})
    assert s == DDPMSchedule(2e-4, 0.01, 500).diffusers_schedule() and s.n_steps == 500
    assert s.sde() == TabulatedVPSDE.from_alphas_cumprod(DDPMSchedule(2e-4, 0.01, 500).alphas_cumprod(), "linear")
    cos = DiffusersSchedule.from_scheduler_config({"beta_schedule": "squaredcos_cap_v2", "prediction_type": "v_prediction"})
    assert cos.prediction_type == "v_prediction" and cos.sde().name == "squaredcos_cap_v2"
    for config, match in [
        ({"beta_schedule": "exponential"}, "beta_schedule 'exponential'; supported: linear, scaled_linear"),
        ({"prediction_type": "velocity"}, "prediction_type 'velocity'; supported: epsilon, v_prediction, sample"),
        ({"rescale_betas_zero_snr": True}, "zero terminal SNR"),
        ({"trained_betas": [0.1, 1.5]}, r"betas must be at least 2 numbers in \(0, 1\)"),
        ({"num_train_timesteps": 1}, "num_train_timesteps must be an int >= 2"),
    ]:
        with pytest.raises(DiffusersModelError, match=match):
            DiffusersSchedule.from_scheduler_config(config)
    with pytest.raises(ValueError, match="log_alphas_cumprod must be finite"):
        TabulatedVPSDE.from_alphas_cumprod([0.9, 0.0])
    with pytest.raises(ValueError, match="step 1 has"):
        TabulatedVPSDE.from_alphas_cumprod([0.9, 0.95])


# ---------------------------------------------------------------------- the tabulated SDE of any schedule
_SCHEDULES = [
    dict(beta_schedule="linear"),
    dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),  # latent diffusion's values
    dict(beta_schedule="squaredcos_cap_v2"),
    dict(beta_schedule="sigmoid"),
    dict(trained_betas=[float(b) for b in torch.linspace(1e-3, 0.2, 50)]),
]
# diffusers computes its table in float32; ours is float64: relative differences measured 3.6e-7
# (linear), 7.5e-7 (scaled_linear), 4.7e-7 (sigmoid), 1.3e-5 (cosine: cos² of float32 arguments near π/2)
_F32_RTOL = 3e-5


@pytest.mark.parametrize("config", _SCHEDULES, ids=["linear", "scaled_linear", "cosine", "sigmoid", "trained"])
def test_tabulated_sde_matches_each_schedulers_alphas_cumprod(config):
    """At t_k = (k + 1)/N the SDE's alpha², sigma² are ᾱ_k, 1 − ᾱ_k of the diffusers scheduler built in
    memory; the marginal solves the moment ODEs of drift_coef and diffusion between the steps."""
    diffusers = pytest.importorskip("diffusers")
    ref = diffusers.DDPMScheduler(**config)
    sched = DiffusersSchedule.from_scheduler_config(dict(ref.config))
    sde = sched.sde()
    n = sched.n_steps
    assert n == len(ref.alphas_cumprod)
    t = torch.arange(1, n + 1, dtype=torch.float64) / n
    alpha, sigma = sde.marginal(t)
    want = ref.alphas_cumprod.double()
    torch.testing.assert_close(alpha**2, want, rtol=_F32_RTOL, atol=0)
    torch.testing.assert_close(sigma**2, 1 - want, rtol=_F32_RTOL, atol=1e-7)  # 1 − ᾱ: float32's absolute 6e-8
    # against our own float64 table the knots are exact: round-off of log-space interpolation (≤ 1e-14 measured)
    table = torch.log(torch.tensor(sched.alphas_cumprod, dtype=torch.float64))
    torch.testing.assert_close(sde.log_alpha_bar(t), table, rtol=0, atol=3e-14)
    np_ = sde.marginal_var(t)[1]
    torch.testing.assert_close(np_, sigma**2, rtol=1e-12, atol=0)  # −expm1 vs squared sqrt: round-off
    assert sde.marginal(torch.zeros(1, dtype=torch.float64))[1].item() == 0.0
    # moment ODEs inside a step (beta is constant there): d log alpha/dt = a(t), d sigma²/dt = 2 a sigma² + g²
    mid = (torch.arange(n, dtype=torch.float64) + 0.5) / n
    h = 1e-3 / n  # stays inside the step; central differences of smooth (exponential) pieces
    a_plus, v_plus = sde.marginal_var(mid + h)
    a_minus, v_minus = sde.marginal_var(mid - h)
    dlog_alpha = (torch.log(a_plus) - torch.log(a_minus)) / (2 * h)
    dvar = (v_plus - v_minus) / (2 * h)
    _, var = sde.marginal_var(mid)
    a, g2 = sde.drift_coef(mid), sde.diffusion(mid) ** 2
    # log alpha is exactly linear in t inside a step: only round-off of a difference over 2h (eps·|log ᾱ|/h)
    torch.testing.assert_close(dlog_alpha, a, rtol=1e-6, atol=1e-6 * float(a.abs().max()))
    torch.testing.assert_close(dvar, 2 * a * var + g2, rtol=1e-5, atol=1e-5 * float(g2.max()))


def test_interpolation_error_between_steps_against_the_cosine_closed_form():
    """Between steps log ᾱ is linear in t; the cosine schedule's ᾱ(t) = f(t)/f(0) is known there: the
    gap is ≤ (1/8N²) max|∂²_t log ᾱ| (the numbers in the TabulatedVPSDE docstring)."""
    import math

    sched = DiffusersSchedule.from_scheduler_config({"beta_schedule": "squaredcos_cap_v2"})
    sde, n = sched.sde(), sched.n_steps

    def f(u):
        return torch.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2

    mid = (torch.arange(n, dtype=torch.float64) + 0.5) / n
    gap = (sde.log_alpha_bar(mid) - torch.log(f(mid) / f(torch.zeros(1, dtype=torch.float64)))).abs()
    c = (mid + 0.008) / 1.008 * math.pi / 2
    second = 2 * (math.pi / 2 / 1.008) ** 2 / torch.cos(c) ** 2  # |∂²_t log f| = 2c'²/cos²(c)
    bound = second / (8 * n**2)
    early = mid <= 0.99  # the cap β ≤ 0.999 changes the last step, so the closed form stops there
    assert torch.all(gap[early] <= 1.01 * bound[early] + 1e-14)
    assert gap[mid <= 0.5].max() < 1.3e-6 and gap[mid <= 0.9].max() < 3e-5 and gap[early].max() < 2.5e-3
    # Can fail: step k placed at k/N instead of (k + 1)/N is off by ~|∂_t log ᾱ|/N, far outside the bound
    shifted = TabulatedVPSDE(sde.log_alphas_cumprod[1:] + (2 * sde.log_alphas_cumprod[-1],))
    off = (shifted.log_alpha_bar(mid) - torch.log(f(mid) / f(torch.zeros(1, dtype=torch.float64)))).abs()
    assert off[mid <= 0.5].max() > 100 * gap[mid <= 0.5].max()


# ---------------------------------------------------------------------- scores from every prediction type
class _ExactGaussianUNet(torch.nn.Module):
    """A stand-in UNet2DModel whose output is the exact prediction for Gaussian data N(mu, c² I).

    For x_t = alpha x_0 + sigma ε: p_t = N(alpha mu, (alpha² c² + sigma²) I), s = −(x − alpha mu)/(alpha² c²
    + sigma²), E[ε | x] = −sigma s, E[x_0 | x] = (x + sigma² s)/alpha, E[v | x] = alpha E[ε] − sigma E[x_0].
    It reads t from the network timestep k = N t − 1 like a diffusers model.
    """

    def __init__(self, schedule: DiffusersSchedule, mu: float, c: float, shape=(1, 4, 4)):
        super().__init__()
        self.schedule, self.mu, self.c = schedule, mu, c
        self.config = type("Config", (), {"sample_size": shape[1], "in_channels": shape[0]})()

    def exact_score(self, x, t):
        alpha, sigma = (v[:, None, None, None] for v in self.schedule.sde().marginal(t))
        return -(x - alpha * self.mu) / (alpha**2 * self.c**2 + sigma**2)

    def forward(self, x, timestep):
        t = (timestep + 1) / self.schedule.n_steps
        alpha, sigma = (v[:, None, None, None] for v in self.schedule.sde().marginal(t))
        s = self.exact_score(x, t)
        eps, x0 = -sigma * s, (x + sigma**2 * s) / alpha
        out = {"epsilon": eps, "sample": x0, "v_prediction": alpha * eps - sigma * x0}[self.schedule.prediction_type]
        return type("Output", (), {"sample": out})()


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("beta_schedule", ["linear", "squaredcos_cap_v2", "scaled_linear"])
def test_score_from_each_prediction_type_is_the_exact_score(prediction, beta_schedule):
    """−ε̂/sigma with ε̂ from ε-, v- or x0-prediction recovers a known Gaussian score to float64 round-off,
    between the steps too (k = N t − 1 fractional)."""
    sched = DiffusersSchedule.from_scheduler_config({"beta_schedule": beta_schedule, "prediction_type": prediction})
    unet = _ExactGaussianUNet(sched, mu=0.7, c=0.3)
    model = ScoreModel(DiffusersEpsNet(unet, sched), sched.sde())
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(5, 1, 4, 4, dtype=torch.float64, generator=gen)
    t = torch.tensor([0.0013, 0.02, 0.3005, 0.77, 1.0], dtype=torch.float64)
    want = unet.exact_score(x, t)
    # each conversion is a few flops on O(1) numbers, divided by sigma ≥ 0.01 (sample: by sigma²)
    torch.testing.assert_close(model(x, t), want, rtol=1e-12, atol=1e-12 * float(want.abs().max()))
    # Can fail: reading the output as ε whatever the prediction type is an O(1) error for v and x0
    if prediction != "epsilon":
        wrong = -unet(x, sched.timestep(t)).sample / sched.sde().marginal(t)[1][:, None, None, None]
        per_sample = (wrong - want).abs().amax((1, 2, 3)) / want.abs().amax((1, 2, 3))
        assert per_sample.max() > 0.1, per_sample  # (at small t, v ≈ ε: the gap shows at large t)


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
    sde = DDPMSchedule().diffusers_schedule().sde()  # no scheduler config: DDPM's linear betas
    assert model.sde == sde and not model.training and model.net.image_shape == (1, 8, 8)
    x = torch.randn(3, 1, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([0.05, 0.4, 0.9], dtype=torch.float64)
    with torch.no_grad():
        eps = unet.double()(x, t * 1000 - 1).sample  # step k sits at t = (k + 1)/N
        s = model(x, t)
    _, sigma = sde.marginal(t)
    # diffusers' embedding runs in float32, ours in float64: float32 round-off of the time embedding
    torch.testing.assert_close(s, -eps / sigma[:, None, None, None], rtol=1e-5, atol=1e-5 * eps.abs().max().item())
    # Can fail: the score at the continuous limit's time index t (N − 1) differs by much more
    with torch.no_grad():
        other = -unet(x, t * 999).sample / sigma[:, None, None, None]
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
    half = DDPMSchedule(1e-4, 0.01, 1000).diffusers_schedule()
    assert model.sde == half.sde() and model.net.schedule == half
    with pytest.raises(DiffusersModelError, match=r"maps onto TabulatedVPSDE\(name='linear', N=1000, "
                       r"alphas_cumprod\[0\]=0.9999, alphas_cumprod\[-1\]=0.00630175.*got sde=VPSDE\(beta_min=0.1"):
        load_diffusers_score(pipe, sde=VPSDE())
    # an explicit schedule wins over the folder's
    assert load_diffusers_score(pipe, schedule=DDPMSchedule()).sde == DDPMSchedule().diffusers_schedule().sde()


@pytest.mark.parametrize("prediction", ["v_prediction", "sample"])
def test_pipeline_with_a_cosine_schedule_and_other_predictions(saved_unet, tmp_path, prediction):
    """A cosine schedule with v- or sample-prediction (refused before) loads as the tabulated cosine SDE, and
    the score is −ε̂/sigma with ε̂ = sigma x + alpha v̂ or (x − alpha x̂_0)/sigma from the UNet's own output."""
    unet, folder = saved_unet
    pipe = tmp_path / "pipe"
    (pipe / "unet").mkdir(parents=True)
    (pipe / "scheduler").mkdir()
    for name in ("config.json", "diffusion_pytorch_model.safetensors"):
        (pipe / "unet" / name).write_bytes((folder / name).read_bytes())
    (pipe / "scheduler" / "scheduler_config.json").write_text(json.dumps(
        {"_class_name": "DDIMScheduler", "beta_schedule": "squaredcos_cap_v2", "num_train_timesteps": 1000,
         "prediction_type": prediction}))
    model = load_diffusers_score(pipe, dtype=torch.float64)
    assert model.sde.name == "squaredcos_cap_v2" and model.net.schedule.prediction_type == prediction
    x = torch.randn(3, 1, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    t = torch.tensor([0.05, 0.4, 0.9], dtype=torch.float64)
    with torch.no_grad():
        out = unet.double()(x, t * 1000 - 1).sample
        s = model(x, t)
    alpha, sigma = (v[:, None, None, None] for v in model.sde.marginal(t))
    eps = sigma * x + alpha * out if prediction == "v_prediction" else (x - alpha * out) / sigma
    # diffusers' embedding runs in float32, ours in float64: float32 round-off of the time embedding
    torch.testing.assert_close(s, -eps / sigma, rtol=1e-5, atol=1e-5 * float((eps / sigma).abs().max()))
    # Can fail: the output read as ε is another field
    assert (s + out / sigma).abs().max() > 1e-2 * s.abs().max()


def test_residual_through_the_unet_forward_mode_and_double_backward(saved_unet):
    """∂_t s by forward mode equals a central difference; ∇(uᵀJu) (double backward through attention,
    one fixed Rademacher probe u) equals the central difference of uᵀJu along a direction; the
    unbiased residual runs and is finite."""
    _, folder = saved_unet
    model = load_diffusers_score(folder, dtype=torch.float64)
    sde = model.sde
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 1, 8, 8, dtype=torch.float64, generator=gen)
    t = torch.tensor([0.3005, 0.6005], dtype=torch.float64)  # mid-step: beta(t) jumps at the steps k/1000

    def probe():  # the same probe u at every call
        return Hutchinson(1, generator=torch.Generator().manual_seed(5))

    terms = score_fpe_terms(model, sde, x, t, divergence=probe())
    _, dt = ForwardModeDt()(model, x, t)
    torch.testing.assert_close(terms.dt_s, dt.detach(), rtol=0, atol=0)
    # t enters as k = 1000 t − 1 through sinusoids of frequency up to 1 in k: ∂³_t s ~ 1e9 |s|, so h = 1e-7
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
    for sde in (VESDE(), SubVPSDE(), VPSDE(), DDPMSchedule(beta_end=0.01).diffusers_schedule().sde()):
        with pytest.raises(DiffusersModelError, match=r"maps onto TabulatedVPSDE\(name='linear', N=1000.*got sde="
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
