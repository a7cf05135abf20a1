r"""Training losses: denoising score matching and the score-FPE regularizer (FP-Diffusion, Lai et al. 2023).

With x_t = alpha(t) x_0 + sigma(t) z, z ~ N(0, I), t ~ U[eps, 1]:

    DSM:  L_dsm(θ) = E_t E_{x_0, z} lambda(t) ‖s_θ(x_t, t) + z / sigma(t)‖²
          lambda = sigma²  ("sigma2": ‖sigma s_θ + z‖², Score SDE's default)  or
          lambda = g²      ("likelihood": Song et al. 2021, bounds the NLL)

    FPE:  L_fpe(θ) = E_t E_{x ~ p_t} w(t) ‖R_θ(x, t)‖²,
          R_θ = ∂_t s_θ − ∇_x[½g² ∇·s_θ + ½g² ‖s_θ‖² − ⟨f, s_θ⟩ − ∇·f]   (fpe_lab.fpe)

    L = L_dsm + lam · L_fpe.

‖·‖² sums over all coordinates of one sample; expectations are batch means. Everything works for
x_0 of shape (b, *dims) — 2-D points and images alike: coefficients broadcast through
:func:`fpe_lab.shapes.append_dims`, and the divergence inside R is whatever estimator is passed
(``ExactDivergence`` for low D, ``Hutchinson`` for images). The residual function is a parameter
too: :func:`fpe_lab.fpe.score_fpe_residual` for any network, or a fast path with the same signature
(``fpe_lab.nets.jet.jet_score_fpe_residual`` for the MLP).
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field
from typing import Protocol

import torch

from fpe_lab.fpe import DivergenceEstimator, ScoreFn, score_fpe_residual
from fpe_lab.sde import LinearSDE
from fpe_lab.shapes import append_dims

__all__ = [
    "DSMWeighting",
    "FPEWeighting",
    "FPEPoints",
    "ResidualFn",
    "LossTerms",
    "sample_time",
    "perturb",
    "dsm_loss",
    "FPERegularizer",
    "ScoreFPELoss",
]


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


class DSMWeighting(enum.Enum):
    """lambda(t) in L_dsm = E lambda(t) ‖s_θ(x_t, t) + z/sigma‖²."""

    SIGMA2 = "sigma2"  # lambda = sigma(t)²: the loss is ‖sigma s_θ + z‖², O(1) at every t
    LIKELIHOOD = "likelihood"  # lambda = g(t)²: the likelihood weighting of Song et al. (2021)

    def weight(self, sde: LinearSDE, t: torch.Tensor) -> torch.Tensor:
        """lambda(t), shape of t."""
        match self:
            case DSMWeighting.SIGMA2:
                return sde.marginal(t)[1] ** 2
            case DSMWeighting.LIKELIHOOD:
                return sde.diffusion(t) ** 2


class FPEWeighting(enum.Enum):
    r"""w(t) in L_fpe = E w(t) ‖R_θ(x, t)‖².

    The residual of a score s = −n/sigma whose network output n is off by O(δ) is O(δ g²/sigma³):
    ∂_t s and ½g²∇(∇·s) both scale like g²/sigma³. ``NORMALIZED`` takes w = (sigma³/g²)², which makes
    w‖R‖² O(δ²) at every t, like DSM with sigma² weighting; ``G2`` is the paper's code
    (α g²‖R‖², without its 1/D²), which puts almost all weight on the smallest t.
    """

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


class FPEPoints(enum.Enum):
    """Where the regularizer evaluates R_θ."""

    PERTURBED = "perturbed"  # the DSM training points (x_t, t) themselves
    RESAMPLED = "resampled"  # the same x_0, an independent t' ~ U[eps, 1] and noise: x_t' ~ p_t'


@dataclass(frozen=True)
class LossTerms:
    """Scalar loss tensors: ``total = dsm + lam · fpe`` (``fpe`` is 0 without a regularizer)."""

    total: torch.Tensor
    dsm: torch.Tensor
    fpe: torch.Tensor

    def is_finite(self) -> bool:
        return bool(torch.isfinite(self.total).item())

    def floats(self) -> dict[str, float]:
        return {k: float(v.detach()) for k, v in (("total", self.total), ("dsm", self.dsm), ("fpe", self.fpe))}


def _check_eps(eps: float) -> float:
    if not (isinstance(eps, (int, float)) and math.isfinite(eps) and 0 < eps < 1):
        raise ValueError(f"eps must be a number in (0, 1) (the smallest training time); got {eps!r}")
    return float(eps)


def sample_time(
    n: int, eps: float, generator: torch.Generator | None, dtype: torch.dtype, device: torch.device | str
) -> torch.Tensor:
    """t ~ U[eps, 1], shape (n,)."""
    u = torch.rand(n, generator=generator, dtype=dtype, device=device)
    return eps + (1 - eps) * u


def perturb(sde: LinearSDE, x0: torch.Tensor, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """x_t = alpha(t) x_0 + sigma(t) z for x_0, z of shape (b, *dims), t of shape (b,)."""
    alpha, sigma = sde.marginal(t)
    return append_dims(alpha, x0.ndim) * x0 + append_dims(sigma, x0.ndim) * z


def dsm_loss(
    score_fn: ScoreFn,
    sde: LinearSDE,
    x0: torch.Tensor,
    t: torch.Tensor,
    z: torch.Tensor,
    weighting: DSMWeighting = DSMWeighting.SIGMA2,
) -> torch.Tensor:
    """Per-sample lambda(t) ‖s_θ(x_t, t) + z/sigma(t)‖², shape (b,), with x_t = alpha x_0 + sigma z.

    The conditional score of x_t | x_0 is −z/sigma, so this is zero exactly when s_θ matches it.
    """
    _, sigma = sde.marginal(t)
    x_t = perturb(sde, x0, t, z)
    err = score_fn(x_t, t) + z / append_dims(sigma, z.ndim)
    return weighting.weight(sde, t) * err.reshape(err.shape[0], -1).pow(2).sum(-1)


@dataclass(frozen=True)
class FPERegularizer:
    """Per-sample w(t) ‖R_θ(x, t)‖² (times ``lam`` in the loss), differentiable in the parameters.

    Args:
        lam: the regularizer's weight lam ≥ 0 in L = L_dsm + lam · L_fpe.
        weighting: w(t), see :class:`FPEWeighting`.
        points: where R is evaluated, see :class:`FPEPoints`.
        n_points: evaluate R on the first ``n_points`` points of the batch only (None: all). R costs
            several DSM steps, so a subset trades variance for time.
        divergence: ∇·s estimator inside R (None: exact; ``fpe_lab.fpe.Hutchinson`` for images).
        residual: the residual function, :func:`fpe_lab.fpe.score_fpe_residual` or a fast path with
            the same signature.
    """

    lam: float
    weighting: FPEWeighting = FPEWeighting.NORMALIZED
    points: FPEPoints = FPEPoints.PERTURBED
    n_points: int | None = None
    divergence: DivergenceEstimator | None = None
    residual: ResidualFn = field(default=score_fpe_residual)

    def __post_init__(self) -> None:
        if not (isinstance(self.lam, (int, float)) and math.isfinite(self.lam) and self.lam >= 0):
            raise ValueError(f"lam must be a finite number >= 0; got {self.lam!r}")
        if not isinstance(self.weighting, FPEWeighting):
            raise ValueError(f"weighting must be an FPEWeighting ({[w.value for w in FPEWeighting]}); got {self.weighting!r}")
        if not isinstance(self.points, FPEPoints):
            raise ValueError(f"points must be an FPEPoints ({[p.value for p in FPEPoints]}); got {self.points!r}")
        if self.n_points is not None and not (isinstance(self.n_points, int) and self.n_points >= 1):
            raise ValueError(f"n_points must be None or an int >= 1; got {self.n_points!r}")

    def __call__(self, score_fn: ScoreFn, sde: LinearSDE, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """w(t) ‖R_θ(x, t)‖² per sample, shape (b,), for x of shape (b, *dims) and t of shape (b,)."""
        r = self.residual(score_fn, sde, x, t, divergence=self.divergence, create_graph=True)
        return self.weighting.weight(sde, t) * r.reshape(r.shape[0], -1).pow(2).sum(-1)


@dataclass(frozen=True)
class ScoreFPELoss:
    """L = E lambda(t)‖s_θ(x_t, t) + z/sigma‖² + lam · E w(t)‖R_θ‖², one batch at a time.

    ``loss(model, x0, generator) -> LossTerms`` draws t ~ U[eps, 1] and z ~ N(0, I) from
    ``generator`` (so a run is reproducible from the generator's state), for x0 of shape (b, *dims).

    Args:
        sde: the forward SDE.
        eps: smallest training time (sigma(eps) > 0 keeps s = −n/sigma finite).
        weighting: DSM weighting lambda(t).
        regularizer: the FPE term, or None for plain DSM.
    """

    sde: LinearSDE
    eps: float = 1e-5
    weighting: DSMWeighting = DSMWeighting.SIGMA2
    regularizer: FPERegularizer | None = None

    def __post_init__(self) -> None:
        _check_eps(self.eps)
        if not isinstance(self.weighting, DSMWeighting):
            raise ValueError(f"weighting must be a DSMWeighting ({[w.value for w in DSMWeighting]}); got {self.weighting!r}")

    def draw(self, x0: torch.Tensor, generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
        """t ~ U[eps, 1] of shape (b,) and z ~ N(0, I) of the shape of x0."""
        t = sample_time(x0.shape[0], self.eps, generator, x0.dtype, x0.device)
        z = torch.randn(x0.shape, generator=generator, dtype=x0.dtype, device=x0.device)
        return t, z

    def __call__(self, score_fn: ScoreFn, x0: torch.Tensor, generator: torch.Generator | None = None) -> LossTerms:
        t, z = self.draw(x0, generator)
        dsm = dsm_loss(score_fn, self.sde, x0, t, z, self.weighting).mean()
        reg = self.regularizer
        if reg is None or reg.lam == 0:
            zero = torch.zeros((), dtype=dsm.dtype, device=dsm.device)
            return LossTerms(total=dsm, dsm=dsm, fpe=zero)
        match reg.points:
            case FPEPoints.PERTURBED:
                x_r, t_r = perturb(self.sde, x0, t, z), t
            case FPEPoints.RESAMPLED:
                t_r, z_r = self.draw(x0, generator)
                x_r = perturb(self.sde, x0, t_r, z_r)
        if reg.n_points is not None:
            x_r, t_r = x_r[: reg.n_points], t_r[: reg.n_points]
        fpe = reg(score_fn, self.sde, x_r, t_r).mean()
        return LossTerms(total=dsm + reg.lam * fpe, dsm=dsm, fpe=fpe)
