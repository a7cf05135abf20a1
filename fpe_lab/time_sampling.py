r"""How the loss draws t on [eps, 1], and the weight that keeps the expected loss that of t ~ U[eps, 1].

``UNIFORM``: t ~ U[eps, 1], weight 1. ``IMPORTANCE``: t ~ q(t) = r(t)/Z with r = g²/sigma²,
Z = Φ(1) − Φ(eps), Φ' = r, each sample's loss multiplied by u/q = Z / ((1 − eps) r(t)), so
E_q[(u/q) ℓ] = E_u[ℓ]. Under the likelihood weighting lambda = g² this turns the DSM term into the
sigma²-weighted one times a constant. t is drawn by the inverse CDF, t = Φ⁻¹(Φ(eps) + u Z), with
Φ and Φ⁻¹ from the SDE (:meth:`fpe_lab.sde.LinearSDE.rate_antiderivative`: closed forms for VE, VP
and sub-VP, a table for any other linear SDE). Derivation: docs/derivations.md#importance-sampled-time.
"""

from __future__ import annotations

import enum
import math

import torch

from fpe_lab.sde import LinearSDE

__all__ = ["TimeSampling", "sample_time", "importance_time_density", "check_eps"]


def check_eps(eps: float) -> float:
    """eps must be a number in (0, 1), the smallest training time."""
    if isinstance(eps, bool) or not (isinstance(eps, (int, float)) and math.isfinite(eps) and 0 < eps < 1):
        raise ValueError(f"eps must be a number in (0, 1) (the smallest training time); got {eps!r}")
    return float(eps)


def sample_time(
    n: int, eps: float, generator: torch.Generator | None, dtype: torch.dtype, device: torch.device | str
) -> torch.Tensor:
    """t ~ U[eps, 1], shape (n,)."""
    u = torch.rand(n, generator=generator, dtype=dtype, device=device)
    return eps + (1 - eps) * u


def _ends(sde: LinearSDE, eps: float, device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
    """(Φ(eps), Z = Φ(1) − Φ(eps)) as float64 scalars; ValueError unless Z is finite and positive."""
    ends = sde.rate_antiderivative(torch.tensor([eps, 1.0], dtype=torch.float64, device=device))
    mass = ends[1] - ends[0]
    if not (torch.isfinite(mass) and mass > 0):
        raise ValueError(f"sde {type(sde).__name__}: ∫ g²/sigma² over [eps, 1] = [{eps:g}, 1] must be finite and "
                         f"positive for importance-sampled time; got {float(mass)!r}")
    return ends[0], mass


def importance_time_density(sde: LinearSDE, eps: float, t: torch.Tensor) -> torch.Tensor:
    """q(t) = (g²/sigma²)(t) / ∫_eps^1 g²/sigma², the density of :attr:`TimeSampling.IMPORTANCE`, shape of t."""
    check_eps(eps)
    return (sde.rate(t.double()) / _ends(sde, eps, t.device)[1]).to(t.dtype)


class TimeSampling(enum.Enum):
    """t ~ U[eps, 1] (weight 1), or t ∝ g²/sigma² with the weight u/q that keeps the uniform expectation."""

    UNIFORM = "uniform"
    IMPORTANCE = "importance"

    def check(self, sde: LinearSDE, eps: float) -> None:
        """ValueError unless this sampling can draw for ``sde`` on [eps, 1] (IMPORTANCE: ∫ g²/sigma² finite, > 0)."""
        if self is TimeSampling.IMPORTANCE:
            _ends(sde, eps, "cpu")

    def sample(
        self,
        n: int,
        eps: float,
        sde: LinearSDE,
        generator: torch.Generator | None,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(t, weight), each of shape (n,): the times and u(t)/q(t), the factor on each sample's loss.
        The draw u ~ U[0, 1) comes from ``generator``; t and the weights are computed in float64."""
        match self:
            case TimeSampling.UNIFORM:
                t = sample_time(n, eps, generator, dtype, device)
                return t, torch.ones_like(t)
            case TimeSampling.IMPORTANCE:
                u = torch.rand(n, generator=generator, dtype=dtype, device=device).double()
                start, mass = _ends(sde, eps, u.device)
                t = sde.rate_antiderivative_inverse(start + u * mass).clamp(eps, 1.0)  # round-off at the ends
                weight = mass / ((1 - eps) * sde.rate(t))
                return t.to(dtype), weight.to(dtype)
        raise AssertionError(self)
