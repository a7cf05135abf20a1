"""The score-FPE residual with a *non-linear* drift, where ∇(∇·f) ≠ 0.

Every SDE of fpe_lab has linear drift f = a(t) x, so ∇·f = a(t) D is constant in x and ∇(∇·f) = 0:
dropping the ∇·f term from the residual goes unnoticed by every test that uses them. Here the density
is known exactly for a non-linear, time-dependent drift.

Construction. For U(y) = ¼‖y‖⁴ − ½‖y‖² (a radial double well) the Langevin SDE
dy = −β(t) ∇U(y) dt + sqrt(2 β(t)) dw leaves p(y) ∝ exp(−U(y)) invariant for any β(t) > 0
(∂_t p = β ∇·(∇U p + ∇p) = 0). Moving the frame, x = y + c(t) solves

    dx = f(x, t) dt + g(t) dw,   f(x, t) = −β(t) ∇U(x − c(t)) + c'(t),   g(t)² = 2 β(t),

so p_t(x) ∝ exp(−U(x − c(t))) exactly (the normaliser is constant in t), with score
s = −∇U(x − c(t)), ∂_t s = ∇²U(x − c) c'(t) ≠ 0, f ≠ s, and ∇·f = −β ΔU(x − c),
∇(∇·f) = −2(D + 2) β (x − c) ≠ 0. The score FPE then holds exactly, so R = 0 up to round-off, while
R without the ∇(∇·f) term is −∇(∇·f) (checked: this file fails with that term removed from fpe.py).
"""

import math

import pytest
import torch

from fpe_lab.fpe import (
    ExactDivergence,
    FiniteDifferenceDt,
    log_density_fpe_residual,
    score_fpe_residual,
    score_fpe_terms,
)
from fpe_lab.shapes import append_dims


def grad_u(y: torch.Tensor) -> torch.Tensor:
    """∇U(y) = (‖y‖² − 1) y for U = ¼‖y‖⁴ − ½‖y‖², y of shape (b, D)."""
    return (y.pow(2).sum(-1, keepdim=True) - 1) * y


def laplacian_u(y: torch.Tensor) -> torch.Tensor:
    """ΔU(y) = (D + 2)‖y‖² − D, shape (b,)."""
    d = y.shape[-1]
    return (d + 2) * y.pow(2).sum(-1) - d


