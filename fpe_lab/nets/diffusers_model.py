r"""A pretrained diffusers ``UNet2DModel`` as a score under the VP SDE of its own discrete schedule.

**The mapping** (derivation: docs/derivations.md#the-diffusers-mapping). A diffusers scheduler with N
training steps has ᾱ_k = ``alphas_cumprod[k]``, k = 0 … N − 1, and trains x_k = sqrt(ᾱ_k) x_0 +
sqrt(1 − ᾱ_k) ε. Step k is put at t_k = (k + 1)/N and log ᾱ is interpolated linearly in t
(:class:`fpe_lab.sde.TabulatedVPSDE`: exact at every step, any ``beta_schedule`` — linear,
scaled_linear, squaredcos_cap_v2, sigmoid, laplace — or ``trained_betas``), so

    alpha(t) = sqrt(ᾱ(t)),  sigma(t) = sqrt(1 − ᾱ(t)),  network timestep k = N t − 1 (fractional),
    x_t = alpha x_0 + sigma ε,   v = alpha ε − sigma x_0   (diffusers' convention),
    ε̂ = network output                          (prediction_type "epsilon"),
    ε̂ = sigma x_t + alpha v̂                      ("v_prediction"; alpha² + sigma² = 1),
    ε̂ = (x_t − alpha x̂_0)/sigma                  ("sample"),
    s(x, t) = −ε̂/sigma(t).

The network was trained at k ≥ 0 only, i.e. t ≥ 1/N.

**Loading.** Weights are read only from ``diffusion_pytorch_model.safetensors`` or, failing that,
``diffusion_pytorch_model.bin`` through ``torch.load(weights_only=True)``: nothing is ever unpickled
beyond tensors and plain containers, so a checkpoint cannot run code. The model is built from
``config.json`` (plain JSON) with ``UNet2DModel.from_config``; the schedule from the pipeline's
``scheduler/scheduler_config.json`` (plain JSON; only the betas and ``prediction_type`` are read).

**Differentiability.** The residual needs forward-mode AD in t and double backward in x. diffusers'
default attention (``scaled_dot_product_attention``) supports neither on CPU, so every attention
layer is switched to the classic ``AttnProcessor`` (explicit softmax(QKᵀ)V). GroupNorm's forward-mode
rule fails on non-contiguous tangents, so each GroupNorm gets a pre-hook making its input contiguous.
The positional time embedding is evaluated in the input's dtype (diffusers casts it to float32), and
for float64 the attention's upcast of QKᵀ and softmax to float32 (a safeguard for float16) is turned
off, so a float64 model is float64 end to end.

Time enters as k = N t − 1 through sinusoids of frequency up to 1 in k, so ∂³_t s ~ N³ |s|: use the
exact forward-mode ∂_t (:class:`fpe_lab.fpe.ForwardModeDt`, the default); a central difference needs
h ≲ 1e-6 (``FiniteDifferenceDt``'s default h = 1e-3 was off by ~20% on a random tiny UNet), and must
not straddle a step t_k, where beta(t) jumps.

diffusers and safetensors are optional: ``pip install -e ".[audit]"``.
"""

from __future__ import annotations

import json
import logging
import math
import pickle
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, cast

import torch
from torch import nn

from fpe_lab.model import ScoreModel
from fpe_lab.sde import LinearSDE, TabulatedVPSDE, VPSDE
from fpe_lab.shapes import append_dims

__all__ = [
    "DDPMSchedule",
    "DiffusersSchedule",
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
    "PREDICTION_TYPES",
    "BETA_SCHEDULES",
]

log = logging.getLogger(__name__)

AUDIT_EXTRA = 'pip install -e ".[audit]"'
CONFIG_NAME = "config.json"
SAFETENSORS_NAME = "diffusion_pytorch_model.safetensors"
BIN_NAME = "diffusion_pytorch_model.bin"
SCHEDULER_CONFIG_NAME = "scheduler_config.json"
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid", "laplace")


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


# ---------------------------------------------------------------------- the schedules
class _UNetConfig(Protocol):
    """What :class:`DiffusersEpsNet` reads of a UNet2DModel's ``config`` (diffusers' FrozenDict, keys as attributes)."""

    sample_size: int | tuple[int, int] | list[int]
    in_channels: int


