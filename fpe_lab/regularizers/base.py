"""The regularizer interface: a per-sample penalty P_θ added to DSM as L = L_dsm + lam · E P_θ.

A regularizer is one module holding one subclass of :class:`Regularizer` (a frozen dataclass):

* ``name``: its ``--reg`` choice, the prefix of its flags (``--<name>-<option>``) and the key of its
  ``loss.reg.<name>`` section in ``config.json``; by default the last component of its module's name,
  so a built-in module copied under another file name is a new regularizer with no edit;
* ``Options``: a frozen :class:`fpe_lab.settings.Section` of its own settings, each declared with
  :func:`fpe_lab.settings.setting` (an empty one when it has none);
* :meth:`Regularizer.from_config`: the instance for a run configuration;
* ``__call__(score_fn, sde, x0, t, z, generator) -> P``: the penalty, shape (m,), m ≤ b.

Built-ins are listed in :data:`fpe_lab.regularizers.BUILTINS`; a user's module enters through
``--plugin MODULE`` (:func:`fpe_lab.regularizers.load_plugin`). Recipes: docs/extending.md.
"""

from __future__ import annotations

import abc
import enum
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, runtime_checkable

import torch

from fpe_lab.fpe import ScoreFn
from fpe_lab.sde import LinearSDE
from fpe_lab.settings import Section

if TYPE_CHECKING:
    from fpe_lab.config import RunConfig

__all__ = [
    "Regularizer", "NoOptions", "SharesScore", "first", "leaf", "sq", "dot",
    "check_lam", "check_n_points", "check_probes", "check_enum",
]


@dataclass(frozen=True)
class NoOptions(Section):
    """The options of a regularizer without settings of its own."""


class Regularizer(abc.ABC):
    """Per-sample penalty P_θ; the loss adds lam · mean_i weight_i P_i (weight: the time's importance weight).

    x0: the clean batch (b, *dims); t: the DSM times (b,); z: the DSM noise (b, *dims), so the DSM
    points are x_t = alpha(t) x0 + sigma(t) z; generator: the loss's noise generator, for any extra
    draws (fresh points, probes: never torch's global RNG). Returns P of shape (m,), m ≤ b, *before*
    lam, differentiable in the parameters; entry i belongs to the DSM time t_i, so a regularizer that
    evaluates only some points uses the first m.
    """

    name: ClassVar[str]
    Options: ClassVar[type[Section]] = NoOptions
    lam: float

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "name" not in cls.__dict__:
            cls.name = cls.__module__.rsplit(".", 1)[-1]  # the module is the unit: its file name is the name

    @classmethod
    @abc.abstractmethod
    def from_config(cls, config: RunConfig, options: Any, lam: float) -> Regularizer:
        """The regularizer of a run: ``config`` the whole run configuration (``config.loss.reg`` holds the
        shared settings: n_points, divergence, probes, probe), ``options`` this class's ``Options``,
        ``lam`` the weight (already divided by D under ``per_dim``)."""

    # an optional hook, not abstract: most regularizers have nothing to check
    @classmethod  # noqa: B027
    def check(cls, config: RunConfig, options: Any) -> None:
        """ValueError when ``options`` cannot serve this run (e.g. a path that needs point data); called
        when the configuration is built, before any work. Default: nothing to check."""

    @classmethod
    def inert(cls, config: RunConfig, options: Any) -> frozenset[str]:
        """Names of settings (own options, or the shared ``probes``/``probe``/``estimator``…) that cannot
        change the trained weights in this configuration: the fingerprint leaves them out."""
        return frozenset()

    @abc.abstractmethod
    def __call__(
        self,
        score_fn: ScoreFn,
        sde: LinearSDE,
        x0: torch.Tensor,
        t: torch.Tensor,
        z: torch.Tensor,
        generator: torch.Generator | None,
    ) -> torch.Tensor: ...


@runtime_checkable
class SharesScore(Protocol):
    """A regularizer that may evaluate s_θ at all DSM points on its way and hand it to DSM.

    ``penalty_and_score(...)`` takes the arguments of :class:`Regularizer` and returns (P, s) with
    s = s_θ(x_t, t) of shape (b, *dims) at the DSM points, or (P, None) when it did not compute it
    there; :class:`fpe_lab.losses.ScoreFPELoss` then skips DSM's own forward pass.
    """

    def penalty_and_score(
        self,
        score_fn: ScoreFn,
        sde: LinearSDE,
        x0: torch.Tensor,
        t: torch.Tensor,
        z: torch.Tensor,
        generator: torch.Generator | None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]: ...


def check_lam(lam: float) -> None:
    if isinstance(lam, bool) or not (isinstance(lam, (int, float)) and math.isfinite(lam) and lam >= 0):
        raise ValueError(f"lam must be a finite number >= 0; got {lam!r}")


def check_n_points(n_points: int | None) -> None:
    if n_points is not None and (isinstance(n_points, bool) or not isinstance(n_points, int) or n_points < 1):
        raise ValueError(f"n_points must be None or an int >= 1; got {n_points!r}")


def check_probes(probes: int | None) -> None:
    if probes is not None and (isinstance(probes, bool) or not isinstance(probes, int) or probes < 1):
        raise ValueError(f"probes must be None (exact Jacobian) or an int >= 1; got {probes!r}")


def check_enum(value: Any, kind: type[enum.Enum], name: str) -> None:
    if not isinstance(value, kind):
        raise ValueError(f"{name} must be a {kind.__name__} ({[v.value for v in kind]}); got {value!r}")


def first(n_points: int | None, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The first ``n_points`` rows of each tensor (all rows when None)."""
    return tensors if n_points is None else tuple(v[:n_points] for v in tensors)


def leaf(x: torch.Tensor) -> torch.Tensor:
    """A fresh leaf requiring grad, so x-derivatives never reach the caller's tensor."""
    return x.detach().requires_grad_(True)


def sq(v: torch.Tensor) -> torch.Tensor:
    """‖v‖² per sample: (b, *dims) -> (b,)."""
    return v.reshape(v.shape[0], -1).pow(2).sum(-1)


def dot(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """⟨u, v⟩ per sample: (b, *dims) × (b, *dims) -> (b,)."""
    return (u * v).reshape(u.shape[0], -1).sum(-1)

