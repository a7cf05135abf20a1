r"""Samplers from the prior: the reverse-time SDE and the probability-flow ODE (Score SDE, Sec. 4).

For the forward SDE dx = f(x, t) dt + g(t) dw with score s = ∇ log p_t:

* reverse-time SDE (Anderson 1982; Score SDE eq. 6), run from t = T down to eps,

      dx = [f(x, t) − g(t)² s(x, t)] dt + g(t) dw̄,

  discretised by Euler–Maruyama (predictor), optionally followed at every step by Langevin
  corrector steps (Score SDE Algorithm 4/5, "PC sampling");
* probability-flow ODE (Score SDE eq. 13), with the same marginals p_t,

      dx/dt = v(x, t) = f(x, t) − ½ g(t)² s(x, t),

  integrated by ``scipy.integrate.solve_ivp`` (adaptive RK45 by default, the reference) or, with
  ``ODEMethod.DOPRI5``, by the batched torch Dormand–Prince of :mod:`fpe_lab.ode` on the score's device
  and dtype, with per-sample error control.

Every function takes ``score_fn(x, t) -> s`` with x of shape (b, *dims) and t of shape (b,), so the
exact mixture score and a trained network are interchangeable, and the same code serves 2-D points
and images. The samplers run under ``torch.no_grad()``: score_fn must not need autograd itself. The
start x_T is passed in explicitly (``sde.prior_sample((b, *dims), generator)``).

**t = 0.** The drifts (:func:`probability_flow_drift`, :func:`reverse_sde_drift`) and the corrector are
pointwise and accept t = 0: they return f(x, 0) − c g(0)² s(x, 0), finite exactly when ``score_fn`` is
finite there (the exact mixture score is; a network score −n_θ/sigma(t) is not, sigma(0) = 0). The
samplers refuse ``eps = 0`` (ValueError): they evaluate the score at their final time (the PF-ODE's last
stage, the corrector's last sweep), and the score of the data distribution has no limit at t = 0 in
general (data on a lattice or a manifold have no density; a network divides by sigma(0) = 0), so they
stop at eps > 0 as Score SDE does (1e-3 for sampling, 1e-5 for likelihoods). An empty batch (b = 0)
is a ValueError naming the shape.

:func:`integrate_ode` (the torch ↔ scipy bridge with NFE count and progress bar) is shared with
:mod:`fpe_lab.likelihood`.
"""

from __future__ import annotations

import enum
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from scipy.integrate import solve_ivp

from fpe_lab.checks import check_batch
from fpe_lab.fpe import ScoreFn
from fpe_lab.ode import dopri5
from fpe_lab.progress import progress_bar as tqdm
from fpe_lab.sde import SDE
from fpe_lab.shapes import append_dims, batch_time

__all__ = [
    "ODEMethod",
    "ODEResult",
    "integrate_ode",
    "probability_flow_drift",
    "reverse_sde_drift",
    "LangevinCorrector",
    "reverse_sde_sample",
    "PFODESamples",
    "pf_ode_sample",
]

log = logging.getLogger(__name__)


class ODEMethod(enum.Enum):
    """ODE integrators: ``scipy.integrate.solve_ivp``'s (the value is scipy's name; the reference, in
    float64 numpy on the host with one RMS error norm over the whole batch), and ``DOPRI5``, the batched
    torch Dormand–Prince 5(4) of :func:`fpe_lab.ode.dopri5` (on the state's device and dtype, error
    control per sample: every sample meets rtol/atol at every accepted step)."""

    RK45 = "RK45"  # Dormand–Prince 5(4), Score SDE's choice for likelihoods
    RK23 = "RK23"  # Bogacki–Shampine 3(2)
    DOP853 = "DOP853"  # Dormand–Prince 8(5,3), for tight tolerances
    DOPRI5 = "dopri5"  # RK45's method in torch with per-sample error control (fpe_lab.ode)


@dataclass(frozen=True)
class ODEResult:
    """End state y(t1) (flat, the dtype of y0) and the number of right-hand-side evaluations."""

    y: torch.Tensor
    nfe: int


