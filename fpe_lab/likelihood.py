r"""Negative log-likelihood under the probability-flow ODE (Score SDE, Sec. 4.3 and App. D.2).

Along the probability-flow ODE dx/dt = v(x, t) = f(x, t) − ½ g(t)² s_θ(x, t) the log-density of the
model's marginals obeys d log p_t(x_t)/dt = −∇·v(x_t, t) (instantaneous change of variables), so with
x_eps = x:

    log p_eps(x) = log p_T(x_T) + ∫_eps^T ∇·v(x_t, t) dt,     ∇·v = ∇·f − ½ g² ∇·s_θ,

where p_T is the prior (``sde.prior_log_prob``; or any ``prior_log_prob`` passed in). The state
[x_t, ∫∇·v] of each point (one row per point) is integrated from eps to T by
``scipy.integrate.solve_ivp`` (RK45 by default, rtol = atol = 1e-5 as in Score SDE; the tolerances
are recorded) — the reference, whose step-size control bounds an RMS norm over the whole batch, so one
point's error is not bounded by the tolerances (docs/conventions.md, "Likelihoods") — or, with
``method=ODEMethod.DOPRI5``, by the batched torch Dormand–Prince of :mod:`fpe_lab.ode`: the same 5(4)
pair on the score's device and dtype, with each point's own error norm (over its x and its ∫∇·v) held
below 1 at every step.

**t = 0.** ``eps`` must be > 0 (ValueError otherwise): the ODE's right-hand side at t = 0 needs the data
score and its divergence, which do not exist in general (data on a lattice or manifold have no
density; a network score −n_θ/sigma(t) divides by sigma(0) = 0), and the DSM bound's integrand has
terms ~1/sigma² whose Monte-Carlo variance is not integrable at 0. An empty batch (b = 0) is a
ValueError naming the shape.

∇·s_θ is exact (``fpe_lab.fpe.ExactDivergence``, D reverse passes: 2-D data) or a Hutchinson estimate
(``fpe_lab.fpe.Hutchinson``: images). A Hutchinson estimator is *frozen* for the solve: its probes
are drawn once per sample and reused at every t (Grathwohl et al. 2019), so the integrand is a smooth
function of t that an adaptive solver can integrate; the NLL is then unbiased over probes.

Units: nats = −log p_eps(x); bits/dim = nats / (D ln 2) with D the number of coordinates.
For 8-bit images see :class:`UniformDequantization`: the data are dequantized with uniform noise and
the bits/dim gain the bin-width term, giving an upper bound on the discrete model's bits/dim.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from fpe_lab.checks import check_batch
from fpe_lab.fpe import DivergenceEstimator, ExactDivergence, Hutchinson, Probe, ScoreFn
from fpe_lab.sampling import ODEMethod, _check_time_window, integrate_ode, probability_flow_drift
from fpe_lab.sde import LinearSDE
from fpe_lab.shapes import append_dims, batch_time, flat_dim

__all__ = ["FixedProbeHutchinson", "UniformDequantization", "NLLResult", "pf_ode_nll", "dsm_nll_bound", "bits_per_dim"]

log = logging.getLogger(__name__)

LN2 = math.log(2.0)


@dataclass(eq=False)
class FixedProbeHutchinson:
    """Hutchinson divergence with probes fixed in advance: (1/n) Σ_j v_jᵀ (∂s/∂x) v_j.

    probes: (n_probes, b, *dims), drawn once; reusing them at every t of an ODE solve makes the
    estimated ∇·v a smooth function of t (one probe per solve is the Score SDE default). No t: it is
    valid at any t where s is. b = 0 is a ValueError naming the shape.
    """

    probes: torch.Tensor

    @classmethod
    def draw(cls, like: torch.Tensor, n_probes: int = 1, probe: Probe = Probe.RADEMACHER,
             generator: torch.Generator | None = None) -> FixedProbeHutchinson:
        """Probes for a batch shaped like ``like`` (b, *dims), from the same law as ``fpe.Hutchinson``."""
        check_batch(like, "like")
        hutch = Hutchinson(n_probes=n_probes, probe=probe, generator=generator)
        return cls(torch.stack([hutch.sample_probe(like) for _ in range(n_probes)]))

    def __call__(self, s: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        check_batch(x, "x")
        if self.probes.shape[1:] != x.shape:
            raise ValueError(f"probes have shape {tuple(self.probes.shape[1:])} per draw; x has {tuple(x.shape)}")
        est = torch.zeros(s.shape[0], dtype=s.dtype, device=s.device)
        n = self.probes.shape[0]
        for j, v in enumerate(self.probes.to(s)):
            (v_jac,) = torch.autograd.grad((s * v).sum(), x, retain_graph=j < n - 1, allow_unused=True)
            if v_jac is not None:
                est = est + (v_jac * v).reshape(s.shape[0], -1).sum(-1)
        return est / n

    def __repr__(self) -> str:
        return f"FixedProbeHutchinson(n_probes={self.probes.shape[0]})"


class _ExactDivergenceNoGraph:
    """∇·s = Σ_i ∂s_i/∂x_i like ``fpe.ExactDivergence``, without building a graph of the result.

    The NLL never differentiates ∇·s again, so the D reverse passes skip ``create_graph`` (measured
    2-3x faster for an MLP 3×128 at D = 2); the values are the same.
    """

    def __call__(self, s: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        s_flat = s.reshape(s.shape[0], -1)
        d = s_flat.shape[1]
        div = torch.zeros(s.shape[0], dtype=s.dtype, device=s.device)
        for i in range(d):
            (g,) = torch.autograd.grad(s_flat[:, i].sum(), x, retain_graph=i < d - 1, allow_unused=True)
            if g is not None:
                div = div + g.reshape(s.shape[0], -1)[:, i]
        return div


def _freeze(divergence: DivergenceEstimator, like: torch.Tensor) -> DivergenceEstimator:
    """The estimator to use for one solve: a random (Hutchinson) estimator gets its probes fixed;
    the exact one drops the graph it keeps for training."""
    match divergence:
        case Hutchinson(n_probes=n, probe=probe, generator=gen):
            return FixedProbeHutchinson.draw(like, n, probe, gen)
        case ExactDivergence():
            return _ExactDivergenceNoGraph()
        case _:
            return divergence


def _describe(divergence: DivergenceEstimator) -> str:
    match divergence:
        case Hutchinson(n_probes=n, probe=probe):
            return f"Hutchinson(n_probes={n}, probe={probe.value}), probes fixed per solve"
        case _:
            return repr(divergence)


@dataclass(frozen=True)
class UniformDequantization:
    r"""Uniform dequantization of data on ``levels`` equally spaced values in [low, high].

    Data x = low + k (high − low)/(levels − 1), k ∈ {0, …, levels − 1} (e.g. 8-bit images scaled to
    [−1, 1]: ``UniformDequantization(256, -1.0, 1.0)``). Following Score SDE, level k is mapped to the
    bin [low + k w, low + (k + 1) w) with w = (high − low)/levels and dequantized as
    y = low + (k + u) w, u ~ U[0, 1)^D. Then P(k) = w^D E_u[p(y)] and by Jensen

        −log₂ P(k) / D ≤ E_u[−log₂ p(y)] / D − log₂ w,

    so bits/dim = nats/(D ln 2) + ``offset_bits_per_dim`` with offset = −log₂ w
    (= 7 for [−1, 1], 8 for [0, 1] at 256 levels; Score SDE's "offset = 7 − inverse_scaler(−1)").
    """

    levels: int = 256
    low: float = -1.0
    high: float = 1.0

    def __post_init__(self) -> None:
        if not isinstance(self.levels, int) or self.levels < 2:
            raise ValueError(f"levels must be an int >= 2; got {self.levels!r}")
        numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (self.low, self.high))
        if not (numbers and math.isfinite(self.low) and math.isfinite(self.high) and self.low < self.high):
            raise ValueError(f"need finite low < high; got low={self.low!r}, high={self.high!r}")

    @property
    def bin_width(self) -> float:
        return (self.high - self.low) / self.levels

    @property
    def offset_bits_per_dim(self) -> float:
        """−log₂ w, added to the continuous bits/dim."""
        return -math.log2(self.bin_width)

    def levels_of(self, x: torch.Tensor) -> torch.Tensor:
        """The integer level k of every entry of x (ValueError if x is not on the level grid)."""
        k = (x - self.low) / (self.high - self.low) * (self.levels - 1)
        k_round = torch.round(k)
        # 1e-3 of a level: far above float32 round-off of k/255-type values, far below one level
        off = (k - k_round).abs().max().item() if x.numel() else 0.0
        if off > 1e-3 or (x.numel() and (k_round.min() < 0 or k_round.max() > self.levels - 1)):
            raise ValueError(
                f"x must lie on the {self.levels} levels low + k (high − low)/(levels − 1) in "
                f"[{self.low}, {self.high}]; got values in [{x.min().item():.6g}, {x.max().item():.6g}] "
                f"with max distance {off:.3g} levels from the grid"
            )
        return k_round

    def dequantize(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """y = low + (k + u) w with u ~ U[0, 1), same shape and dtype as x."""
        k = self.levels_of(x)
        u = torch.rand(x.shape, generator=generator, dtype=x.dtype, device=x.device)
        return self.low + (k + u) * self.bin_width


def bits_per_dim(nats: torch.Tensor, dim: int, offset_bits: float = 0.0) -> torch.Tensor:
    """nats / (D ln 2) + offset_bits (offset: see :class:`UniformDequantization`)."""
    return nats / (dim * LN2) + offset_bits


@dataclass(frozen=True)
class NLLResult:
    """Per-sample PF-ODE NLL of a batch of b points and the settings that produced it.

    nats: (b,) −log p_eps(y) of the model (y = x, or the dequantized x);
    bits_per_dim: (b,) nats/(D ln 2) + offset_bits_per_dim;
    prior_log_prob: (b,) log p_T(x_T);  delta_log_p: (b,) ∫_eps^T ∇·v dt;  x_T: (b, *dims);
    nfe: score-network evaluations on the whole batch (summed over chunks).
    """

    nats: torch.Tensor
    bits_per_dim: torch.Tensor
    prior_log_prob: torch.Tensor
    delta_log_p: torch.Tensor
    x_T: torch.Tensor
    nfe: int
    settings: dict = field(default_factory=dict)

    def summary(self) -> dict:
        """JSON-serialisable means, standard errors (None for one point) and settings."""
        n = self.nats.numel()
        sem = lambda v: float(v.std() / math.sqrt(n)) if n > 1 else None  # noqa: E731
        return {
            "n_points": n,
            "nats": float(self.nats.mean()),
            "nats_sem": sem(self.nats),
            "bits_per_dim": float(self.bits_per_dim.mean()),
            "bits_per_dim_sem": sem(self.bits_per_dim),
            "nfe": self.nfe,
            **self.settings,
        }


def _nll_chunk(score_fn, sde, x, *, eps, t_end, divergence, prior_log_prob, method, rtol, atol, progress):
    b, shape = x.shape[0], x.shape
    d = flat_dim(x)
    div = _freeze(divergence, x)

    # the state is sample-major: row i = [x_i (D coordinates), ∫∇·v of point i], flattened; the scipy
    # methods see a permutation of the old [all x, all ∫∇·v] layout (same RMS norm), DOPRI5 reads rows
    def rhs(y: torch.Tensor, t: float) -> torch.Tensor:
        with torch.enable_grad():
            xt = y.reshape(b, d + 1)[:, :d].reshape(shape).detach().requires_grad_(True)
            tt = batch_time(t, xt)
            s = score_fn(xt, tt)
            half_g2 = 0.5 * sde.diffusion(tt) ** 2
            v = probability_flow_drift(lambda _x, _t: s, sde, xt, tt)
            div_v = sde.div_drift(xt, tt) - half_g2 * div(s, xt)
        return torch.cat([v.detach().reshape(b, d), div_v.detach()[:, None]], dim=1).reshape(-1)

    y0 = torch.cat([x.reshape(b, d), torch.zeros(b, 1, dtype=x.dtype, device=x.device)], dim=1).reshape(-1)
    res = integrate_ode(rhs, y0, (eps, t_end), method=method, rtol=rtol, atol=atol, progress=progress,
                        desc="PF-ODE NLL", batch=b)
    rows = res.y.reshape(b, d + 1)
    x_T = rows[:, :d].reshape(shape)
    delta = rows[:, d]
    with torch.no_grad():
        prior = prior_log_prob(x_T).to(x.dtype)
    return x_T, delta, prior, res.nfe


def pf_ode_nll(
    score_fn: ScoreFn,
    sde: LinearSDE,
    x: torch.Tensor,
    *,
    eps: float = 1e-5,
    t_end: float = 1.0,
    divergence: DivergenceEstimator | None = None,
    prior_log_prob: Callable[[torch.Tensor], torch.Tensor] | None = None,
    method: ODEMethod = ODEMethod.RK45,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    dequantization: UniformDequantization | None = None,
    generator: torch.Generator | None = None,
    batch_size: int | None = None,
    progress: bool = False,
) -> NLLResult:
    """−log p_eps(x) of the model whose score is ``score_fn``, by the probability-flow ODE.

    Main arguments:
        score_fn: s_θ(x, t), x of shape (b, *dims), t of shape (b,). Samples must not interact.
        sde: the forward SDE (drift, diffusion, div_drift, prior_log_prob).
        x: (b, *dims) points; their dtype is the compute dtype (float64 for verification).

    Other arguments:
        eps, t_end: the integration window [eps, t_end], 0 < eps < t_end <= 1 (eps = 0 is a ValueError:
            see the module docstring).
        divergence: ``ExactDivergence()`` (default) or ``Hutchinson(...)`` (probes frozen per solve,
            drawn from its generator) or any fixed ``(s, x) -> (b,)`` estimator.
        prior_log_prob: log p_T, default ``sde.prior_log_prob``; pass the exact log p_T to remove
            the prior mismatch (e.g. in tests).
        method, rtol, atol: the integrator and its tolerances (recorded in ``settings``): a scipy
            ``ODEMethod`` (the reference, float64 on the host, RMS error over the batch) or
            ``ODEMethod.DOPRI5`` (torch on x's device and dtype, error per point).
        dequantization: dequantize x first (``generator`` draws u) and add the bin-width offset.
        batch_size: solve in chunks of this many points (separate adaptive solves), default one solve.
        progress: tqdm bar over t with the NFE.
    """
    _check_time_window(eps, t_end)
    check_batch(x, "x")
    if not isinstance(x, torch.Tensor) or x.ndim < 2 or not x.is_floating_point():
        raise ValueError(f"x must be a floating tensor of shape (b, *dims), b >= 1; got "
                         f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
    if not torch.isfinite(x).all():
        raise ValueError("x must be finite; got non-finite entries")
    if batch_size is not None and (not isinstance(batch_size, int) or batch_size < 1):
        raise ValueError(f"batch_size must be None or an int >= 1; got {batch_size!r}")
    divergence = divergence or ExactDivergence()
    prior_log_prob = prior_log_prob or sde.prior_log_prob
    offset = 0.0
    if dequantization is not None:
        x = dequantization.dequantize(x, generator)
        offset = dequantization.offset_bits_per_dim
    x = x.detach()
    chunks = x.split(batch_size or x.shape[0])
    parts = [
        _nll_chunk(score_fn, sde, c, eps=eps, t_end=t_end, divergence=divergence, prior_log_prob=prior_log_prob,
                   method=method, rtol=rtol, atol=atol, progress=progress)
        for c in chunks
    ]
    x_T = torch.cat([p[0] for p in parts])
    delta = torch.cat([p[1] for p in parts])
    prior = torch.cat([p[2] for p in parts])
    nats = -(prior + delta)
    nfe = sum(p[3] for p in parts)
    d = flat_dim(x)
    log.info("PF-ODE NLL of %d points: %.4f nats (%.4f bits/dim), %d evaluations",
             x.shape[0], nats.mean().item(), bits_per_dim(nats, d, offset).mean().item(), nfe)
    settings = {
        "method": method.value, "rtol": rtol, "atol": atol, "eps": eps, "t_end": t_end,
        "error_control": "per point" if method is ODEMethod.DOPRI5 else "RMS over each solve's batch",
        "divergence": _describe(divergence), "dim": d, "offset_bits_per_dim": offset,
        "dequantization": repr(dequantization), "n_chunks": len(chunks),
    }
    return NLLResult(nats, bits_per_dim(nats, d, offset), prior, delta, x_T, nfe, settings)


def dsm_nll_bound(
    score_fn: ScoreFn,
    sde: LinearSDE,
    x: torch.Tensor,
    *,
    eps: float = 1e-5,
    n_times: int = 16,
    generator: torch.Generator | None = None,
    dequantization: UniformDequantization | None = None,
) -> NLLResult:
    r"""The denoising-score-matching bound on the NLL (Song et al. 2021, "Maximum likelihood training of
    score-based diffusion models", Thm 1), a cheap check beside :func:`pf_ode_nll`:

        L(x_0) = −E log π(x_1) + ∫_eps^1 E[ ½g² ‖s_θ(x_t, t) + z/σ‖² − ½g² D/σ² − ∇·f ] dt,

    with x_t = α x_0 + σ z, π the prior and D/σ² = E‖∇log p_{0t}(x_t | x_0)‖² taken in closed form.
    Monte Carlo: ``n_times`` stratified times in [eps, 1] per point, one z per time, one z' for x_1.
    With the exact score, E_{x_0~p_0} L = H(p_eps) + KL(p_1 ‖ π) (tested); a model's bound is an upper
    bound on its (SDE) NLL in expectation. Returns nats and bits/dim per point (``nfe`` = score calls
    per point); as for the PF-ODE, nats = −(prior_log_prob + delta_log_p), here with
    delta_log_p = −(the time integral).

    eps = 0 is a ValueError: near t = 0 the integrand's terms g²‖z/σ‖² and g² D/σ² grow like 1/σ² ~ 1/t;
    they cancel in expectation, but the Monte-Carlo variance ~∫ dt/t² diverges. b = 0 is a ValueError.
    """
    if not isinstance(n_times, int) or n_times < 1:
        raise ValueError(f"n_times must be an int >= 1; got {n_times!r}")
    _check_time_window(eps, 1.0)
    check_batch(x, "x")
    if not isinstance(x, torch.Tensor) or x.ndim < 2 or not x.is_floating_point():
        raise ValueError(f"x must be a floating tensor of shape (b, *dims), b >= 1; got "
                         f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
    offset = 0.0
    if dequantization is not None:
        x = dequantization.dequantize(x, generator)
        offset = dequantization.offset_bits_per_dim
    x = x.detach()
    b, d = x.shape[0], flat_dim(x)

    def noise() -> torch.Tensor:
        return torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)

    alpha1, sigma1 = sde.marginal(batch_time(1.0, x))
    x_1 = append_dims(alpha1, x.ndim) * x + append_dims(sigma1, x.ndim) * noise()
    prior = sde.prior_log_prob(x_1)
    integral = torch.zeros(b, dtype=x.dtype, device=x.device)
    width = (1.0 - eps) / n_times
    with torch.no_grad():
        for k in range(n_times):
            t = eps + width * (k + torch.rand(b, generator=generator, dtype=x.dtype, device=x.device))
            alpha, sigma = sde.marginal(t)
            z = noise()
            x_t = append_dims(alpha, x.ndim) * x + append_dims(sigma, x.ndim) * z
            err = (score_fn(x_t, t) + z / append_dims(sigma, x.ndim)).reshape(b, -1).pow(2).sum(-1)
            g2 = sde.diffusion(t) ** 2
            integral = integral + width * (0.5 * g2 * (err - d / sigma**2) - sde.div_drift(x_t, t))
    nats = -prior + integral
    log.info("DSM bound of %d points: %.4f nats (%.4f bits/dim), %d score evaluations per point",
             b, nats.mean().item(), bits_per_dim(nats, d, offset).mean().item(), n_times)
    settings = {"method": "dsm_bound", "n_times": n_times, "eps": eps, "dim": d, "offset_bits_per_dim": offset,
                "dequantization": repr(dequantization)}
    return NLLResult(nats, bits_per_dim(nats, d, offset), prior, -integral, x_1, n_times, settings)
