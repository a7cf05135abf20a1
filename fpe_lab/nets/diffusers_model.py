r"""A pretrained diffusers ``UNet2DModel`` (a DDPM noise predictor) as a score under the VP SDE.

**The discrete model.** DDPM (Ho et al. 2020) with N steps and linear betas
β_k = β_start + k (β_end − β_start)/(N − 1), k = 0 … N − 1 (diffusers' 0-based timesteps), has

    x_k = sqrt(1 − β_k) x_{k−1} + sqrt(β_k) z_k,   so   x_k | x_data ~ N(sqrt(ᾱ_k) x_data, (1 − ᾱ_k) I),
    ᾱ_k = ∏_{j=0}^{k} (1 − β_j)   (diffusers' ``alphas_cumprod[k]``),

and the network ε̂(x, k) is trained to predict z in x = sqrt(ᾱ_k) x_data + sqrt(1 − ᾱ_k) z.

**The continuous limit** (Score SDE, Song et al. 2021, Sec. 3.4 and App. B). Put the N steps on
[0, 1] with width 1/N and define β̄(t) = N β(t (N − 1)), i.e. β̄(t) = beta_min + t (beta_max − beta_min)
with beta_min = N β_start, beta_max = N β_end (0.1 and 20 for 1e-4 … 0.02 over N = 1000). Then

    log ᾱ_k = Σ_{j≤k} log(1 − β_j) = −Σ_{j≤k} β_j + O(Σ β_j²) → −∫_0^{t_k} β̄(u) du = −B(t_k),

which is the VP SDE dx = −½β̄ x dt + sqrt(β̄) dw with alpha(t)² = e^{−B(t)}, sigma(t)² = 1 − e^{−B(t)}
(:class:`fpe_lab.sde.VPSDE`). So time t is network timestep k = t (N − 1) (the sinusoidal embedding
takes fractional k), and since E[z | x_t] = −sigma(t) ∇ log p_t, the score is

    s(x, t) = −ε̂(x, t (N − 1)) / sigma(t).

**How close.** At t_k = k/(N − 1), exactly (the sum of the linear betas in closed form),

    −log ᾱ_k − B(t_k) = E1 + E2,   E1 = (1 − t_k)(β_start + ½(β_end − β_start) t_k),
    E2 = Σ_{j≤k} (−log(1 − β_j) − β_j) ∈ [½ Σ β_j², ½ Σ β_j² / (1 − β_end)],

so E1 ≤ β_start + (β_end − β_start)/8 (a one-step offset: k + 1 discrete steps of width 1/N against
time k/(N − 1)) and E2 ≤ ½ Σ_j β_j² ≈ (1/2N) ∫ β̄² (0.067 at t = 1 for the default schedule); both
vanish like 1/N, and |alpha(t_k)² − ᾱ_k| = |sigma(t_k)² − (1 − ᾱ_k)| ≤ e^{−B}(E1 + E2). The map is not
exact at finite N: the continuous B is an integral, the discrete schedule a product. Near t = 0 the
one-step offset matters relative to sigma: sigma(0) = 0 while the first DDPM step already has noise
sqrt(β_start) = 0.01, and at t = 1e-3 (k ≈ 1) sigma² is about half the discrete 1 − ᾱ_1, so the
mapped score is off by up to ~√2 there; from k ≈ 10 (t ≈ 0.01) on, the mismatch is ≲ 5%.

**Loading.** Weights are read only from ``diffusion_pytorch_model.safetensors`` or, failing that,
``diffusion_pytorch_model.bin`` through ``torch.load(weights_only=True)``: nothing is ever unpickled
beyond tensors and plain containers, so a checkpoint cannot run code. The model is built from
``config.json`` (plain JSON) with ``UNet2DModel.from_config``.

**Differentiability.** The residual needs forward-mode AD in t and double backward in x. diffusers'
default attention (``scaled_dot_product_attention``) supports neither on CPU, so every attention
layer is switched to the classic ``AttnProcessor`` (explicit softmax(QKᵀ)V). GroupNorm's forward-mode
rule fails on non-contiguous tangents, so each GroupNorm gets a pre-hook making its input contiguous.
The positional time embedding is evaluated in the input's dtype (diffusers casts it to float32), and
for float64 the attention's upcast of QKᵀ and softmax to float32 (a safeguard for float16) is turned
off, so a float64 model is float64 end to end.

Time enters as k = (N − 1) t through sinusoids of frequency up to 1 in k, so ∂³_t s ~ N³ |s|: use the
exact forward-mode ∂_t (:class:`fpe_lab.fpe.ForwardModeDt`, the default); a central difference needs
h ≲ 1e-6 (``FiniteDifferenceDt``'s default h = 1e-3 was off by ~20% on a random tiny UNet).

diffusers and safetensors are optional: ``pip install -e ".[audit]"``.
"""

