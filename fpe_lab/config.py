"""The run configuration: one nested, frozen dataclass for point and image runs, and its presets.

A :class:`RunConfig` says everything that decides a run:

    data    which data set (a 2-D toy set or an image set) and its parameters
    sde     the forward SDE and its coefficients
    model   the network (an MLP for points, a U-Net for images)
    loss    DSM weighting, eps, time sampling, and one regularizer section
    optim   steps, batch, learning rate, EMA, clipping, checkpoints, initialisation
    eval    evaluation times, sizes, tolerances and seed
    seed, device, threads

``toy2d()``, ``cifar10()`` and ``digits()`` are values of it (the presets). Every leaf field carries its
command-line flag and help text in its metadata, so the CLI (:mod:`fpe_lab.commands.train`) is generated
from the dataclasses and a new field is a new flag without parser code. A configuration round-trips
through JSON (``to_dict`` / ``from_dict``); ``config.json`` of a run passed back with ``--config``
reproduces the run. Objects (SDE, data, model, loss) are built from it by :mod:`fpe_lab.build`.

Validation happens at construction: a bad value raises ValueError naming the field, the value and what
is allowed. There is one way to say "plain DSM": ``loss.reg.kind = none`` with ``lam = 0`` (either one
implies the other).
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import json
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Iterator

from fpe_lab.fpe import Probe
from fpe_lab.losses import ConservativeWeighting, DSMWeighting, FPEEstimator, FPEPoints, FPEWeighting, TimeSampling
from fpe_lab.metrics.evaluate import DEFAULT_TIMES
from fpe_lab.nets.unet import UNetSize

__all__ = [
    "Dataset",
    "SDEKind",
    "RegKind",
    "DivergenceKind",
    "TimeDerivativeKind",
    "ResidualPath",
    "Weights",
    "DeviceChoice",
    "DataConfig",
    "SDEConfig",
    "ModelConfig",
    "RegConfig",
    "LossConfig",
    "OptimConfig",
    "EvalConfig",
    "RunConfig",
    "Leaf",
    "leaves",
    "toy2d",
    "cifar10",
    "digits",
    "DEFAULT_TIMES",
]

MIN_EPS = 1e-6
"""Smallest eps: 1 − eps must differ from 1 in float32 (resolution 1.2e-7) with digits to spare."""

MIXTURE_MAX_DIM = 4096
"""Largest D of the mixture data set (a 64×64 one-channel image). The exact truth (fpe_lab.gmm) forms a
D×D covariance per evaluation point and component, b·K·D²·8 bytes in float64 (2 GiB for b = 4, K = 4 at
D = 4096), so evaluating at large D needs a small ``--eval-batch``."""
MIXTURE_MAX_COMPONENTS = 64
JET_MAX_DIM = 8
"""Largest D of the jet residual path: it carries 1 + D + D(D+1)/2 derivative streams per hidden unit
(45 at D = 8, 153 at D = 16, against 6 at D = 2), so its memory grows as D²; above 8 use the generic path."""


# ---------------------------------------------------------------------- choices
class Dataset(enum.Enum):
    """The data sets: 2-D toy sets (``fpe_lab.data.toy``, exact p_t known) and image sets (``fpe_lab.data.images``)."""

    GMM = "gmm"
    EIGHT_GAUSSIANS = "8gaussians"
    CHECKERBOARD = "checkerboard"
    RINGS = "rings"
    MOONS = "moons"
    SWISSROLL = "swissroll"
    PINWHEEL = "pinwheel"
    CIFAR10 = "cifar10"
    DIGITS = "digits"
    MIXTURE = "mixture"  # a Gaussian mixture in D = data.dim dimensions (fpe_lab.data.mixture)

    @property
    def is_image(self) -> bool:
        return self in (Dataset.CIFAR10, Dataset.DIGITS)

    @property
    def shape(self) -> tuple[int, ...]:
        """Shape of one sample: (2,) for the toy sets, (C, H, W) for images. The mixture's shape (D,)
        depends on ``data.dim``: ask :attr:`DataConfig.shape` (ValueError here, never a wrong (2,))."""
        match self:
            case Dataset.CIFAR10:
                return (3, 32, 32)
            case Dataset.DIGITS:
                return (1, 8, 8)
            case Dataset.MIXTURE:
                raise ValueError("data mixture has shape (data.dim,), set per run: use DataConfig.shape "
                                 "(config.data.shape), not Dataset.shape")
            case _:
                return (2,)

    @property
    def dim(self) -> int:
        return math.prod(self.shape)


class SDEKind(enum.Enum):
    VE = "ve"
    VP = "vp"
    SUBVP = "subvp"


class RegKind(enum.Enum):
    """The regularizer added to DSM."""

    NONE = "none"  # plain DSM (lam = 0)
    FPE = "fpe"  # lam · E w(t)‖R_θ‖², the score-FPE residual (FP-Diffusion)
    CONSERVATIVE = "conservative"  # lam · E w(t)‖J − Jᵀ‖²_F, the asymmetry penalty (Chao et al. 2023)
    HODSM = "hodsm"  # high-order denoising score matching (Lu et al. 2022)


class DivergenceKind(enum.Enum):
    """∇·s inside the residual."""

    EXACT = "exact"  # D reverse passes: points
    HUTCHINSON = "hutchinson"  # unbiased probe estimate: images


class TimeDerivativeKind(enum.Enum):
    """∂_t s inside the residual."""

    JVP = "jvp"  # forward-mode JVP in t: exact
    FD = "fd"  # central difference clipped to [eps, 1], extra evaluations without dropout


class ResidualPath(enum.Enum):
    """How R_θ is differentiated during training."""

    GENERIC = "generic"  # fpe_lab.fpe.score_fpe_residual: autograd, any network
    JET = "jet"  # fpe_lab.nets.jet: one Taylor-mode pass through the MLP (exact divergence, JVP ∂_t only)


class Weights(enum.Enum):
    """Which weights of a checkpoint to read."""

    EMA = "ema"
    MODEL = "model"


class DeviceChoice(enum.Enum):
    AUTO = "auto"  # cuda if available, else cpu
    CPU = "cpu"
    CUDA = "cuda"


# ---------------------------------------------------------------------- field helpers
def setting(default: Any, help: str, flag: str | None = None, in_hash: bool = True) -> Any:
    """A config field: its default, help text, command-line flag (default: the field name with dashes)
    and whether it enters the run folder's hash (settings that cannot change the trained weights do not)."""
    meta = {"help": help, "flag": flag, "in_hash": in_hash}
    if isinstance(default, (list, dict, set)):
        raise TypeError("mutable defaults are not allowed")
    return field(default=default, metadata=meta)


