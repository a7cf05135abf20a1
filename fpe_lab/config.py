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
import typing
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fpe_lab import regularizers
from fpe_lab.checks import check_float as _check_float
from fpe_lab.checks import check_int as _check_int
from fpe_lab.data.images import cifar10_digest
from fpe_lab.fpe import Probe
from fpe_lab.losses import DSMWeighting
from fpe_lab.metrics.evaluate import DEFAULT_TIMES
from fpe_lab.nets.unet import UNetSize
from fpe_lab.regularizers.fpe import FPEOptions, ResidualPath
from fpe_lab.sampling import ODEMethod
from fpe_lab.settings import Section, convert, plain, section, setting
from fpe_lab.time_sampling import TimeSampling

__all__ = [
    "Dataset",
    "SDEKind",
    "DivergenceKind",
    "Weights",
    "InitState",
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
MIXTURE_MAX_RANK = 64
BETA_LIMIT = 1000.0
"""Largest beta(t) of VP/sub-VP (Score SDE uses 20): explicit PF-ODE solvers take ~beta_max steps per solve."""
MIXTURE_MAX_IMAGE_DIM = 3 * 64 * 64
"""Largest D of an image-shaped mixture: its truth is low-rank (O(K·D·r) per point, no D×D matrix)."""
# ---------------------------------------------------------------------- choices
class Dataset(enum.Enum):
    """The data sets (loaded by :func:`fpe_lab.data.load`): 2-D toy sets (``fpe_lab.data.toy``, exact p_t known),
    real image sets (``fpe_lab.data.images``), and Gaussian mixtures with exact p_t in any shape
    (``fpe_lab.data.mixture``; ``digits-gmm``: the mixture fitted to the 8×8 digits, ``fpe_lab.data.digits_gmm``)."""

    GMM = "gmm"
    EIGHT_GAUSSIANS = "8gaussians"
    CHECKERBOARD = "checkerboard"
    RINGS = "rings"
    MOONS = "moons"
    SWISSROLL = "swissroll"
    PINWHEEL = "pinwheel"
    IMBALANCED = "imbalanced"
    CIFAR10 = "cifar10"
    DIGITS = "digits"
    MIXTURE = "mixture"  # a Gaussian mixture in D = data.dim dimensions, or of data.data_shape (fpe_lab.data.mixture)
    DIGITS_GMM = "digits-gmm"  # the Gaussian mixture fitted to the 8×8 digits: images with exact truth

    @property
    def is_image(self) -> bool:
        """A set of real, quantized images (files or scikit-learn's digits): bits/dim, no exact truth."""
        return self in (Dataset.CIFAR10, Dataset.DIGITS)

    @property
    def shape(self) -> tuple[int, ...]:
        """Shape of one sample: (2,) for the toy sets, (C, H, W) for images. The mixture's shape (D,)
        depends on ``data.dim``: ask :attr:`DataConfig.shape` (ValueError here, never a wrong (2,))."""
        match self:
            case Dataset.CIFAR10:
                return (3, 32, 32)
            case Dataset.DIGITS | Dataset.DIGITS_GMM:
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


class DivergenceKind(enum.Enum):
    """∇·s inside the residual."""

    EXACT = "exact"  # D reverse passes: points
    HUTCHINSON = "hutchinson"  # unbiased probe estimate: images


class Weights(enum.Enum):
    """Which weights of a checkpoint to read."""

    EMA = "ema"
    MODEL = "model"


class InitState(enum.Enum):
    """What ``--init-from`` carries over from the source run besides its weights."""

    CONTINUE = "continue"  # the model's raw weights, the EMA and Adam's state: fine-tuning continues training
    FRESH = "fresh"  # only the weights named by init_weights; a fresh optimizer and EMA (configuration 0.2)


class DeviceChoice(enum.Enum):
    AUTO = "auto"  # cuda if available, else cpu
    CPU = "cpu"
    CUDA = "cuda"


# ---------------------------------------------------------------------- sections
@dataclass(frozen=True)
class DataConfig(Section):
    name: Dataset = setting(Dataset.GMM, "data set p_0: a 2-D toy set, a D-dimensional Gaussian mixture or an "
                            "image set", flag="data")
    data_dir: str | None = setting(None, "folder of the image files (cifar10: cifar-10-batches-py or its parent)")
    hflip: bool = setting(False, "mirror training images left-right with probability 1/2")
    dim: int = setting(2, f"mixture: the dimension D, in [1, {MIXTURE_MAX_DIM}] (other data sets: must stay 2)",
                       flag="data-dim")
    components: int = setting(4, f"mixture: the number of Gaussian components, in [1, {MIXTURE_MAX_COMPONENTS}]")
    data_shape: tuple[int, ...] | None = setting(None, "mixture: the shape of a sample, e.g. 3,32,32 (images, "
                                                 "trained with the U-Net); none: (data_dim,)")
    rank: int = setting(0, f"mixture: extra directions per component, covariance U Uᵀ + sd² I (exact truth "
                        f"by Woodbury), in [0, {MIXTURE_MAX_RANK}]", flag="mixture-rank")

    def __post_init__(self) -> None:
        self._check_enums()
        if self.hflip and not self.name.is_image:
            raise ValueError(f"hflip applies to real images only; data {self.name.value} is not")
        _check_int("data_dim", self.dim, 1, MIXTURE_MAX_DIM)
        _check_int("components", self.components, 1, MIXTURE_MAX_COMPONENTS)
        _check_int("mixture_rank", self.rank, 0, MIXTURE_MAX_RANK)
        if self.name is not Dataset.MIXTURE and ((self.dim, self.components, self.rank) != (2, 4, 0)
                                                 or self.data_shape is not None):
            raise ValueError(f"data_dim, components, data_shape and mixture_rank apply to data mixture only; data "
                             f"{self.name.value} has data_dim {self.dim}, components {self.components}, data_shape "
                             f"{self.data_shape}, mixture_rank {self.rank} (leave them at 2, 4, none and 0)")
        if self.data_shape is not None:
            if not 1 <= len(self.data_shape) <= 3 or not all(isinstance(n, int) and n >= 1 for n in self.data_shape):
                raise ValueError(f"data_shape must be 1 to 3 positive integers (D, or C,H,W); got {self.data_shape}")
            if self.dim != 2:
                raise ValueError(f"give either data_dim or data_shape; got data_dim {self.dim} and data_shape "
                                 f"{self.data_shape}")
            if math.prod(self.data_shape) > MIXTURE_MAX_IMAGE_DIM:
                raise ValueError(f"data_shape {self.data_shape} holds {math.prod(self.data_shape)} values; at most "
                                 f"{MIXTURE_MAX_IMAGE_DIM}")
            if len(self.data_shape) == 3 and self.data_shape[1] != self.data_shape[2]:
                raise ValueError(f"data_shape C,H,W must be square images (the U-Net); got {self.data_shape}")

    @property
    def shape(self) -> tuple[int, ...]:
        """Shape of one sample: (dim,) or data_shape for the mixture, (2,) for the toy sets, (C, H, W) for images."""
        match self.name:
            case Dataset.MIXTURE:
                return self.data_shape if self.data_shape is not None else (self.dim,)
            case _:
                return self.name.shape

    @property
    def is_image(self) -> bool:
        """Samples of shape (C, H, W): trained with the U-Net, evaluated in float32 on the device."""
        return len(self.shape) == 3


@dataclass(frozen=True)
class SDEConfig(Section):
    kind: SDEKind = setting(SDEKind.VP, "forward SDE", flag="sde")
    beta_min: float = setting(0.1, "VP/sub-VP: beta(0)")
    beta_max: float = setting(20.0, "VP/sub-VP: beta(1)")
    sigma_min: float = setting(0.01, "VE: sigma_min")
    sigma_max: float = setting(50.0, "VE: sigma_max")

    def __post_init__(self) -> None:
        self._check_enums()
        # beyond BETA_LIMIT the PF-ODE (NLL, samples) needs of the order of beta_max explicit steps per solve:
        # training would finish and the evaluation would not
        _check_float("beta_min", self.beta_min, 0.0, BETA_LIMIT, lo_open=True)
        _check_float("beta_max", self.beta_max, self.beta_min, BETA_LIMIT)
        _check_float("sigma_min", self.sigma_min, 0.0, lo_open=True)
        _check_float("sigma_max", self.sigma_max, self.sigma_min, lo_open=True)


@dataclass(frozen=True)
class ModelConfig(Section):
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
            _check_int("width", self.width, 1, 2**16)
        if self.depth is not None:
            _check_int("depth", self.depth, 1, 1024)
        _check_int("n_freq", self.n_freq, 0, 1024)
        if self.dropout is not None:
            _check_float("dropout", self.dropout, 0.0, 1.0, hi_open=True)


# The flat regularizer fields of configuration version 0.2, with their defaults: old config.json files are
# migrated from them, and the fingerprint of a built-in regularizer is written in this form, so run folders
# made before the regularizers became modules keep their names. Frozen: a new regularizer never enters here.
_LEGACY_FIELDS: dict[str, tuple[str, str, Any]] = {
    "weighting": ("fpe", "weighting", "normalized"),
    "points": ("fpe", "points", "perturbed"),
    "estimator": ("fpe", "estimator", "squared"),
    "dt": ("fpe", "dt", "jvp"),
    "fd_step": ("fpe", "fd_step", 1e-3),
    "residual_path": ("fpe", "residual_path", "jet"),
    "conservative_weighting": ("conservative", "weighting", "sigma4"),
    "hodsm_order": ("hodsm", "order", 2),
}
_SHARED_DEFAULTS: dict[str, Any] = {"probes": 1, "probe": "rademacher"}


@dataclass(frozen=True)
class RegConfig(Section):
    """The regularizer: L = L_dsm + lam · E P_θ (lam/D with ``per_dim``), P_θ from :mod:`fpe_lab.regularizers`.

    The fields here are shared by every regularizer; ``options`` holds the active one's own settings (its
    ``Options`` section), written as ``loss.reg.<name>`` in JSON and set by ``--<name>-<field>`` flags.
    """

    kind: str = setting("fpe", "regularizer: none (plain DSM), fpe (the score-FPE residual), conservative "
                        "(‖J − Jᵀ‖² penalty), hodsm (high-order DSM), or a plug-in's name", flag="reg")
    lam: float = setting(0.1, "its weight lam >= 0 (0 is plain DSM)")
    n_points: int | None = setting(None, "evaluate the regularizer on the first N points of each batch (none: all)",
                                   flag="reg-batch")
    per_dim: bool = setting(False, "divide the term by D (images)")
    divergence: DivergenceKind = setting(DivergenceKind.EXACT, "∇·s inside R, J for conservative and high-order "
                                         "DSM: exact or hutchinson")
    probes: int = setting(1, "Hutchinson probes per sample")
    probe: Probe = setting(Probe.RADEMACHER, "Hutchinson probe distribution")
    options: Section | None = field(default=None,
                                    metadata={"options": True, "help": "the active regularizer's options"})

    def __post_init__(self) -> None:
        self._check_enums()
        if not isinstance(self.kind, str):
            raise ValueError(f"reg must be a regularizer name; got {self.kind!r}")
        _check_float("lam", self.lam, 0.0)
        if (self.kind == regularizers.NONE) != (self.lam == 0):
            raise ValueError(f"reg {self.kind} with lam {self.lam:g}: plain DSM is reg none with lam 0; "
                             f"a regularizer needs lam > 0")
        if self.n_points is not None:
            _check_int("reg_batch", self.n_points, 1)
        _check_int("probes", self.probes, 1, 1024)
        if self.kind == regularizers.NONE:
            if self.options is not None:
                raise ValueError(f"plain DSM (reg none) has no regularizer options; got {self.options!r}")
            return
        cls = regularizers.get(self.kind)
        if self.options is None:
            object.__setattr__(self, "options", cls.Options())
        elif not isinstance(self.options, cls.Options):
            raise ValueError(f"reg {self.kind} takes options of type {cls.Options.__name__}; got {self.options!r}")

    @classmethod
    def none(cls) -> RegConfig:
        """Plain DSM."""
        return cls(kind=regularizers.NONE, lam=0.0)

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: plain(getattr(self, f.name)) for f in dataclasses.fields(self) if f.name != "options"}
        if self.options is not None:
            out[self.kind] = self.options.to_dict()
        return out

    @classmethod
    def from_dict(cls, d: Any, path: str = "") -> RegConfig:
        """Inverse of :meth:`to_dict`; a 0.2 configuration (flat regularizer fields) is migrated."""
        where = path or "reg"
        if not isinstance(d, dict):
            raise ValueError(f"{where} must be a JSON object; got {type(d).__name__}")
        d = dict(d)
        kind = d.get("kind", "fpe")
        if not isinstance(kind, str):
            raise ValueError(f"{where}.kind must be a regularizer name; got {kind!r}")
        legacy = {k: d.pop(k) for k in list(d) if k in _LEGACY_FIELDS}
        for key, value in legacy.items():  # 0.2: every regularizer's fields, flat; only the active one's count
            name, option, _ = _LEGACY_FIELDS[key]
            if name == kind:
                d.setdefault(name, {})[option] = value
        if "fpe_batch" in d:  # never a key of 0.2, but the name its flag had
            raise ValueError(f"unknown key '{where}.fpe_batch'; the number of points is n_points (--reg-batch)")
        names = [f.name for f in dataclasses.fields(cls) if f.name != "options"]
        sections = {k: d.pop(k) for k in list(d) if k not in names}
        options = None
        for name, value in sections.items():
            if name != kind:
                known = name in regularizers.available()
                raise ValueError(f"{where}.{name} is the section of reg {name}; this configuration's reg is {kind}"
                                 if known else f"unknown key(s) '{where}.{name}' in {where}; allowed: {names} and "
                                 f"the section of the active regularizer ('{kind}')")
            options = regularizers.get(kind).Options.from_dict(value, f"{where}.{name}")
        hints = typing.get_type_hints(cls)
        kwargs = {k: convert(hints[k], v, f"{path}.{k}" if path else k) for k, v in d.items()}
        return cls(**kwargs, options=options)

    def option_value(self, name: str, option: str) -> Any:
        """The value of regularizer ``name``'s ``option``: this configuration's if ``name`` is active, else
        its default."""
        opts = self.options if self.kind == name else regularizers.get(name).Options()
        return getattr(opts, option)


