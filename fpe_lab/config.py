"""Run configurations: frozen dataclasses with validation, JSON round trip, and the objects they build.

``Toy2dConfig()`` is the ``toy2d`` preset (see :func:`toy2d`). Choices are enums; strings from the
CLI are converted by the command with an explicit ``match`` or ``Enum(value)``. Objects (SDE, data,
model, loss) are built here by explicit ``match`` — no registries.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import logging
import math
import typing
from dataclasses import dataclass
from typing import Any

import torch

from fpe_lab.fpe import FiniteDifferenceDt, ForwardModeDt, Probe
from fpe_lab.losses import DSMWeighting, FPEPoints, FPERegularizer, FPEWeighting, ResidualFn, ScoreFPELoss
from fpe_lab.nets.unet import UNetConfig, UNetSize
from fpe_lab.sde import LinearSDE, SubVPSDE, VESDE, VPSDE

__all__ = [
    "SDEKind",
    "Regularizer",
    "ToyData",
    "DeviceChoice",
    "ResidualPath",
    "Toy2dConfig",
    "toy2d",
    "ImageData",
    "TimeDerivativeKind",
    "ImageConfig",
    "cifar10",
    "digits",
    "build_sde",
    "build_data",
    "build_model",
    "build_loss",
    "residual_function",
    "resolve_device",
]

log = logging.getLogger(__name__)


class SDEKind(enum.Enum):
    VE = "ve"
    VP = "vp"
    SUBVP = "subvp"


class Regularizer(enum.Enum):
    NONE = "none"  # plain DSM
    FPE = "fpe"  # DSM + lam · E w(t) ‖R_θ‖²


class ToyData(enum.Enum):
    """The 2-D data sets of ``fpe_lab.data.toy`` (value = its name there)."""

    CHECKERBOARD = "checkerboard"
    EIGHT_GAUSSIANS = "8gaussians"
    GMM = "gmm"
    RINGS = "rings"
    MOONS = "moons"
    SWISSROLL = "swissroll"
    PINWHEEL = "pinwheel"


class DeviceChoice(enum.Enum):
    AUTO = "auto"  # cuda if available, else cpu
    CPU = "cpu"
    CUDA = "cuda"


class ResidualPath(enum.Enum):
    """How R_θ is differentiated during training."""

    GENERIC = "generic"  # fpe_lab.fpe.score_fpe_residual: autograd, any network
    JET = "jet"  # fpe_lab.nets.jet: one Taylor-mode pass through the MLP (falls back to GENERIC if absent)


class _JSONConfig:
    """JSON round trip and enum checks shared by the frozen run configs (enums stored as their values)."""

    def _check_enums(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            kind, v = hints[f.name], getattr(self, f.name)
            if isinstance(kind, type) and issubclass(kind, enum.Enum) and not isinstance(v, kind):
                raise ValueError(f"{f.name} must be a {kind.__name__} (one of {[m.value for m in kind]}); got {v!r}")

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict: enums become their values, tuples lists."""
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]):
        """Inverse of :meth:`to_dict`; unknown keys are an error, missing keys take the defaults."""
        if not isinstance(d, dict):
            raise ValueError(f"config must be a JSON object; got {type(d).__name__}")
        hints = typing.get_type_hints(cls)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown config keys {unknown} for {cls.__name__}; allowed: {sorted(names)}")
        kwargs = {}
        for k, v in d.items():
            kind = hints[k]
            if isinstance(kind, type) and issubclass(kind, enum.Enum):
                try:
                    v = kind(v)
                except ValueError:
                    raise ValueError(f"{k} must be one of {[m.value for m in kind]}; got {v!r}") from None
            elif typing.get_origin(kind) is tuple and isinstance(v, list):
                v = tuple(v)
            kwargs[k] = v
        return cls(**kwargs)

    @classmethod
    def from_json(cls, text: str):
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"config is not valid JSON: {e}") from None
        return cls.from_dict(d)

    def replace(self, **changes: Any):
        return dataclasses.replace(self, **changes)