def section(cls: type, help: str) -> Any:
    return field(default_factory=cls, metadata={"help": help, "section": True})


def _check_int(name: str, v: Any, lo: int, hi: int | None = None) -> None:
    ok = isinstance(v, int) and not isinstance(v, bool) and v >= lo and (hi is None or v <= hi)
    if not ok:
        rng = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise ValueError(f"{name} must be an integer {rng}; got {v!r}")


def _check_float(name: str, v: Any, lo: float, hi: float = math.inf, lo_open: bool = False,
                 hi_open: bool = False) -> None:
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    ok = ok and (v > lo if lo_open else v >= lo) and (v < hi if hi_open else v <= hi)
    if not ok:
        lb, rb = "(" if lo_open else "[", ")" if hi_open else "]"
        raise ValueError(f"{name} must be a finite number in {lb}{lo:g}, {hi:g}{rb}; got {v!r}")


def _plain(v: Any) -> Any:
    if isinstance(v, _Section):
        return v.to_dict()
    if isinstance(v, enum.Enum):
        return v.value
    return list(v) if isinstance(v, tuple) else v


def _strip_optional(kind: Any) -> tuple[Any, bool]:
    """(inner type, whether None is allowed) of ``X | None``."""
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(kind) if a is not type(None)]
        return args[0], len(args) < len(typing.get_args(kind))
    return kind, False


def _convert(kind: Any, v: Any, path: str) -> Any:
    """A JSON value → the field's type (enum from value, tuple from list, nested section from dict)."""
    inner, optional = _strip_optional(kind)
    if v is None:
        if optional:
            return None
        raise ValueError(f"{path} must not be null")
    if isinstance(inner, type) and issubclass(inner, _Section):
        return inner.from_dict(v, path)
    if isinstance(inner, type) and issubclass(inner, enum.Enum):
        if isinstance(v, inner):
            return v
        try:
            return inner(v)
        except ValueError:
            raise ValueError(f"{path} must be one of {[m.value for m in inner]}; got {v!r}") from None
    if typing.get_origin(inner) is tuple and isinstance(v, list):
        return tuple(v)
    if inner is float and isinstance(v, int) and not isinstance(v, bool):
        return float(v)
    return v