@dataclass(frozen=True)
class LossConfig(Section):
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
class OptimConfig(Section):
    steps: int = setting(2000, "total optimizer steps (a finished run grows with --resume --steps N)", in_hash=False)
    batch: int = setting(256, "batch size (global, split over processes)")
    lr: float = setting(2e-3, "Adam learning rate")
    ema_decay: float = setting(0.999, "EMA decay of the weights (warm-up min(decay, (1+k)/(10+k)))")
    grad_clip: float | None = setting(None, "clip the global gradient norm (none: no clipping)")
    ckpt_every: int = setting(500, "checkpoint (and numbered snapshot) every N steps", in_hash=False)
    keep: int = setting(3, "numbered snapshots kept beside the latest checkpoint", in_hash=False)
    init_from: str | None = setting(None, "start from this run folder or checkpoint (see --init-state)")
    init_state: InitState = setting(InitState.CONTINUE, "with --init-from: continue its model, EMA and optimizer "
                                    "state at this run's lr (continue), or only its weights with a fresh optimizer "
                                    "and EMA (fresh)")
    init_weights: Weights = setting(Weights.EMA, "with --init-state fresh: which weights --init-from reads, ema or "
                                    "model")
    bf16: bool = setting(False, "bf16 autocast for the DSM network pass (CUDA only)")

    def __post_init__(self) -> None:
        self._check_enums()
        _check_int("steps", self.steps, 1, 10**9)
        _check_int("batch", self.batch, 1, 10**7)
        _check_float("lr", self.lr, 0.0, 10.0, lo_open=True)
        _check_float("ema_decay", self.ema_decay, 0.0, 1.0, hi_open=True)
        if self.grad_clip is not None:
            _check_float("grad_clip", self.grad_clip, 0.0, lo_open=True)
        _check_int("ckpt_every", self.ckpt_every, 1)
        _check_int("keep", self.keep, 0)

    @classmethod
    def from_dict(cls, d: Any, path: str = "") -> OptimConfig:
        """Inverse of ``to_dict``; a 0.2 configuration with ``init_from`` and no ``init_state`` meant fresh."""
        if isinstance(d, dict) and d.get("init_from") is not None and "init_state" not in d:
            d = {**d, "init_state": InitState.FRESH.value}
        return typing.cast(OptimConfig, super().from_dict(d, path))


