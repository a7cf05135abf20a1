r"""The score Fokker-Planck residual of any score function (FP-Diffusion, Lai et al. 2023, Sec. 3).

For dx = f(x, t) dt + g(t) dw the density obeys ∂_t p = −∇·(f p) + ½g² Δp; its log obeys

    ∂_t log p = ½g² (∇·s + ‖s‖²) − ⟨f, s⟩ − ∇·f,            s = ∇ log p,

and the score obeys the gradient of that, the *score FPE*

    ∂_t s = ∇_x [ ½g² ∇·s + ½g² ‖s‖² − ⟨f, s⟩ − ∇·f ].

The residual of a candidate score s_θ is

    R_θ(x, t) = ∂_t s_θ − ∇_x [ ½g² ∇·s_θ + ½g² ‖s_θ‖² − ⟨f, s_θ⟩ − ∇·f ],

zero for the true score of *any* initial density. Every function here takes
``score_fn(x: (b, *dims), t: (b,)) -> s: (b, *dims)``, so the exact mixture score and a network are
interchangeable.

Derivatives are exact and batched: ∂_t s by one forward-mode JVP in t, spatial derivatives by
reverse-mode passes over the batch sum. Summing over the batch is exact only when samples do not
interact inside ``score_fn`` (no train-mode BatchNorm, no attention across samples). The divergence
is exact (D reverse passes, for low D) or a Hutchinson estimate (one pass per probe, for images).

With a Hutchinson divergence ‖R̂‖² overestimates ‖R‖² by the estimator's variance (which grows with D);
:func:`residual_sq` gives the unbiased ⟨R̂₁, R̂₂⟩ from two independent probe sets, and
:func:`jacobian_asymmetry_sq` unbiased estimates of ‖J − Jᵀ‖²_F and ‖J‖²_F; :class:`Estimate` holds
per-sample values with their mean and standard error.
"""

from __future__ import annotations

import contextlib
import enum
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.func import jvp

from fpe_lab.checks import check_finite, check_time
from fpe_lab.sde import SDE
from fpe_lab.shapes import append_dims, batch_time

__all__ = [
    "ScoreFn",
    "check_score",
    "eval_mode",
    "ExactDivergence",
    "Hutchinson",
    "Probe",
    "ForwardModeDt",
    "FiniteDifferenceDt",
    "ScoreFPETerms",
    "score_fpe_terms",
    "score_fpe_residual",
    "log_density_fpe_residual",
    "divergence",
    "draw_probe",
    "vjp",
    "jvp_x",
    "jacobian_of",
    "jacobian",
    "jacobian_asymmetry",
    "jacobian_asymmetry_sq",
    "curl_2d",
    "ResidualEstimator",
    "residual_sq",
    "Estimate",
]

ScoreFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _grad(
    out: torch.Tensor, x: torch.Tensor, create_graph: bool = True, retain_graph: bool | None = None
) -> torch.Tensor:
    """∂(Σ_b out_b)/∂x, zero where out does not depend on x."""
    if not out.requires_grad:
        return torch.zeros_like(x)
    (g,) = torch.autograd.grad(out.sum(), x, create_graph=create_graph, retain_graph=retain_graph, allow_unused=True)
    return torch.zeros_like(x) if g is None else g


