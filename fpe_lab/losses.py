r"""Training losses: denoising score matching plus one regularizer behind one interface.

With x_t = alpha(t) x_0 + sigma(t) z, z ~ N(0, I), t drawn on [eps, 1] (uniformly, or by importance
sampling, :class:`TimeSampling`):

    DSM:  L_dsm(θ) = E_{t~U[eps,1]} E_{x_0, z} lambda(t) ‖s_θ(x_t, t) + z / sigma(t)‖²
          lambda = sigma²  ("sigma2": ‖sigma s_θ + z‖², Score SDE's default)  or
          lambda = g²      ("likelihood": Song et al. 2021, bounds the NLL)

    L = L_dsm + lam · E_{t~U[eps,1]} E_{x_0, z} P_θ(x_0, t, z),

where P_θ is the per-sample penalty of a :class:`Regularizer`:

* :class:`FPERegularizer`          w(t) ‖R_θ(x, t)‖², R_θ the score-FPE residual (FP-Diffusion, Lai et al. 2023):
                                   R_θ = ∂_t s_θ − ∇_x[½g² ∇·s_θ + ½g² ‖s_θ‖² − ⟨f, s_θ⟩ − ∇·f]   (fpe_lab.fpe);
* :class:`ConservativeRegularizer` w(t) ‖J − Jᵀ‖²_F, J = ∂s_θ/∂x (Chao et al., ICML 2023);
* :class:`HODSMRegularizer`        second- (and third-) order denoising score matching (Lu et al., ICML 2022).

‖·‖² sums over all coordinates of one sample; expectations are batch means. Everything works for
x_0 of shape (b, *dims) — 2-D points and images alike: coefficients broadcast through
:func:`fpe_lab.shapes.append_dims`. Randomness (t, z, resampled points, Hutchinson probes) comes from
the generator passed to the loss, so a step is reproducible from the generator's state.
"""

from __future__ import annotations

import dataclasses
import enum
import math
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import torch
from torch.func import jvp

from fpe_lab.fpe import DivergenceEstimator, ExactDivergence, Hutchinson, Probe, ScoreFn, score_fpe_residual
from fpe_lab.sde import LinearSDE, SubVPSDE, VESDE, VPSDE
from fpe_lab.shapes import append_dims, flat_dim

