r"""A batched Dormand–Prince 5(4) integrator in torch with per-sample error control.

:func:`dopri5` solves dy/dt = rhs(y, t) for a *batch* of independent states y of shape (b, *dims)
(b samples that do not interact through ``rhs``), on y0's device and in y0's dtype: no copy to host
memory or to float64 at any evaluation (``scipy.integrate.solve_ivp``, the reference behind
:class:`fpe_lab.sampling.ODEMethod`'s scipy members, copies the state to float64 numpy at every one).

The method is scipy's ``RK45`` step for step (Dormand & Prince 1980; Hairer, Nørsett & Wanner,
*Solving ODEs I*, II.4–5): the same tableau, FSAL (6 evaluations per step attempt, the 7th stage is
the next step's first), the same 4th-order error estimate, initial-step heuristic and step-size
update (safety 0.9, factor in [0.2, 10], exponent −1/5, no growth right after a rejection) and the
same end-of-interval clipping. What differs is the error *norm*:

* scipy: one RMS over the whole flattened state, ‖e / (atol + rtol·max(|y|, |y_new|))‖_RMS. In a batch
  this is a mean over samples, so one sample's error can be ~sqrt(b) times the tolerance while the
  batch passes (docs/conventions.md, "Likelihoods").
* here: each sample's own RMS over its coordinates, err_i = ‖e_i / scale_i‖_RMS, i = 1..b. The step
  size h is **shared by the batch** (one time t for all samples, so ``rhs`` sees a scalar t), and a step
  is accepted only when **every** sample has err_i < 1; the next h follows from max_i err_i. So every
  sample's local error meets the tolerances, as if it were solved alone, at the cost that the hardest
  sample sets the step for all: the batch takes about as many steps as its hardest member alone (more
  when different samples are hardest at different times), each step one batched evaluation per stage.

  Shared rather than per-sample step sizes: a per-sample h would need ``rhs`` to take a per-sample time
  (b,) and would evaluate all samples at b different times; every right-hand side in fpe_lab (the
  PF-ODE drift, its divergence) takes one t per call, and a shared step keeps the batch in lock step.

With b = 1 the norm is scipy's, and the solver takes scipy's RK45 steps (tested: the same NFE and the
same result to round-off). The accepted steps' per-sample error norms are returned
(``max_error_norm``), so a caller can check that no sample was let through.

Cost: 6 batched evaluations per attempted step plus 2 at the start, and one device→host
synchronisation per attempted step (the accept/reject decision needs max_i err_i on the host).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from fpe_lab.progress import progress_bar as tqdm

__all__ = ["DOPRI5Solution", "dopri5", "error_norms"]

log = logging.getLogger(__name__)

# Dormand–Prince 5(4) tableau (as scipy.integrate.RK45); C are the stage times, A the stage weights,
# B the 5th-order weights (also the 7th stage's row: FSAL), E = (5th − 4th order) weights over 7 stages.
_C = (0.0, 1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0)
_A = (
    (),
    (1 / 5,),
    (3 / 40, 9 / 40),
    (44 / 45, -56 / 15, 32 / 9),
    (19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729),
    (9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656),
)
_B = (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84)
_E = (-71 / 57600, 0.0, 71 / 16695, -71 / 1920, 17253 / 339200, -22 / 525, 1 / 40)
_ORDER_ERR = 4  # order of the embedded (error) method: error ∝ h^5
_SAFETY, _MIN_FACTOR, _MAX_FACTOR = 0.9, 0.2, 10.0

Rhs = Callable[[torch.Tensor, float], torch.Tensor]


@dataclass(frozen=True)
class DOPRI5Solution:
    """The state at t1 and the solver's accounting.

    y: (b, *dims) at t1, the dtype and device of y0;  nfe: right-hand-side evaluations (each on the whole
    batch);  n_accepted, n_rejected: step attempts;  max_error_norm: (b,) the largest error norm of each
    sample over the accepted steps (< 1 by construction: every sample met rtol/atol at every step).
    """

    y: torch.Tensor
    nfe: int
    n_accepted: int
    n_rejected: int
    max_error_norm: torch.Tensor


def error_norms(e: torch.Tensor, y: torch.Tensor, y_new: torch.Tensor, rtol: float, atol: float) -> torch.Tensor:
    """Per-sample RMS of e / (atol + rtol max(|y|, |y_new|)) over all but the first axis, shape (b,)."""
    scale = atol + rtol * torch.maximum(y.abs(), y_new.abs())
    return (e / scale).reshape(e.shape[0], -1).pow(2).mean(-1).sqrt()


def _rms(v: torch.Tensor) -> torch.Tensor:
    return v.reshape(v.shape[0], -1).pow(2).mean(-1).sqrt()


def _combination(coefs: tuple[float, ...], ks: list[torch.Tensor]) -> torch.Tensor:
    """Σ_i coefs[i] ks[i] over the nonzero coefficients (at least one), left to right."""
    terms = (c * k for c, k in zip(coefs, ks) if c != 0.0)
    total = next(terms)
    for term in terms:
        total = total + term
    return total


def _check(rtol: float, atol: float, y0: torch.Tensor, t0: float, t1: float, first_step, max_steps) -> None:
    for name, v in (("rtol", rtol), ("atol", atol)):
        if isinstance(v, bool) or not (isinstance(v, (int, float)) and math.isfinite(v) and 0 < v < 1):
            raise ValueError(f"{name} must be a number in (0, 1); got {v!r}")
    if not isinstance(y0, torch.Tensor) or not y0.is_floating_point() or y0.ndim < 1:
        desc = f"shape {tuple(y0.shape)}, dtype {y0.dtype}" if isinstance(y0, torch.Tensor) else type(y0).__name__
        raise ValueError(f"y0 must be a floating tensor of shape (b, *dims); got {desc}")
    if y0.shape[0] == 0 or y0.numel() == 0:
        raise ValueError(f"y0 is an empty batch: shape {tuple(y0.shape)}; need b >= 1 samples with >= 1 coordinate")
    if not torch.isfinite(y0).all():
        raise ValueError("y0 must be finite; got non-finite entries")
    floor = 10 * torch.finfo(y0.dtype).eps
    if rtol < floor:
        raise ValueError(
            f"rtol={rtol!r} is below 10 × the {y0.dtype} epsilon ({floor:.2g}): the state's round-off per step "
            "exceeds it (the stage-based error estimate would still shrink with h, so the solver would crawl "
            "without gaining accuracy); use float64 or a looser rtol")
    if not (math.isfinite(t0) and math.isfinite(t1)) or t0 == t1:
        raise ValueError(f"t_span must be two different finite times; got ({t0!r}, {t1!r})")
    if first_step is not None and not (isinstance(first_step, (int, float)) and 0 < first_step <= abs(t1 - t0)):
        raise ValueError(f"first_step must be None or in (0, |t1 − t0|]; got {first_step!r}")
    if max_steps is not None and (isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps < 1):
        raise ValueError(f"max_steps must be None or an int >= 1; got {max_steps!r}")


def _initial_step(fun: Rhs, t0: float, y0: torch.Tensor, f0: torch.Tensor, t1: float, direction: float,
                  rtol: float, atol: float) -> float:
    """scipy's ``select_initial_step`` (Hairer I, II.4) per sample; the batch takes the smallest step."""
    interval = abs(t1 - t0)
    scale = atol + y0.abs() * rtol
    d0, d1 = _rms(y0 / scale), _rms(f0 / scale)
    h0_each = torch.where((d0 < 1e-5) | (d1 < 1e-5), torch.full_like(d0, 1e-6), 0.01 * d0 / d1)
    h0 = float(h0_each.clamp(max=interval).min())  # one h0 for the batch: rhs takes a single t
    f1 = fun(y0 + h0 * direction * f0, t0 + h0 * direction)
    d2 = _rms((f1 - f0) / scale) / h0
    dmax = torch.maximum(d1, d2)
    h1 = torch.where(dmax <= 1e-15, torch.full_like(dmax, max(1e-6, h0 * 1e-3)),
                     (0.01 / dmax) ** (1 / (_ORDER_ERR + 1)))
    return min(100 * h0, float(h1.min()), interval)


