r"""The conservativity regularizer (Chao et al., ICML 2023): per sample w(t) ‖J − Jᵀ‖²_F, J = ∂s_θ/∂x.

A score is a gradient field, so its Jacobian (the Hessian of log p_t) is symmetric: the penalty is
zero for any exact score and measures the rotational part of s_θ. Options (``--conservative-…``):
the time weighting w(t).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from fpe_lab.fpe import Probe, ScoreFn, check_score, draw_probe, jacobian_of, jvp_x, vjp
from fpe_lab.regularizers.base import Regularizer, check_enum, check_lam, check_n_points, check_probes, first, leaf, sq
from fpe_lab.sde import LinearSDE
from fpe_lab.settings import Section, setting

if TYPE_CHECKING:
    from fpe_lab.config import RunConfig

__all__ = ["ConservativeWeighting", "ConservativeOptions", "ConservativeRegularizer"]


class ConservativeWeighting(enum.Enum):
    r"""w(t) in E w(t) ‖J − Jᵀ‖²_F.

    For s = −n/sigma with an O(1) network output n, J ~ 1/sigma² near the data, so ‖J − Jᵀ‖² ~ 1/sigma⁴:
    ``SIGMA4`` makes the term O(1) at every t, as sigma² does for DSM. ``SIGMA2`` is Chao et al.'s: their
    per-sample term sigma² (tr(JJᵀ) − tr(JJ)) = ½ sigma² ‖J − Jᵀ‖²_F, i.e. their β is lam = β/2 here.
    """

    SIGMA4 = "sigma4"  # w = sigma(t)⁴
    SIGMA2 = "sigma2"  # w = sigma(t)²: Chao et al.
    ONE = "one"  # w = 1

    def weight(self, sde: LinearSDE, t: torch.Tensor) -> torch.Tensor:
        """w(t), shape of t."""
        match self:
            case ConservativeWeighting.SIGMA4:
                return sde.marginal(t)[1] ** 4
            case ConservativeWeighting.SIGMA2:
                return sde.marginal(t)[1] ** 2
            case ConservativeWeighting.ONE:
                return torch.ones_like(t)
        raise AssertionError(self)


@dataclass(frozen=True)
class ConservativeOptions(Section):
    """Settings of the conservativity regularizer (flags ``--conservative-<field>``)."""

    weighting: ConservativeWeighting = setting(ConservativeWeighting.SIGMA4,
                                               "w(t) = sigma^4 (O(1) at every t), sigma2 (Chao et al.'s), one")

    def __post_init__(self) -> None:
        self._check_enums()


@dataclass(frozen=True)
class ConservativeRegularizer(Regularizer):
    r"""Per-sample w(t) ‖J − Jᵀ‖²_F at the DSM points; J of the flattened sample, (D, D).

    * ``probes=None``: exact, J by D reverse passes with create_graph (2-D points);
    * ``probes=k``: the unbiased (1/k) Σ_v ‖(J − Jᵀ)v‖² (E‖Av‖² = ‖A‖²_F for E[vvᵀ] = I), Jv by a
      forward-mode JVP and Jᵀv by a VJP per probe, probes from the loss's generator. Exact for D = 2
      with Rademacher probes (‖Av‖² = a²(v₁² + v₂²) = 2a² = ‖A‖²_F).

    Args:
        lam: weight lam ≥ 0 in the loss.
        weighting: w(t), see :class:`ConservativeWeighting`.
        n_points: evaluate at the first ``n_points`` DSM points only (None: all).
        probes: None (exact) or the number k ≥ 1 of Hutchinson probes per point.
        probe: the probes' distribution, ``fpe_lab.fpe.Probe``.
    """

    Options = ConservativeOptions

    lam: float
    weighting: ConservativeWeighting = ConservativeWeighting.SIGMA4
    n_points: int | None = None
    probes: int | None = None
    probe: Probe = Probe.RADEMACHER

    def __post_init__(self) -> None:
        check_lam(self.lam)
        check_enum(self.weighting, ConservativeWeighting, "weighting")
        check_n_points(self.n_points)
        check_probes(self.probes)
        check_enum(self.probe, Probe, "probe")

    @classmethod
    def from_config(cls, config: RunConfig, options: ConservativeOptions, lam: float) -> ConservativeRegularizer:
        reg = config.loss.reg
        exact = reg.divergence.value == "exact"
        return cls(lam=lam, weighting=options.weighting, n_points=reg.n_points,
                   probes=None if exact else reg.probes, probe=reg.probe)

    @classmethod
    def inert(cls, config: RunConfig, options: ConservativeOptions) -> frozenset[str]:
        return frozenset({"probes", "probe"} if config.loss.reg.divergence.value == "exact" else ())

    def asymmetry(
        self, score_fn: ScoreFn, x: torch.Tensor, t: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """‖J − Jᵀ‖²_F per sample (exact, or the Hutchinson estimate), shape (b,), for x (b, *dims), t (b,)."""
        x = leaf(x)
        if self.probes is None:
            jac = jacobian_of(check_score(score_fn(x, t), x), x, create_graph=True)
            return (jac - jac.transpose(1, 2)).pow(2).sum((1, 2))
        est = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
        for _ in range(self.probes):
            v = draw_probe(x, self.probe, generator)
            s, jv = jvp_x(score_fn, x, t, v)
            est = est + sq(jv - vjp(check_score(s, x), x, v))
        return est / self.probes

    def __call__(
        self,
        score_fn: ScoreFn,
        sde: LinearSDE,
        x0: torch.Tensor,
        t: torch.Tensor,
        z: torch.Tensor,
        generator: torch.Generator | None,
    ) -> torch.Tensor:
        """w(t) ‖J − Jᵀ‖²_F at the (first n_points) DSM points, shape (m,)."""
        x, tt = first(self.n_points, sde.perturb(x0, t, z), t)
        return self.weighting.weight(sde, tt) * self.asymmetry(score_fn, x, tt, generator)