class EvalScale(enum.Enum):
    """How the settings an image preset leaves open (none) are filled in at evaluation time."""

    DEVICE = "device"  # sized to the device: a few points and times on a CPU (minutes), more on a GPU
    PAPER = "paper"  # the Score SDE protocol: RK45 at rtol 1e-5, the test set repeated 5 times


# What the image presets' open evaluation settings become (EvalConfig.resolve); the measured costs behind
# the CPU row are in benchmarks/RESULTS.md ("image evaluation").
_IMAGE_EVAL: dict[str, dict[str, Any]] = {
    "cpu": {"times": (0.05, 0.5, 1.0), "points": 8, "nll_points": 8, "rtol": 1e-4, "repeats": 1, "ode": "dopri5"},
    "cuda": {"times": DEFAULT_TIMES, "points": 64, "nll_points": 256, "rtol": 1e-5, "repeats": 1, "ode": "dopri5"},
    "paper": {"times": DEFAULT_TIMES, "points": 256, "nll_points": 10000, "rtol": 1e-5, "repeats": 5, "ode": "RK45"},
}


@dataclass(frozen=True)
class EvalConfig(Section):
    """Evaluation settings. Image presets leave ``times``, ``points``, ``nll_points``, ``rtol``, ``repeats`` and
    ``ode`` open (none): :meth:`resolve` fills them for the device, or at paper scale (``--eval-scale paper``)."""

    times: tuple[float, ...] | None = setting(DEFAULT_TIMES, "evaluation times of the per-t metrics (none: by "
                                              "--eval-scale)", flag="eval-times")
    points: int | None = setting(1000, "points x_t per evaluation time (none: by --eval-scale)", flag="eval-points")
    nll_points: int | None = setting(300, "held-out points for the PF-ODE NLL / bits/dim (0: skip; none: by "
                                     "--eval-scale)", flag="eval-nll-points")
    samples: int = setting(1000, "samples for sample distances, 2-D only (0: skip)", flag="eval-samples")
    rtol: float | None = setting(1e-5, "rtol = atol of the PF-ODE NLL solve (none: by --eval-scale)",
                                 flag="eval-rtol")
    repeats: int | None = setting(1, "repeats of the NLL points, dequantization and probes redrawn (none: by "
                                  "--eval-scale)", flag="eval-repeats")
    ode: ODEMethod | None = setting(ODEMethod.RK45, "the PF-ODE NLL solver: rk45 (scipy, float64 on the host) or "
                                    "dopri5 (torch, on the device, error per point); none: by --eval-scale",
                                    flag="eval-ode")
    scale: EvalScale = setting(EvalScale.DEVICE, "what open (none) settings become: device (minutes on a CPU) or "
                               "paper (RK45 1e-5, 10000 test points x 5)", flag="eval-scale")
    batch: int = setting(256, "points per chunk of the image evaluation", flag="eval-batch")
    probes: int = setting(2, "Hutchinson probes per point where D is large", flag="eval-probes")
    seed: int | None = setting(None, "seed of the evaluation's draws (none: derived from the run's seed)",
                               flag="eval-seed")
    gap_grid: int = setting(0, "N > 0: the ODE–SDE gap on an N×N grid, 2-D data only (0: skip; N = 128 takes about a "
                            "minute on one core)", flag="eval-gap-grid")

    def __post_init__(self) -> None:
        self._check_enums()
        if self.times is not None and (not self.times or not all(
                isinstance(t, (int, float)) and not isinstance(t, bool) and math.isfinite(t) and 0 < t <= 1
                for t in self.times)):
            raise ValueError(f"eval times must be a nonempty list of numbers in (0, 1]; got {list(self.times)!r}")
        if self.times is not None and list(self.times) != sorted(set(self.times)):
            raise ValueError(f"eval times must be increasing, without repeats; got {list(self.times)!r}")
        if self.points is not None:
            _check_int("eval_points", self.points, 2, 10**7)
        if self.nll_points is not None:
            _check_int("eval_nll_points", self.nll_points, 0, 10**7)
        _check_int("eval_samples", self.samples, 0, 10**7)
        if self.samples == 1:
            raise ValueError("eval_samples must be 0 (skip) or >= 2; got 1")
        if self.rtol is not None:
            _check_float("eval_rtol", self.rtol, 0.0, 1.0, lo_open=True, hi_open=True)
        if self.repeats is not None:
            _check_int("eval_repeats", self.repeats, 1, 100)
        _check_int("eval_batch", self.batch, 1, 10**7)
        _check_int("eval_probes", self.probes, 2, 1024)
        if self.seed is not None:
            _check_int("eval_seed", self.seed, 0, 2**62)
        if self.gap_grid != 0:
            _check_int("eval_gap_grid", self.gap_grid, 16, 512)

    def resolve(self, device_type: str) -> EvalConfig:
        """The settings with every open (none) one filled: by ``scale`` and the device ("cpu" or "cuda")."""
        fill = _IMAGE_EVAL["paper" if self.scale is EvalScale.PAPER else ("cpu" if device_type == "cpu" else "cuda")]
        changes: dict[str, Any] = {
            k: (ODEMethod(v) if k == "ode" else v) for k, v in fill.items() if getattr(self, k) is None
        }
        return dataclasses.replace(self, **changes) if changes else self