class ExactDivergence:
    """∇·s = Σ_i ∂s_i/∂x_i, exact, by D reverse-mode passes over the batch sum."""

    def __call__(self, s: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        s_flat = s.reshape(s.shape[0], -1)
        div = torch.zeros(s.shape[0], dtype=s.dtype, device=s.device)
        for i in range(s_flat.shape[1]):
            div = div + _grad(s_flat[:, i], x).reshape(s.shape[0], -1)[:, i]
        return div

    def __repr__(self) -> str:
        return "ExactDivergence()"


class Probe(enum.Enum):
    """Distribution of Hutchinson probes v with E[v vᵀ] = I."""

    RADEMACHER = "rademacher"
    GAUSSIAN = "gaussian"


def draw_probe(like: torch.Tensor, probe: Probe, generator: torch.Generator | None) -> torch.Tensor:
    """One probe per sample, shape and dtype of ``like``: Rademacher (±1) or N(0, I), E[v vᵀ] = I.

    Drawn on the generator's device (so a CPU generator serves CUDA inputs with the same probes as on
    CPU) and moved to ``like``'s; without a generator, from torch's global one.
    """
    device = generator.device if generator is not None else like.device
    v = torch.randn(like.shape, generator=generator, dtype=like.dtype, device=device).to(like.device)
    match probe:
        case Probe.RADEMACHER:
            return v.sign()
        case Probe.GAUSSIAN:
            return v
    raise ValueError(f"probe must be a fpe_lab.fpe.Probe ({[p.value for p in Probe]}); got {probe!r}")


@dataclass(eq=False)
class Hutchinson:
    """Unbiased estimate ∇·s ≈ (1/n) Σ_j v_jᵀ (∂s/∂x) v_j with n independent probes per sample.

    Each probe costs one reverse pass (v_jᵀ J by a VJP). Variance of one Rademacher probe:
    2 Σ_{i≠k} J_ik² (with J symmetrised), so conservative fields with small off-diagonal Jacobian
    are cheap to estimate.
    """

    n_probes: int = 1
    probe: Probe = Probe.RADEMACHER
    generator: torch.Generator | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.n_probes, int) or self.n_probes < 1:
            raise ValueError(f"n_probes must be an int >= 1; got {self.n_probes!r}")
        if not isinstance(self.probe, Probe):
            raise ValueError(f"probe must be a fpe_lab.fpe.Probe ({list(Probe)}); got {self.probe!r}")

    def sample_probe(self, like: torch.Tensor) -> torch.Tensor:
        """One probe per sample (:func:`draw_probe` from this estimator's generator)."""
        return draw_probe(like, self.probe, self.generator)

    def __call__(self, s: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        est = torch.zeros(s.shape[0], dtype=s.dtype, device=s.device)
        for _ in range(self.n_probes):
            v = self.sample_probe(x)
            v_jac = _grad((s * v).reshape(s.shape[0], -1).sum(-1), x)
            est = est + (v_jac * v).reshape(s.shape[0], -1).sum(-1)
        return est / self.n_probes


DivergenceEstimator = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _leaves(x: torch.Tensor, t) -> tuple[torch.Tensor, torch.Tensor]:
    """Fresh leaves requiring grad, so derivatives in x and t never leak to the caller's tensors."""
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.ndim < 2:
        desc = f"shape {tuple(x.shape)}, dtype {x.dtype}" if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"x must be a floating tensor of shape (b, *dims) with at least 2 axes; got {desc}")
    if x.shape[0] == 0:
        raise ValueError(f"x must hold at least one sample (b >= 1); got an empty batch of shape {tuple(x.shape)}")
    check_finite(x.detach(), "x")
    t = check_time(batch_time(t, x))
    return x.detach().requires_grad_(True), t.detach().requires_grad_(True)


