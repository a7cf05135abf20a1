r"""Per-sample quantities of a score at one time t, shared by the evaluation and the audit.

On x_t = alpha(t) x_0 + sigma(t) z (z ~ N(0, I) from ``generator``), per sample:

* ``res``: ‖R‖² of the score-FPE residual R = ∂_t s − ∇[½g² ∇·s + ½g² ‖s‖² − ⟨f, s⟩ − ∇·f]; exact, or
  the unbiased ⟨R̂₁, R̂₂⟩ from two independent Hutchinson probe sets (E⟨R̂₁, R̂₂⟩ = ‖R‖²);
* ``scale``: S² = ‖∂_t s‖² + ‖½g²∇∇·s‖² + ‖½g²∇‖s‖²‖² + ‖∇⟨f, s⟩‖², the size of the terms, with the
  divergence term unbiased in the same way (⟨½g²∇∇̂₁·s, ½g²∇∇̂₂·s⟩), so E res / E scale is the relative
  residual without the probe variance of either;
* ``asym``, ``jsq``: ‖J − Jᵀ‖²_F and ‖J‖²_F (exact, or unbiased Hutchinson estimates);
* ``dsm``: ‖sigma s + z‖²;
* with a truth: ``err`` = ‖s − ∇log p_t‖² and ``true_sq`` = ‖∇log p_t‖²; for exact 2-D: ``curl`` = |∂_x s_y − ∂_y s_x|.

Means and standard errors come from :class:`fpe_lab.fpe.Estimate` (``mean``, ``se``, ``ratio``).
"""

from __future__ import annotations

from typing import Any

import torch

from fpe_lab.fpe import Hutchinson, Probe, ScoreFn, ScoreFPETerms, jacobian_asymmetry_sq, score_fpe_terms
from fpe_lab.sde import LinearSDE
from fpe_lab.shapes import append_dims

__all__ = ["per_time_samples"]


def _sq(v: torch.Tensor) -> torch.Tensor:
    return v.to(torch.float64).reshape(v.shape[0], -1).pow(2).sum(-1)


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a.to(torch.float64).reshape(a.shape[0], -1) * b.to(torch.float64).reshape(b.shape[0], -1)).sum(-1)


def _scale_sq(t1: ScoreFPETerms, t2: ScoreFPETerms) -> torch.Tensor:
    """S² with ‖½g²∇(∇·s)‖² as ⟨½g²∇∇̂₁·s, ½g²∇∇̂₂·s⟩ (= ScoreFPETerms.scale² when t1 is t2)."""
    half_g2 = append_dims(0.5 * t1.g2, t1.s.ndim)
    return (_sq(t1.dt_s) + _dot(half_g2 * t1.grad_div_s, half_g2 * t2.grad_div_s)
            + _sq(half_g2 * t1.grad_sq_norm_s) + _sq(t1.grad_f_dot_s))


def per_time_samples(
    score_fn: ScoreFn,
    sde: LinearSDE,
    x0: torch.Tensor,
    t: float,
    *,
    exact: bool,
    probes: int,
    batch_size: int,
    generator: torch.Generator,
    dtype: torch.dtype | None = None,
    truth: Any = None,
    bar: Any = None,
) -> dict[str, torch.Tensor]:
    """The per-sample quantities of the module docstring at time t for every row of x0 (chunks of
    ``batch_size``), each a float64 CPU tensor of shape (n,). The score is evaluated in ``dtype`` (default:
    x0's) on x0's device; z and the probes come from ``generator`` in that order per chunk; ``truth``
    (``truth.score(x, t)`` on CPU, flattened points) adds the score error; ``bar`` is advanced per chunk."""
    dtype = dtype or x0.dtype
    dim = x0[0].numel()
    parts: dict[str, list[torch.Tensor]] = {}
    for x0c in x0.split(batch_size):
        tb = torch.full((x0c.shape[0],), t, dtype=torch.float64, device=x0c.device)
        alpha, sigma = sde.marginal(tb)
        z = torch.randn(x0c.shape, generator=generator, dtype=torch.float64, device=generator.device).to(x0c.device)
        xt = append_dims(alpha, x0c.ndim) * x0c.to(torch.float64) + append_dims(sigma, x0c.ndim) * z
        xd, td = xt.to(dtype), tb.to(dtype)
        if exact:
            t1 = t2 = score_fpe_terms(score_fn, sde, xd, td)
        else:
            hutch = Hutchinson(probes, Probe.RADEMACHER, generator=generator)
            t1 = score_fpe_terms(score_fn, sde, xd, td, divergence=hutch)
            t2 = score_fpe_terms(score_fn, sde, xd, td, divergence=hutch)  # the next, independent probe set
        asym, jsq = jacobian_asymmetry_sq(score_fn, xd, td, probes=None if exact else probes, generator=generator)
        s = t1.s.to(torch.float64)
        new = {"res": _dot(t1.residual, t2.residual), "scale": _scale_sq(t1, t2), "asym": asym.to(torch.float64),
               "jsq": jsq.to(torch.float64), "dsm": _sq(append_dims(sigma, s.ndim) * s + z)}
        if truth is not None:
            s_true = truth.score(xt.reshape(xt.shape[0], -1).cpu(), t).reshape(xt.shape).to(s.device, torch.float64)
            new["err"], new["true_sq"] = _sq(s - s_true), _sq(s_true)
        if dim == 2 and exact:
            from fpe_lab.fpe import jacobian

            jac = jacobian(score_fn, xd, td).to(torch.float64)
            new["curl"] = (jac[:, 1, 0] - jac[:, 0, 1]).abs()
        for k, v in new.items():
            parts.setdefault(k, []).append(v.detach().cpu())
        if bar is not None:
            bar.update(x0c.shape[0])
    return {k: torch.cat(v) for k, v in parts.items()}