def _check_int(name: str, v: Any, lo: int) -> None:
    if not (isinstance(v, int) and not isinstance(v, bool) and v >= lo):
        raise ValueError(f"{name} must be an int >= {lo}; got {v!r}")


def _check_float(name: str, v: Any, lo: float, hi: float = math.inf, lo_open: bool = False, hi_open: bool = False) -> None:
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    ok = ok and (v > lo if lo_open else v >= lo) and (v < hi if hi_open else v <= hi)
    if not ok:
        lb, rb = "(" if lo_open else "[", ")" if hi_open else "]"
        raise ValueError(f"{name} must be a finite number in {lb}{lo:g}, {hi:g}{rb}; got {v!r}")


@dataclass(frozen=True)
class Toy2dConfig(_JSONConfig):
    """One 2-D training run: data, SDE, loss, network, optimisation and evaluation settings.

    The defaults are the ``toy2d`` preset, sized so that ``python -m fpe_lab.run toy2d`` trains and
    evaluates within three minutes on 2 CPU cores: measured 70 s of CPU time for ``--reg fpe`` (jet
    residual, one thread) and 30 s for ``--reg none``, train + evaluation (`/usr/bin/time`, 2-core
    machine shared with other jobs, so wall time there was longer). At these settings the
    regularizer halves the time-averaged relative residual (0.23 → 0.14, gmm/VP, seed 0).
    """

    # data and SDE
    data: ToyData = ToyData.GMM
    sde: SDEKind = SDEKind.VP
    # loss: DSM + lam · E w(t) ‖R_θ(x, t)‖² at t ~ U[eps, 1]
    reg: Regularizer = Regularizer.FPE
    lam: float = 0.1
    eps: float = 1e-3
    weighting: DSMWeighting = DSMWeighting.SIGMA2
    fpe_weighting: FPEWeighting = FPEWeighting.NORMALIZED
    fpe_points: FPEPoints = FPEPoints.PERTURBED
    fpe_batch: int | None = None  # points per step for R (None: the whole batch)
    residual_path: ResidualPath = ResidualPath.JET
    # network: TimeMLP(dim=2, width, depth, n_freq) inside ScoreModel
    width: int = 128
    depth: int = 3
    n_freq: int = 8
    # optimisation
    steps: int = 2000
    batch: int = 256
    lr: float = 2e-3
    ema_decay: float = 0.999
    grad_clip: float | None = None
    seed: int = 0
    ckpt_every: int = 500
    device: DeviceChoice = DeviceChoice.AUTO
    # evaluation
    eval_points: int = 1000
    eval_nll_points: int = 300
    eval_samples: int = 1000

    def __post_init__(self) -> None:
        self._check_enums()
        _check_float("lam", self.lam, 0.0)
        _check_float("eps", self.eps, 0.0, 0.5, lo_open=True)
        _check_float("lr", self.lr, 0.0, lo_open=True)
        _check_float("ema_decay", self.ema_decay, 0.0, 1.0, hi_open=True)
        if self.grad_clip is not None:
            _check_float("grad_clip", self.grad_clip, 0.0, lo_open=True)
        for name, lo in (("width", 1), ("depth", 1), ("n_freq", 0), ("steps", 1), ("batch", 1), ("seed", 0),
                         ("ckpt_every", 1), ("eval_points", 2), ("eval_nll_points", 0), ("eval_samples", 0)):
            _check_int(name, getattr(self, name), lo)
        if self.fpe_batch is not None:
            _check_int("fpe_batch", self.fpe_batch, 1)
            if self.fpe_batch > self.batch:
                raise ValueError(f"fpe_batch must be <= batch ({self.batch}); got {self.fpe_batch}")


def _plain(v: Any) -> Any:
    if isinstance(v, enum.Enum):
        return v.value
    return list(v) if isinstance(v, tuple) else v