def _betas(kind: str, n: int, beta_start: float, beta_end: float) -> torch.Tensor:
    """diffusers' ``beta_schedule`` formulas (DDPMScheduler, diffusers 0.42), in float64."""
    k = torch.arange(n, dtype=torch.float64)
    if kind == "linear":
        return torch.linspace(beta_start, beta_end, n, dtype=torch.float64)
    if kind == "scaled_linear":
        return torch.linspace(beta_start**0.5, beta_end**0.5, n, dtype=torch.float64) ** 2
    if kind == "sigmoid":
        return torch.sigmoid(torch.linspace(-6, 6, n, dtype=torch.float64)) * (beta_end - beta_start) + beta_start

    if kind == "squaredcos_cap_v2":  # 1 − ᾱ((i+1)/N)/ᾱ(i/N), ᾱ(t) = cos²((t + 0.008)/1.008 · π/2), capped at 0.999
        def alpha_bar(t):
            return torch.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
    else:  # laplace
        def alpha_bar(t):
            lmb = -0.5 * torch.sign(0.5 - t) * torch.log(1 - 2 * torch.abs(0.5 - t) + 1e-6)
            return torch.sqrt(torch.exp(lmb) / (1 + torch.exp(lmb)))
    return torch.clamp(1 - alpha_bar((k + 1) / n) / alpha_bar(k / n), max=0.999)


class _ScheduleSDE:
    """The SDE :class:`DiffusersSchedule` sets in ``__post_init__``, declared on a plain class so that the
    dataclass does not take it for a field."""

    _sde: TabulatedVPSDE


@dataclass(frozen=True, repr=False)
class DiffusersSchedule(_ScheduleSDE):
    """A diffusers training schedule: ᾱ_k (``alphas_cumprod``, float64) and what the network predicts.

    :meth:`sde` is its :class:`~fpe_lab.sde.TabulatedVPSDE` and :meth:`timestep` the network input
    k = N t − 1 (module docstring).
    """

    alphas_cumprod: tuple[float, ...]
    prediction_type: str = "epsilon"
    beta_schedule: str = "table"

    def __post_init__(self) -> None:
        if self.prediction_type not in PREDICTION_TYPES:
            raise DiffusersModelError(f"prediction_type must be one of {', '.join(PREDICTION_TYPES)}; "
                                      f"got {self.prediction_type!r}")
        object.__setattr__(self, "alphas_cumprod", tuple(float(v) for v in self.alphas_cumprod))
        try:
            sde = TabulatedVPSDE.from_alphas_cumprod(self.alphas_cumprod, self.beta_schedule)
        except ValueError as e:
            raise DiffusersModelError(f"alphas_cumprod of the {self.beta_schedule} schedule: {e}") from None
        object.__setattr__(self, "_sde", sde)

    @classmethod
    def from_betas(cls, betas, prediction_type: str = "epsilon", beta_schedule: str = "table") -> DiffusersSchedule:
        """ᾱ_k = ∏_{j≤k} (1 − β_j) from the betas (any sequence or tensor; float64)."""
        b = torch.as_tensor(betas, dtype=torch.float64).reshape(-1)
        if b.numel() < 2 or not bool(((b > 0) & (b < 1)).all()):
            raise DiffusersModelError(f"betas must be at least 2 numbers in (0, 1); got {b.numel()} with range "
                                      f"[{float(b.min()) if b.numel() else float('nan'):.3g}, "
                                      f"{float(b.max()) if b.numel() else float('nan'):.3g}]")
        return cls(tuple(float(v) for v in torch.cumprod(1 - b, 0)), prediction_type, beta_schedule)

    @classmethod
    def from_scheduler_config(cls, config: dict[str, Any], where: str = "scheduler config") -> DiffusersSchedule:
        """The schedule of a diffusers ``scheduler_config.json`` (DDPM, DDIM, …): ``trained_betas`` or
        ``beta_schedule`` with ``beta_start``, ``beta_end``, ``num_train_timesteps``, and ``prediction_type``
        (defaults as diffusers'). A zero terminal SNR (``rescale_betas_zero_snr``) has ᾱ_{N−1} = 0 and no
        VP SDE with finite log ᾱ: a :class:`DiffusersModelError`, like an unknown schedule or prediction."""
        pred = config.get("prediction_type", "epsilon")
        if pred not in PREDICTION_TYPES:
            raise DiffusersModelError(f"{where}: prediction_type {pred!r}; supported: {', '.join(PREDICTION_TYPES)}")
        if config.get("rescale_betas_zero_snr"):
            raise DiffusersModelError(f"{where}: rescale_betas_zero_snr makes ᾱ = 0 at the last step (zero terminal "
                                      "SNR), where log ᾱ and the tabulated VP SDE are undefined; not supported")
        trained = config.get("trained_betas")
        try:
            if trained is not None:
                return cls.from_betas(trained, pred, "trained_betas")
            kind = config.get("beta_schedule", "linear")
            if kind not in BETA_SCHEDULES:
                raise DiffusersModelError(f"{where}: beta_schedule {kind!r}; supported: {', '.join(BETA_SCHEDULES)} "
                                          "or trained_betas")
            n = config.get("num_train_timesteps", 1000)
            if isinstance(n, bool) or not isinstance(n, int) or n < 2:
                raise DiffusersModelError(f"{where}: num_train_timesteps must be an int >= 2; got {n!r}")
            betas = _betas(kind, n, float(config.get("beta_start", 1e-4)), float(config.get("beta_end", 0.02)))
            return cls.from_betas(betas, pred, kind)
        except (TypeError, ValueError) as e:
            if isinstance(e, DiffusersModelError) and str(e).startswith(where):
                raise
            raise DiffusersModelError(f"{where}: {e}") from None

    @property
    def n_steps(self) -> int:
        return len(self.alphas_cumprod)

    def sde(self) -> TabulatedVPSDE:
        """The VP SDE with log ᾱ piecewise linear through ((k + 1)/N, log ᾱ_k)."""
        return self._sde

    def timestep(self, t: torch.Tensor) -> torch.Tensor:
        """Network timestep k = N t − 1 for t in [0, 1] (fractional), same shape and dtype as t."""
        return t * self.n_steps - 1

    def __repr__(self) -> str:
        return (f"DiffusersSchedule(beta_schedule={self.beta_schedule!r}, N={self.n_steps}, "
                f"prediction_type={self.prediction_type!r})")