def _check_tolerances(rtol: float, atol: float, method: ODEMethod) -> None:
    for name, v in (("rtol", rtol), ("atol", atol)):
        if not (isinstance(v, (int, float)) and math.isfinite(v) and 0 < v < 1):
            raise ValueError(f"{name} must be a number in (0, 1); got {v!r}")
    if not isinstance(method, ODEMethod):
        raise ValueError(f"method must be a fpe_lab.sampling.ODEMethod ({[m.name for m in ODEMethod]}); got {method!r}")


def _check_time_window(eps: float, t_end: float) -> None:
    if not (isinstance(eps, (int, float)) and isinstance(t_end, (int, float))):
        raise ValueError(f"eps and t_end must be numbers; got eps={eps!r}, t_end={t_end!r}")
    if eps == 0 or t_end == 0:
        raise ValueError(
            f"t = 0 is not allowed as eps or t_end (got eps={eps!r}, t_end={t_end!r}): the solvers evaluate "
            "the score at their end time and the data score has no limit at t = 0 in general (a network "
            "score −n/sigma(t) divides by sigma(0) = 0; data on a lattice or manifold have no density); "
            "stop at eps > 0, e.g. 1e-5 for likelihoods, 1e-3 for sampling"
        )
    if not (0 < eps < t_end <= 1):
        raise ValueError(f"need 0 < eps < t_end <= 1; got eps={eps!r}, t_end={t_end!r}")


def integrate_ode(
    rhs: Callable[[torch.Tensor, float], torch.Tensor],
    y0: torch.Tensor,
    t_span: tuple[float, float],
    *,
    method: ODEMethod = ODEMethod.RK45,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    progress: bool = False,
    desc: str = "ODE",
    batch: int | None = None,
) -> ODEResult:
    """Solve dy/dt = rhs(y, t) from t_span[0] to t_span[1] for a flat torch state y0 of shape (n,).

    ``rhs`` receives y in y0's dtype/device and a float t, and returns shape (n,). Any t_span inside the
    caller's domain is fine (t = 0 included); the rhs decides whether it is defined there.

    * scipy methods (RK45, RK23, DOP853, the reference) integrate in float64 numpy, copying y to and
      from y0's device at every evaluation. The step-size control bounds the RMS over the *whole*
      state of err_i / (atol + rtol |y_i|), so the error of one sample in a batch is not bounded by the
      tolerances (see docs/conventions.md): use tight tolerances where per-sample accuracy matters.
    * ``ODEMethod.DOPRI5`` (:func:`fpe_lab.ode.dopri5`) integrates on y0's device in y0's dtype. With
      ``batch = b`` the flat state is read as b samples of n/b coordinates each, *sample-major*
      (y0.reshape(b, −1) is one row per sample), and each sample's own RMS error is held below 1 at
      every accepted step; with ``batch=None`` the whole state is one sample (scipy's norm).

    Raises ``FloatingPointError`` when rhs produces a non-finite value, ``RuntimeError`` when the solver
    fails and ``ValueError`` for an empty state (n = 0) or a ``batch`` that does not divide n.
    """
    _check_tolerances(rtol, atol, method)
    check_batch(y0, "y0")
    n = y0.numel()
    if batch is not None and (isinstance(batch, bool) or not isinstance(batch, int) or batch < 1 or n % batch):
        raise ValueError(f"batch must be None or an int >= 1 dividing the state size {n}; got {batch!r}")
    t0, t1 = float(t_span[0]), float(t_span[1])
    dtype, device = y0.dtype, y0.device
    if method is ODEMethod.DOPRI5:
        rows = batch or 1
        sol = dopri5(lambda y, t: rhs(y.reshape(-1), t).reshape(rows, -1), y0.detach().reshape(rows, -1),
                     (t0, t1), rtol=rtol, atol=atol, progress=progress, desc=desc)
        log.debug("%s: dopri5 from t=%g to %g in %d evaluations (%d accepted, %d rejected steps)",
                  desc, t0, t1, sol.nfe, sol.n_accepted, sol.n_rejected)
        return ODEResult(sol.y.reshape(-1), sol.nfe)
    nfe = 0
    done = 0.0
    bar = tqdm(total=abs(t1 - t0), desc=desc, unit="t", disable=not progress, leave=False,
               bar_format="{l_bar}{bar}| t {n:.3f}/{total:.3f} [{elapsed}{postfix}]")

    def fun(t: float, y: np.ndarray) -> np.ndarray:
        nonlocal nfe, done
        nfe += 1
        out = rhs(torch.from_numpy(y).to(dtype=dtype, device=device), t)
        if not torch.isfinite(out).all():
            raise FloatingPointError(f"{desc}: right-hand side is non-finite at t={t:.6g} (evaluation {nfe})")
        progressed = abs(t - t0)
        if progressed > done:
            bar.update(progressed - done)
            done = progressed
        bar.set_postfix(nfe=nfe, refresh=False)
        return out.detach().reshape(-1).to(torch.float64).cpu().numpy()

    try:
        sol = solve_ivp(fun, (t0, t1), y0.detach().reshape(-1).to(torch.float64).cpu().numpy(),
                        method=method.value, rtol=rtol, atol=atol)
    finally:
        bar.close()
    if not sol.success:
        raise RuntimeError(f"{desc}: solve_ivp ({method.value}, rtol={rtol}, atol={atol}) failed: {sol.message}")
    log.debug("%s: %s from t=%g to %g in %d evaluations", desc, method.value, t0, t1, nfe)
    return ODEResult(torch.from_numpy(sol.y[:, -1]).to(dtype=dtype, device=device), nfe)


