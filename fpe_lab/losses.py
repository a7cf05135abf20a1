r"""Training losses: denoising score matching plus one regularizer.

With x_t = alpha(t) x_0 + sigma(t) z, z ~ N(0, I), t drawn on [eps, 1] (uniformly, or by importance
sampling, :class:`fpe_lab.time_sampling.TimeSampling`):

    DSM:  L_dsm(θ) = E_{t~U[eps,1]} E_{x_0, z} lambda(t) ‖s_θ(x_t, t) + z / sigma(t)‖²
          lambda = sigma²  ("sigma2": ‖sigma s_θ + z‖², Score SDE's default)  or
          lambda = g²      ("likelihood": Song et al. 2021, bounds the NLL)

    L = L_dsm + lam · E_{t~U[eps,1]} E_{x_0, z} P_θ(x_0, t, z),

where P_θ is the per-sample penalty of a regularizer (:mod:`fpe_lab.regularizers`: the score-FPE
residual, conservativity, high-order DSM, or a plug-in). ‖·‖² sums over all coordinates of one sample;
expectations are batch means. x_0 has shape (b, *dims), 2-D points and images alike. Randomness
(t, z, and the regularizer's draws) comes from the generator passed to the loss, so a step is
reproducible from the generator's state.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import torch

from fpe_lab.fpe import ScoreFn
from fpe_lab.regularizers.base import Regularizer, SharesScore, check_enum, sq
from fpe_lab.sde import LinearSDE
from fpe_lab.shapes import append_dims
from fpe_lab.time_sampling import TimeSampling, check_eps

__all__ = ["DSMWeighting", "LossTerms", "dsm_loss", "ScoreFPELoss"]


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
        raise AssertionError(self)


@dataclass(frozen=True)
class LossTerms:
    """Scalar loss tensors: ``total = dsm + lam · reg`` (``reg`` is 0 without a regularizer)."""

    total: torch.Tensor
    dsm: torch.Tensor
    reg: torch.Tensor

    def is_finite(self) -> bool:
        return bool(torch.isfinite(self.total).item())

    def floats(self) -> dict[str, float]:
        """{"total", "dsm", "reg"} as Python floats."""
        return {k: float(v.detach()) for k, v in (("total", self.total), ("dsm", self.dsm), ("reg", self.reg))}


def _dsm_from_score(
    s: torch.Tensor, sde: LinearSDE, t: torch.Tensor, z: torch.Tensor, weighting: DSMWeighting
) -> torch.Tensor:
    """lambda(t) ‖s + z/sigma(t)‖² per sample, shape (b,), from s = s_θ(x_t, t)."""
    _, sigma = sde.marginal(t)
    return weighting.weight(sde, t) * sq(s + z / append_dims(sigma, z.ndim))


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
    return _dsm_from_score(score_fn(sde.perturb(x0, t, z), t), sde, t, z, weighting)


@dataclass(frozen=True)
class ScoreFPELoss:
    r"""L = E lambda(t)‖s_θ(x_t, t) + z/sigma‖² + lam · E P_θ, one batch at a time.

    ``loss(score_fn, x0, generator) -> LossTerms`` draws t (``time_sampling``) and z ~ N(0, I) from
    ``generator`` (so a run is reproducible from the generator's state), for x0 of shape (b, *dims),
    then calls the regularizer with the same generator. Each sample's DSM term and penalty are
    multiplied by the time's importance weight (1 under UNIFORM), so both terms estimate their
    expectation under t ~ U[eps, 1]. When the regularizer computes s_θ at all DSM points anyway
    (:class:`SharesScore`, e.g. an FPE regularizer on the jet path), DSM uses that s instead of a
    second forward pass.

    Args:
        sde: the forward SDE.
        eps: smallest training time (sigma(eps) > 0 keeps s = −n/sigma finite).
        weighting: DSM weighting lambda(t).
        regularizer: a :class:`Regularizer`, or None for plain DSM (as is lam = 0).
        time_sampling: how t is drawn, see :class:`TimeSampling`.
    """

    sde: LinearSDE
    eps: float = 1e-5
    weighting: DSMWeighting = DSMWeighting.SIGMA2
    regularizer: Regularizer | None = None
    time_sampling: TimeSampling = TimeSampling.UNIFORM

    def __post_init__(self) -> None:
        check_eps(self.eps)
        check_enum(self.weighting, DSMWeighting, "weighting")
        if self.regularizer is not None and not isinstance(self.regularizer, Regularizer):
            raise ValueError(
                "regularizer must be None or a fpe_lab.regularizers.base.Regularizer (FPERegularizer, "
                f"ConservativeRegularizer, HODSMRegularizer or a plug-in's); got {self.regularizer!r}"
            )
        check_enum(self.time_sampling, TimeSampling, "time_sampling")
        self.time_sampling.check(self.sde, self.eps)

    def draw(
        self, x0: torch.Tensor, generator: torch.Generator | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(t, z, weight): times (b,), noise N(0, I) of the shape of x0, importance weights (b,)."""
        t, weight = self.time_sampling.sample(x0.shape[0], self.eps, self.sde, generator, x0.dtype, x0.device)
        z = torch.randn(x0.shape, generator=generator, dtype=x0.dtype, device=x0.device)
        return t, z, weight

    def __call__(self, score_fn: ScoreFn, x0: torch.Tensor, generator: torch.Generator | None = None) -> LossTerms:
        """LossTerms for the clean batch x0 of shape (b, *dims):
        dsm = mean_i weight_i lambda(t_i)‖s_θ(x_t,i, t_i) + z_i/sigma(t_i)‖², reg = mean_{i<m} weight_i P_i,
        total = dsm + lam · reg (reg = 0 and total = dsm without a regularizer or with lam = 0)."""
        t, z, weight = self.draw(x0, generator)
        reg, pen, s = self.regularizer, None, None
        if reg is not None and reg.lam != 0:
            if isinstance(reg, SharesScore):
                pen, s = reg.penalty_and_score(score_fn, self.sde, x0, t, z, generator)
            else:
                pen = reg(score_fn, self.sde, x0, t, z, generator)
            if not isinstance(pen, torch.Tensor) or pen.ndim != 1 or not 1 <= pen.shape[0] <= x0.shape[0]:
                got = tuple(pen.shape) if isinstance(pen, torch.Tensor) else type(pen).__name__
                raise ValueError("regularizer must return a per-sample penalty of shape (m,), "
                                 f"1 <= m <= {x0.shape[0]}; got {got}")
        if s is None:
            s = score_fn(self.sde.perturb(x0, t, z), t)
        dsm = (weight * _dsm_from_score(s, self.sde, t, z, self.weighting)).mean()
        if pen is None:
            zero = torch.zeros((), dtype=dsm.dtype, device=dsm.device)
            return LossTerms(total=dsm, dsm=dsm, reg=zero)
        reg_term = (weight[: pen.shape[0]] * pen).mean()
        assert reg is not None  # pen is computed only with a regularizer
        return LossTerms(total=dsm + reg.lam * reg_term, dsm=dsm, reg=reg_term)
