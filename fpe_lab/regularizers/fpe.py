r"""The score-FPE regularizer (FP-Diffusion, Lai et al., ICML 2023): per sample w(t) ‖R_θ(x, t)‖², with

    R_θ = ∂_t s_θ − ∇_x[½g² ∇·s_θ + ½g² ‖s_θ‖² − ⟨f, s_θ⟩ − ∇·f]     (fpe_lab.fpe.score_fpe_residual).

Options (``--fpe-…`` flags, section ``loss.reg.fpe``): the time weighting w(t), where R is evaluated,
the estimator of ‖R‖² under a Hutchinson divergence, how ∂_t s is taken, and the residual's code path.
The weighting's derivation and the paper's 1/D²: docs/derivations.md#the-fpe-weighting-and-the-papers-1d2.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import torch

from fpe_lab.fpe import (
    DivergenceEstimator,
    ExactDivergence,
    FiniteDifferenceDt,
    ForwardModeDt,
    Hutchinson,
    ResidualEstimator,
    ScoreFn,
    score_fpe_residual,
)
from fpe_lab.regularizers.base import Regularizer, check_enum, check_lam, check_n_points, dot, first, sq
from fpe_lab.sde import LinearSDE
from fpe_lab.settings import Section, setting

if TYPE_CHECKING:
    from fpe_lab.config import RunConfig

__all__ = [
    "FPEWeighting",
    "FPEPoints",
    "TimeDerivativeKind",
    "ResidualPath",
    "ResidualFn",
    "ScoreResidualFn",
    "FPEOptions",
    "FPERegularizer",
    "JET_MAX_DIM",
]

JET_MAX_DIM = 8
"""Largest D of the jet residual path: it carries 1 + D + D(D+1)/2 derivative streams per hidden unit
(45 at D = 8, 153 at D = 16, against 6 at D = 2), so its memory grows as D²; above 8 use the generic path."""


class FPEWeighting(enum.Enum):
    """w(t) in E w(t) ‖R_θ‖². NORMALIZED makes w‖R‖² O(δ²) at every t for a network off by O(δ);
    G2 is the paper's code (without its 1/D²: pass lam = α/D²)."""

    NORMALIZED = "normalized"  # w = sigma⁶ / g⁴
    G2 = "g2"  # w = g²  (sony/fp-diffusion)
    ONE = "one"  # w = 1

    def weight(self, sde: LinearSDE, t: torch.Tensor) -> torch.Tensor:
        """w(t), shape of t."""
        match self:
            case FPEWeighting.NORMALIZED:
                return (sde.marginal(t)[1] ** 3 / sde.diffusion(t) ** 2) ** 2
            case FPEWeighting.G2:
                return sde.diffusion(t) ** 2
            case FPEWeighting.ONE:
                return torch.ones_like(t)
        raise AssertionError(self)


class FPEPoints(enum.Enum):
    """Where the FPE regularizer evaluates R_θ."""

    PERTURBED = "perturbed"  # the DSM training points (x_t, t) themselves
    RESAMPLED = "resampled"  # fresh points x' = alpha(t) x_0[π] + sigma(t) z', independent of the DSM points


class TimeDerivativeKind(enum.Enum):
    """∂_t s inside the residual."""

    JVP = "jvp"  # forward-mode JVP in t: exact
    FD = "fd"  # central difference clipped to [eps, 1], extra evaluations without dropout


class ResidualPath(enum.Enum):
    """How R_θ is differentiated during training."""

    GENERIC = "generic"  # fpe_lab.fpe.score_fpe_residual: autograd, any network
    JET = "jet"  # fpe_lab.nets.jet: one Taylor-mode pass through the MLP (exact divergence, JVP ∂_t only)


class ResidualFn(Protocol):
    """``residual(score_fn, sde, x, t, divergence=None, create_graph=False) -> R`` of the shape of x."""

    def __call__(
        self,
        score_fn: ScoreFn,
        sde: LinearSDE,
        x: torch.Tensor,
        t: torch.Tensor,
        divergence: DivergenceEstimator | None = None,
        create_graph: bool = False,
    ) -> torch.Tensor: ...


@runtime_checkable
class ScoreResidualFn(ResidualFn, Protocol):
    """A :class:`ResidualFn` that can also return the score it evaluated on the way:
    ``with_score(...) -> (s, R)``, each the shape of x (``fpe_lab.nets.jet.jet_score_fpe_residual``)."""

    def with_score(
        self,
        score_fn: ScoreFn,
        sde: LinearSDE,
        x: torch.Tensor,
        t: torch.Tensor,
        divergence: DivergenceEstimator | None = None,
        create_graph: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]: ...


