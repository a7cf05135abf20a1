r"""A regularizer as a plug-in: the Jacobian norm penalty w(t) ‖∂s_θ/∂x‖²_F, a smoothness prior on the score.

    python -m fpe_lab.run toy2d --plugin jacobian_norm --reg jacobian_norm --lam 0.01 --jacobian-norm-weighting sigma4

with this folder on ``PYTHONPATH``. The module defines one subclass of ``fpe_lab.regularizers.base.Regularizer``;
its name is the module's (``jacobian_norm``), its ``Options`` become ``--jacobian-norm-…`` flags and the section
``loss.reg.jacobian_norm`` of ``config.json``, which also records ``plugins: ["jacobian_norm"]`` so that ``eval``
and ``--resume`` load it again. Unlike the conservativity penalty, it is not zero at the exact score (the
Hessian of log p_t is not zero), so it trades score error for smoothness: an example of the door, not a method.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

import torch

from fpe_lab.fpe import Probe, ScoreFn, check_score, draw_probe, jvp_x
from fpe_lab.regularizers.base import Regularizer, check_lam, first, leaf, sq
from fpe_lab.sde import LinearSDE
from fpe_lab.settings import Section, setting


class Weighting(enum.Enum):
    """w(t): sigma⁴ makes ‖J‖² ~ 1/sigma⁴ O(1) at every t."""

    SIGMA4 = "sigma4"
    ONE = "one"


@dataclass(frozen=True)
class Options(Section):
    weighting: Weighting = setting(Weighting.SIGMA4, "w(t) = sigma^4 or 1")


@dataclass(frozen=True)
class JacobianNormRegularizer(Regularizer):
    """w(t) ‖J‖²_F at the DSM points, J = ∂s_θ/∂x, estimated by one Rademacher probe: E‖Jv‖² = ‖J‖²_F."""

    Options = Options

    lam: float
    weighting: Weighting = Weighting.SIGMA4
    n_points: int | None = None

    def __post_init__(self) -> None:
        check_lam(self.lam)

    @classmethod
    def from_config(cls, config: Any, options: Options, lam: float) -> JacobianNormRegularizer:
        return cls(lam=lam, weighting=options.weighting, n_points=config.loss.reg.n_points)

    def __call__(self, score_fn: ScoreFn, sde: LinearSDE, x0: torch.Tensor, t: torch.Tensor, z: torch.Tensor,
                 generator: torch.Generator | None) -> torch.Tensor:
        x, tt = first(self.n_points, sde.perturb(x0, t, z), t)
        x = leaf(x)
        s, jv = jvp_x(score_fn, x, tt, draw_probe(x, Probe.RADEMACHER, generator))
        check_score(s, x)
        w = sde.marginal(tt)[1] ** 4 if self.weighting is Weighting.SIGMA4 else torch.ones_like(tt)
        return w * sq(jv)