def check_score(s: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """s must be a tensor of the shape of x (what ``score_fn(x, t)`` returns); returns s."""
    if not isinstance(s, torch.Tensor) or s.shape != x.shape:
        got = tuple(s.shape) if isinstance(s, torch.Tensor) else type(s).__name__
        raise ValueError(f"score_fn(x, t) must return the shape of x {tuple(x.shape)}; got {got}")
    return s


class ForwardModeDt:
    """∂_t s by one forward-mode JVP in t with tangent 1 per sample: exact, about one extra forward."""

    def __call__(self, score_fn: ScoreFn, x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(s(x, t), ∂_t s(x, t)), each of the shape of x."""
        s, dt_s = jvp(lambda tt: score_fn(x, tt), (t,), (torch.ones_like(t),))  # type: ignore[misc]
        return check_score(s, x), dt_s

    def __repr__(self) -> str:
        return "ForwardModeDt()"


@contextlib.contextmanager
def eval_mode(score_fn: ScoreFn):
    """Put ``score_fn`` (when it is an nn.Module) in eval mode, restoring every submodule's flag after."""
    if not isinstance(score_fn, torch.nn.Module):
        yield
        return
    flags = [(m, m.training) for m in score_fn.modules()]
    score_fn.eval()
    try:
        yield
    finally:
        for m, flag in flags:
            m.training = flag


@dataclass(frozen=True)
class FiniteDifferenceDt:
    """∂_t s ≈ (s(x, t₊) − s(x, t₋)) / (t₊ − t₋),  t± = clip(t ± h, eps, 1).

    Central (O(h²)) where t ± h lies in [eps, 1]; near the ends the stencil is clipped, never
    stepping below eps (the paper's code steps to t − 1e-3 < 0 and gets NaN for VP) — there it is
    O(h). The two extra evaluations run with ``score_fn`` in eval mode when it is an ``nn.Module``,
    so dropout noise is not divided by h (pass the module itself, not a lambda around it).
    The first evaluation s(x, t), which the rest of the residual uses, keeps the caller's mode.
    """

    h: float = 1e-3
    eps: float = 1e-5

    def __post_init__(self) -> None:
        if not (isinstance(self.h, (int, float)) and 0 < self.h < 0.5):
            raise ValueError(f"h must be a step in (0, 0.5); got {self.h!r}")
        if not (isinstance(self.eps, (int, float)) and 0 <= self.eps < 1):
            raise ValueError(f"eps must lie in [0, 1); got {self.eps!r}")

    def __call__(self, score_fn: ScoreFn, x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(s(x, t), finite-difference ∂_t s), each of the shape of x."""
        s = check_score(score_fn(x, t), x)
        t0 = t.detach()
        lo = torch.minimum(torch.clamp(t0 - self.h, min=self.eps), t0)
        hi = torch.maximum(torch.clamp(t0 + self.h, max=1.0), t0)
        with eval_mode(score_fn):
            dt_s = (score_fn(x, hi) - score_fn(x, lo)) / append_dims(hi - lo, x.ndim)
        return s, dt_s


TimeDerivative = Callable[[ScoreFn, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def _div_drift(sde: SDE, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """∇·f from the SDE, or by exact autograd of its drift when it has no ``div_drift``."""
    if hasattr(sde, "div_drift"):
        return sde.div_drift(x, t)
    return ExactDivergence()(sde.drift(x, t), x)


@dataclass(frozen=True)
class ScoreFPETerms:
    """Every term of the score FPE at points (x, t); each field has the shape of x, g2 shape (b,).

    residual = dt_s − [ ½g² (grad_div_s + grad_sq_norm_s) − grad_f_dot_s − grad_div_f ]
    """

    s: torch.Tensor
    dt_s: torch.Tensor  # ∂_t s
    grad_div_s: torch.Tensor  # ∇(∇·s)
    grad_sq_norm_s: torch.Tensor  # ∇‖s‖²
    grad_f_dot_s: torch.Tensor  # ∇⟨f, s⟩
    grad_div_f: torch.Tensor  # ∇(∇·f)
    g2: torch.Tensor  # g(t)²

    @property
    def rhs(self) -> torch.Tensor:
        """∇[½g² ∇·s + ½g² ‖s‖² − ⟨f, s⟩ − ∇·f]."""
        half_g2 = append_dims(0.5 * self.g2, self.s.ndim)
        return half_g2 * (self.grad_div_s + self.grad_sq_norm_s) - self.grad_f_dot_s - self.grad_div_f

    @property
    def residual(self) -> torch.Tensor:
        return self.dt_s - self.rhs

    @property
    def scale(self) -> torch.Tensor:
        """Per-sample size of the terms, sqrt(‖∂_t s‖² + ‖½g²∇∇·s‖² + ‖½g²∇‖s‖²‖² + ‖∇⟨f,s⟩‖²), shape (b,).

        |R| / scale measures how far from cancelling the terms are (0: exact, ~1: unrelated).
        """
        half_g2 = append_dims(0.5 * self.g2, self.s.ndim)
        parts = (self.dt_s, half_g2 * self.grad_div_s, half_g2 * self.grad_sq_norm_s, self.grad_f_dot_s)
        return torch.sqrt(torch.stack([p.reshape(p.shape[0], -1).pow(2).sum(-1) for p in parts]).sum(0))


def score_fpe_terms(
    score_fn: ScoreFn,
    sde: SDE,
    x: torch.Tensor,
    t: torch.Tensor | float,
    divergence: DivergenceEstimator | None = None,
    create_graph: bool = False,
    time_derivative: TimeDerivative | None = None,
) -> ScoreFPETerms:
    """Each term of the score FPE of ``score_fn`` at x of shape (b, *dims), t of shape (b,) or scalar.

    Args:
        divergence: ``ExactDivergence()`` (default) or ``Hutchinson(n_probes, probe)``.
        create_graph: keep the graph so the terms can be differentiated again (e.g. by parameters).
        time_derivative: ``ForwardModeDt()`` (default, exact) or ``FiniteDifferenceDt(h, eps)``.
    """
    divergence = divergence or ExactDivergence()
    x, t = _leaves(x, t)
    s, dt_s = (time_derivative or ForwardModeDt())(score_fn, x, t)
    div_s = divergence(s, x)
    f = sde.drift(x, t)
    div_f = _div_drift(sde, x, t)
    g = sde.diffusion(t)
    terms = ScoreFPETerms(
        s=s,
        dt_s=dt_s,
        grad_div_s=_grad(div_s, x),
        grad_sq_norm_s=_grad(s.reshape(s.shape[0], -1).pow(2).sum(-1), x),
        grad_f_dot_s=_grad((f * s).reshape(s.shape[0], -1).sum(-1), x),
        grad_div_f=_grad(div_f, x),
        g2=g**2,
    )
    if create_graph:
        return terms
    return ScoreFPETerms(**{k: v.detach() for k, v in terms.__dict__.items()})


def score_fpe_residual(
    score_fn: ScoreFn,
    sde: SDE,
    x: torch.Tensor,
    t: torch.Tensor | float,
    divergence: DivergenceEstimator | None = None,
    create_graph: bool = False,
    time_derivative: TimeDerivative | None = None,
) -> torch.Tensor:
    """R = ∂_t s − ∇_x[½g² ∇·s + ½g² ‖s‖² − ⟨f, s⟩ − ∇·f], shape of x (b, *dims).

    Cheaper than :func:`score_fpe_terms`: the bracket is one per-sample scalar φ(x, t), so ∇_x φ
    takes one reverse pass. Pass ``create_graph=True`` to train through R (the regularizer).
    ``divergence`` and ``time_derivative`` as in :func:`score_fpe_terms`.
    """
    divergence = divergence or ExactDivergence()
    x, t = _leaves(x, t)
    s, dt_s = (time_derivative or ForwardModeDt())(score_fn, x, t)
    flat = s.reshape(s.shape[0], -1)
    g2 = sde.diffusion(t) ** 2
    f_dot_s = (sde.drift(x, t).reshape(s.shape[0], -1) * flat).sum(-1)
    phi = 0.5 * g2 * (divergence(s, x) + flat.pow(2).sum(-1)) - f_dot_s - _div_drift(sde, x, t)
    r = dt_s - _grad(phi, x, create_graph=create_graph)
    return r if create_graph else r.detach()


class ResidualEstimator(enum.Enum):
    """How :func:`residual_sq` estimates ‖R‖² when the divergence inside R is a random estimate.

    SQUARED: ‖R̂‖², one residual; E‖R̂‖² = ‖R‖² + E‖R̂ − R‖² (the paper's form, biased upward).
    UNBIASED: ⟨R̂₁, R̂₂⟩, two residuals with independent divergence draws; E⟨R̂₁, R̂₂⟩ = ⟨R, R⟩.
    """

    SQUARED = "squared"
    UNBIASED = "unbiased"


def _is_deterministic(divergence: DivergenceEstimator | None) -> bool:
    return divergence is None or isinstance(divergence, ExactDivergence)


def residual_sq(
    score_fn: ScoreFn,
    sde: SDE,
    x: torch.Tensor,
    t: torch.Tensor | float,
    *,
    divergence: DivergenceEstimator | None = None,
    estimator: ResidualEstimator = ResidualEstimator.UNBIASED,
    time_derivative: TimeDerivative | None = None,
    create_graph: bool = False,
) -> torch.Tensor:
    """Per-sample estimate of ‖R(x, t)‖², shape (b,), for x of shape (b, *dims), t of shape (b,) or scalar.

    R = ∂_t s − ∇_x φ with φ = ½g² ∇·s + ½g² ‖s‖² − ⟨f, s⟩ − ∇·f (see :func:`score_fpe_residual`).
    With a Hutchinson divergence, R̂ = R + ½g² ∇(∇̂·s − ∇·s) is unbiased but random, so

    * ``ResidualEstimator.SQUARED``: ‖R̂‖², one residual (the paper's form). Biased upward:
      E‖R̂‖² = ‖R‖² + E‖R̂ − R‖², and the variance term grows with D, so even the exact score
      reads a positive residual on images.
    * ``ResidualEstimator.UNBIASED`` (default): ⟨R̂₁, R̂₂⟩ with two residuals whose divergence
      probes are independent (the divergence estimator is called twice, drawing two probe sets in
      sequence from its generator); E⟨R̂₁, R̂₂⟩ = ⟨E R̂₁, E R̂₂⟩ = ‖R‖². Single values may be
      negative; their mean is the estimate. Costs one more divergence and one more reverse pass.

    With the exact divergence (``divergence`` None or ``ExactDivergence()``) both equal ‖R‖² exactly
    (UNBIASED then computes R once). ∂_t s is deterministic (``time_derivative`` as in
    :func:`score_fpe_terms`) and shared by both residuals. ``create_graph=True`` keeps the graph
    (the gradient of the UNBIASED estimate is an unbiased estimate of ∇_θ ‖R‖²).
    """
    if not isinstance(estimator, ResidualEstimator):
        raise ValueError(f"estimator must be a fpe_lab.fpe.ResidualEstimator ({list(ResidualEstimator)}); "
                         f"got {estimator!r}")
    two = estimator is ResidualEstimator.UNBIASED and not _is_deterministic(divergence)
    div_est = divergence or ExactDivergence()
    x, t = _leaves(x, t)
    s, dt_s = (time_derivative or ForwardModeDt())(score_fn, x, t)
    b = s.shape[0]
    flat = s.reshape(b, -1)
    half_g2 = 0.5 * sde.diffusion(t) ** 2
    f_dot_s = (sde.drift(x, t).reshape(b, -1) * flat).sum(-1)
    common = half_g2 * flat.pow(2).sum(-1) - f_dot_s - _div_drift(sde, x, t)
    divs = [div_est(s, x) for _ in range(2 if two else 1)]
    residuals = []
    for k, div_s in enumerate(divs):
        keep = create_graph or k < len(divs) - 1  # the second reverse pass reuses the graph
        r = dt_s - _grad(common + half_g2 * div_s, x, create_graph=create_graph, retain_graph=keep)
        residuals.append(r.reshape(b, -1))
    sq = (residuals[0] * residuals[-1]).sum(-1)
    check_finite(sq.detach(), "residual_sq (the residual of score_fn)")
    return sq if create_graph else sq.detach()


@dataclass(frozen=True)
class Estimate:
    """Per-sample unbiased estimates of a nonnegative quantity and their batch mean with standard error.

    ``values`` has shape (b,), b >= 1, stored as float64 (detached unless built from ``create_graph`` output);
    ``mean`` = (1/b) Σ values, ``se`` = std(values) / sqrt(b) with the (b − 1) sample std, 0.0 for b = 1.
    Single values of an unbiased estimate (e.g. :func:`residual_sq` with UNBIASED) may be negative.
    """

    values: torch.Tensor

    def __post_init__(self) -> None:
        v = self.values
        if not isinstance(v, torch.Tensor) or not v.is_floating_point() or v.ndim != 1 or v.numel() == 0:
            desc = f"shape {tuple(v.shape)}, dtype {v.dtype}" if isinstance(v, torch.Tensor) else type(v).__name__
            raise ValueError(f"values must be a floating tensor of shape (b,) with b >= 1; got {desc}")
        check_finite(v.detach(), "values")
        object.__setattr__(self, "values", v.to(torch.float64))  # differentiable cast: a graph is kept

    @property
    def n(self) -> int:
        return self.values.numel()

    @property
    def mean(self) -> float:
        return float(self.values.detach().double().mean())

    @property
    def se(self) -> float:
        if self.n == 1:
            return 0.0
        return float(self.values.detach().double().std() / math.sqrt(self.n))

    def ratio(self, other: Estimate) -> tuple[float, float]:
        """r = mean(self)/mean(other) over paired samples and its delta-method standard error
        sqrt(Var(a − r b)/n)/mean(b); ValueError unless mean(other) > 0 and the pairs match."""
        a, b = self.values.detach(), other.values.detach()
        if a.shape != b.shape:
            raise ValueError(f"a ratio needs paired samples; got {tuple(a.shape)} and {tuple(b.shape)}")
        mb = float(b.mean())
        if mb == 0 and not bool(a.any()):
            return 0.0, 0.0  # 0/0: a field whose terms all vanish (e.g. a zero Jacobian, which is symmetric)
        if not mb > 0:
            raise ValueError(f"the denominator mean must be positive for a ratio; got {mb!r} (a constant score?)")
        r = float(a.mean()) / mb
        return r, (float((a - r * b).std() / math.sqrt(self.n)) / mb if self.n > 1 else 0.0)


def log_density_fpe_residual(
    log_prob_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    sde: SDE,
    x: torch.Tensor,
    t: torch.Tensor | float,
    divergence: DivergenceEstimator | None = None,
    create_graph: bool = False,
) -> torch.Tensor:
    """r = ∂_t log p − [½g² (Δ log p + ‖∇ log p‖²) − ⟨f, ∇ log p⟩ − ∇·f], shape (b,).

    ``log_prob_fn(x, t) -> (b,)``; zero when log p_t solves the density FPE.
    """
    divergence = divergence or ExactDivergence()
    x, t = _leaves(x, t)
    log_p = log_prob_fn(x, t)
    if not isinstance(log_p, torch.Tensor) or log_p.shape != x.shape[:1]:
        got = tuple(log_p.shape) if isinstance(log_p, torch.Tensor) else type(log_p).__name__
        raise ValueError(f"log_prob_fn(x, t) must return shape ({x.shape[0]},); got {got}")
    s, dt_log_p = torch.autograd.grad(log_p.sum(), (x, t), create_graph=True, allow_unused=True)
    s = torch.zeros_like(x) if s is None else s  # a log-density constant in x or in t
    dt_log_p = torch.zeros_like(t) if dt_log_p is None else dt_log_p
    flat = s.reshape(s.shape[0], -1)
    g2 = sde.diffusion(t) ** 2
    f_dot_s = (sde.drift(x, t).reshape(s.shape[0], -1) * flat).sum(-1)
    r = dt_log_p - (0.5 * g2 * (divergence(s, x) + flat.pow(2).sum(-1)) - f_dot_s - _div_drift(sde, x, t))
    return r if create_graph else r.detach()


def divergence(
    score_fn: ScoreFn, x: torch.Tensor, t: torch.Tensor | float, estimator: DivergenceEstimator | None = None
) -> torch.Tensor:
    """∇·s(x, t), shape (b,): exact by default, or the given Hutchinson estimator."""
    x, t = _leaves(x, t)
    return (estimator or ExactDivergence())(check_score(score_fn(x, t), x), x).detach()


def vjp(out: torch.Tensor, x: torch.Tensor, v: torch.Tensor, create_graph: bool = True) -> torch.Tensor:
    """vᵀ ∂out/∂x per sample (shape of x), keeping the graph by default (differentiable again); zero
    where out does not depend on x. The graph of ``out`` is retained for further passes."""
    if not out.requires_grad:
        return torch.zeros_like(x)
    (g,) = torch.autograd.grad(out, x, grad_outputs=v, create_graph=create_graph, retain_graph=True,
                               allow_unused=True)
    return torch.zeros_like(x) if g is None else g


def jvp_x(score_fn: ScoreFn, x: torch.Tensor, t: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(s(x, t), J v) by one forward-mode JVP along x + τ v at τ = 0, J = ∂s/∂x; both differentiable in
    the parameters, s also in x (x is closed over, as in :class:`ForwardModeDt`)."""
    tau = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
    along = lambda tt: score_fn(x + append_dims(tt, x.ndim) * v, t)  # noqa: E731
    s, jv = jvp(along, (tau,), (torch.ones_like(tau),))  # type: ignore[misc]
    return s, jv


def jacobian_of(s: torch.Tensor, x: torch.Tensor, create_graph: bool = False) -> torch.Tensor:
    """J[b, i, k] = ∂s_i/∂x_k of the flattened sample, (b, D, D), by D reverse passes over the batch sum
    (samples must not interact inside the score); ``create_graph`` keeps it differentiable."""
    flat = s.reshape(s.shape[0], -1)
    rows = []
    for i in range(flat.shape[1]):
        e = torch.zeros_like(flat)
        e[:, i] = 1
        rows.append(vjp(s, x, e.reshape(s.shape), create_graph).reshape(s.shape[0], -1))
    return torch.stack(rows, dim=1)


def jacobian(score_fn: ScoreFn, x: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
    """J_ij = ∂s_i/∂x_j for x of shape (b, D); returns (b, D, D) (D reverse passes)."""
    if x.ndim != 2:
        raise ValueError(f"jacobian needs x of shape (b, D); got shape {tuple(x.shape)}")
    x, t = _leaves(x, t)
    return jacobian_of(check_score(score_fn(x, t), x), x)


def jacobian_asymmetry(score_fn: ScoreFn, x: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
    """‖J − Jᵀ‖_F per sample, shape (b,): zero iff s is locally a gradient field (conservative)."""
    jac = jacobian(score_fn, x, t)
    return torch.linalg.matrix_norm(jac - jac.transpose(-1, -2))


def jacobian_asymmetry_sq(
    score_fn: ScoreFn,
    x: torch.Tensor,
    t: torch.Tensor | float,
    *,
    probes: int | None = None,
    probe: Probe = Probe.RADEMACHER,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample (‖J − Jᵀ‖²_F, ‖J‖²_F), each shape (b,), J = ∂s/∂x of the flattened score (D × D).

    x has shape (b, *dims), t shape (b,) or scalar. ``probes`` None: exact, from the full Jacobian
    (D reverse passes; for small D). ``probes`` k: unbiased Hutchinson estimates
    (1/k) Σ_v ‖(J − Jᵀ) v‖² and (1/k) Σ_v ‖J v‖² with k independent probes per sample,
    E v vᵀ = I (``probe``, drawn from ``generator``), since E‖M v‖² = tr(Mᵀ M E v vᵀ) = ‖M‖²_F.
    J v comes from a forward-mode JVP in x, Jᵀ v from a VJP: per probe about three forward costs.
    The ratio ‖J − Jᵀ‖²_F / ‖J‖²_F is 0 for a gradient field and at most 4.
    """
    if probes is not None and (isinstance(probes, bool) or not isinstance(probes, int) or probes < 1):
        raise ValueError(f"probes must be None (exact) or an int >= 1; got {probes!r}")
    x, t = _leaves(x, t)
    b = x.shape[0]
    if probes is None:
        jac = jacobian_of(check_score(score_fn(x, t), x), x)
        return (jac - jac.transpose(-1, -2)).pow(2).sum((-1, -2)), jac.pow(2).sum((-1, -2))
    t0 = t.detach()
    asym = torch.zeros(b, dtype=x.dtype, device=x.device)
    norm = torch.zeros(b, dtype=x.dtype, device=x.device)
    for _ in range(probes):
        v = draw_probe(x, probe, generator)
        s, jv = jvp_x(score_fn, x, t0, v)
        jtv = vjp(check_score(s, x), x, v, create_graph=False)
        asym = asym + (jv.detach() - jtv).reshape(b, -1).pow(2).sum(-1)
        norm = norm + jv.detach().reshape(b, -1).pow(2).sum(-1)
    return asym / probes, norm / probes


def curl_2d(score_fn: ScoreFn, x: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
    """Scalar curl ∂s_y/∂x − ∂s_x/∂y for x of shape (b, 2); returns (b,)."""
    if x.ndim != 2 or x.shape[1] != 2:
        raise ValueError(f"curl_2d needs x of shape (b, 2); got shape {tuple(x.shape)}")
    jac = jacobian(score_fn, x, t)
    return jac[:, 1, 0] - jac[:, 0, 1]