def dopri5(
    rhs: Rhs,
    y0: torch.Tensor,
    t_span: tuple[float, float],
    *,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    first_step: float | None = None,
    max_steps: int | None = None,
    progress: bool = False,
    desc: str = "DOPRI5",
) -> DOPRI5Solution:
    """Integrate dy/dt = rhs(y, t) from t_span[0] to t_span[1] (either direction) for y0 of shape (b, *dims).

    ``rhs(y, t)`` gets y of y0's shape, dtype and device and a Python float t, and returns the same shape;
    the b samples must not interact through it. Error control is per sample (module docstring): a step is
    accepted only when every sample's RMS error norm against atol + rtol·|y| is below 1.

    Args:
        rtol, atol: tolerances in (0, 1); rtol must be at least 10 × y0's dtype epsilon (float32: 1.2e-6,
            float64: 2.2e-15), below which round-off of the state exceeds it (``ValueError``).
        first_step: the first step size (default: the Hairer/scipy heuristic, 1 extra evaluation).
        max_steps: bound on step attempts (accepted + rejected), default unbounded.
        progress: tqdm bar over t with NFE and step counts.

    Raises ``FloatingPointError`` when rhs gives a non-finite value (naming t), ``RuntimeError`` when the
    step size falls below 10 ulp of t or ``max_steps`` is exceeded, ``ValueError`` for bad arguments
    (including an empty batch, b = 0).
    """
    t0, t1 = float(t_span[0]), float(t_span[1])
    _check(rtol, atol, y0, t0, t1, first_step, max_steps)
    direction = 1.0 if t1 > t0 else -1.0
    nfe = 0

    def fun(y: torch.Tensor, t: float) -> torch.Tensor:
        nonlocal nfe
        nfe += 1
        out = rhs(y, t)
        if not isinstance(out, torch.Tensor) or out.shape != y.shape:
            got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ValueError(f"{desc}: rhs(y, t) must return the shape of y {tuple(y.shape)}; got {got}")
        return out

    y = y0.detach()
    t = t0
    f = fun(y, t)
    if not torch.isfinite(f).all():
        raise FloatingPointError(f"{desc}: right-hand side is non-finite at t={t:.6g} (evaluation {nfe})")
    h_abs = float(first_step) if first_step is not None else _initial_step(fun, t, y, f, t1, direction, rtol, atol)
    max_err = torch.zeros(y.shape[0], dtype=y.dtype, device=y.device)
    n_acc = n_rej = 0
    bar = tqdm(total=abs(t1 - t0), desc=desc, unit="t", disable=not progress, leave=False,
               bar_format="{l_bar}{bar}| t {n:.3f}/{total:.3f} [{elapsed}{postfix}]")
    try:
        while direction * (t - t1) < 0:
            min_step = 10 * abs(math.nextafter(t, direction * math.inf) - t)
            h_abs = max(h_abs, min_step)
            rejected = False
            while True:
                if h_abs < min_step:
                    raise RuntimeError(f"{desc}: step size {h_abs:.3g} fell below 10 ulp of t={t:.9g} "
                                       f"(rtol={rtol}, atol={atol} in {y.dtype}?)")
                if max_steps is not None and n_acc + n_rej >= max_steps:
                    raise RuntimeError(f"{desc}: max_steps={max_steps} step attempts reached at t={t:.6g}")
                t_new = t + direction * h_abs
                if direction * (t_new - t1) > 0:
                    t_new = t1
                h = t_new - t
                h_abs = abs(h)
                ks = [f]
                for c, a in zip(_C[1:], _A[1:]):
                    dy = _combination(a, ks)
                    ks.append(fun(y + h * dy, t + c * h))
                y_new = y + h * _combination(_B, ks)
                f_new = fun(y_new, t_new)
                ks.append(f_new)
                e = h * _combination(_E, ks)
                err = error_norms(e, y, y_new, rtol, atol)
                err_max = err.max().item()  # the one host synchronisation of the step
                if not math.isfinite(err_max):
                    raise FloatingPointError(
                        f"{desc}: right-hand side is non-finite in the step from t={t:.6g} to {t_new:.6g} "
                        f"(evaluation {nfe})")
                if err_max < 1:
                    factor = (_MAX_FACTOR if err_max == 0
                              else min(_MAX_FACTOR, _SAFETY * err_max ** (-1 / (_ORDER_ERR + 1))))
                    if rejected:
                        factor = min(1.0, factor)
                    h_abs *= factor
                    n_acc += 1
                    break
                h_abs *= max(_MIN_FACTOR, _SAFETY * err_max ** (-1 / (_ORDER_ERR + 1)))
                rejected = True
                n_rej += 1
            bar.update(abs(t_new - t))
            bar.set_postfix(nfe=nfe, steps=n_acc, rejected=n_rej, refresh=False)
            max_err = torch.maximum(max_err, err)
            t, y, f = t_new, y_new, f_new
    finally:
        bar.close()
    if not torch.isfinite(y).all():
        raise FloatingPointError(f"{desc}: the state became non-finite (overflow) by t={t1:.6g}")
    log.debug("%s: t=%g to %g, %d accepted, %d rejected steps, %d evaluations", desc, t0, t1, n_acc, n_rej, nfe)
    return DOPRI5Solution(y, nfe, n_acc, n_rej, max_err)