@dataclass(frozen=True)
class RunConfig(Section):
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
    plugins: tuple[str, ...] = setting((), "import this module from sys.path first; the Regularizer subclasses it "
                                       "defines become --reg choices (repeatable)", flag="plugin", in_hash=False,
                                       repeat=True)

    def __post_init__(self) -> None:
        self._check_enums()
        _check_int("seed", self.seed, 0, 2**62)
        _check_int("threads", self.threads, 1, 1024)
        for module in self.plugins:
            regularizers.load_plugin(module)
        reg = self.loss.reg
        if reg.kind != regularizers.NONE:
            regularizers.get(reg.kind).check(self, reg.options)
        if reg.n_points is not None and reg.n_points > self.optim.batch:
            raise ValueError(f"reg_batch must be <= batch ({self.optim.batch}); got {reg.n_points}")
        if self.data.name is Dataset.CIFAR10 and self.data.data_dir is None:
            raise ValueError("data cifar10 needs data_dir (--data-dir: the cifar-10-batches-py folder or its parent)")
        if self.eval.gap_grid and self.dim != 2:
            raise ValueError(f"eval_gap_grid needs 2-D data (the grids are 2-D); data {self.data.name.value} has "
                             f"D = {self.dim}")
        # open times are filled by EvalConfig.resolve on the device: check every fill it can choose, before training
        paper = self.eval.scale is EvalScale.PAPER
        fills = (_IMAGE_EVAL["paper"],) if paper else (_IMAGE_EVAL["cpu"], _IMAGE_EVAL["cuda"])
        for times in [self.eval.times] if self.eval.times is not None else [f["times"] for f in fills]:
            if min(times) < self.loss.eps:
                raise ValueError(f"eval times must lie in [eps, 1] = [{self.loss.eps:g}, 1]; got {list(times)}"
                                 + ("" if self.eval.times is not None else " (the device's default: set --eval-times)"))

    @classmethod
    def from_dict(cls, d: Any, path: str = "") -> RunConfig:
        """Inverse of :meth:`to_dict`; the plug-ins it names are loaded before its regularizer is read."""
        if isinstance(d, dict) and "plugins" in d:
            for module in convert(tuple[str, ...], d["plugins"], "plugins"):
                regularizers.load_plugin(module)
        return typing.cast(RunConfig, super().from_dict(d, path))

    @property
    def dim(self) -> int:
        """D, the number of coordinates of one sample (the product of ``data.shape``)."""
        return math.prod(self.data.shape)

    @property
    def eval_seed(self) -> int:
        return self.eval.seed if self.eval.seed is not None else self.seed + 12345

    def override(self, changes: dict[tuple[str, ...], Any]) -> RunConfig:
        """A copy with the leaves at the given paths replaced, e.g. ``{("loss", "eps"): 1e-5}``; validated.
        A regularizer option's path is ``("loss", "reg", NAME, FIELD)``."""
        changes = dict(changes)
        kind, lam = ("loss", "reg", "kind"), ("loss", "reg", "lam")
        if kind in changes and plain(changes[kind]) == regularizers.NONE:
            changes[lam] = 0.0  # plain DSM: one way to say it (reg none sets lam 0, whatever lam said)
        if kind in changes:  # options of a regularizer that is not the one chosen here cannot act: dropped
            changes = {p: v for p, v in changes.items()
                       if not (len(p) == 4 and p[:2] == ("loss", "reg") and p[2] != plain(changes[kind]))}
        if lam in changes and kind not in changes and changes[lam] == 0:
            changes[kind] = regularizers.NONE
        if ("plugins",) in changes:
            for module in changes[("plugins",)]:
                regularizers.load_plugin(module)
        d = self.to_dict()
        if kind in changes and plain(changes[kind]) != self.loss.reg.kind:
            d["loss"]["reg"].pop(self.loss.reg.kind, None)  # the old regularizer's options go with it
        for path, value in changes.items():
            node = d
            for key in path[:-1]:
                node = node.setdefault(key, {})
            node[path[-1]] = plain(value)
        return RunConfig.from_dict(d)

    def fingerprint(self) -> str:
        """A short hash of the settings that change the trained weights (not steps, checkpointing,
        device, threads or evaluation, nor settings inert in this configuration): runs with equal
        fingerprints are the same run, possibly grown. CIFAR-10 enters by the content of its training
        batches (:func:`fpe_lab.data.images.cifar10_digest`), not by the spelling of ``data_dir``, so
        computing it reads (once per process and file version) or stats those files; DataError if they
        are missing."""
        return _fingerprint(_hashed(self))

    def legacy_fingerprints(self) -> tuple[str, ...]:
        """Fingerprints that run folders of this configuration were named by before the current rule, for
        finding and verifying those folders (:mod:`fpe_lab.runs`): for cifar10 the one with ``data_dir``
        hashed as the path string typed (before it entered by content); empty for every other data set.
        Reads no files."""
        if self.data.name is not Dataset.CIFAR10:
            return ()
        return (_fingerprint(_hashed(self, data_by_content=False)),)

    def label(self) -> str:
        """A readable run name: data, SDE, regularizer and weight, seed."""
        reg = self.loss.reg
        kind = reg.kind if reg.kind == regularizers.NONE else f"{reg.kind}{reg.lam:g}"
        return f"{self.data.name.value}_{self.sde.kind.value}_{kind}_seed{self.seed}"