class _Section:
    """JSON round trip and enum checks for the frozen config sections."""

    def _check_enums(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            kind, optional = _strip_optional(hints[f.name])
            v = getattr(self, f.name)
            if v is None and optional:
                continue
            if isinstance(kind, type) and issubclass(kind, enum.Enum) and not isinstance(v, kind):
                raise ValueError(f"{f.name} must be one of {[m.value for m in kind]}; got {v!r}")
            if isinstance(kind, type) and issubclass(kind, _Section) and not isinstance(v, kind):
                raise ValueError(f"{f.name} must be a {kind.__name__}; got {v!r}")

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict: enums become their values, tuples lists, sections dicts."""
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}  # type: ignore[arg-type]

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: Any, path: str = ""):
        """Inverse of :meth:`to_dict`. Unknown keys are an error; missing keys take the defaults."""
        where = path or "config"
        if not isinstance(d, dict):
            raise ValueError(f"{where} must be a JSON object; got {type(d).__name__}")
        hints = typing.get_type_hints(cls)
        names = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
        unknown = sorted(set(d) - set(names))
        if unknown:
            raise ValueError(f"unknown key(s) {', '.join(repr(f'{path}.{k}' if path else k) for k in unknown)} in "
                             f"{where}; allowed: {names}")
        kwargs = {k: _convert(hints[k], v, f"{path}.{k}" if path else k) for k, v in d.items()}
        return cls(**kwargs)

    @classmethod
    def from_json(cls, text: str):
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"config is not valid JSON: {e}") from None
        return cls.from_dict(d)

    def replace(self, **changes: Any):
        return dataclasses.replace(self, **changes)  # type: ignore[type-var]


# ---------------------------------------------------------------------- sections
@dataclass(frozen=True)
class DataConfig(_Section):
    name: Dataset = setting(Dataset.GMM, "data set p_0: a 2-D toy set, a D-dimensional Gaussian mixture or an "
                            "image set", flag="data")
    data_dir: str | None = setting(None, "folder of the image files (cifar10: cifar-10-batches-py or its parent)")
    hflip: bool = setting(False, "mirror training images left-right with probability 1/2")
    dim: int = setting(2, f"mixture: the dimension D, in [1, {MIXTURE_MAX_DIM}] (other data sets: must stay 2)",
                       flag="data-dim")
    components: int = setting(4, f"mixture: the number of Gaussian components, in [1, {MIXTURE_MAX_COMPONENTS}]")

    def __post_init__(self) -> None:
        self._check_enums()
        if self.hflip and not self.name.is_image:
            raise ValueError(f"hflip applies to images only; data {self.name.value} is points")
        _check_int("data_dim", self.dim, 1, MIXTURE_MAX_DIM)
        _check_int("components", self.components, 1, MIXTURE_MAX_COMPONENTS)
        if self.name is not Dataset.MIXTURE and (self.dim, self.components) != (2, 4):
            raise ValueError(f"data_dim and components apply to data mixture only; data {self.name.value} has "
                             f"data_dim {self.dim}, components {self.components} (leave them at 2 and 4)")

    @property
    def shape(self) -> tuple[int, ...]:
        """Shape of one sample: (dim,) for the mixture, (2,) for the toy sets, (C, H, W) for images."""
        match self.name:
            case Dataset.MIXTURE:
                return (self.dim,)
            case _:
                return self.name.shape


@dataclass(frozen=True)
class SDEConfig(_Section):
    kind: SDEKind = setting(SDEKind.VP, "forward SDE", flag="sde")
    beta_min: float = setting(0.1, "VP/sub-VP: beta(0)")
    beta_max: float = setting(20.0, "VP/sub-VP: beta(1)")
    sigma_min: float = setting(0.01, "VE: sigma_min")
    sigma_max: float = setting(50.0, "VE: sigma_max")

    def __post_init__(self) -> None:
        self._check_enums()
        _check_float("beta_min", self.beta_min, 0.0, lo_open=True)
        _check_float("beta_max", self.beta_max, self.beta_min)
        _check_float("sigma_min", self.sigma_min, 0.0, lo_open=True)
        _check_float("sigma_max", self.sigma_max, self.sigma_min, lo_open=True)


@dataclass(frozen=True)
class ModelConfig(_Section):
    """The network: ``TimeMLP(width, depth, n_freq)`` for points, ``UNet(unet preset)`` for images, whose
    base channels and residual blocks per level ``width`` and ``depth`` override when given."""

    width: int | None = setting(128, "hidden width (MLP) / base channels (U-Net); none: the U-Net preset's")
    depth: int | None = setting(3, "hidden layers (MLP) / residual blocks per level (U-Net); none: the preset's")
    n_freq: int = setting(8, "MLP: Fourier features of t")
    unet: UNetSize = setting(UNetSize.TINY, "U-Net size preset (images)", flag="model")
    dropout: float | None = setting(None, "U-Net dropout; none: the preset's")

    def __post_init__(self) -> None:
        self._check_enums()
        if self.width is not None:
            _check_int("width", self.width, 1)
        if self.depth is not None:
            _check_int("depth", self.depth, 1)
        _check_int("n_freq", self.n_freq, 0)
        if self.dropout is not None:
            _check_float("dropout", self.dropout, 0.0, 1.0, hi_open=True)


@dataclass(frozen=True)
class RegConfig(_Section):
    """The regularizer: L = L_dsm + lam · E w(t)‖R_θ‖² (or lam/D with ``per_dim``)."""

    kind: RegKind = setting(RegKind.FPE, "regularizer: none (plain DSM), fpe (the score-FPE residual), conservative "
                            "(‖J − Jᵀ‖² penalty), hodsm (high-order DSM)", flag="reg")
    lam: float = setting(0.1, "its weight lam >= 0 (0 is plain DSM)")
    weighting: FPEWeighting = setting(FPEWeighting.NORMALIZED, "w(t): normalized = sigma^6/g^4, g2 = g^2 (the paper's), one",
                                      flag="fpe-weighting")
    points: FPEPoints = setting(FPEPoints.PERTURBED, "where R is evaluated: the DSM points or resampled ones",
                                flag="fpe-points")
    n_points: int | None = setting(None, "evaluate R on the first N points of each batch (none: all)", flag="fpe-batch")
    per_dim: bool = setting(False, "divide the term by D (images)")
    estimator: FPEEstimator = setting(FPEEstimator.SQUARED, "‖R̂‖² (squared, the paper's) or ⟨R̂₁, R̂₂⟩ (unbiased)",
                                      flag="fpe-estimator")
    divergence: DivergenceKind = setting(DivergenceKind.EXACT, "∇·s inside R (and J for conservative): exact or hutchinson")
    probes: int = setting(1, "Hutchinson probes per sample")
    probe: Probe = setting(Probe.RADEMACHER, "Hutchinson probe distribution")
    dt: TimeDerivativeKind = setting(TimeDerivativeKind.JVP, "∂_t s inside R: jvp (exact) or fd (clipped central difference)")
    fd_step: float = setting(1e-3, "h of the finite-difference ∂_t s (with --dt fd)")
    residual_path: ResidualPath = setting(ResidualPath.JET, "jet (Taylor mode, MLP only) or generic (autograd)")
    conservative_weighting: ConservativeWeighting = setting(
        ConservativeWeighting.SIGMA4, "conservative: w(t) = sigma^4 (O(1) at every t), sigma2 (Chao et al.'s), one")
    hodsm_order: int = setting(2, "hodsm: 2 (second order) or 3 (with the third-order trace term)")

    def __post_init__(self) -> None:
        self._check_enums()
        _check_float("lam", self.lam, 0.0)
        if (self.kind is RegKind.NONE) != (self.lam == 0):
            raise ValueError(f"reg {self.kind.value} with lam {self.lam:g}: plain DSM is reg none with lam 0; "
                             f"a regularizer needs lam > 0")
        if self.n_points is not None:
            _check_int("fpe_batch", self.n_points, 1)
        _check_int("probes", self.probes, 1, 1024)
        _check_float("fd_step", self.fd_step, 0.0, 0.5, lo_open=True)
        _check_int("hodsm_order", self.hodsm_order, 2, 3)
        if self.residual_path is ResidualPath.JET and self.kind is RegKind.FPE:
            if self.divergence is not DivergenceKind.EXACT or self.dt is not TimeDerivativeKind.JVP:
                raise ValueError("residual_path jet computes the exact divergence and ∂_t by forward mode; "
                                 f"got divergence {self.divergence.value}, dt {self.dt.value}: use --residual-path generic")

    @classmethod
    def none(cls) -> RegConfig:
        """Plain DSM."""
        return cls(kind=RegKind.NONE, lam=0.0)


@dataclass(frozen=True)
class LossConfig(_Section):
    dsm_weighting: DSMWeighting = setting(DSMWeighting.SIGMA2, "DSM lambda(t): sigma2 or likelihood (g^2)")
    eps: float = setting(1e-3, "smallest training time; start of the NLL integration and end of sampling")
    time_sampling: TimeSampling = setting(TimeSampling.UNIFORM, "t ~ U[eps, 1] (uniform) or ∝ g²/sigma² with the "
                                          "weight divided out (importance)")
    reg: RegConfig = section(RegConfig, "the regularizer")

    def __post_init__(self) -> None:
        self._check_enums()
        _check_float("eps", self.eps, 0.0, 0.5, lo_open=True)
        if self.eps < MIN_EPS:
            raise ValueError(f"eps must be >= {MIN_EPS:g} (below it float32, the training dtype, cannot tell "
                             f"1 − eps from 1 in the PF-ODE and sigma(eps) loses its digits); got {self.eps:g}")


@dataclass(frozen=True)
class OptimConfig(_Section):
    steps: int = setting(2000, "total optimizer steps (a finished run grows with --resume --steps N)", in_hash=False)
    batch: int = setting(256, "batch size (global, split over processes)")
    lr: float = setting(2e-3, "Adam learning rate")
    ema_decay: float = setting(0.999, "EMA decay of the weights (warm-up min(decay, (1+k)/(10+k)))")
    grad_clip: float | None = setting(None, "clip the global gradient norm (none: no clipping)")
    ckpt_every: int = setting(500, "checkpoint (and numbered snapshot) every N steps", in_hash=False)
    keep: int = setting(3, "numbered snapshots kept beside the latest checkpoint", in_hash=False)
    init_from: str | None = setting(None, "start from the weights of this run folder or checkpoint (fresh optimizer)")
    init_weights: Weights = setting(Weights.EMA, "which weights --init-from reads: ema or model")
    bf16: bool = setting(False, "bf16 autocast for the DSM network pass (CUDA only)")

    def __post_init__(self) -> None:
        self._check_enums()
        _check_int("steps", self.steps, 1)
        _check_int("batch", self.batch, 1)
        _check_float("lr", self.lr, 0.0, 10.0, lo_open=True)
        _check_float("ema_decay", self.ema_decay, 0.0, 1.0, hi_open=True)
        if self.grad_clip is not None:
            _check_float("grad_clip", self.grad_clip, 0.0, lo_open=True)
        _check_int("ckpt_every", self.ckpt_every, 1)
        _check_int("keep", self.keep, 0)


@dataclass(frozen=True)
class EvalConfig(_Section):
    times: tuple[float, ...] = setting(DEFAULT_TIMES, "evaluation times of the per-t metrics", flag="eval-times")
    points: int = setting(1000, "points x_t per evaluation time", flag="eval-points")
    nll_points: int = setting(300, "held-out points for the PF-ODE NLL / bits/dim (0: skip)", flag="eval-nll-points")
    samples: int = setting(1000, "samples for sample distances, 2-D only (0: skip)", flag="eval-samples")
    rtol: float = setting(1e-5, "rtol = atol of the PF-ODE NLL solve", flag="eval-rtol")
    repeats: int = setting(1, "repeats of the NLL points (dequantization and probes redrawn)", flag="eval-repeats")
    batch: int = setting(256, "points per chunk of the image evaluation", flag="eval-batch")
    probes: int = setting(2, "Hutchinson probes per point where D is large", flag="eval-probes")
    seed: int | None = setting(None, "seed of the evaluation's draws (none: derived from the run's seed)", flag="eval-seed")

    def __post_init__(self) -> None:
        self._check_enums()
        if not self.times or not all(isinstance(t, (int, float)) and not isinstance(t, bool) and math.isfinite(t)
                                     and 0 < t <= 1 for t in self.times):
            raise ValueError(f"eval times must be a nonempty list of numbers in (0, 1]; got {list(self.times)!r}")
        _check_int("eval_points", self.points, 2)
        _check_int("eval_nll_points", self.nll_points, 0)
        _check_int("eval_samples", self.samples, 0)
        if self.samples == 1:
            raise ValueError("eval_samples must be 0 (skip) or >= 2; got 1")
        _check_float("eval_rtol", self.rtol, 0.0, 1.0, lo_open=True)
        _check_int("eval_repeats", self.repeats, 1, 100)
        _check_int("eval_batch", self.batch, 1)
        _check_int("eval_probes", self.probes, 2, 1024)
        if self.seed is not None:
            _check_int("eval_seed", self.seed, 0)


@dataclass(frozen=True)
class RunConfig(_Section):
    """Everything that decides a run. Presets: :func:`toy2d`, :func:`cifar10`, :func:`digits`."""

    data: DataConfig = section(DataConfig, "data")
    sde: SDEConfig = section(SDEConfig, "forward SDE")
    model: ModelConfig = section(ModelConfig, "network")
    loss: LossConfig = section(LossConfig, "loss")
    optim: OptimConfig = section(OptimConfig, "optimisation")
    eval: EvalConfig = section(EvalConfig, "evaluation")
    seed: int = setting(0, "seed of initialisation, data order and noise")
    device: DeviceChoice = setting(DeviceChoice.AUTO, "device (auto: cuda if available)", in_hash=False)
    threads: int = setting(1, "CPU threads per process (1: no oversubscription on shared cores)", in_hash=False)

    def __post_init__(self) -> None:
        self._check_enums()
        _check_int("seed", self.seed, 0, 2**62)
        _check_int("threads", self.threads, 1, 1024)
        reg = self.loss.reg
        if reg.kind is RegKind.FPE and self.data.name.is_image and reg.residual_path is ResidualPath.JET:
            raise ValueError(f"residual_path jet needs the MLP of point data; data {self.data.name.value} uses the "
                             "U-Net: use --residual-path generic")
        if reg.kind is RegKind.FPE and reg.residual_path is ResidualPath.JET and self.dim > JET_MAX_DIM:
            raise ValueError(f"residual_path jet supports data_dim <= {JET_MAX_DIM} (it carries 1 + D + D(D+1)/2 "
                             f"derivative streams per hidden unit, {1 + self.dim + self.dim * (self.dim + 1) // 2} "
                             f"at D = {self.dim}); got data_dim {self.dim}: use --residual-path generic")
        if reg.n_points is not None and reg.n_points > self.optim.batch:
            raise ValueError(f"fpe_batch must be <= batch ({self.optim.batch}); got {reg.n_points}")
        if self.data.name is Dataset.CIFAR10 and self.data.data_dir is None:
            raise ValueError("data cifar10 needs data_dir (--data-dir: the cifar-10-batches-py folder or its parent)")
        if max(self.eval.times) < self.loss.eps or min(self.eval.times) < self.loss.eps:
            raise ValueError(f"eval times must lie in [eps, 1] = [{self.loss.eps:g}, 1]; got {list(self.eval.times)}")

    @property
    def dim(self) -> int:
        """D, the number of coordinates of one sample (the product of ``data.shape``)."""
        return math.prod(self.data.shape)

    @property
    def eval_seed(self) -> int:
        return self.eval.seed if self.eval.seed is not None else self.seed + 12345

    def override(self, changes: dict[tuple[str, ...], Any]) -> RunConfig:
        """A copy with the leaves at the given paths replaced, e.g. ``{("loss", "eps"): 1e-5}``; validated."""
        changes = dict(changes)
        kind, lam = ("loss", "reg", "kind"), ("loss", "reg", "lam")
        if kind in changes and RegKind(_plain(changes[kind])) is RegKind.NONE:
            changes[lam] = 0.0  # plain DSM: one way to say it (reg none sets lam 0, whatever lam said)
        if lam in changes and kind not in changes and changes[lam] == 0:
            changes[kind] = RegKind.NONE
        d = self.to_dict()
        for path, value in changes.items():
            node = d
            for key in path[:-1]:
                node = node[key]
            node[path[-1]] = _plain(value)
        return RunConfig.from_dict(d)

    def fingerprint(self) -> str:
        """A short hash of the settings that change the trained weights (not steps, checkpointing,
        device, threads or evaluation): runs with equal fingerprints are the same run, possibly grown."""
        text = json.dumps(_hashed(self), sort_keys=True)
        return hashlib.sha256(text.encode("utf-8")).hexdigest()[:10]

    def label(self) -> str:
        """A readable run name: data, SDE, regularizer and weight, seed."""
        reg = self.loss.reg
        kind = reg.kind.value if reg.kind is RegKind.NONE else f"{reg.kind.value}{reg.lam:g}"
        return f"{self.data.name.value}_{self.sde.kind.value}_{kind}_seed{self.seed}"


def _hashed(config: _Section) -> dict[str, Any]:
    """The settings that decide the trained weights; plain DSM ignores every other regularizer field."""
    if isinstance(config, RegConfig) and config.kind is RegKind.NONE:
        return {"kind": RegKind.NONE.value}
    out: dict[str, Any] = {}
    for f in dataclasses.fields(config):  # type: ignore[arg-type]
        if f.name == "eval" and isinstance(config, RunConfig):
            continue
        if not f.metadata.get("in_hash", True):
            continue
        if isinstance(config, DataConfig) and f.name in ("dim", "components") and config.name is not Dataset.MIXTURE:
            continue  # fixed at 2 and 4 off the mixture: the fingerprints of earlier run folders stay valid
        v = getattr(config, f.name)
        out[f.name] = _hashed(v) if isinstance(v, _Section) else _plain(v)
    return out


# ---------------------------------------------------------------------- leaves (for the CLI)
@dataclass(frozen=True)
class Leaf:
    """One settable field: its path in the config, its flag, type and help."""

    path: tuple[str, ...]
    flag: str
    kind: Any
    help: str

    def get(self, config: RunConfig) -> Any:
        v: Any = config
        for key in self.path:
            v = getattr(v, key)
        return v


def leaves(cls: type = RunConfig, prefix: tuple[str, ...] = ()) -> Iterator[Leaf]:
    """Every leaf field of the configuration, depth first in declaration order."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.metadata.get("section"):
            yield from leaves(hints[f.name], prefix + (f.name,))
        else:
            flag = f.metadata.get("flag") or f.name.replace("_", "-")
            yield Leaf(prefix + (f.name,), flag, hints[f.name], f.metadata.get("help", ""))


# ---------------------------------------------------------------------- presets
def toy2d(**changes: Any) -> RunConfig:
    """The ``toy2d`` preset: DSM + 0.1 · normalized score-FPE residual on the 2-D Gaussian mixture under VP,
    MLP 3×128, 2000 steps of batch 256 — sized to train and evaluate in about a minute on 2 CPU cores.
    ``changes`` replace top-level sections (e.g. ``seed=1``)."""
    return RunConfig(**changes)


def _image_preset(data: DataConfig, **changes: Any) -> RunConfig:
    base = RunConfig(
        data=data,
        model=ModelConfig(width=None, depth=None),
        loss=LossConfig(eps=1e-5, reg=RegConfig(per_dim=True, divergence=DivergenceKind.HUTCHINSON,
                                                residual_path=ResidualPath.GENERIC)),
        optim=OptimConfig(steps=1000, batch=64, lr=2e-4, ema_decay=0.9999, grad_clip=1.0),
        eval=EvalConfig(points=64, nll_points=256, samples=0, batch=64),
    )
    return dataclasses.replace(base, **changes)


def cifar10(data_dir: str = "data", **changes: Any) -> RunConfig:
    """The ``cifar10`` preset: tiny U-Net, DSM + (0.1/D) · normalized residual with one Rademacher probe,
    Adam 2e-4, EMA 0.9999, clip 1, eps 1e-5 (the paper's fine-tuning recipe scale)."""
    return _image_preset(DataConfig(name=Dataset.CIFAR10, data_dir=data_dir, hflip=True), **changes)


def digits(**changes: Any) -> RunConfig:
    """The ``digits`` preset: the cifar10 recipe on scikit-learn's offline 8×8 digits (1 channel, no flips)."""
    return _image_preset(DataConfig(name=Dataset.DIGITS), **changes)