@dataclass(frozen=True)
class FPEOptions(Section):
    """Settings of the score-FPE regularizer (flags ``--fpe-<field>``)."""

    weighting: FPEWeighting = setting(FPEWeighting.NORMALIZED,
                                      "w(t): normalized = sigma^6/g^4, g2 = g^2 (the paper's), one")
    points: FPEPoints = setting(FPEPoints.PERTURBED, "where R is evaluated: the DSM points or resampled ones")
    estimator: ResidualEstimator = setting(ResidualEstimator.UNBIASED,
                                           "with a Hutchinson divergence: ⟨R̂₁, R̂₂⟩ (unbiased) or ‖R̂‖² "
                                           "(squared, the paper's, biased upward)")
    dt: TimeDerivativeKind = setting(TimeDerivativeKind.JVP, "∂_t s inside R: jvp (exact) or fd (clipped central "
                                     "difference)")
    fd_step: float = setting(1e-3, "h of the finite-difference ∂_t s (with --fpe-dt fd), in (0, 0.5)")
    residual_path: ResidualPath = setting(ResidualPath.JET, "jet (Taylor mode, MLP only) or generic (autograd)")

    def __post_init__(self) -> None:
        self._check_enums()
        if not (isinstance(self.fd_step, float) and 0 < self.fd_step < 0.5):
            raise ValueError(f"fpe fd_step must be a number in (0, 0.5); got {self.fd_step!r}")


def _fp32_residual(score_fn, sde, x, t, divergence=None, create_graph=False, time_derivative=None):
    """score_fpe_residual with autocast disabled: the residual's derivatives in fp32 under bf16 training."""
    with torch.autocast(device_type=x.device.type, enabled=False):
        return score_fpe_residual(score_fn, sde, x.float(), t.float(), divergence=divergence,
                                  create_graph=create_graph, time_derivative=time_derivative)


def _with_generator(divergence: DivergenceEstimator | None, generator: torch.Generator | None) -> Any:
    """A Hutchinson estimator without its own generator draws its probes from ``generator`` (the loss's),
    never from torch's global RNG; anything else is returned as is."""
    if isinstance(divergence, Hutchinson) and divergence.generator is None and generator is not None:
        return dataclasses.replace(divergence, generator=generator)
    return divergence