def _fingerprint(hashed: dict[str, Any]) -> str:
    text = json.dumps(hashed, sort_keys=True)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:10]


def _reg_hashed(config: RunConfig) -> dict[str, Any]:
    """The regularizer's part of the fingerprint: the shared fields and the active regularizer's options,
    each setting that is inert in this configuration at its default. Built-ins are written in the flat
    form of configuration 0.2, so earlier run folders keep their fingerprints."""
    reg = config.loss.reg
    if reg.kind == regularizers.NONE:
        return {"kind": regularizers.NONE}
    assert reg.options is not None
    inert = regularizers.get(reg.kind).inert(config, reg.options)
    out = {k: v for k, v in reg.hashed().items() if k != "options"}
    out.update({k: v for k, v in _SHARED_DEFAULTS.items() if k in inert})
    options = {k: v for k, v in reg.options.hashed().items() if k not in inert}
    legacy = {(name, option): flat for flat, (name, option, _) in _LEGACY_FIELDS.items()}
    if not any(name == reg.kind for name, _ in legacy):
        return {**out, reg.kind: options}
    out.update({flat: default for flat, (_, _, default) in _LEGACY_FIELDS.items()})
    out.update({legacy[(reg.kind, k)]: v for k, v in options.items()})
    return out


def _hashed(config: RunConfig, data_by_content: bool = True) -> dict[str, Any]:
    """The settings that decide the trained weights. A setting that cannot act in this configuration enters
    at its default (so it does not split run folders, and older folders keep their fingerprints).

    ``data.data_dir`` enters as None for every data set but cifar10 (only cifar10 reads files); for cifar10
    as ``"sha256:" + cifar10_digest(data_dir)``, the content of its training batches, so the same data under
    another path spelling (relative or absolute, a symlink, the folder or its parent, a copy) is the same
    run. ``data_by_content=False`` gives the rule before that, the path string as typed: it names the run
    folders made then (:meth:`RunConfig.legacy_fingerprints`)."""
    out = config.hashed()
    out.pop("eval")
    data, sde, model = out["data"], out["sde"], out["model"]
    if config.data.name is not Dataset.MIXTURE:
        del data["dim"], data["components"]  # fixed at 2 and 4 off the mixture
    if config.data.data_shape is None:
        del data["data_shape"]  # added after 0.2: absent unless set
    if config.data.rank == 0:
        del data["rank"]
    if config.data.name is not Dataset.CIFAR10:
        data["data_dir"] = None  # only cifar10 reads files
    elif data_by_content:
        assert config.data.data_dir is not None  # RunConfig requires it for cifar10
        data["data_dir"] = "sha256:" + cifar10_digest(config.data.data_dir)
    if not config.data.is_image:
        model["unet"], model["dropout"] = UNetSize.TINY.value, None  # the MLP
    optim = out["optim"]
    if config.optim.init_from is None or config.optim.init_state is InitState.FRESH:
        del optim["init_state"]  # 0.2 runs (fresh) keep their fingerprints
    if config.optim.init_from is not None and config.optim.init_state is InitState.CONTINUE:
        # the source by identity (its folder name holds its label and fingerprint), not by path spelling
        src = Path(config.optim.init_from)
        optim["init_from"] = src.name if src.suffix != ".pt" else f"{src.parent.name}/{src.name}"
        optim["init_weights"] = Weights.EMA.value  # read only by --init-state fresh
    if config.sde.kind is SDEKind.VE:
        sde["beta_min"], sde["beta_max"] = 0.1, 20.0
    else:
        sde["sigma_min"], sde["sigma_max"] = 0.01, 50.0
    out["loss"]["reg"] = _reg_hashed(config)
    return out