def toy2d(**overrides: Any) -> Toy2dConfig:
    """The ``toy2d`` preset, with ``overrides`` applied (validated)."""
    return Toy2dConfig(**overrides)


# ---------------------------------------------------------------------- construction
def build_sde(kind: SDEKind) -> LinearSDE:
    """The SDE with the Score SDE default coefficients (REFERENCE.md §1)."""
    match kind:
        case SDEKind.VE:
            return VESDE()
        case SDEKind.VP:
            return VPSDE()
        case SDEKind.SUBVP:
            return SubVPSDE()
    raise ValueError(f"kind must be an SDEKind ({[k.value for k in SDEKind]}); got {kind!r}")


def build_data(config: Toy2dConfig):
    """The toy distribution ``fpe_lab.data.toy.toy_distribution(config.data.value)``."""
    from fpe_lab.data.toy import toy_distribution  # imported late: the data module is optional at import time

    return toy_distribution(config.data.value)


def build_model(config: Toy2dConfig, sde: LinearSDE, dtype: torch.dtype = torch.float32):
    """``ScoreModel(TimeMLP(2, width, depth, n_freq), sde)`` initialised from ``config.seed``.

    The initialisation uses a forked global RNG, so building a model has no side effect on it.
    """
    from fpe_lab.model import ScoreModel
    from fpe_lab.nets.mlp import TimeMLP

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        net = TimeMLP(dim=2, width=config.width, depth=config.depth, n_freq=config.n_freq)
    return ScoreModel(net.to(dtype), sde)


def residual_function(path: ResidualPath) -> ResidualFn:
    """The residual function for ``path``; JET falls back to the generic path (logged) when absent."""
    from fpe_lab.fpe import score_fpe_residual

    match path:
        case ResidualPath.GENERIC:
            return score_fpe_residual
        case ResidualPath.JET:
            try:
                from fpe_lab.nets.jet import jet_score_fpe_residual
            except ImportError:
                log.warning("fpe_lab.nets.jet is not available; using the generic residual path")
                return score_fpe_residual
            return jet_score_fpe_residual
    raise ValueError(f"path must be a ResidualPath ({[p.value for p in ResidualPath]}); got {path!r}")


def build_loss(config: Toy2dConfig, sde: LinearSDE) -> ScoreFPELoss:
    """DSM (config.weighting) plus, for ``reg=fpe``, lam · E w(t)‖R_θ‖² with exact derivatives."""
    match config.reg:
        case Regularizer.NONE:
            reg = None
        case Regularizer.FPE:
            reg = FPERegularizer(
                lam=config.lam,
                weighting=config.fpe_weighting,
                points=config.fpe_points,
                n_points=config.fpe_batch,
                divergence=None,  # exact in 2-D
                residual=residual_function(config.residual_path),
            )
    return ScoreFPELoss(sde=sde, eps=config.eps, weighting=config.weighting, regularizer=reg)


def resolve_device(choice: DeviceChoice) -> torch.device:
    """AUTO → cuda if available else cpu; CUDA without CUDA is a ValueError."""
    match choice:
        case DeviceChoice.AUTO:
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        case DeviceChoice.CPU:
            return torch.device("cpu")
        case DeviceChoice.CUDA:
            if not torch.cuda.is_available():
                raise ValueError("device cuda was requested but CUDA is not available (use --device cpu or auto)")
            return torch.device("cuda")
    raise ValueError(f"device must be a DeviceChoice ({[d.value for d in DeviceChoice]}); got {choice!r}")


# ---------------------------------------------------------------------- images (issue 6)
class TimeDerivativeKind(enum.Enum):
    """How ∂_t s inside the residual is computed (``fpe_lab.fpe``)."""

    JVP = "jvp"  # forward-mode JVP in t: exact (default)
    FD = "fd"  # central difference clipped to [eps, 1], extra evaluations without dropout

    def build(self, step: float, eps: float):
        match self:
            case TimeDerivativeKind.JVP:
                return ForwardModeDt()
            case TimeDerivativeKind.FD:
                return FiniteDifferenceDt(h=step, eps=eps)


