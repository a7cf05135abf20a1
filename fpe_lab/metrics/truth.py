r"""Ground truth for evaluating a learned score: the true score ∇ log p_t(x) and log p_t(x).

A truth object answers, for x of shape (b, D) and a scalar time t in [0, 1],

    score(x, t)    -> ∇_x log p_t(x),  shape (b, D), float64;
    log_prob(x, t) -> log p_t(x),      shape (b,),   float64,

where p_t is the law of x_t = alpha(t) x_0 + sigma(t) z under the SDE the model was trained with.
Three sources, one interface:

* :class:`MixtureTruth`  closed form for a :class:`~fpe_lab.gmm.GaussianMixture` (exact);
* :class:`ToyTruth`      a toy distribution's ``perturbed_score`` / ``perturbed_log_prob``
  (exact p_t by quadrature; ``fpe_lab.data.toy``);
* :class:`GridTruth`     a grid solution of the Fokker–Planck equation (``fpe_lab.groundtruth``),
  with ``score_at(x, t)`` / ``log_prob_at(x, t)`` available at its solved times only.
"""

from __future__ import annotations

import abc
from typing import Any

import torch

from fpe_lab.checks import check_time
from fpe_lab.gmm import GaussianMixture
from fpe_lab.gmm_lowrank import LowRankGaussianMixture
from fpe_lab.sde import LinearSDE

__all__ = ["Truth", "MixtureTruth", "ToyTruth", "GridTruth"]


def _scalar_time(t) -> float:
    tt = check_time(t)
    if isinstance(t, (int, float)):
        return float(t)  # keep the caller's float64 value (as_tensor would round it to float32)
    if tt.numel() != 1:
        raise ValueError(f"t must be a scalar time in [0, 1]; got shape {tuple(tt.shape)}")
    return float(tt.reshape(()))


def _check_x(x: torch.Tensor) -> torch.Tensor:
    if not isinstance(x, torch.Tensor) or x.ndim != 2:
        raise ValueError(f"x must be a tensor of shape (b, D); got "
                         f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
    return x.detach().to(torch.float64)


class Truth(abc.ABC):
    """The true perturbed density p_t of the data under a fixed SDE (scalar t, float64 results)."""

    @abc.abstractmethod
    def score(self, x: torch.Tensor, t: float) -> torch.Tensor:
        """∇ log p_t(x) for x of shape (b, D); returns (b, D) float64."""

    @abc.abstractmethod
    def log_prob(self, x: torch.Tensor, t: float) -> torch.Tensor:
        """log p_t(x) for x of shape (b, D); returns (b,) float64."""


class MixtureTruth(Truth):
    """Closed-form truth of a Gaussian mixture p_0 under a linear SDE: full covariances (:mod:`fpe_lab.gmm`) or
    low-rank plus isotropic ones (:mod:`fpe_lab.gmm_lowrank`, no D×D matrix)."""

    def __init__(self, mixture: GaussianMixture | LowRankGaussianMixture, sde: LinearSDE) -> None:
        if isinstance(mixture, LowRankGaussianMixture):
            self.mixture: GaussianMixture | LowRankGaussianMixture = LowRankGaussianMixture(
                mixture.weights, mixture.means, mixture.factors, mixture.noise_var, dtype=torch.float64)
        else:
            self.mixture = GaussianMixture(mixture.weights, mixture.means, mixture.covs, dtype=torch.float64)
        self.sde = sde

    def score(self, x: torch.Tensor, t: float) -> torch.Tensor:
        return self.mixture.score(_check_x(x), _scalar_time(t), self.sde)

    def log_prob(self, x: torch.Tensor, t: float) -> torch.Tensor:
        return self.mixture.log_prob(_check_x(x), _scalar_time(t), self.sde)

    def __repr__(self) -> str:
        return f"MixtureTruth({self.mixture!r}, {type(self.sde).__name__})"


class ToyTruth(Truth):
    """Truth from a toy distribution with ``perturbed_score(x, t, sde)`` and ``perturbed_log_prob(x, t, sde)``."""

    def __init__(self, distribution: Any, sde: LinearSDE) -> None:
        for name in ("perturbed_score", "perturbed_log_prob"):
            if not callable(getattr(distribution, name, None)):
                raise ValueError(f"distribution must provide {name}(x, t, sde); got {distribution!r}")
        self.distribution = distribution
        self.sde = sde

    def score(self, x: torch.Tensor, t: float) -> torch.Tensor:
        x = _check_x(x)
        out = self.distribution.perturbed_score(x, _scalar_time(t), self.sde)
        return torch.as_tensor(out, dtype=torch.float64)

    def log_prob(self, x: torch.Tensor, t: float) -> torch.Tensor:
        x = _check_x(x)
        out = self.distribution.perturbed_log_prob(x, _scalar_time(t), self.sde)
        return torch.as_tensor(out, dtype=torch.float64)

    def __repr__(self) -> str:
        return f"ToyTruth({self.distribution!r}, {type(self.sde).__name__})"


class GridTruth(Truth):
    """Truth from a grid Fokker–Planck solution with ``score_at(x, t)`` and ``log_prob_at(x, t)``.

    The solution only knows its solved times (``solution.times`` if present): evaluate there.
    Points are passed as float64 tensors; numpy results are converted back.
    """

    def __init__(self, solution: Any) -> None:
        for name in ("score_at", "log_prob_at"):
            if not callable(getattr(solution, name, None)):
                raise ValueError(f"solution must provide {name}(x, t); got {solution!r}")
        self.solution = solution

    def score(self, x: torch.Tensor, t: float) -> torch.Tensor:
        return torch.as_tensor(self.solution.score_at(_check_x(x), _scalar_time(t)), dtype=torch.float64)

    def log_prob(self, x: torch.Tensor, t: float) -> torch.Tensor:
        return torch.as_tensor(self.solution.log_prob_at(_check_x(x), _scalar_time(t)), dtype=torch.float64)

    def __repr__(self) -> str:
        return f"GridTruth({type(self.solution).__name__})"
