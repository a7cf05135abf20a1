r"""Forward SDEs  dx = f(x, t) dt + g(t) dw  on R^D, t in [0, 1] (Score SDE, arXiv 2011.13456, Sec. 3.4).

An SDE object exposes what the score Fokker-Planck equation needs:

* ``drift(x, t)``       f(x, t), same shape as x of shape (b, *dims);
* ``diffusion(t)``      g(t), shape (b,);
* ``div_drift(x, t)``   ∇·f(x, t), shape (b,);
* ``marginal(t)``       (alpha(t), sigma(t)) with x_t | x_0 ~ N(alpha x_0, sigma² I);
* ``marginal_var(t)``   (alpha(t), sigma(t)²), smooth in t up to and including t = 0;
* ``prior_sample`` / ``prior_log_prob`` for the reference density at t = 1;
* ``str(sde)``          the equation with its coefficients.

The three SDEs here have linear drift f(x, t) = a(t) x, so their transition kernels are Gaussian.
``marginal`` is the *exact* transition of the SDE started at the data at t = 0 (sigma(0) = 0). For VE
this differs from Score SDE, which perturbs with sigma_min (sigma_max/sigma_min)^t, i.e. treats the
data as already blurred by sigma_min.

**t = 0 and empty batches.** Every method here is defined at t = 0 and returns the value there, which is
also the limit t → 0⁺: f(x, 0), g(0), ∇·f(x, 0) and (alpha(0), sigma(0)) = (1, 0) exactly (the
marginal is the data itself). What does *not* exist at t = 0 is the t-derivative of sigma for VE and VP
(sigma(t) ~ sqrt(c t)) and of g for sub-VP (g(t) ~ beta_min sqrt(2 t)): differentiating ``marginal(t)[1]``
in t there gives inf, and sigma² built as ``sigma ** 2`` gives 0·inf = NaN. Code that differentiates
the transition in t (the exact mixture score under ``torch.func.jvp``) must use ``marginal_var``, whose
sigma² is an analytic function of t (VE: sigma_min² expm1(2 t ln(sigma_max/sigma_min)), VP:
−expm1(−B(t)), sub-VP: expm1(−B(t))²). An empty batch (x or t of shape (0, ...)) is a ``ValueError``
naming the shape.
"""

from __future__ import annotations

import abc
import math
from dataclasses import dataclass

import torch

from fpe_lab.checks import check_batch, check_positive, check_time
from fpe_lab.shapes import append_dims, flat_dim

__all__ = ["SDE", "LinearSDE", "VESDE", "VPSDE", "SubVPSDE"]


def _time(t: torch.Tensor | float) -> torch.Tensor:
    """t in [0, 1] (t = 0 included) as a floating tensor; a scalar or shape (b,) with b >= 1."""
    t = check_batch(check_time(t), "t")
    return t if t.is_floating_point() else t.to(torch.get_default_dtype())


def _softplus(phi: torch.Tensor) -> torch.Tensor:
    """log(1 + e^phi), stable at both ends."""
    return torch.logaddexp(phi, torch.zeros_like(phi))


TABLE_T_MIN = 1e-6
"""First knot of the tabulated rate antiderivative (the smallest training eps)."""
_TABLE_KNOTS = 8193


def _interp(x: torch.Tensor, xs: torch.Tensor, ys: torch.Tensor) -> torch.Tensor:
    """Piecewise-linear interpolation of the increasing table (xs, ys) at x (clamped to the table)."""
    i = (torch.searchsorted(xs, x.contiguous(), right=True) - 1).clamp(0, xs.numel() - 2)
    w = ((x - xs[i]) / (xs[i + 1] - xs[i])).clamp(0, 1)
    return ys[i] + w * (ys[i + 1] - ys[i])


_TABLES: dict[tuple[LinearSDE, str], tuple[torch.Tensor, torch.Tensor]] = {}