class MovingDoubleWellDrift:
    """dx = [−β(t) ∇U(x − c(t)) + c'(t)] dt + sqrt(2β(t)) dw on R^D: the SDE object the residual needs,
    drift and diffusion only (fpe.py then differentiates the drift itself for ∇·f)."""

    def __init__(self, dim: int = 2):
        self.dim = dim

    # β(t) = 1 + t, c(t) = 0.5 (sin 3t, t², 0, ...) (first D entries)
    @staticmethod
    def beta(t: torch.Tensor) -> torch.Tensor:
        return 1 + t

    def c(self, t: torch.Tensor) -> torch.Tensor:
        cols = [0.5 * torch.sin(3 * t), 0.5 * t**2] + [torch.zeros_like(t)] * max(self.dim - 2, 0)
        return torch.stack(cols[: self.dim], dim=-1)

    def dc(self, t: torch.Tensor) -> torch.Tensor:
        cols = [1.5 * torch.cos(3 * t), t] + [torch.zeros_like(t)] * max(self.dim - 2, 0)
        return torch.stack(cols[: self.dim], dim=-1)

    def drift(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return -append_dims(self.beta(t), x.ndim) * grad_u(x - self.c(t)) + self.dc(t)

    def diffusion(self, t: torch.Tensor) -> torch.Tensor:
        return torch.sqrt(2 * self.beta(t))

    def score(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return -grad_u(x - self.c(t))

    def log_prob(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """log p_t up to a constant that does not depend on x or t."""
        y = x - self.c(t)
        return -(0.25 * y.pow(2).sum(-1).pow(2) - 0.5 * y.pow(2).sum(-1))


class MovingDoubleWell(MovingDoubleWellDrift):
    """The same SDE with its closed-form ∇·f (the path the library's linear SDEs take)."""

    def div_drift(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """∇·f = −β(t) ΔU(x − c(t)), shape (b,)."""
        return -self.beta(t) * laplacian_u(x - self.c(t))


def _points(n=64, dim=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return 1.5 * torch.randn(n, dim, generator=g, dtype=torch.float64)


def test_the_sde_object_is_what_it_claims():
    """drift/div_drift against autograd, and p ∝ exp(−U(x − c)) against its score (float64 round-off)."""
    sde = MovingDoubleWell(3)
    x = _points(dim=3).requires_grad_(True)
    t = torch.full((x.shape[0],), 0.4, dtype=torch.float64)
    torch.testing.assert_close(ExactDivergence()(sde.drift(x, t), x), sde.div_drift(x, t), rtol=1e-12, atol=1e-12)
    (s,) = torch.autograd.grad(sde.log_prob(x, t).sum(), x)
    torch.testing.assert_close(s, sde.score(x.detach(), t), rtol=1e-12, atol=1e-12)


@pytest.mark.analytic
@pytest.mark.parametrize("dim", [1, 2, 3])
@pytest.mark.parametrize("with_div_drift", [True, False], ids=["div_drift", "autograd-div"])
@pytest.mark.parametrize("t", [0.0, 0.3, 1.0])
def test_residual_vanishes_for_a_nonlinear_drift(dim, with_div_drift, t):
    sde = MovingDoubleWell(dim) if with_div_drift else MovingDoubleWellDrift(dim)
    assert hasattr(sde, "div_drift") == with_div_drift
    x = _points(dim=dim)
    terms = score_fpe_terms(sde.score, sde, x, t)
    r = score_fpe_residual(sde.score, sde, x, t)
    # the term the linear SDEs never exercise is really there: ∇(∇·f) = −2(D + 2) β (x − c), O(10)
    tt = torch.full((x.shape[0],), t, dtype=torch.float64)
    expected = -2 * (dim + 2) * append_dims(sde.beta(tt), 2) * (x - sde.c(tt))
    torch.testing.assert_close(terms.grad_div_f, expected, rtol=1e-12, atol=1e-12)
    assert terms.grad_div_f.abs().max() > 1.0
    assert terms.dt_s.abs().max() > 1.0  # and the moving frame makes ∂_t s nonzero
    # R = 0: terms up to ~1e4 in size (‖x‖ up to ~5, ∇U cubic) cancel to float64 round-off; measured
    # |R|/scale ≤ 4e-16, so 1e-12 is ~1e3× headroom, while dropping ∇(∇·f) gives |R|/scale from 1e-3
    # (points near the well's minimum) to 1 (far out) at every (D, t) here
    assert (terms.residual.norm(dim=-1) / terms.scale).max() < 1e-12
    assert (r.norm(dim=-1) / terms.scale).max() < 1e-12


@pytest.mark.analytic
def test_log_density_residual_vanishes_for_a_nonlinear_drift():
    sde = MovingDoubleWell(2)
    x = _points()
    r = log_density_fpe_residual(sde.log_prob, sde, x, 0.6)
    scale = sde.div_drift(x, torch.full((x.shape[0],), 0.6, dtype=torch.float64)).abs().max()
    assert scale > 1.0 and r.abs().max() < 1e-12 * scale


def test_a_wrong_score_is_caught_with_the_nonlinear_drift():
    """Control: the stationary score of the *unmoved* well (c = 0) has a nonzero residual here."""
    sde = MovingDoubleWell(2)
    x = _points()
    r = score_fpe_residual(lambda y, t: -grad_u(y), sde, x, 0.5)
    assert r.abs().max() > 0.1


def test_finite_difference_dt_residual_is_small_for_the_nonlinear_drift():
    """The FD time derivative through the same residual: O(h²) away from the ends."""
    sde = MovingDoubleWell(2)
    x = _points()
    scale = score_fpe_terms(sde.score, sde, x, 0.5).scale.max()
    r = score_fpe_residual(sde.score, sde, x, 0.5, time_derivative=FiniteDifferenceDt(h=1e-3))
    # central difference, error |∂³_t s| h²/6: measured 3.9e-10 relative to the terms' scale
    assert r.abs().max() < 1e-8 * scale
    assert math.isfinite(r.abs().max().item())