from __future__ import annotations

import json
import logging
import math
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fpe_lab.model import ScoreModel
from fpe_lab.sde import LinearSDE, VPSDE

__all__ = [
    "DDPMSchedule",
    "DiffusersModelError",
    "MissingDiffusersError",
    "DiffusersEpsNet",
    "load_diffusers_score",
    "find_unet_dir",
    "is_diffusers_model",
    "looks_like_diffusers",
    "AUDIT_EXTRA",
    "CONFIG_NAME",
    "SAFETENSORS_NAME",
    "BIN_NAME",
]

log = logging.getLogger(__name__)

AUDIT_EXTRA = 'pip install -e ".[audit]"'
CONFIG_NAME = "config.json"
SAFETENSORS_NAME = "diffusion_pytorch_model.safetensors"
BIN_NAME = "diffusion_pytorch_model.bin"
SCHEDULER_CONFIG_NAME = "scheduler_config.json"


class MissingDiffusersError(ImportError):
    """diffusers or safetensors is not installed (the optional ``audit`` extra)."""


class DiffusersModelError(ValueError):
    """The folder is not a usable diffusers UNet2DModel, or it does not fit the request."""


def _require_diffusers():
    """(UNet2DModel, Attention, AttnProcessor), or :class:`MissingDiffusersError` naming the extra."""
    try:
        from diffusers import UNet2DModel
        from diffusers.models.attention_processor import Attention, AttnProcessor
    except ImportError as e:
        raise MissingDiffusersError(
            f"reading a diffusers model needs the optional packages diffusers and safetensors: {AUDIT_EXTRA}"
        ) from e
    return UNet2DModel, Attention, AttnProcessor