@dataclass(frozen=True)
class DDPMSchedule:
    """Linear DDPM betas β_k = beta_start + k (beta_end − beta_start)/(n_steps − 1), k = 0 … n_steps − 1.

    :meth:`diffusers_schedule` is its table (what :func:`load_diffusers_score` uses); :meth:`vp_sde` is
    the closed-form continuous limit VPSDE(n_steps·beta_start, n_steps·beta_end) with the time map
    :meth:`timestep` = t·(n_steps − 1), off by O(1/N) (:meth:`log_alpha_bound`;
    docs/derivations.md#the-diffusers-mapping).
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
            raise ValueError(
                f"beta_end must be >= beta_start; got beta_start={self.beta_start}, beta_end={self.beta_end}"
            )

    def betas(self) -> torch.Tensor:
        """β_k, float64 (n_steps,)."""
        return torch.linspace(self.beta_start, self.beta_end, self.n_steps, dtype=torch.float64)

    def alphas_cumprod(self) -> torch.Tensor:
        """ᾱ_k = ∏_{j≤k} (1 − β_j), float64 (n_steps,)."""
        return torch.cumprod(1.0 - self.betas(), 0)

    def diffusers_schedule(self, prediction_type: str = "epsilon") -> DiffusersSchedule:
        """The table of these betas as a :class:`DiffusersSchedule`."""
        return DiffusersSchedule.from_betas(self.betas(), prediction_type, "linear")

    def vp_sde(self) -> VPSDE:
        """The continuous limit: VPSDE(beta_min = N β_start, beta_max = N β_end)."""
        return VPSDE(beta_min=self.n_steps * self.beta_start, beta_max=self.n_steps * self.beta_end)

    def timestep(self, t: torch.Tensor) -> torch.Tensor:
        """The continuous limit's network timestep k = t (N − 1) for t in [0, 1], same shape and dtype as t."""
        return t * (self.n_steps - 1)

    def log_alpha_bound(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Bounds (lo_k, hi_k) on −log ᾱ_k − B(t_k) at t_k = k/(N − 1): E1 + ½Σβ² and E1 + ½Σβ²/(1 − β_end)
        (docs/derivations.md#the-diffusers-mapping), float64 (n_steps,)."""
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
    """n(x, t) = ε̂(x, t): the noise the UNet2DModel's output stands for, at network timestep k = N t − 1.

    x of shape (b, C, H, W), t of shape (b,). With alpha, sigma the marginal of the schedule's
    :class:`~fpe_lab.sde.TabulatedVPSDE` at t: ε̂ = output ("epsilon"), sigma x + alpha output
    ("v_prediction"), (x − alpha output)/sigma ("sample"). Wrap it in :class:`fpe_lab.model.ScoreModel`
    with that SDE for the score −n/sigma(t) (:func:`load_diffusers_score` does).
    """

    def __init__(self, unet: nn.Module, schedule: DiffusersSchedule) -> None:
        super().__init__()
        self.unet = unet
        self.schedule = schedule
        self.sde = schedule.sde()
        cfg = cast(_UNetConfig, unet.config)
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
        out = self.unet(x, self.schedule.timestep(t)).sample
        kind = self.schedule.prediction_type
        if kind == "epsilon":
            return out
        alpha, sigma = (append_dims(v.to(x.dtype), x.ndim) for v in self.sde.marginal(t))
        if kind == "v_prediction":  # v = alpha ε − sigma x_0 and x = alpha x_0 + sigma ε
            return sigma * x + alpha * out
        return (x - alpha * out) / sigma  # "sample": out = x̂_0


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
            raise DiffusersModelError(
                f"{d / CONFIG_NAME} describes a diffusers {name}; only UNet2DModel (unconditional DDPM) is supported"
            )
        if not _has_weights(d):
            raise DiffusersModelError(
                f"{d} has a UNet2DModel {CONFIG_NAME} but no weights ({SAFETENSORS_NAME} or {BIN_NAME})"
            )
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
        with warnings.catch_warnings():
            # torch notes a pickle protocol its safe unpickler may not support; the file is refused or read anyway
            warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
            state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, AttributeError, TypeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DiffusersModelError(
            f"refusing to load {path}: it is not a plain tensor state dict (torch.load with weights_only=True "
            f"rejected it: {first}); convert the weights to {SAFETENSORS_NAME}"
        ) from None
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
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
        raise DiffusersModelError(
            f"{where}: a class-conditional model (num_class_embeds/class_embed_type set); "
            "only unconditional ones are supported"
        )
    c_in, c_out = cfg.get("in_channels", 3), cfg.get("out_channels", 3)
    if c_out != c_in:
        raise DiffusersModelError(
            f"{where}: out_channels {c_out} != in_channels {c_in}; a noise predictor returns the input's shape"
        )


def load_diffusers_score(
    path: str | Path,
    *,
    sde: LinearSDE | None = None,
    schedule: DiffusersSchedule | DDPMSchedule | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> ScoreModel:
    """The score s(x, t) = −ε̂(x, t)/sigma(t) of a diffusers UNet2DModel folder under the VP SDE of its schedule.

    Args:
        path: a UNet folder or a pipeline folder (:func:`find_unet_dir`).
        schedule: the training schedule; default from the pipeline's ``scheduler/scheduler_config.json``
            when present (:meth:`DiffusersSchedule.from_scheduler_config`: any beta_schedule, trained
            betas, epsilon / v / sample prediction), else DDPM's linear 1e-4 … 0.02 over 1000 steps with
            epsilon prediction. A :class:`DDPMSchedule` stands for its table with epsilon prediction.
        sde: the SDE the caller wants; must be the schedule's ``TabulatedVPSDE`` (any other SDE is a
            :class:`DiffusersModelError` naming both). Default: that SDE.
        dtype, device: where the network runs.

    Returns a :class:`fpe_lab.model.ScoreModel` in eval mode (``.sde`` the :class:`~fpe_lab.sde.TabulatedVPSDE`;
    ``.net`` a :class:`DiffusersEpsNet` with ``image_shape`` (C, H, W) and ``schedule``);
    score_fn(x: (b, C, H, W), t: (b,)). Raises :class:`MissingDiffusersError` without diffusers,
    :class:`DiffusersModelError` for an unusable folder, schedule or SDE.
    """
    unet_cls, attention_cls, attn_processor_cls = _require_diffusers()
    folder, sched_path = find_unet_dir(path)
    if schedule is None:
        schedule = (DiffusersSchedule.from_scheduler_config(_read_json(sched_path), str(sched_path))
                    if sched_path is not None else DDPMSchedule().diffusers_schedule())
    elif isinstance(schedule, DDPMSchedule):
        schedule = schedule.diffusers_schedule()
    elif not isinstance(schedule, DiffusersSchedule):
        raise DiffusersModelError(
            f"schedule must be a DiffusersSchedule or DDPMSchedule; got {type(schedule).__name__}")
    vp = schedule.sde()
    if sde is not None and sde != vp:
        raise DiffusersModelError(
            f"the diffusers model {folder} maps onto {vp!r} (its {schedule!r}); got sde={sde!r}"
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
        detail = lines[1] if len(lines) > 1 else lines[0]
        raise DiffusersModelError(f"{folder}: the weights do not fit config.json: {detail}") from None
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
    log.info("loaded diffusers UNet2DModel %s (%d parameters, %s prediction) as the score of %r", folder,
             sum(p.numel() for p in unet.parameters()), schedule.prediction_type, vp)
    return model