class ImageData(enum.Enum):
    CIFAR10 = "cifar10"
    DIGITS = "digits"


@dataclass(frozen=True)
class ImageConfig(_JSONConfig):
    """One image run (``python -m fpe_lab.run cifar10`` / ``digits``). Defaults: the paper's fine-tuning
    recipe scale (Adam 2e-4, EMA 0.9999, clip 1); ``cifar10()`` and ``digits()`` are the presets."""

    data: ImageData = ImageData.CIFAR10
    data_dir: str | None = None
    image_shape: tuple[int, int, int] = (3, 32, 32)  # (C, H, W), from the data; checked on resume
    model: UNetSize = UNetSize.TINY
    sde: SDEKind = SDEKind.VP
    reg: Regularizer = Regularizer.FPE
    lam: float = 0.1
    per_dim: bool = True  # divide the FPE term by D
    fpe_weighting: FPEWeighting = FPEWeighting.NORMALIZED
    fpe_batch: int | None = None
    probes: int = 1
    probe: Probe = Probe.RADEMACHER
    dt: TimeDerivativeKind = TimeDerivativeKind.JVP
    fd_step: float = 1e-3  # h of the finite-difference ∂_t s (only with dt = fd)
    eps: float = 1e-5
    steps: int = 1000
    batch: int = 64  # global batch (split over ranks)
    lr: float = 2e-4
    ema_decay: float = 0.9999
    grad_clip: float | None = 1.0
    seed: int = 0
    ckpt_every: int = 500
    hflip: bool = True
    bf16: bool = False
    device: DeviceChoice = DeviceChoice.AUTO
    init_from: str | None = None
    eval_points: int = 256
    eval_repeats: int = 1
    eval_rtol: float = 1e-5
    eval_batch: int = 64
    eval_seed: int = 0  # seeds the dequantization noise and Hutchinson probes of the bits/dim solve

    def __post_init__(self) -> None:
        self._check_enums()
        for name, lo in (("probes", 1), ("steps", 1), ("batch", 1), ("seed", 0), ("ckpt_every", 1),
                         ("eval_points", 0), ("eval_repeats", 1), ("eval_batch", 1), ("eval_seed", 0)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ValueError(f"{name} must be an int >= {lo}; got {v!r}")
        for name, lo, hi in (("lam", 0.0, math.inf), ("eps", 0.0, 0.5), ("lr", 0.0, 10.0), ("eval_rtol", 0.0, 1.0),
                             ("fd_step", 0.0, 0.5)):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and lo <= v <= hi) or (name != "lam" and v == 0):
                raise ValueError(f"{name} must be a finite number in {'[' if name == 'lam' else '('}{lo:g}, {hi:g}]; got {v!r}")
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"ema_decay must be in [0, 1); got {self.ema_decay!r}")
        if self.fpe_batch is not None and not (isinstance(self.fpe_batch, int) and 1 <= self.fpe_batch):
            raise ValueError(f"fpe_batch must be None or an int >= 1; got {self.fpe_batch!r}")

    @property
    def dim(self) -> int:
        return math.prod(self.image_shape)

    def unet_config(self) -> UNetConfig:
        c, h, w = self.image_shape
        if h != w:
            raise ValueError(f"images must be square; got {h}×{w}")
        return UNetConfig.preset(self.model, in_channels=c, image_size=h)


def cifar10(**overrides: Any) -> ImageConfig:
    """The ``cifar10`` preset (``python -m fpe_lab.run cifar10``), with ``overrides`` applied (validated)."""
    return ImageConfig(**{"data": ImageData.CIFAR10, **overrides})


def digits(**overrides: Any) -> ImageConfig:
    """The ``digits`` preset: scikit-learn's 8×8 digits, 1 channel, no flips."""
    return ImageConfig(**{"data": ImageData.DIGITS, "image_shape": (1, 8, 8), "hflip": False, **overrides})