# ---------------------------------------------------------------------- the schedule
@dataclass(frozen=True)
class DDPMSchedule:
    """Linear DDPM betas β_k = beta_start + k (beta_end − beta_start)/(n_steps − 1), k = 0 … n_steps − 1.

    :meth:`vp_sde` is its continuous limit VPSDE(n_steps·beta_start, n_steps·beta_end) and
    :meth:`timestep` the network input t·(n_steps − 1) (module docstring).
    """

    beta_start: float = 1e-4
    beta_end: float = 0.02
    n_steps: int = 1000

    def __post_init__(self) -> None:
        if isinstance(self.n_steps, bool) or not isinstance(self.n_steps, int) or self.n_steps < 2:
            raise ValueError(f"n_steps must be an int >= 2; got {self.n_steps!r}")
        for name in ("beta_start", "beta_end"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not (0 < v < 1):
                raise ValueError(f"{name} must be a number in (0, 1); got {v!r}")
        if self.beta_end < self.beta_start:
            raise ValueError(f"beta_end must be >= beta_start; got beta_start={self.beta_start}, beta_end={self.beta_end}")

    @classmethod
    def from_scheduler_config(cls, config: dict[str, Any], where: str = "scheduler config") -> DDPMSchedule:
        """The schedule of a diffusers DDPM/DDIM ``scheduler_config.json``; only linear betas with
        epsilon prediction map onto the VP SDE (anything else is a :class:`DiffusersModelError`)."""
        kind = config.get("beta_schedule", "linear")
        if kind != "linear" or config.get("trained_betas") is not None:
            raise DiffusersModelError(
                f"{where}: beta_schedule {kind!r} (trained_betas {'set' if config.get('trained_betas') is not None else 'unset'}) "
                "does not map onto the VP SDE; only linear betas do"
            )
        pred = config.get("prediction_type", "epsilon")
        if pred != "epsilon":
            raise DiffusersModelError(f"{where}: prediction_type {pred!r}; only 'epsilon' (noise prediction) is supported")
        try:
            return cls(float(config.get("beta_start", 1e-4)), float(config.get("beta_end", 0.02)),
                       int(config.get("num_train_timesteps", 1000)))
        except (TypeError, ValueError) as e:
            raise DiffusersModelError(f"{where}: {e}") from None

    def betas(self) -> torch.Tensor:
        """β_k, float64 (n_steps,)."""
        return torch.linspace(self.beta_start, self.beta_end, self.n_steps, dtype=torch.float64)

    def alphas_cumprod(self) -> torch.Tensor:
        """ᾱ_k = ∏_{j≤k} (1 − β_j), float64 (n_steps,)."""
        return torch.cumprod(1.0 - self.betas(), 0)

    def vp_sde(self) -> VPSDE:
        """The continuous limit: VPSDE(beta_min = N β_start, beta_max = N β_end)."""
        return VPSDE(beta_min=self.n_steps * self.beta_start, beta_max=self.n_steps * self.beta_end)

    def timestep(self, t: torch.Tensor) -> torch.Tensor:
        """Network timestep k = t (N − 1) for t in [0, 1] (fractional), same shape and dtype as t."""
        return t * (self.n_steps - 1)

    def log_alpha_bound(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Bounds (lo_k, hi_k) on −log ᾱ_k − B(t_k) at t_k = k/(N − 1): E1 + ½Σβ² and E1 + ½Σβ²/(1 − β_end)
        (module docstring), float64 (n_steps,)."""
        t = torch.arange(self.n_steps, dtype=torch.float64) / (self.n_steps - 1)
        e1 = (1 - t) * (self.beta_start + 0.5 * (self.beta_end - self.beta_start) * t)
        half_sq = 0.5 * torch.cumsum(self.betas() ** 2, 0)
        return e1 + half_sq, e1 + half_sq / (1 - self.beta_end)


# ---------------------------------------------------------------------- the network
class _PositionalTimesteps(nn.Module):
    """The DDPM sinusoidal embedding of diffusers' ``Timesteps``, computed in the timesteps' dtype.

    emb = [sin(k ω_i), cos(k ω_i)] (or cos first), ω_i = exp(−ln(10⁴) i / (half − shift)), i < half = C/2,
    scaled by ``scale``; zero-padded when C is odd.
    """

    def __init__(self, num_channels: int, flip_sin_to_cos: bool, downscale_freq_shift: float, scale: float = 1.0):
        super().__init__()
        self.num_channels = num_channels
        self.flip_sin_to_cos = flip_sin_to_cos
        self.downscale_freq_shift = downscale_freq_shift
        self.scale = scale

    def forward(self, timesteps: torch.Tensor) -> torch.Tensor:
        dtype = timesteps.dtype if timesteps.is_floating_point() else torch.float32
        half = self.num_channels // 2
        i = torch.arange(half, dtype=dtype, device=timesteps.device)
        freqs = torch.exp(-math.log(10000.0) * i / (half - self.downscale_freq_shift))
        arg = self.scale * timesteps.to(dtype)[:, None] * freqs[None, :]
        emb = torch.cat([torch.sin(arg), torch.cos(arg)], dim=-1)
        if self.flip_sin_to_cos:
            emb = torch.cat([emb[:, half:], emb[:, :half]], dim=-1)
        if self.num_channels % 2:
            emb = nn.functional.pad(emb, (0, 1))
        return emb


def _contiguous_input(module: nn.Module, args: tuple) -> tuple:
    return tuple(a.contiguous() if isinstance(a, torch.Tensor) else a for a in args)


class DiffusersEpsNet(nn.Module):
    """n(x, t) = ε̂(x, t (N − 1)) of a diffusers UNet2DModel, x of shape (b, C, H, W), t of shape (b,).

    Wrap it in :class:`fpe_lab.model.ScoreModel` with the schedule's VP SDE for the score
    −n/sigma(t) (:func:`load_diffusers_score` does).
    """

    def __init__(self, unet: nn.Module, schedule: DDPMSchedule) -> None:
        super().__init__()
        self.unet = unet
        self.schedule = schedule
        cfg = unet.config
        size = cfg.sample_size
        h, w = (size, size) if isinstance(size, int) else tuple(size)
        self.image_shape: tuple[int, int, int] = (int(cfg.in_channels), int(h), int(w))

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or tuple(x.shape[1:]) != self.image_shape:
            c, h, w = self.image_shape
            raise DiffusersModelError(
                f"the diffusers model takes images of shape (b, {c}, {h}, {w}) (in_channels={c}, sample_size={h}×{w}); "
                f"got x of shape {tuple(x.shape)}"
            )
        return self.unet(x, self.schedule.timestep(t)).sample


# ---------------------------------------------------------------------- finding and loading
def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DiffusersModelError(f"cannot read {path} as JSON: {e}") from None
    if not isinstance(data, dict):
        raise DiffusersModelError(f"{path}: expected a JSON object; got {type(data).__name__}")
    return data


def _class_name(d: Path) -> str | None:
    """The ``_class_name`` of ``d/config.json`` (diffusers writes it), or None."""
    try:
        data = json.loads((d / CONFIG_NAME).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    name = data.get("_class_name") if isinstance(data, dict) else None
    return name if isinstance(name, str) else None


def _has_weights(d: Path) -> bool:
    return (d / SAFETENSORS_NAME).is_file() or (d / BIN_NAME).is_file()


def looks_like_diffusers(path: str | Path) -> bool:
    """Whether ``path`` (or ``path/unet``) has a diffusers ``config.json`` (one with ``_class_name``),
    usable or not; :func:`find_unet_dir` then says what is wrong with it."""
    p = Path(path)
    return _class_name(p) is not None or _class_name(p / "unet") is not None


def find_unet_dir(path: str | Path) -> tuple[Path, Path | None]:
    """(folder holding the UNet2DModel's config and weights, scheduler config or None).

    ``path`` is either the UNet folder itself (``save_pretrained`` layout: ``config.json`` with
    ``"_class_name": "UNet2DModel"`` and ``diffusion_pytorch_model.safetensors`` or ``.bin``) or a
    pipeline folder with ``unet/`` (and optionally ``scheduler/scheduler_config.json``); a
    ``scheduler_config.json`` beside the UNet's own config also counts.
    """
    p = Path(path)
    for d in (p, p / "unet"):
        name = _class_name(d)
        if name is None:
            continue
        if name != "UNet2DModel":
            raise DiffusersModelError(f"{d / CONFIG_NAME} describes a diffusers {name}; only UNet2DModel (unconditional DDPM) is supported")
        if not _has_weights(d):
            raise DiffusersModelError(f"{d} has a UNet2DModel {CONFIG_NAME} but no weights ({SAFETENSORS_NAME} or {BIN_NAME})")
        if d == p:
            for sched in (p / SCHEDULER_CONFIG_NAME, p.parent / "scheduler" / SCHEDULER_CONFIG_NAME):
                if sched.is_file() and (sched.parent == p or p.name == "unet"):
                    return p, sched
            return p, None
        sched = p / "scheduler" / SCHEDULER_CONFIG_NAME
        return d, sched if sched.is_file() else None
    raise DiffusersModelError(
        f"{p} is not a diffusers UNet2DModel folder: expected {CONFIG_NAME} with \"_class_name\": \"UNet2DModel\" "
        f"and {SAFETENSORS_NAME} (or {BIN_NAME}), directly or in a unet/ subfolder"
    )


def is_diffusers_model(path: str | Path) -> bool:
    """Whether :func:`find_unet_dir` accepts ``path``."""
    try:
        find_unet_dir(path)
    except DiffusersModelError:
        return False
    return True


def _load_state_dict(folder: Path) -> dict[str, torch.Tensor]:
    """Tensors only: safetensors, else ``torch.load(weights_only=True)`` (never arbitrary unpickling)."""
    st = folder / SAFETENSORS_NAME
    if st.is_file():
        try:
            from safetensors.torch import load_file
        except ImportError as e:
            raise MissingDiffusersError(f"reading {st} needs the optional package safetensors: {AUDIT_EXTRA}") from e
        try:
            return load_file(str(st), device="cpu")
        except Exception as e:  # safetensors raises its own SafetensorError for corrupt files
            raise DiffusersModelError(f"cannot read {st} as safetensors: {e}") from None
    path = folder / BIN_NAME
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, AttributeError, TypeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DiffusersModelError(
            f"refusing to load {path}: it is not a plain tensor state dict (torch.load with weights_only=True "
            f"rejected it: {first}); convert the weights to {SAFETENSORS_NAME}"
        ) from None
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise DiffusersModelError(f"{path}: expected a dict of parameter name → tensor; got {type(state).__name__}")
    return state


def _check_config(cfg: dict[str, Any], where: Path) -> None:
    emb = cfg.get("time_embedding_type", "positional")
    if emb != "positional":
        raise DiffusersModelError(
            f"{where}: time_embedding_type {emb!r} (a VE / NCSN++ model) cannot use the DDPM → VP mapping, "
            "which needs a 'positional' (DDPM) time embedding"
        )
    if cfg.get("num_class_embeds") is not None or cfg.get("class_embed_type") is not None:
        raise DiffusersModelError(f"{where}: a class-conditional model (num_class_embeds/class_embed_type set); only unconditional ones are supported")
    c_in, c_out = cfg.get("in_channels", 3), cfg.get("out_channels", 3)
    if c_out != c_in:
        raise DiffusersModelError(f"{where}: out_channels {c_out} != in_channels {c_in}; a noise predictor returns the input's shape")


def _same_vp(sde: Any, vp: VPSDE) -> bool:
    """Same VP SDE up to float64 round-off of N·beta (1e-12 relative)."""
    return (type(sde) is VPSDE and math.isclose(sde.beta_min, vp.beta_min, rel_tol=1e-12)
            and math.isclose(sde.beta_max, vp.beta_max, rel_tol=1e-12))


def load_diffusers_score(
    path: str | Path,
    *,
    sde: LinearSDE | None = None,
    schedule: DDPMSchedule | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> ScoreModel:
    """The score s(x, t) = −ε̂(x, t (N − 1))/sigma(t) of a diffusers UNet2DModel folder under the VP SDE.

    Args:
        path: a UNet folder or a pipeline folder (:func:`find_unet_dir`).
        schedule: the DDPM betas; default from the pipeline's ``scheduler/scheduler_config.json`` when
            present, else ``DDPMSchedule()`` (1e-4 … 0.02 over 1000 steps).
        sde: the SDE the caller wants; must be the schedule's continuous limit ``schedule.vp_sde()``
            (any other SDE is a :class:`DiffusersModelError` naming both). Default: that VP SDE.
        dtype, device: where the network runs.

    Returns a :class:`fpe_lab.model.ScoreModel` in eval mode (``.sde`` the VP SDE; ``.net`` a
    :class:`DiffusersEpsNet` with ``image_shape`` (C, H, W)); score_fn(x: (b, C, H, W), t: (b,)).
    Raises :class:`MissingDiffusersError` without diffusers, :class:`DiffusersModelError` for an
    unusable folder or an SDE the DDPM mapping does not give.
    """
    unet_cls, attention_cls, attn_processor_cls = _require_diffusers()
    folder, sched_path = find_unet_dir(path)
    if schedule is None:
        schedule = (DDPMSchedule.from_scheduler_config(_read_json(sched_path), str(sched_path))
                    if sched_path is not None else DDPMSchedule())
    vp = schedule.vp_sde()
    if sde is not None and not _same_vp(sde, vp):
        raise DiffusersModelError(
            f"the DDPM checkpoint {folder} maps onto {vp!r} (its continuous limit, {schedule}); got sde={sde!r}"
        )
    cfg = _read_json(folder / CONFIG_NAME)
    _check_config(cfg, folder / CONFIG_NAME)
    state = _load_state_dict(folder)
    try:
        unet = unet_cls.from_config(cfg)
    except Exception as e:  # diffusers raises several types for a bad config
        raise DiffusersModelError(f"{folder / CONFIG_NAME}: cannot build a UNet2DModel: {e}") from None
    try:
        missing, unexpected = unet.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shape mismatches
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        raise DiffusersModelError(f"{folder}: the weights do not fit config.json: {lines[1] if len(lines) > 1 else lines[0]}") from None
    if missing or unexpected:
        raise DiffusersModelError(
            f"{folder}: the weights do not fit config.json: {len(missing)} missing keys"
            f"{f' (e.g. {missing[0]})' if missing else ''}, {len(unexpected)} unexpected keys"
            f"{f' (e.g. {unexpected[0]})' if unexpected else ''}"
        )
    for m in unet.modules():
        if isinstance(m, attention_cls):
            m.set_processor(attn_processor_cls())
            if dtype == torch.float64:  # the fp16 safeguard would compute float64 scores in float32
                m.upcast_attention = m.upcast_softmax = False
        if isinstance(m, nn.GroupNorm):
            m.register_forward_pre_hook(_contiguous_input)
    tp = unet.time_proj
    unet.time_proj = _PositionalTimesteps(tp.num_channels, tp.flip_sin_to_cos, tp.downscale_freq_shift,
                                          getattr(tp, "scale", 1.0))
    model = ScoreModel(DiffusersEpsNet(unet, schedule), vp).to(device=device, dtype=dtype).eval()
    model.requires_grad_(False)
    log.info("loaded diffusers UNet2DModel %s (%d parameters) as the score of %s", folder,
             sum(p.numel() for p in unet.parameters()), vp)
    return model