def _rate_table(sde: LinearSDE, device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
    """(knots, Φ(knots)) in float64 on log-spaced knots of [TABLE_T_MIN, 1], Φ(TABLE_T_MIN) = 0, by
    trapezoids of r·t in log t (r ~ 1/t, so r·t is smooth there); ValueError unless r is finite and > 0."""
    key = (sde, str(device))
    try:
        return _TABLES[key]
    except TypeError:  # an unhashable SDE: no cache
        return _tabulate(sde, device)
    except KeyError:
        _TABLES[key] = _tabulate(sde, device)
        return _TABLES[key]


def _tabulate(sde: LinearSDE, device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
    """The table of :func:`_rate_table`."""
    knots = torch.logspace(math.log10(TABLE_T_MIN), 0.0, _TABLE_KNOTS, dtype=torch.float64, device=device)
    knots[0], knots[-1] = TABLE_T_MIN, 1.0
    r = sde.rate(knots)
    if not (torch.isfinite(r).all() and (r > 0).all()):
        raise ValueError(f"sde {type(sde).__name__}: g(t)²/sigma(t)² must be finite and positive on "
                         f"[{TABLE_T_MIN:g}, 1] for importance-sampled time")
    rt, logt = r * knots, knots.log()
    phi = torch.cat([torch.zeros(1, dtype=torch.float64, device=device),
                     torch.cumsum(0.5 * (rt[1:] + rt[:-1]) * logt.diff(), 0)])
    return knots, phi


class SDE(abc.ABC):
    """Abstract forward SDE dx = f(x, t) dt + g(t) dw."""

    @abc.abstractmethod
    def drift(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """f(x, t) for x of shape (b, *dims) and t of shape (b,); returns shape (b, *dims).

        t = 0 is allowed (the value there); b = 0 is a ValueError."""

    @abc.abstractmethod
    def diffusion(self, t: torch.Tensor) -> torch.Tensor:
        """g(t), same shape as t; t = 0 is allowed (the value there)."""

    @abc.abstractmethod
    def div_drift(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """∇·f(x, t) = Σ_i ∂f_i/∂x_i, shape (b,); t = 0 is allowed (the value there)."""


class LinearSDE(SDE):
    """SDE with linear drift f(x, t) = a(t) x and a Gaussian transition kernel.

    The marginal solves the moment ODEs  d alpha/dt = a alpha,  d sigma²/dt = 2 a sigma² + g²
    with alpha(0) = 1, sigma(0) = 0.
    """

    @abc.abstractmethod
    def drift_coef(self, t: torch.Tensor) -> torch.Tensor:
        """a(t) in f(x, t) = a(t) x, same shape as t; t = 0 is allowed (the value there)."""

    @abc.abstractmethod
    def marginal(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(alpha(t), sigma(t)), each the shape of t: x_t | x_0 ~ N(alpha x_0, sigma² I).

        t = 0 is allowed and gives exactly (1, 0), the limit t → 0⁺. sigma is not differentiable in t at
        t = 0 for VE and VP (sigma ~ sqrt(t)): differentiate :meth:`marginal_var` instead.
        """

    def marginal_var(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(alpha(t), sigma(t)²), each the shape of t, with sigma² computed without a square root.

        The same transition as :meth:`marginal`, in the form to differentiate in t: sigma² is smooth
        on [0, 1] including t = 0, where (alpha, sigma²) = (1, 0) and d sigma²/dt = g(0)² (the moment
        ODE with sigma = 0), while d sigma/dt is infinite for VE and VP. This default squares
        ``marginal``'s sigma (right for any SDE whose sigma is smooth); VE and VP override it.
        """
        alpha, sigma = self.marginal(t)
        return alpha, sigma**2

    def rate(self, t: torch.Tensor) -> torch.Tensor:
        """r(t) = g(t)² / sigma(t)², shape of t: the ratio of the likelihood and sigma² DSM weightings
        (r ~ 1/t near 0), the target of importance-sampled time."""
        return self.diffusion(t) ** 2 / self.marginal_var(t)[1]

    def rate_antiderivative(self, t: torch.Tensor) -> torch.Tensor:
        """Φ(t) with Φ' = g²/sigma², up to a constant, shape of t (t >= TABLE_T_MIN).

        This default tabulates Φ (trapezoids in log t on 8193 log-spaced knots of [1e-6, 1], float64;
        relative error ~1e-7, below float32 resolution) and interpolates linearly; VE, VP and sub-VP
        override it with closed forms (docs/derivations.md#importance-sampled-time).
        """
        knots, phi = _rate_table(self, t.device)
        return _interp(t.double(), knots, phi).to(t.dtype)

    def rate_antiderivative_inverse(self, phi: torch.Tensor) -> torch.Tensor:
        """t with Φ(t) = phi, the inverse of :meth:`rate_antiderivative` (tabulated by default)."""
        knots, table = _rate_table(self, phi.device)
        return _interp(phi.double(), table, knots).to(phi.dtype)

    @abc.abstractmethod
    def prior_std(self) -> float:
        """Standard deviation of the isotropic Gaussian prior at t = 1."""

    def perturb(self, x0: torch.Tensor, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """x_t = alpha(t) x_0 + sigma(t) z for x_0, z of shape (b, *dims), t of shape (b,)."""
        alpha, sigma = self.marginal(t)
        return append_dims(alpha, x0.ndim) * x0 + append_dims(sigma, x0.ndim) * z

    def drift(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """a(t) x, shape of x (b, *dims); t = 0 allowed; b = 0 is a ValueError naming the shape."""
        check_batch(x, "x")
        return append_dims(self.drift_coef(t), x.ndim) * x

    def div_drift(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """a(t) D, shape (b,); t = 0 allowed; b = 0 is a ValueError naming the shape."""
        check_batch(x, "x")
        a = self.drift_coef(t)
        return (a * flat_dim(x)).expand(x.shape[:1]) if a.ndim == 0 else a * flat_dim(x)

    def prior_sample(
        self,
        shape: tuple[int, ...],
        generator: torch.Generator | None = None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> torch.Tensor:
        """Samples of N(0, prior_std² I) of shape (b, *dims) (no t: the prior is the law at t = 1).

        b = 0 is allowed here, as in ``GaussianMixture.sample(0)``: it is a request for no samples, not
        an input batch, and returns an empty tensor.
        """
        z = torch.randn(shape, generator=generator, dtype=dtype, device=device)
        return self.prior_std() * z

    def prior_log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """log N(x; 0, prior_std² I) summed over all but the batch axis, shape (b,); b = 0 is a ValueError."""
        check_batch(x, "x")
        var = self.prior_std() ** 2
        d = flat_dim(x)
        sq = x.reshape(x.shape[0], -1).pow(2).sum(-1)
        return -0.5 * sq / var - 0.5 * d * math.log(2 * math.pi * var)


@dataclass(frozen=True)
class VESDE(LinearSDE):
    r"""Variance exploding: dx = sqrt(d[sigma²]/dt) dw, f = 0.

    sigma_SDE(t) = sigma_min (sigma_max/sigma_min)^t,  g(t) = sigma_SDE(t) sqrt(2 ln(sigma_max/sigma_min)).
    Exact marginal: alpha = 1, sigma²(t) = sigma_min² ((sigma_max/sigma_min)^{2t} − 1)  (so sigma(0) = 0;
    Score SDE uses sigma_SDE(t)² instead). Prior N(0, sigma(1)² I).
    """

    sigma_min: float = 0.01
    sigma_max: float = 50.0

    def __post_init__(self) -> None:
        check_positive(self.sigma_min, "sigma_min")
        check_positive(self.sigma_max, "sigma_max")
        if self.sigma_max <= self.sigma_min:
            raise ValueError(
                f"sigma_max must exceed sigma_min; got sigma_min={self.sigma_min}, sigma_max={self.sigma_max}"
            )

    @property
    def _log_ratio(self) -> float:
        return math.log(self.sigma_max / self.sigma_min)

    def drift_coef(self, t: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(_time(t))

    def diffusion(self, t: torch.Tensor) -> torch.Tensor:
        t = _time(t)
        return self.sigma_min * torch.exp(t * self._log_ratio) * math.sqrt(2 * self._log_ratio)

    def marginal(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        t = _time(t)
        sigma = self.sigma_min * torch.sqrt(torch.expm1(2 * t * self._log_ratio))
        return torch.ones_like(t), sigma

    def marginal_var(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(1, sigma_min² expm1(2 t ln(sigma_max/sigma_min))): analytic in t, d sigma²/dt(0) = g(0)²."""
        t = _time(t)
        return torch.ones_like(t), self.sigma_min**2 * torch.expm1(2 * t * self._log_ratio)

    def prior_std(self) -> float:
        return self.sigma_min * math.sqrt(math.expm1(2 * self._log_ratio))

    def rate_antiderivative(self, t: torch.Tensor) -> torch.Tensor:
        """Φ = log expm1(2Lt), L = ln(sigma_max/sigma_min) (g² = d sigma²/dt, so Φ = log sigma² + const)."""
        return torch.log(torch.expm1(2 * _time(t) * self._log_ratio))

    def rate_antiderivative_inverse(self, phi: torch.Tensor) -> torch.Tensor:
        """t = softplus(Φ)/(2L)."""
        return _softplus(phi) / (2 * self._log_ratio)

    def __str__(self) -> str:
        return (
            f"VE SDE: dx = g(t) dw,  g(t) = {self.sigma_min:g}·({self.sigma_max:g}/{self.sigma_min:g})^t"
            f"·sqrt(2 ln({self.sigma_max:g}/{self.sigma_min:g}));  "
            f"x_t|x_0 ~ N(x_0, {self.sigma_min:g}²(({self.sigma_max:g}/{self.sigma_min:g})^(2t) − 1) I)"
        )


@dataclass(frozen=True)
class _BetaSchedule:
    """beta(t) = beta_min + t (beta_max − beta_min) and B(t) = ∫_0^t beta."""

    beta_min: float = 0.1
    beta_max: float = 20.0

    def __post_init__(self) -> None:
        check_positive(self.beta_min, "beta_min")
        check_positive(self.beta_max, "beta_max")
        if self.beta_max < self.beta_min:
            raise ValueError(
                f"beta_max must be >= beta_min; got beta_min={self.beta_min}, beta_max={self.beta_max}"
            )

    def beta(self, t: torch.Tensor) -> torch.Tensor:
        return self.beta_min + t * (self.beta_max - self.beta_min)

    def int_beta(self, t: torch.Tensor) -> torch.Tensor:
        return self.beta_min * t + 0.5 * (self.beta_max - self.beta_min) * t**2

    def drift_coef(self, t: torch.Tensor) -> torch.Tensor:
        return -0.5 * self.beta(_time(t))

    def prior_std(self) -> float:
        return 1.0

    def time_of_int_beta(self, b: torch.Tensor) -> torch.Tensor:
        """t with B(t) = b: the positive root 2b/(beta_min + sqrt(beta_min² + 2(beta_max − beta_min) b)),
        written without cancellation."""
        return 2 * b / (self.beta_min + torch.sqrt(self.beta_min**2 + 2 * (self.beta_max - self.beta_min) * b))

    def _schedule(self) -> str:
        return f"beta(t) = {self.beta_min:g} + {self.beta_max - self.beta_min:g} t"


@dataclass(frozen=True)
class VPSDE(_BetaSchedule, LinearSDE):
    r"""Variance preserving: dx = −½ beta(t) x dt + sqrt(beta(t)) dw.

    alpha(t) = exp(−B(t)/2),  sigma²(t) = 1 − exp(−B(t)),  B(t) = beta_min t + ½(beta_max − beta_min) t².
    Prior N(0, I).
    """

    def diffusion(self, t: torch.Tensor) -> torch.Tensor:
        return torch.sqrt(self.beta(_time(t)))

    def marginal(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b = self.int_beta(_time(t))
        return torch.exp(-0.5 * b), torch.sqrt(-torch.expm1(-b))

    def marginal_var(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(exp(−B/2), −expm1(−B)): analytic in t, d sigma²/dt(0) = beta_min = g(0)²."""
        b = self.int_beta(_time(t))
        return torch.exp(-0.5 * b), -torch.expm1(-b)

    def rate_antiderivative(self, t: torch.Tensor) -> torch.Tensor:
        """Φ = log expm1(B): r = beta/(1 − e^{−B}) = d/dt log(e^B − 1)."""
        return torch.log(torch.expm1(self.int_beta(_time(t))))

    def rate_antiderivative_inverse(self, phi: torch.Tensor) -> torch.Tensor:
        """B = softplus(Φ), then t from B."""
        return self.time_of_int_beta(_softplus(phi))

    def __str__(self) -> str:
        return (
            f"VP SDE: dx = −½ beta(t) x dt + sqrt(beta(t)) dw,  {self._schedule()};  "
            "x_t|x_0 ~ N(exp(−B/2) x_0, (1 − exp(−B)) I), B(t) = ∫_0^t beta"
        )


@dataclass(frozen=True)
class SubVPSDE(_BetaSchedule, LinearSDE):
    r"""sub-VP: dx = −½ beta(t) x dt + sqrt(beta(t)(1 − exp(−2B(t)))) dw.

    alpha(t) = exp(−B(t)/2),  sigma(t) = 1 − exp(−B(t))  (sigma² ≤ VP's).  Prior N(0, I).
    """

    def diffusion(self, t: torch.Tensor) -> torch.Tensor:
        """g(0) = 0 exactly; g ~ beta_min sqrt(2 t) is not differentiable in t at 0 (g² is)."""
        t = _time(t)
        return torch.sqrt(self.beta(t) * -torch.expm1(-2 * self.int_beta(t)))

    def marginal(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """sigma = 1 − exp(−B) is smooth at t = 0 here (sigma ~ beta_min t), unlike VE and VP."""
        b = self.int_beta(_time(t))
        return torch.exp(-0.5 * b), -torch.expm1(-b)

    def rate_antiderivative(self, t: torch.Tensor) -> torch.Tensor:
        """Φ = 2 log expm1(B) − B: r = beta(1 + e^{−B})/(1 − e^{−B})."""
        b = self.int_beta(_time(t))
        return 2 * torch.log(torch.expm1(b)) - b

    def rate_antiderivative_inverse(self, phi: torch.Tensor) -> torch.Tensor:
        """B = 2 asinh(e^{Φ/2}/2), then t from B."""
        return self.time_of_int_beta(2 * torch.asinh(0.5 * torch.exp(0.5 * phi)))

    def __str__(self) -> str:
        return (
            f"sub-VP SDE: dx = −½ beta(t) x dt + sqrt(beta(t)(1 − exp(−2B(t)))) dw,  {self._schedule()};  "
            "x_t|x_0 ~ N(exp(−B/2) x_0, (1 − exp(−B))² I), B(t) = ∫_0^t beta"
        )


class _KnotTables:
    """The tables :class:`TabulatedVPSDE` sets in ``__post_init__``, declared on a plain class so that the
    dataclass does not take them for fields (they stay out of its __init__, fields(), asdict, eq and hash)."""

    _knots: torch.Tensor  # (N + 1,) the knots k/N
    _values: torch.Tensor  # (N + 1,) log ᾱ at the knots, 0 first
    _rates: torch.Tensor  # (N,) beta on each interval


@dataclass(frozen=True, repr=False)
class TabulatedVPSDE(LinearSDE, _KnotTables):
    r"""The VP SDE of a discrete schedule ᾱ_0 > ᾱ_1 > … > ᾱ_{N−1} > 0 (diffusers' ``alphas_cumprod``).

    Step k of the table sits at t = (k + 1)/N, and log ᾱ is piecewise linear in t through the knots
    (0, 0), (1/N, log ᾱ_0), …, (1, log ᾱ_{N−1}):

        alpha(t)² = ᾱ(t),  sigma(t)² = 1 − ᾱ(t),  beta(t) = −d log ᾱ/dt = −N log(ᾱ_k/ᾱ_{k−1}) on (k/N, (k+1)/N),
        dx = −½ beta(t) x dt + sqrt(beta(t)) dw,

    so beta is the constant rate −N log(1 − β_k) of each step (β_k = 1 − ᾱ_k/ᾱ_{k−1}), and the marginal
    equals the table at every knot up to float64 round-off (tests/nets/test_diffusers_model.py measures
    ≤ 1e-14 in log ᾱ). Between knots the interpolant differs from a smooth schedule by ≤ (1/8N²) max|∂²_t
    log ᾱ|: measured against the cosine schedule's closed form (N = 1000), 1.2e-6 in log ᾱ for t ≤ 0.5,
    2.5e-5 for t ≤ 0.9, 2.3e-3 for t ≤ 0.99 (∂²_t log ᾱ grows like 1/ᾱ as ᾱ → 0). beta jumps at the
    knots, so the SDE's coefficients are piecewise constant in t and ∂_t of the marginal is one-sided
    there (docs/derivations.md#the-diffusers-mapping). Prior N(0, I) (ᾱ_{N−1} ≈ 0).

    Args:
        log_alphas_cumprod: (log ᾱ_0, …, log ᾱ_{N−1}), N ≥ 2, finite and strictly decreasing below 0.
        name: a label for str/repr (e.g. the diffusers ``beta_schedule``).
    """

    log_alphas_cumprod: tuple[float, ...]
    name: str = "table"

    def __post_init__(self) -> None:
        try:
            table = torch.as_tensor([float(v) for v in self.log_alphas_cumprod], dtype=torch.float64)
        except (TypeError, ValueError):
            raise ValueError("log_alphas_cumprod must be a sequence of numbers (log ᾱ_k)") from None
        if table.numel() < 2:
            raise ValueError(f"log_alphas_cumprod must hold at least 2 steps; got {table.numel()}")
        if not bool(torch.isfinite(table).all()):
            raise ValueError("log_alphas_cumprod must be finite: ᾱ_k > 0 at every step (a zero terminal SNR, "
                             "ᾱ_{N−1} = 0, has no log)")
        steps = torch.diff(torch.cat([table.new_zeros(1), table]))
        if not bool((steps < 0).all()):
            k = int(torch.nonzero(steps >= 0)[0])
            raise ValueError(f"ᾱ must decrease strictly from 1 (every beta_k > 0); step {k} has "
                             f"log ᾱ_k − log ᾱ_{{k−1}} = {float(steps[k]):.3g}")
        object.__setattr__(self, "log_alphas_cumprod", tuple(float(v) for v in table))
        n = table.numel()
        object.__setattr__(self, "_knots", torch.arange(n + 1, dtype=torch.float64) / n)
        object.__setattr__(self, "_values", torch.cat([table.new_zeros(1), table]))
        object.__setattr__(self, "_rates", -steps * n)

    @classmethod
    def from_alphas_cumprod(cls, alphas_cumprod, name: str = "table") -> TabulatedVPSDE:
        """From ᾱ_k themselves (any sequence or tensor; taken in float64)."""
        a = torch.as_tensor(alphas_cumprod, dtype=torch.float64).reshape(-1)
        return cls(tuple(float(v) for v in torch.log(a)), name)

    @property
    def n_steps(self) -> int:
        return len(self.log_alphas_cumprod)

    def _piece(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(t in float64, index j of the interval (j/N, (j+1)/N] holding t, the knots on t's device)."""
        t64 = t.to(torch.float64)
        knots = self._knots.to(t.device)
        j = (torch.searchsorted(knots, t64.detach().contiguous(), right=False) - 1).clamp(0, self.n_steps - 1)
        return t64, j, knots

    def log_alpha_bar(self, t: torch.Tensor) -> torch.Tensor:
        """log ᾱ(t), piecewise linear through the knots; float64, shape of t (differentiable in t)."""
        t64, j, knots = self._piece(_time(t))
        values, rates = self._values.to(t64.device), self._rates.to(t64.device)
        return values[j] - rates[j] * (t64 - knots[j])

    def beta(self, t: torch.Tensor) -> torch.Tensor:
        """beta(t) = −d log ᾱ/dt (the rate of the step holding t), in t's dtype."""
        t = _time(t)
        _, j, _ = self._piece(t)
        return self._rates.to(t.device)[j].to(t.dtype)

    def drift_coef(self, t: torch.Tensor) -> torch.Tensor:
        return -0.5 * self.beta(t)

    def diffusion(self, t: torch.Tensor) -> torch.Tensor:
        return torch.sqrt(self.beta(t))

    def marginal(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        t = _time(t)
        log_ab = self.log_alpha_bar(t)
        return torch.exp(0.5 * log_ab).to(t.dtype), torch.sqrt(-torch.expm1(log_ab)).to(t.dtype)

    def marginal_var(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(sqrt(ᾱ), 1 − ᾱ) with 1 − ᾱ = −expm1(log ᾱ): linear in t near 0, d sigma²/dt(0) = beta(0)."""
        t = _time(t)
        log_ab = self.log_alpha_bar(t)
        return torch.exp(0.5 * log_ab).to(t.dtype), (-torch.expm1(log_ab)).to(t.dtype)

    def prior_std(self) -> float:
        return 1.0

    def __repr__(self) -> str:
        first, last = (math.exp(self.log_alphas_cumprod[k]) for k in (0, -1))
        return (f"TabulatedVPSDE(name={self.name!r}, N={self.n_steps}, alphas_cumprod[0]={first:.6g}, "
                f"alphas_cumprod[-1]={last:.6g})")

    def __str__(self) -> str:
        return (
            f"tabulated VP SDE ({self.name}, N = {self.n_steps}): dx = −½ beta(t) x dt + sqrt(beta(t)) dw,  "
            "beta = −d log ᾱ/dt, log ᾱ piecewise linear through (0, 0) and ((k+1)/N, log alphas_cumprod[k]);  "
            f"x_t|x_0 ~ N(sqrt(ᾱ(t)) x_0, (1 − ᾱ(t)) I), ᾱ(1) = {math.exp(self.log_alphas_cumprod[-1]):.3g}"
        )


__all__ += ["TabulatedVPSDE"]