@dataclass(frozen=True)
class FPERegularizer(Regularizer):
    r"""Per-sample w(t) ‖R_θ(x, t)‖² (times ``lam`` in the loss), differentiable in the parameters.

    Args:
        lam: the weight lam ≥ 0 in L = L_dsm + lam · L_fpe.
        weighting: w(t), see :class:`FPEWeighting`.
        points: ``PERTURBED``: the DSM points x_t = alpha(t) x0 + sigma(t) z. ``RESAMPLED``:
            x' = alpha(t) x0[π] + sigma(t) z' with a random permutation π and fresh noise z' from the
            generator; entry i stays at time t_i, so the loss's importance weight of t_i applies to it.
        n_points: evaluate R on the first ``n_points`` points only (None: all).
        divergence: ∇·s estimator inside R (None: exact; ``fpe_lab.fpe.Hutchinson`` for images). A
            ``Hutchinson`` without its own generator draws its probes from the loss's generator.
        residual: :func:`fpe_lab.fpe.score_fpe_residual` or a fast path with the same signature; one
            that also returns s (:class:`ScoreResidualFn`) hands s to DSM (:meth:`penalty_and_score`).
        estimator: ‖R̂‖² or ⟨R̂₁, R̂₂⟩ (``fpe_lab.fpe.ResidualEstimator``); equal with an exact divergence.
    """

    Options = FPEOptions

    lam: float
    weighting: FPEWeighting = FPEWeighting.NORMALIZED
    points: FPEPoints = FPEPoints.PERTURBED
    n_points: int | None = None
    divergence: DivergenceEstimator | None = None
    residual: ResidualFn = field(default=score_fpe_residual)
    estimator: ResidualEstimator = ResidualEstimator.UNBIASED

    def __post_init__(self) -> None:
        check_lam(self.lam)
        check_enum(self.weighting, FPEWeighting, "weighting")
        check_enum(self.points, FPEPoints, "points")
        check_n_points(self.n_points)
        check_enum(self.estimator, ResidualEstimator, "estimator")
        if not callable(self.residual):
            raise ValueError("residual must be a residual function (fpe_lab.fpe.score_fpe_residual); "
                             f"got {self.residual!r}")

    @classmethod
    def from_config(cls, config: RunConfig, options: FPEOptions, lam: float) -> FPERegularizer:
        reg = config.loss.reg
        exact = reg.divergence.value == "exact"
        residual: Any
        if options.residual_path is ResidualPath.JET:
            from fpe_lab.nets.jet import jet_score_fpe_residual

            residual = jet_score_fpe_residual
        else:
            dt = (ForwardModeDt() if options.dt is TimeDerivativeKind.JVP
                  else FiniteDifferenceDt(h=options.fd_step, eps=config.loss.eps))
            residual = functools.partial(_fp32_residual if config.optim.bf16 else score_fpe_residual,
                                         time_derivative=dt)
        return cls(lam=lam, weighting=options.weighting, points=options.points, n_points=reg.n_points,
                   divergence=None if exact else Hutchinson(reg.probes, reg.probe), residual=residual,
                   estimator=options.estimator)

    @classmethod
    def check(cls, config: RunConfig, options: FPEOptions) -> None:
        if options.residual_path is not ResidualPath.JET:
            return
        reg = config.loss.reg
        if reg.divergence.value != "exact" or options.dt is not TimeDerivativeKind.JVP:
            raise ValueError("fpe residual_path jet computes the exact divergence and ∂_t by forward mode; got "
                             f"divergence {reg.divergence.value}, dt {options.dt.value}: "
                             "use --fpe-residual-path generic")
        if config.data.is_image:
            raise ValueError(f"fpe residual_path jet needs the MLP of point data; data {config.data.name.value} "
                             f"of shape {config.data.shape} uses the U-Net: use --fpe-residual-path generic")
        if config.dim > JET_MAX_DIM:
            raise ValueError(f"fpe residual_path jet supports data_dim <= {JET_MAX_DIM} (it carries 1 + D + "
                             f"D(D+1)/2 derivative streams per hidden unit, "
                             f"{1 + config.dim + config.dim * (config.dim + 1) // 2} at D = {config.dim}); got "
                             f"data_dim {config.dim}: use --fpe-residual-path generic")

    @classmethod
    def inert(cls, config: RunConfig, options: FPEOptions) -> frozenset[str]:
        out = set()
        if config.loss.reg.divergence.value == "exact":
            out |= {"estimator", "probes", "probe"}  # R is exact: one evaluation, no probes
        if options.dt is TimeDerivativeKind.JVP:
            out.add("fd_step")
        return frozenset(out)

    def points_for(
        self, sde: LinearSDE, x0: torch.Tensor, t: torch.Tensor, z: torch.Tensor, generator: torch.Generator | None
    ) -> tuple[torch.Tensor, ...]:
        """(x, t) where R is evaluated, shapes (m, *dims) and (m,), m = min(b, n_points); see ``points``."""
        match self.points:
            case FPEPoints.PERTURBED:
                x = sde.perturb(x0, t, z)
            case FPEPoints.RESAMPLED:
                device = generator.device if generator is not None else x0.device
                perm = torch.randperm(x0.shape[0], generator=generator, device=device).to(x0.device)
                z_new = torch.randn(x0.shape, generator=generator, dtype=x0.dtype, device=x0.device)
                x = sde.perturb(x0[perm], t, z_new)
        return first(self.n_points, x, t)

    def _evaluate(
        self,
        score_fn: ScoreFn,
        sde: LinearSDE,
        x: torch.Tensor,
        t: torch.Tensor,
        generator: torch.Generator | None,
        with_score: bool,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(w ‖R̂‖² or w ⟨R̂₁, R̂₂⟩, s or None) at the given points."""
        div = _with_generator(self.divergence, generator)
        s: torch.Tensor | None
        if with_score:
            assert isinstance(self.residual, ScoreResidualFn)
            s, r = self.residual.with_score(score_fn, sde, x, t, divergence=div, create_graph=True)
        else:
            s, r = None, self.residual(score_fn, sde, x, t, divergence=div, create_graph=True)
        w = self.weighting.weight(sde, t)
        if self.estimator is ResidualEstimator.SQUARED or div is None or isinstance(div, ExactDivergence):
            return w * sq(r), s  # with an exact R, ⟨R, R⟩ = ‖R‖²: one evaluation
        r2 = self.residual(score_fn, sde, x, t, divergence=div, create_graph=True)  # fresh probes
        return w * dot(r, r2), s

    def penalty_at(
        self,
        score_fn: ScoreFn,
        sde: LinearSDE,
        x: torch.Tensor,
        t: torch.Tensor,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """w(t) ‖R_θ(x, t)‖² (or the ``estimator``'s form) per sample, shape (b,), at given points x of
        shape (b, *dims) and t of shape (b,); probes of a generator-less Hutchinson from ``generator``."""
        return self._evaluate(score_fn, sde, x, t, generator, with_score=False)[0]

    def __call__(
        self,
        score_fn: ScoreFn,
        sde: LinearSDE,
        x0: torch.Tensor,
        t: torch.Tensor,
        z: torch.Tensor,
        generator: torch.Generator | None,
    ) -> torch.Tensor:
        """The penalty at :meth:`points_for`, shape (m,)."""
        x, tt = self.points_for(sde, x0, t, z, generator)
        return self.penalty_at(score_fn, sde, x, tt, generator)

    def penalty_and_score(
        self,
        score_fn: ScoreFn,
        sde: LinearSDE,
        x0: torch.Tensor,
        t: torch.Tensor,
        z: torch.Tensor,
        generator: torch.Generator | None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(penalty, s_θ(x_t, t)) when R is evaluated at all DSM points by a :class:`ScoreResidualFn`,
        else (penalty, None): the :class:`fpe_lab.regularizers.base.SharesScore` hook of the loss."""
        shares = (
            self.points is FPEPoints.PERTURBED
            and (self.n_points is None or self.n_points >= x0.shape[0])
            and isinstance(self.residual, ScoreResidualFn)
        )
        if not shares:
            return self(score_fn, sde, x0, t, z, generator), None
        return self._evaluate(score_fn, sde, sde.perturb(x0, t, z), t, generator, with_score=True)