__all__ = [
    "DSMWeighting",
    "FPEWeighting",
    "FPEPoints",
    "FPEEstimator",
    "ConservativeWeighting",
    "TimeSampling",
    "ResidualFn",
    "ScoreResidualFn",
    "Regularizer",
    "SharesScore",
    "LossTerms",
    "sample_time",
    "importance_time_density",
    "perturb",
    "dsm_loss",
    "FPERegularizer",
    "ConservativeRegularizer",
    "HODSMRegularizer",
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


@runtime_checkable
class ScoreResidualFn(Protocol):
    """A :class:`ResidualFn` that can also return the score it evaluated on the way:
    ``with_score(score_fn, sde, x, t, divergence=None, create_graph=False) -> (s, R)``, each the shape
    of x (``fpe_lab.nets.jet.jet_score_fpe_residual``: s is the jet's value stream)."""

    def __call__(
        self,
        score_fn: ScoreFn,
        sde: LinearSDE,
        x: torch.Tensor,
        t: torch.Tensor,
        divergence: DivergenceEstimator | None = None,
        create_graph: bool = False,
    ) -> torch.Tensor: ...

    def with_score(
        self,
        score_fn: ScoreFn,
        sde: LinearSDE,
        x: torch.Tensor,
        t: torch.Tensor,
        divergence: DivergenceEstimator | None = None,
        create_graph: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]: ...


@runtime_checkable
class Regularizer(Protocol):
    """The one regularizer interface: ``lam`` and ``reg(score_fn, sde, x0, t, z, generator) -> P``.

    x0: the clean batch (b, *dims); t: the DSM times (b,); z: the DSM noise (b, *dims), so the DSM
    points are x_t = alpha(t) x0 + sigma(t) z; generator: the loss's noise generator, for any extra
    draws (fresh points, probes). Returns the per-sample penalty P of shape (m,), m ≤ b, *before*
    lam, differentiable in the parameters; entry i belongs to the DSM time t_i (the loss multiplies
    it by that time's importance weight, :class:`TimeSampling`), so a regularizer that evaluates
    only some points uses the first m.
    """

    lam: float

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
    there; :class:`ScoreFPELoss` then skips DSM's own forward pass.
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

    The paper's weighting is ``DSMWeighting.LIKELIHOOD`` + ``G2``: L = E g²‖s_θ + z/sigma‖² + α E g²‖R‖²/D².
    Its 1/D² changes the balance with DSM with the dimension: the DSM term sums D coordinates, so it
    is O(D); ‖R‖² sums D coordinates too, so it is O(D) as well; with the 1/D² factor the residual's
    weight relative to DSM falls like 1/D², i.e. at the same α it is (3072/2)² ≈ 2.4e6 times smaller
    on CIFAR-10 (D = 3072) than on 2-D data. Here that factor is not built in: pass lam = α/D².
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
    """Where the FPE regularizer evaluates R_θ."""

    PERTURBED = "perturbed"  # the DSM training points (x_t, t) themselves
    RESAMPLED = "resampled"  # fresh points x' = alpha(t') x_0 + sigma(t') z', independent of the DSM points


class FPEEstimator(enum.Enum):
    r"""How ‖R‖² is estimated from a residual R̂ whose divergence is a Hutchinson estimate.

    R̂ = R + e with E[e] = 0 (e = −½g² ∇(∇̂·s − ∇·s) is linear in the probes), so
    E‖R̂‖² = ‖R‖² + E‖e‖² is biased upward by the probe variance, while two evaluations with
    independent probes give E⟨R̂₁, R̂₂⟩ = ‖R‖² (per sample it may be negative). With an exact
    divergence both are ‖R‖² and R is computed once.
    """

    SQUARED = "squared"  # ‖R̂‖²: the paper's form
    UNBIASED = "unbiased"  # ⟨R̂₁, R̂₂⟩: two residuals with independent probes


class ConservativeWeighting(enum.Enum):
    r"""w(t) in E w(t) ‖J − Jᵀ‖²_F, J = ∂s_θ/∂x.

    For s = −n/sigma with an O(1) network output n, J = −(∂n/∂x)/sigma and ∂n/∂x ~ 1/sigma near the
    data, so J ~ 1/sigma² and ‖J − Jᵀ‖² ~ 1/sigma⁴: ``SIGMA4`` makes the term O(1) at every t, as
    sigma² does for DSM. ``SIGMA2`` is Chao et al.'s (ICML 2023) weighting: their per-sample term is
    sigma² (tr(JJᵀ) − tr(JJ)) = ½ sigma² ‖J − Jᵀ‖²_F, i.e. their balancing factor β is lam = β/2 here.
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


def _beta_time(sde: VPSDE | SubVPSDE, b: torch.Tensor) -> torch.Tensor:
    """t with B(t) = beta_min t + ½(beta_max − beta_min) t² = b: the positive root, written without cancellation."""
    return 2 * b / (sde.beta_min + torch.sqrt(sde.beta_min**2 + 2 * (sde.beta_max - sde.beta_min) * b))


def _rate(sde: LinearSDE, t: torch.Tensor) -> torch.Tensor:
    """r(t) = g(t)² / sigma(t)², shape of t."""
    return sde.diffusion(t) ** 2 / sde.marginal(t)[1] ** 2


def _rate_antiderivative(sde: LinearSDE, t: torch.Tensor) -> torch.Tensor:
    """Φ(t) with Φ' = g²/sigma² (closed forms: see :class:`TimeSampling`), shape of t."""
    match sde:
        case VESDE():
            return torch.log(torch.expm1(2 * t * math.log(sde.sigma_max / sde.sigma_min)))
        case VPSDE():
            return torch.log(torch.expm1(sde.int_beta(t)))
        case SubVPSDE():
            b = sde.int_beta(t)
            return 2 * torch.log(torch.expm1(b)) - b
    raise ValueError(f"sde must be a VESDE, VPSDE or SubVPSDE for the closed form; got {type(sde).__name__}")


def _rate_antiderivative_inverse(sde: LinearSDE, phi: torch.Tensor) -> torch.Tensor:
    """t with Φ(t) = phi, the inverse of :func:`_rate_antiderivative`."""
    softplus = torch.logaddexp(phi, torch.zeros_like(phi))  # log(1 + e^phi), stable at both ends
    match sde:
        case VESDE():
            return softplus / (2 * math.log(sde.sigma_max / sde.sigma_min))
        case VPSDE():
            return _beta_time(sde, softplus)
        case SubVPSDE():
            return _beta_time(sde, 2 * torch.asinh(0.5 * torch.exp(0.5 * phi)))
    raise ValueError(f"sde must be a VESDE, VPSDE or SubVPSDE; got {type(sde).__name__}")


def _closed_form(sde: LinearSDE) -> bool:
    """Whether Φ = ∫ g²/sigma² and its inverse have the closed forms of :class:`TimeSampling`."""
    match sde:
        case VESDE() | VPSDE() | SubVPSDE():
            return True
    return False


_TABLE_KNOTS = 8193  # log-spaced knots on [eps, 1]: r ~ 1/t near eps, so equal steps in log t


def _rate_table(sde: LinearSDE, eps: float, device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(knots, cdf, Z) in float64: the trapezoidal cumulative integral of r = g²/sigma² on log-spaced
    knots of [eps, 1], normalised to a CDF with cdf[0] = 0, cdf[-1] = 1; ValueError unless r is finite
    and positive there."""
    knots = torch.logspace(math.log10(eps), 0.0, _TABLE_KNOTS, dtype=torch.float64, device=device)
    knots[0], knots[-1] = eps, 1.0
    r = _rate(sde, knots)
    if not (torch.isfinite(r).all() and (r > 0).all()):
        raise ValueError(
            f"sde {type(sde).__name__}: g(t)²/sigma(t)² must be finite and positive on [eps, 1] = [{eps}, 1] "
            "for importance-sampled time"
        )
    cum = torch.cat([torch.zeros(1, dtype=torch.float64, device=device), torch.cumsum(0.5 * (r[1:] + r[:-1]) * knots.diff(), 0)])
    return knots, cum / cum[-1], cum[-1]


def _rate_mass(sde: LinearSDE, eps: float, like: torch.Tensor) -> torch.Tensor:
    """Z = ∫_eps^1 g²/sigma² as a float64 scalar on the device of ``like`` (closed form, else the table's)."""
    if not _closed_form(sde):
        return _rate_table(sde, eps, like.device)[2]
    ends = _rate_antiderivative(sde, torch.tensor([eps, 1.0], dtype=torch.float64, device=like.device))
    return ends[1] - ends[0]


def _draw_closed_form(sde: LinearSDE, eps: float, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(t, u/q) from uniforms u (float64) by the closed-form inverse CDF."""
    ends = _rate_antiderivative(sde, torch.tensor([eps, 1.0], dtype=torch.float64, device=u.device))
    mass = ends[1] - ends[0]
    t = _rate_antiderivative_inverse(sde, ends[0] + u * mass).clamp(eps, 1.0)  # round-off at the ends
    return t, mass / ((1 - eps) * _rate(sde, t))


def _draw_tabulated(sde: LinearSDE, eps: float, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(t, u/q) from uniforms u (float64) by inverting the piecewise-linear tabulated CDF. The draws have
    the piecewise-constant density q̃ = Δcdf/Δt of their interval, and the weight is 1/((1 − eps) q̃):
    exactly the law drawn, so the weighted loss stays unbiased whatever the table's error."""
    knots, cdf, _ = _rate_table(sde, eps, u.device)
    i = (torch.searchsorted(cdf, u, right=True) - 1).clamp(0, knots.numel() - 2)
    d_cdf, d_t = cdf[i + 1] - cdf[i], knots[i + 1] - knots[i]
    t = (knots[i] + (u - cdf[i]) / d_cdf * d_t).clamp(eps, 1.0)
    return t, d_t / ((1 - eps) * d_cdf)


def importance_time_density(sde: LinearSDE, eps: float, t: torch.Tensor) -> torch.Tensor:
    """q(t) = (g²/sigma²)(t) / ∫_eps^1 g²/sigma², the target density of :attr:`TimeSampling.IMPORTANCE`,
    shape of t (for SDEs without a closed form, Z is the table's and the draws follow its
    piecewise-constant approximation of q)."""
    _check_eps(eps)
    return (_rate(sde, t.double()) / _rate_mass(sde, eps, t)).to(t.dtype)


class TimeSampling(enum.Enum):
    r"""How the loss draws t on [eps, 1], and the weight that keeps the expected loss that of t ~ U[eps, 1].

    ``UNIFORM``: t ~ U[eps, 1], weight 1.

    ``IMPORTANCE``: t ~ q(t) = r(t)/Z on [eps, 1] with r = g²/sigma², Z = Φ(1) − Φ(eps), Φ' = r, and
    each sample's DSM term and penalty multiplied by u/q = Z / ((1 − eps) r(t)) (u = 1/(1 − eps), the
    uniform density), so E_q[(u/q) ℓ] = E_u[ℓ]. With the likelihood weighting lambda = g² the DSM
    term becomes lambda u/q ‖s + z/sigma‖² = Z/(1 − eps) ‖sigma s + z‖²: the sigma²-weighted loss times
    a constant, O(1) at every t, where under U[eps, 1] the per-sample weight g²/sigma² ~ 1/t near eps
    makes the variance ~ 1/eps. t is drawn by the inverse CDF in closed form (no tabulation):

    * VE:     sigma² = sigma_min² expm1(2Lt), g² = d sigma²/dt (L = ln(sigma_max/sigma_min)), so
              Φ = log expm1(2Lt) and t = softplus(Φ)/(2L);
    * VP:     sigma² = 1 − e^{−B}, g² = β = dB/dt, r = β/(1 − e^{−B}), so Φ = log expm1(B), B = softplus(Φ);
    * sub-VP: sigma = 1 − e^{−B}, g² = β(1 − e^{−2B}), r = β(1 + e^{−B})/(1 − e^{−B}), so
              Φ = 2 log expm1(B) − B = 2 log(2 sinh(B/2)) and B = 2 asinh(e^{Φ/2}/2);

    and t = 2B/(β_min + sqrt(β_min² + 2(β_max − β_min)B)) solves B(t) = β_min t + ½(β_max − β_min)t².
    Any other ``LinearSDE``: a tabulated CDF (trapezoidal integral of r on 8193 log-spaced knots of
    [eps, 1]) inverted by linear interpolation; its weights use the piecewise-constant density of the
    table, which is the law actually drawn, so the weighted loss stays unbiased. The draw u ~ U[0, 1)
    comes from the loss's generator; t and the weights are computed in float64, then cast to the data's
    dtype.
    """

    UNIFORM = "uniform"
    IMPORTANCE = "importance"

    def check(self, sde: LinearSDE, eps: float) -> None:
        """ValueError unless this sampling can draw for ``sde`` on [eps, 1] (IMPORTANCE: g²/sigma² finite, > 0)."""
        if self is TimeSampling.IMPORTANCE and not _closed_form(sde):
            _rate_table(sde, eps, "cpu")

    def sample(
        self,
        n: int,
        eps: float,
        sde: LinearSDE,
        generator: torch.Generator | None,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(t, weight), each of shape (n,): the times and u(t)/q(t), the factor on each sample's loss."""
        match self:
            case TimeSampling.UNIFORM:
                t = sample_time(n, eps, generator, dtype, device)
                return t, torch.ones_like(t)
            case TimeSampling.IMPORTANCE:
                u = torch.rand(n, generator=generator, dtype=dtype, device=device).double()
                draw = _draw_closed_form if _closed_form(sde) else _draw_tabulated
                t, weight = draw(sde, eps, u)
                return t.to(dtype), weight.to(dtype)


@dataclass(frozen=True, init=False)
class LossTerms:
    """Scalar loss tensors: ``total = dsm + lam · reg`` (``reg`` is 0 without a regularizer).

    ``fpe`` is an alias of ``reg`` (the name from when the FPE residual was the only regularizer):
    ``LossTerms(total, dsm, fpe=...)`` and ``terms.fpe`` work, and :meth:`floats` has both keys.
    """

    total: torch.Tensor
    dsm: torch.Tensor
    reg: torch.Tensor

    def __init__(
        self,
        total: torch.Tensor,
        dsm: torch.Tensor,
        reg: torch.Tensor | None = None,
        *,
        fpe: torch.Tensor | None = None,
    ) -> None:
        if (reg is None) == (fpe is None):
            raise ValueError(f"pass exactly one of reg and its alias fpe; got reg={reg!r}, fpe={fpe!r}")
        object.__setattr__(self, "total", total)
        object.__setattr__(self, "dsm", dsm)
        object.__setattr__(self, "reg", reg if reg is not None else fpe)

    @property
    def fpe(self) -> torch.Tensor:
        """Alias of ``reg``."""
        return self.reg

    def is_finite(self) -> bool:
        return bool(torch.isfinite(self.total).item())

    def floats(self) -> dict[str, float]:
        """{"total", "dsm", "reg", "fpe" (= "reg")} as Python floats."""
        out = {k: float(v.detach()) for k, v in (("total", self.total), ("dsm", self.dsm), ("reg", self.reg))}
        out["fpe"] = out["reg"]
        return out


def perturb(sde: LinearSDE, x0: torch.Tensor, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """x_t = alpha(t) x_0 + sigma(t) z for x_0, z of shape (b, *dims), t of shape (b,)."""
    alpha, sigma = sde.marginal(t)
    return append_dims(alpha, x0.ndim) * x0 + append_dims(sigma, x0.ndim) * z


def _sq(v: torch.Tensor) -> torch.Tensor:
    """‖v‖² per sample: (b, *dims) -> (b,)."""
    return v.reshape(v.shape[0], -1).pow(2).sum(-1)


def _dot(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """⟨u, v⟩ per sample: (b, *dims) × (b, *dims) -> (b,)."""
    return (u * v).reshape(u.shape[0], -1).sum(-1)


def _dsm_from_score(
    s: torch.Tensor, sde: LinearSDE, t: torch.Tensor, z: torch.Tensor, weighting: DSMWeighting
) -> torch.Tensor:
    """lambda(t) ‖s + z/sigma(t)‖² per sample, shape (b,), from s = s_θ(x_t, t)."""
    _, sigma = sde.marginal(t)
    return weighting.weight(sde, t) * _sq(s + z / append_dims(sigma, z.ndim))


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
    return _dsm_from_score(score_fn(perturb(sde, x0, t, z), t), sde, t, z, weighting)


def _check_lam(lam: float) -> None:
    if isinstance(lam, bool) or not (isinstance(lam, (int, float)) and math.isfinite(lam) and lam >= 0):
        raise ValueError(f"lam must be a finite number >= 0; got {lam!r}")


def _check_n_points(n_points: int | None) -> None:
    if n_points is not None and (isinstance(n_points, bool) or not isinstance(n_points, int) or n_points < 1):
        raise ValueError(f"n_points must be None or an int >= 1; got {n_points!r}")


def _check_enum(value, kind: type[enum.Enum], name: str) -> None:
    if not isinstance(value, kind):
        raise ValueError(f"{name} must be a {kind.__name__} ({[v.value for v in kind]}); got {value!r}")


def _first(n_points: int | None, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The first ``n_points`` rows of each tensor (all rows when None)."""
    return tensors if n_points is None else tuple(v[:n_points] for v in tensors)


def _with_generator(divergence: DivergenceEstimator | None, generator: torch.Generator | None):
    """A Hutchinson estimator without its own generator draws its probes from ``generator`` (the loss's),
    never from torch's global RNG; anything else is returned as is."""
    if isinstance(divergence, Hutchinson) and divergence.generator is None and generator is not None:
        return dataclasses.replace(divergence, generator=generator)
    return divergence


def _draw_probe(like: torch.Tensor, probe: Probe, generator: torch.Generator | None) -> torch.Tensor:
    """One probe per sample, shape and dtype of ``like``: Rademacher (±1) or N(0, I); E[v vᵀ] = I."""
    device = generator.device if generator is not None else like.device
    v = torch.randn(like.shape, generator=generator, dtype=like.dtype, device=device).to(like.device)
    match probe:
        case Probe.RADEMACHER:
            return v.sign()
        case Probe.GAUSSIAN:
            return v


def _leaf(x: torch.Tensor) -> torch.Tensor:
    """A fresh leaf requiring grad, so x-derivatives never reach the caller's tensor."""
    return x.detach().requires_grad_(True)


def _vjp(out: torch.Tensor, x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """vᵀ ∂out/∂x per sample (shape of x), differentiable again (create_graph); zero if out ignores x."""
    if not out.requires_grad:
        return torch.zeros_like(x)
    (g,) = torch.autograd.grad(out, x, grad_outputs=v, create_graph=True, allow_unused=True)
    return torch.zeros_like(x) if g is None else g


def _jvp_x(score_fn: ScoreFn, x: torch.Tensor, t: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(s(x, t), J v) by one forward-mode JVP along x + τ v at τ = 0; both differentiable in the
    parameters, s also in x (x is closed over, as in ``fpe_lab.fpe.ForwardModeDt``)."""
    tau = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
    return jvp(lambda tt: score_fn(x + append_dims(tt, x.ndim) * v, t), (tau,), (torch.ones_like(tau),))


def _jacobian(s: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """J[b, i, k] = ∂s_i/∂x_k of the flattened sample, (b, D, D), by D reverse passes, create_graph."""
    flat = s.reshape(s.shape[0], -1)
    rows = []
    for i in range(flat.shape[1]):
        e = torch.zeros_like(flat)
        e[:, i] = 1
        rows.append(_vjp(s, x, e.reshape(s.shape)).reshape(s.shape[0], -1))
    return torch.stack(rows, dim=1)


def _check_score(s: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    if not isinstance(s, torch.Tensor) or s.shape != x.shape:
        got = tuple(s.shape) if isinstance(s, torch.Tensor) else type(s).__name__
        raise ValueError(f"score_fn(x, t) must return the shape of x {tuple(x.shape)}; got {got}")
    return s


@dataclass(frozen=True)
class FPERegularizer:
    r"""Per-sample w(t) ‖R_θ(x, t)‖² (times ``lam`` in the loss), differentiable in the parameters.

    Args:
        lam: the regularizer's weight lam ≥ 0 in L = L_dsm + lam · L_fpe.
        weighting: w(t), see :class:`FPEWeighting`.
        points: where R is evaluated, see :class:`FPEPoints`. ``PERTURBED``: the DSM points
            x_t = alpha(t) x0 + sigma(t) z. ``RESAMPLED``: x' = alpha(t) x0[π] + sigma(t) z' with a random
            permutation π and fresh noise z' from the generator, i.e. every clean sample x0_j gets a fresh
            time t' = t_{π⁻¹(j)} (drawn from the loss's time law, whatever :class:`TimeSampling` is) and fresh
            noise; entry i stays at time t_i, so the loss's importance weight of t_i applies to it.
        n_points: evaluate R on the first ``n_points`` points only (None: all). R costs several DSM
            steps, so a subset trades variance for time.
        divergence: ∇·s estimator inside R (None: exact; ``fpe_lab.fpe.Hutchinson`` for images). A
            ``Hutchinson`` without its own generator draws its probes from the loss's generator.
        residual: the residual function, :func:`fpe_lab.fpe.score_fpe_residual` or a fast path with
            the same signature. One that also returns s (:class:`ScoreResidualFn`, e.g.
            ``fpe_lab.nets.jet.jet_score_fpe_residual``) hands s at the DSM points to DSM when
            ``points`` is PERTURBED and no subset is taken (:meth:`penalty_and_score`).
        estimator: ‖R̂‖² or ⟨R̂₁, R̂₂⟩, see :class:`FPEEstimator`.
    """

    lam: float
    weighting: FPEWeighting = FPEWeighting.NORMALIZED
    points: FPEPoints = FPEPoints.PERTURBED
    n_points: int | None = None
    divergence: DivergenceEstimator | None = None
    residual: ResidualFn = field(default=score_fpe_residual)
    estimator: FPEEstimator = FPEEstimator.SQUARED

    def __post_init__(self) -> None:
        _check_lam(self.lam)
        _check_enum(self.weighting, FPEWeighting, "weighting")
        _check_enum(self.points, FPEPoints, "points")
        _check_n_points(self.n_points)
        _check_enum(self.estimator, FPEEstimator, "estimator")
        if not callable(self.residual):
            raise ValueError(f"residual must be a residual function (fpe_lab.fpe.score_fpe_residual); got {self.residual!r}")

    def points_for(
        self, sde: LinearSDE, x0: torch.Tensor, t: torch.Tensor, z: torch.Tensor, generator: torch.Generator | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, t) where R is evaluated, shapes (m, *dims) and (m,), m = min(b, n_points); see ``points``."""
        match self.points:
            case FPEPoints.PERTURBED:
                x = perturb(sde, x0, t, z)
            case FPEPoints.RESAMPLED:
                device = generator.device if generator is not None else x0.device
                perm = torch.randperm(x0.shape[0], generator=generator, device=device).to(x0.device)
                z_new = torch.randn(x0.shape, generator=generator, dtype=x0.dtype, device=x0.device)
                x = perturb(sde, x0[perm], t, z_new)
        return _first(self.n_points, x, t)

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
        if with_score:
            s, r = self.residual.with_score(score_fn, sde, x, t, divergence=div, create_graph=True)
        else:
            s, r = None, self.residual(score_fn, sde, x, t, divergence=div, create_graph=True)
        w = self.weighting.weight(sde, t)
        match self.estimator:
            case FPEEstimator.SQUARED:
                return w * _sq(r), s
            case FPEEstimator.UNBIASED:
                if div is None or isinstance(div, ExactDivergence):
                    return w * _sq(r), s  # R is exact: ⟨R, R⟩ = ‖R‖², one evaluation
                r2 = self.residual(score_fn, sde, x, t, divergence=div, create_graph=True)  # fresh probes
                return w * _dot(r, r2), s

    def penalty_at(
        self, score_fn: ScoreFn, sde: LinearSDE, x: torch.Tensor, t: torch.Tensor, generator: torch.Generator | None = None
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
        """The :class:`Regularizer` call: the penalty at :meth:`points_for`, shape (m,)."""
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
        else (penalty, None): the :class:`SharesScore` hook of :class:`ScoreFPELoss`."""
        shares = (
            self.points is FPEPoints.PERTURBED
            and (self.n_points is None or self.n_points >= x0.shape[0])
            and isinstance(self.residual, ScoreResidualFn)
        )
        if not shares:
            return self(score_fn, sde, x0, t, z, generator), None
        return self._evaluate(score_fn, sde, perturb(sde, x0, t, z), t, generator, with_score=True)


@dataclass(frozen=True)
class ConservativeRegularizer:
    r"""Per-sample w(t) ‖J − Jᵀ‖²_F at the DSM points, J = ∂s_θ/∂x (Chao et al., ICML 2023).

    A score is a gradient field, so its Jacobian (the Hessian of log p_t) is symmetric; the penalty
    is zero for any exact score and measures the rotational part of s_θ. For x of shape (b, *dims),
    J is the Jacobian of the flattened sample, (D, D).

    * ``probes=None``: exact, J by D reverse passes with create_graph (fine for 2-D points);
    * ``probes=k``: the unbiased estimate (1/k) Σ_v ‖(J − Jᵀ)v‖², since E‖Av‖² = tr(A E[vvᵀ] Aᵀ)
      = ‖A‖²_F for E[vvᵀ] = I; Jv by one forward-mode JVP and Jᵀv by one VJP per probe, both
      differentiable in the parameters, probes from the loss's generator. For D = 2 and Rademacher
      probes it is exact: A = J − Jᵀ = [[0, a], [−a, 0]] gives ‖Av‖² = a²(v₁² + v₂²) = 2a² = ‖A‖²_F.

    Args:
        lam: weight lam ≥ 0 in the loss.
        weighting: w(t), see :class:`ConservativeWeighting`.
        n_points: evaluate at the first ``n_points`` DSM points only (None: all).
        probes: None (exact) or the number k ≥ 1 of Hutchinson probes per point.
        probe: the probes' distribution, ``fpe_lab.fpe.Probe``.
    """

    lam: float
    weighting: ConservativeWeighting = ConservativeWeighting.SIGMA4
    n_points: int | None = None
    probes: int | None = None
    probe: Probe = Probe.RADEMACHER

    def __post_init__(self) -> None:
        _check_lam(self.lam)
        _check_enum(self.weighting, ConservativeWeighting, "weighting")
        _check_n_points(self.n_points)
        if self.probes is not None and (isinstance(self.probes, bool) or not isinstance(self.probes, int) or self.probes < 1):
            raise ValueError(f"probes must be None (exact Jacobian) or an int >= 1; got {self.probes!r}")
        _check_enum(self.probe, Probe, "probe")

    def asymmetry(
        self, score_fn: ScoreFn, x: torch.Tensor, t: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """‖J − Jᵀ‖²_F per sample (exact, or the Hutchinson estimate), shape (b,), for x (b, *dims), t (b,)."""
        x = _leaf(x)
        if self.probes is None:
            jac = _jacobian(_check_score(score_fn(x, t), x), x)
            return (jac - jac.transpose(1, 2)).pow(2).sum((1, 2))
        est = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
        for _ in range(self.probes):
            v = _draw_probe(x, self.probe, generator)
            s, jv = _jvp_x(score_fn, x, t, v)
            est = est + _sq(jv - _vjp(_check_score(s, x), x, v))
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
        """The :class:`Regularizer` call: w(t) ‖J − Jᵀ‖²_F at the (first n_points) DSM points, shape (m,)."""
        x, tt = _first(self.n_points, perturb(sde, x0, t, z), t)
        return self.weighting.weight(sde, tt) * self.asymmetry(score_fn, x, tt, generator)


@dataclass(frozen=True)
class HODSMRegularizer:
    r"""High-order denoising score matching (Lu et al., ICML 2022): matches ∇s_θ (and ∇ tr ∇s_θ) to
    the conditional moments of the noise, at the DSM points.

    Derivation. With x = alpha x0 + sigma z, the posterior of u = x0 given x is an exponential family
    in x: p(u | x) ∝ p0(u) e^{−alpha²‖u‖²/(2sigma²)} e^{⟨x, alpha u⟩/sigma²}, so the derivatives of
    A(x) = log p_t(x) + ‖x‖²/(2sigma²) + const are the cumulants of alpha u / sigma²; since
    z = (x − alpha u)/sigma, the cumulants of z | x are

        E[z | x] = −sigma s,   Cov[z | x] = sigma² ∇s + I,   κ₃[z | x]_{kij} = −sigma³ ∂_k∂_i∂_j log p_t,

    with s = ∇ log p_t. Let ε̂ = −sigma s_θ with s_θ detached (the first-order estimate of E[z | x],
    trained by DSM) and w = z − ε̂. Second order: E[w wᵀ | x] = Cov[z | x] when ε̂ is exact, so

        E2 = sigma² ∇s_θ + I − w wᵀ

    has conditional mean zero exactly at the true score, and minimising E‖E2‖²_F over the matrix
    field gives sigma²∇s_θ + I = E[wwᵀ | x]. Lu et al. add the squared trace (tr E2)², which the
    likelihood bound needs. Third order: contracting κ₃, σ³ ∇ tr ∇s = −E[d ‖d‖² | x] with
    d = z − E[z | x]; writing w = d + δ (δ = E[z | x] − ε̂) and Ĉ = sigma² ∇s_θ + I detached (= Cov[z | x]
    when exact), E[‖w‖² w − tr(Ĉ) w − 2Ĉw | x] = E[d ‖d‖² | x] + ‖δ‖² δ, so

        E3 = sigma³ ∇_x tr(∇s_θ) + ‖w‖² w − tr(Ĉ) w − 2Ĉ w

    has conditional mean zero at the true score, with the error of ε̂ entering only at third order.

    What is implemented (per sample, x of shape (b, *dims) flattened to D coordinates):

    * ``probes=None`` (exact; forms (D, D) matrices, meant for low-dimensional points; J by D reverse
      passes with create_graph, ∇ tr ∇s_θ by one more):

          order 2:  (‖E2‖²_F + (tr E2)²) / D
          order 3:  the order-2 term + ‖E3‖² / D

    * ``probes=k`` (Lu et al.'s form for images, no D×D matrix): per Rademacher probe v from the
      loss's generator, with Jv by one forward-mode JVP and ∇_x(vᵀJv) by one reverse pass over it,

          E2 v = sigma² Jv + v − ⟨w, v⟩ w,           vᵀE2 v = sigma² vᵀJv + ‖v‖² − ⟨w, v⟩²,
          E3_v = sigma³ ∇_x(vᵀJv) + ⟨w, v⟩² w − (vᵀĈv) w − 2⟨w, v⟩ Ĉv,

          order 2:  (‖E2 v‖² + (vᵀE2 v)²) / D,   order 3: + ‖E3_v‖² / D,   averaged over the k probes.

      E_v‖E2 v‖² = ‖E2‖²_F and E_v[E3_v] = E3 (E[vvᵀ] = I), while (vᵀE2 v)² and ‖E3_v‖² exceed their
      exact counterparts by the probe variance; for fixed v, the conditional mean of E3_v given x is
      still zero at the true score (the target's mean is κ₃(v, v, ·) = −sigma³ ∇(vᵀ∇s v)), so the
      exact score stays stationary.

    The 1/D keeps their balance with DSM (they average over coordinates where DSM here sums), and the
    sigma², sigma³ factors make E2, E3 O(1) at every t (the sigma² convention of DSM), so no further
    time weighting is applied.

    Args:
        lam: weight lam ≥ 0 in the loss.
        order: 2 or 3.
        n_points: evaluate at the first ``n_points`` DSM points only (None: all).
        probes: None (exact Jacobian) or the number k ≥ 1 of Rademacher probes (images).
    """

    lam: float
    order: int = 2
    n_points: int | None = None
    probes: int | None = None

    def __post_init__(self) -> None:
        _check_lam(self.lam)
        if isinstance(self.order, bool) or self.order not in (2, 3):
            raise ValueError(f"order must be 2 or 3 (second- or third-order score matching); got {self.order!r}")
        _check_n_points(self.n_points)
        if self.probes is not None and (isinstance(self.probes, bool) or not isinstance(self.probes, int) or self.probes < 1):
            raise ValueError(f"probes must be None (exact Jacobian) or an int >= 1; got {self.probes!r}")

    def __call__(
        self,
        score_fn: ScoreFn,
        sde: LinearSDE,
        x0: torch.Tensor,
        t: torch.Tensor,
        z: torch.Tensor,
        generator: torch.Generator | None,
    ) -> torch.Tensor:
        """The :class:`Regularizer` call: the order-2 (or 3) penalty at the (first n_points) DSM points, (m,)."""
        x_t, tt, zz = _first(self.n_points, perturb(sde, x0, t, z), t, z)
        x = _leaf(x_t)
        sigma = sde.marginal(tt)[1][:, None]
        if self.probes is None:
            return self._exact(score_fn, x, tt, zz, sigma)
        pen = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
        for _ in range(self.probes):
            pen = pen + self._projected(score_fn, x, tt, zz, sigma, _draw_probe(x, Probe.RADEMACHER, generator))
        return pen / self.probes

    def _exact(
        self, score_fn: ScoreFn, x: torch.Tensor, t: torch.Tensor, z: torch.Tensor, sigma: torch.Tensor
    ) -> torch.Tensor:
        """(‖E2‖²_F + (tr E2)²)/D (+ ‖E3‖²/D), shape (b,); sigma of shape (b, 1)."""
        s = _check_score(score_fn(x, t), x)
        b, d = x.shape[0], flat_dim(x)
        w = z.reshape(b, d) + sigma * s.detach().reshape(b, d)  # z − ε̂, ε̂ = −sigma s_θ (stop-gradient)
        jac = _jacobian(s, x)
        eye = torch.eye(d, dtype=x.dtype, device=x.device)
        cov = sigma[:, :, None] ** 2 * jac + eye  # sigma² ∇s_θ + I
        e2 = cov - w[:, :, None] * w[:, None, :]
        pen = (e2.pow(2).sum((1, 2)) + torch.diagonal(e2, dim1=1, dim2=2).sum(-1) ** 2) / d
        if self.order == 3:
            tr_jac = torch.diagonal(jac, dim1=1, dim2=2).sum(-1)
            grad_tr = _vjp(tr_jac, x, torch.ones_like(tr_jac)).reshape(b, d)  # ∇_x tr ∇s_θ per sample
            c_hat = cov.detach()
            e3 = (
                sigma**3 * grad_tr
                + (w.pow(2).sum(-1, keepdim=True) - torch.diagonal(c_hat, dim1=1, dim2=2).sum(-1, keepdim=True)) * w
                - 2 * torch.einsum("bij,bj->bi", c_hat, w)
            )
            pen = pen + e3.pow(2).sum(-1) / d
        return pen

    def _projected(
        self, score_fn: ScoreFn, x: torch.Tensor, t: torch.Tensor, z: torch.Tensor, sigma: torch.Tensor, v: torch.Tensor
    ) -> torch.Tensor:
        """(‖E2 v‖² + (vᵀE2 v)²)/D (+ ‖E3_v‖²/D) for one probe v, shape (b,); sigma of shape (b, 1)."""
        s, jv = _jvp_x(score_fn, x, t, v)
        _check_score(s, x)
        b, d = x.shape[0], flat_dim(x)
        s, jv, vf = s.reshape(b, d), jv.reshape(b, d), v.reshape(b, d)
        w = z.reshape(b, d) + sigma * s.detach()  # z − ε̂
        wv = (w * vf).sum(-1, keepdim=True)  # ⟨w, v⟩
        cv = sigma**2 * jv + vf  # Ĉ v before the stop-gradient
        e2v = cv - wv * w
        v_e2_v = (vf * e2v).sum(-1)  # vᵀE2v = sigma² vᵀJv + ‖v‖² − ⟨w, v⟩²
        pen = (e2v.pow(2).sum(-1) + v_e2_v**2) / d
        if self.order == 3:
            v_j_v = (vf * jv).sum(-1)
            grad_vjv = _vjp(v_j_v, x, torch.ones_like(v_j_v)).reshape(b, d)  # ∇_x(vᵀJv): reverse over forward
            c_v = cv.detach()
            e3 = sigma**3 * grad_vjv + (wv**2 - (vf * c_v).sum(-1, keepdim=True)) * w - 2 * wv * c_v
            pen = pen + e3.pow(2).sum(-1) / d
        return pen


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
        _check_eps(self.eps)
        _check_enum(self.weighting, DSMWeighting, "weighting")
        if self.regularizer is not None and not isinstance(self.regularizer, Regularizer):
            raise ValueError(
                "regularizer must be None or a Regularizer (a callable with a float lam: FPERegularizer, "
                f"ConservativeRegularizer, HODSMRegularizer); got {self.regularizer!r}"
            )
        _check_enum(self.time_sampling, TimeSampling, "time_sampling")
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
                raise ValueError(f"regularizer must return a per-sample penalty of shape (m,), 1 <= m <= {x0.shape[0]}; got {got}")
        if s is None:
            s = score_fn(perturb(self.sde, x0, t, z), t)
        dsm = (weight * _dsm_from_score(s, self.sde, t, z, self.weighting)).mean()
        if pen is None:
            zero = torch.zeros((), dtype=dsm.dtype, device=dsm.device)
            return LossTerms(total=dsm, dsm=dsm, reg=zero)
        reg_term = (weight[: pen.shape[0]] * pen).mean()
        return LossTerms(total=dsm + reg.lam * reg_term, dsm=dsm, reg=reg_term)