# ---------------------------------------------------------------------- leaves (for the CLI)
@dataclass(frozen=True)
class Leaf:
    """One settable field: its path in the config, its flag, type, help and whether the flag repeats."""

    path: tuple[str, ...]
    flag: str
    kind: Any
    help: str
    repeat: bool = False

    def get(self, config: RunConfig) -> Any:
        """This field's value in ``config`` (a regularizer option: its default unless that regularizer is active)."""
        v: Any = config
        for i, key in enumerate(self.path):
            if isinstance(v, RegConfig) and key not in {f.name for f in dataclasses.fields(v)}:
                return v.option_value(key, self.path[i + 1])
            v = getattr(v, key)
        return v


def leaves(cls: type = RunConfig, prefix: tuple[str, ...] = ()) -> Iterator[Leaf]:
    """Every leaf field of the configuration, depth first in declaration order; under ``loss.reg`` the options
    of every available regularizer (built-ins and loaded plug-ins), with flags ``--<name>-<field>``."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.metadata.get("section"):
            yield from leaves(hints[f.name], prefix + (f.name,))
        elif f.metadata.get("options"):
            for name, reg_cls in regularizers.available().items():
                for leaf in leaves(reg_cls.Options, prefix + (name,)):
                    flag = f"{name}-{leaf.flag}".replace("_", "-")
                    yield dataclasses.replace(leaf, flag=flag, help=f"{name}: {leaf.help}")
        else:
            flag = f.metadata.get("flag") or f.name.replace("_", "-")
            yield Leaf(prefix + (f.name,), flag, hints[f.name], f.metadata.get("help", ""),
                       f.metadata.get("repeat", False))


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
                                                options=FPEOptions(residual_path=ResidualPath.GENERIC))),
        optim=OptimConfig(steps=1000, batch=64, lr=2e-4, ema_decay=0.9999, grad_clip=1.0),
        eval=EvalConfig(times=None, points=None, nll_points=None, rtol=None, repeats=None, ode=None, samples=0,
                        batch=64),
    )
    return dataclasses.replace(base, **changes)


def cifar10(data_dir: str = "data", **changes: Any) -> RunConfig:
    """The ``cifar10`` preset: tiny U-Net, DSM + (0.1/D) · normalized residual with one Rademacher probe,
    Adam 2e-4, EMA 0.9999, clip 1, eps 1e-5 (the paper's fine-tuning recipe scale)."""
    return _image_preset(DataConfig(name=Dataset.CIFAR10, data_dir=data_dir, hflip=True), **changes)


def digits(**changes: Any) -> RunConfig:
    """The ``digits`` preset: the cifar10 recipe on scikit-learn's offline 8×8 digits (1 channel, no flips)."""
    return _image_preset(DataConfig(name=Dataset.DIGITS), **changes)