def probability_flow_drift(score_fn: ScoreFn, sde: SDE, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """v(x, t) = f(x, t) − ½ g(t)² s(x, t), shape of x (b, *dims); t of shape (b,).

    t = 0 is allowed: the value there, finite iff score_fn(x, 0) is (see the module docstring);
    b = 0 is a ValueError naming the shape."""
    check_batch(x, "x")
    half_g2 = append_dims(0.5 * sde.diffusion(t) ** 2, x.ndim)
    return sde.drift(x, t) - half_g2 * score_fn(x, t)


def reverse_sde_drift(score_fn: ScoreFn, sde: SDE, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """f(x, t) − g(t)² s(x, t), the drift of the reverse-time SDE (in forward time), shape of x.

    t = 0 is allowed (the value there, finite iff score_fn(x, 0) is); b = 0 is a ValueError."""
    check_batch(x, "x")
    g2 = append_dims(sde.diffusion(t) ** 2, x.ndim)
    return sde.drift(x, t) - g2 * score_fn(x, t)


def _check_start(x_T: torch.Tensor) -> None:
    check_batch(x_T, "x_T")
    if not isinstance(x_T, torch.Tensor) or x_T.ndim < 2 or not x_T.is_floating_point():
        raise ValueError(
            f"x_T must be a floating tensor of shape (b, *dims) with b >= 1; got "
            f"{tuple(x_T.shape) if isinstance(x_T, torch.Tensor) else type(x_T).__name__}"
        )
    if not torch.isfinite(x_T).all():
        raise ValueError("x_T must be finite; got non-finite entries")


@dataclass(frozen=True)
class LangevinCorrector:
    r"""Langevin MCMC steps at fixed t (Score SDE Algorithm 4/5):

        x ← x + δ s(x, t) + sqrt(2δ) z,    δ = 2 (snr mean_b‖z‖ / mean_b‖s(x, t)‖)²,

    which leave p_t invariant as δ → 0. ``snr`` is the signal-to-noise ratio r of Score SDE; as
    there, the norms are averaged over the batch (one δ per step: a per-sample ratio explodes where
    ‖s‖ ≈ 0, at the modes). Score SDE tuned snr = 0.16 for images; tune it for other data.
    """

    snr: float = 0.16
    n_steps: int = 1

    def __post_init__(self) -> None:
        if not (isinstance(self.snr, (int, float)) and math.isfinite(self.snr) and self.snr > 0):
            raise ValueError(f"snr must be a finite positive number; got {self.snr!r}")
        if not isinstance(self.n_steps, int) or self.n_steps < 1:
            raise ValueError(f"n_steps must be an int >= 1; got {self.n_steps!r}")

    def __call__(self, score_fn: ScoreFn, x: torch.Tensor, t: torch.Tensor,
                 generator: torch.Generator | None) -> torch.Tensor:
        """n_steps Langevin steps at t (t = 0 allowed where score_fn is finite); b = 0 is a ValueError."""
        check_batch(x, "x")
        for _ in range(self.n_steps):
            s = score_fn(x, t)
            z = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
            s_norm = s.reshape(s.shape[0], -1).norm(dim=-1).mean()
            z_norm = z.reshape(z.shape[0], -1).norm(dim=-1).mean()
            step = 2 * (self.snr * z_norm / s_norm.clamp_min(1e-30)) ** 2
            x = x + step * s + torch.sqrt(2 * step) * z
        return x


@torch.no_grad()
def reverse_sde_sample(
    score_fn: ScoreFn,
    sde: SDE,
    x_T: torch.Tensor,
    *,
    n_steps: int = 500,
    eps: float = 1e-3,
    t_end: float = 1.0,
    generator: torch.Generator | None = None,
    corrector: LangevinCorrector | None = None,
    progress: bool = False,
) -> torch.Tensor:
    r"""Euler–Maruyama on the reverse-time SDE from x_T ~ p_{t_end} to t = eps; returns x_eps ~ p_eps.

    With uniform steps h = (t_end − eps)/n_steps, t_i = t_end − i h:

        x_{i+1} = x_i − [f(x_i, t_i) − g(t_i)² s(x_i, t_i)] h + g(t_i) sqrt(h) z_i,   z_i ~ N(0, I),

    (weak order 1 in h), then ``corrector`` at t_{i+1} if given. Noise is added at every step, so the
    result is distributed as p_eps (not denoised). x_T: (b, *dims), b >= 1; returns the same shape and
    dtype. eps = 0 is a ValueError (module docstring: the corrector would evaluate the score at t = 0).
    """
    _check_start(x_T)
    _check_time_window(eps, t_end)
    if not isinstance(n_steps, int) or n_steps < 1:
        raise ValueError(f"n_steps must be an int >= 1; got {n_steps!r}")
    h = (t_end - eps) / n_steps
    x = x_T
    for i in tqdm(range(n_steps), desc="reverse SDE", disable=not progress, leave=False):
        t = batch_time(t_end - i * h, x)
        z = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
        g = append_dims(sde.diffusion(t), x.ndim)
        x = x - reverse_sde_drift(score_fn, sde, x, t) * h + g * math.sqrt(h) * z
        if corrector is not None:
            x = corrector(score_fn, x, batch_time(t_end - (i + 1) * h, x), generator)
    if not torch.isfinite(x).all():
        raise FloatingPointError("reverse_sde_sample produced non-finite samples (score_fn diverged?)")
    return x


@dataclass(frozen=True)
class PFODESamples:
    """x_eps of shape (b, *dims) and the number of score evaluations (each on the whole batch)."""

    x: torch.Tensor
    nfe: int


@torch.no_grad()
def pf_ode_sample(
    score_fn: ScoreFn,
    sde: SDE,
    x_T: torch.Tensor,
    *,
    eps: float = 1e-3,
    t_end: float = 1.0,
    method: ODEMethod = ODEMethod.RK45,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    progress: bool = False,
) -> PFODESamples:
    """Integrate the probability-flow ODE dx/dt = f − ½g² s backwards from x_T at t_end to t = eps.

    Deterministic given x_T; the samples are distributed as p_eps up to the solver error. ``method``:
    a scipy method (the reference; error controlled in RMS over the whole batch, see
    :func:`integrate_ode`) or ``ODEMethod.DOPRI5`` (torch, on x_T's device and dtype, error controlled
    per sample). x_T: (b, *dims), b >= 1. eps = 0 is a ValueError (module docstring: the last stage
    evaluates the score at t = eps).
    """
    _check_start(x_T)
    _check_time_window(eps, t_end)
    shape = x_T.shape

    def rhs(y: torch.Tensor, t: float) -> torch.Tensor:
        x = y.reshape(shape)
        return probability_flow_drift(score_fn, sde, x, batch_time(t, x)).reshape(-1)

    res = integrate_ode(rhs, x_T.reshape(-1), (t_end, eps), method=method, rtol=rtol, atol=atol,
                        progress=progress, desc="PF-ODE sample", batch=shape[0])
    return PFODESamples(res.y.reshape(shape), res.nfe)
