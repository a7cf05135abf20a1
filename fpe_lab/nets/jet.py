r"""A fast exact score-FPE residual for :class:`~fpe_lab.nets.mlp.TimeMLP` score models.

The score FPE residual (FP-Diffusion, Lai et al. 2023, Sec. 3) of s = ∇ log p_t needs only

    ∂_t s,    J_ik = ∂s_i/∂x_k,    H_ikl = ∂²s_i/∂x_k∂x_l,

and for a linear drift f = a(t) x (VE, VP, sub-VP) it reads

    R = ∂_t s − [ ½g² (∇(∇·s) + 2 Jᵀs) − a (Jᵀx + s) ],     ∇(∇·s)_k = Σ_i H_iki,

since ∇‖s‖² = 2Jᵀs, ∇⟨f, s⟩ = a (s + Jᵀx) and ∇(∇·f) = ∇(a D) = 0.

Instead of nested autograd (:func:`fpe_lab.fpe.score_fpe_residual`: one JVP in t, D reverse passes
for ∇·s, one more for ∇φ), this module pushes a truncated Taylor polynomial ("jet") of every hidden
activation forward through the MLP in one batched pass. Per sample and hidden unit it carries

    K = 1 + D + D(D+1)/2   derivative streams   (∂_t; ∂_k for k < D; ∂_k∂_l for k ≤ l)

next to the value: 6 at D = 2 (7 streams with the value). The rules are

* Linear z = W h + b:  every derivative stream is W·(stream); the bias enters the value only;
* SiLU y = φ(z):       y_t = φ'(z) z_t,  y_k = φ'(z) z_k,  y_kl = φ'(z) z_kl + φ''(z) z_k z_l
  (no ∂_t∂_x stream is needed, so the time derivative stays first order);
* input [x, e(t)]:     ∂_k x = unit vector, ∂²x = 0, ∂_t e(t) = ω ⊙ [cos ωt, −sin ωt];
* s = −n/sigma(t):     ∂_t s = −(∂_t n + s sigma') / sigma, spatial streams divided by −sigma.

The result is differentiable torch code (the hidden SiLU layers use :class:`_SiLUJet`, an autograd
Function with a hand-written backward that saves only its inputs; :func:`_silu_jet` is the plain
reference it is tested against), so with ``create_graph=True`` the residual can be trained through
(the FPE regularizer), and gradients w.r.t. the parameters are those of the generic path.

Use: ``from fpe_lab.nets.jet import jet_score_fpe_residual`` (same signature and result as
:func:`fpe_lab.fpe.score_fpe_residual`, with a ``ScoreModel(TimeMLP, sde)`` as the score function).
A loss that evaluates s at the same points (DSM at the perturbed points) calls
``jet_score_fpe_residual.with_score`` instead, which returns s (the jet's value stream) beside R: one
forward pass fewer (``fpe_lab.regularizers.fpe.FPERegularizer`` does so at the DSM points). Cost per training
step (benchmarks/bench_train_step.py, benchmarks/RESULTS.md): about 7 matmul streams, so ~7-8x a DSM
step (~6-7x with the shared value), vs ~10-13x for the generic path.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import jvp

from fpe_lab.checks import check_finite, check_time
from fpe_lab.fpe import ExactDivergence
from fpe_lab.model import ScoreModel
from fpe_lab.nets.mlp import TimeMLP
from fpe_lab.sde import SDE, LinearSDE
from fpe_lab.shapes import batch_time

__all__ = ["ScoreJet", "score_jet", "residual_from_jet", "JetScoreFPEResidual", "jet_score_fpe_residual"]


def _pairs(d: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Index pairs (k, l) with k ≤ l in row-major order: the packed second-derivative streams."""
    k, l = torch.triu_indices(d, d)
    return k, l


def _pair_index(d: int) -> torch.Tensor:
    """(d, d) matrix whose (k, l) entry is the packed index of the pair (min(k, l), max(k, l))."""
    k, l = _pairs(d)
    idx = torch.empty(d, d, dtype=torch.long)
    idx[k, l] = torch.arange(k.numel())
    idx[l, k] = torch.arange(k.numel())
    return idx


@dataclass(frozen=True)
class ScoreJet:
    """Value and derivatives of a score s(x, t) at points x of shape (b, D), t of shape (b,).

    Attributes:
        value:          s, shape (b, D).
        dt:             ∂_t s, shape (b, D).
        jacobian:       J[b, i, k] = ∂s_i/∂x_k, shape (b, D, D) (the layout of ``fpe.jacobian``).
        hessian_packed: ∂²s_i/∂x_k∂x_l for k ≤ l, shape (b, D, D(D+1)/2), pairs in row-major order
                        (``torch.triu_indices``).
    """

    value: torch.Tensor
    dt: torch.Tensor
    jacobian: torch.Tensor
    hessian_packed: torch.Tensor

    @property
    def hessian(self) -> torch.Tensor:
        """H[b, i, k, l] = ∂²s_i/∂x_k∂x_l, shape (b, D, D, D) (the layout of ``torch.func.hessian``)."""
        d = self.value.shape[1]
        return self.hessian_packed[:, :, _pair_index(d).to(self.value.device)]

    @property
    def grad_div(self) -> torch.Tensor:
        """∇(∇·s), shape (b, D): entry k is Σ_i ∂²s_i/∂x_k∂x_i."""
        return torch.diagonal(self.hessian, dim1=1, dim2=3).sum(-1)


def _silu_derivatives(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """φ(z) = z σ(z), φ' = σ (1 + z (1 − σ)), φ'' = σ (1 − σ) (2 + z (1 − 2σ)); each the shape of z."""
    sig = torch.sigmoid(z)
    return z * sig, sig * (1 + z * (1 - sig)), sig * (1 - sig) * (2 + z * (1 - 2 * sig))


def _silu_jet(z: torch.Tensor, dz: torch.Tensor, d: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Push a jet through SiLU: y_t = φ' z_t,  y_k = φ' z_k,  y_kl = φ' z_kl + φ'' z_k z_l.

    z: pre-activation values (b, H); dz: derivative streams (K, b, H) in the order
    [∂_t, ∂_0..∂_{D-1}, packed ∂_k∂_l (k ≤ l)]. Returns (y (b, H), dy (K, b, H)).
    """
    y, phi1, phi2 = _silu_derivatives(z)
    k, l = _pairs(d)
    grad = dz[1 : 1 + d]
    second = phi1 * dz[1 + d :] + phi2 * grad[k.to(z.device)] * grad[l.to(z.device)]
    return y, torch.cat([phi1 * dz[: 1 + d], second], dim=0)


class _SiLUJet(torch.autograd.Function):
    """:func:`_silu_jet` with a hand-written backward: the same values, fewer passes over memory.

    Autograd of :func:`_silu_jet` keeps ~10 intermediate (K, b, H) tensors per layer and replays
    index/cat/broadcast backward ops; this saves only (z, dz) and recomputes φ', φ'', φ''' in the
    backward. With G = ∂L/∂y, G_j = ∂L/∂y_j (j over all K streams, p = (k, l) over pairs):

        ∂L/∂z    = G φ' + φ'' Σ_j G_j z_j + φ''' Σ_p G_p z_k z_l
        ∂L/∂z_j  = G_j φ'  (+ φ'' Σ_p G_p (δ_jk z_l + δ_jl z_k) for the first-order streams j < D)

    φ''' = σ' (3 (1 − 2σ) + z ((1 − 2σ)² − 2σ')), σ' = σ(1 − σ). Checked against
    :func:`_silu_jet` and by ``torch.autograd.gradcheck`` in tests/test_jet.py.
    """

    @staticmethod
    def forward(ctx, z: torch.Tensor, dz: torch.Tensor, d: int) -> tuple[torch.Tensor, torch.Tensor]:
        sig = torch.sigmoid(z)
        s1 = sig * (1 - sig)
        phi1 = sig + z * s1
        phi2 = s1 * (2 + z * (1 - 2 * sig))
        dy = dz * phi1
        grad, second = dz[1 : 1 + d], dy[1 + d :]
        p = 0
        for k in range(d):
            phi2_gk = phi2 * grad[k]
            for l in range(k, d):
                second[p].addcmul_(phi2_gk, grad[l])
                p += 1
        ctx.save_for_backward(z, dz)
        ctx.d = d
        return z * sig, dy

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_y: torch.Tensor, g_dy: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None]:
        z, dz = ctx.saved_tensors
        d = ctx.d
        sig = torch.sigmoid(z)
        s1 = sig * (1 - sig)
        c = 1 - 2 * sig
        phi1 = sig + z * s1
        phi2 = s1 * (2 + z * c)
        phi3 = s1 * (3 * c + z * (c * c - 2 * s1))
        g_dz = g_dy * phi1
        g_z = g_y * phi1 + phi2 * (g_dy * dz).sum(0)
        grad, g_grad, acc3 = dz[1 : 1 + d], g_dz[1 : 1 + d], torch.zeros_like(z)
        p = 0
        for k in range(d):
            for l in range(k, d):
                w = phi2 * g_dy[1 + d + p]
                g_grad[k].addcmul_(w, grad[l])
                g_grad[l].addcmul_(w, grad[k])
                acc3.addcmul_(g_dy[1 + d + p] * grad[k], grad[l])
                p += 1
        return g_z + phi3 * acc3, g_dz, None


def _net_jet(net: TimeMLP, x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """n(x, t) of shape (b, D) and its derivative streams (K, b, D), K = 1 + D + D(D+1)/2."""
    d = x.shape[1]
    arg = t[:, None] * net.freqs.to(t)
    sin, cos = torch.sin(arg), torch.cos(arg)
    e = torch.cat([sin, cos], dim=-1)
    de = torch.cat([cos, -sin], dim=-1) * torch.cat([net.freqs, net.freqs]).to(t)  # ∂_t e(t)

    # First layer: ∂_k [x, e] is the unit vector e_k and ∂²[x, e] = 0, so z_k = W1[:, k] is shared
    # by the whole batch and z_kl = 0: y_k = φ' W1[:, k], y_kl = φ'' W1[:, k] W1[:, l] (no matmul).
    first, *rest = (cast(nn.Linear, layer) for layer in net.hidden)  # TimeMLP's hidden layers are all Linear
    z = F.linear(torch.cat([x, e], dim=-1), first.weight, first.bias)
    w_x = first.weight[:, :d].T[:, None, :]  # (D, 1, H): ∂_k z
    k, l = _pairs(d)
    h, phi1, phi2 = _silu_derivatives(z)
    dz_t = de @ first.weight[:, d:].T  # (b, H)
    dh = torch.cat([(phi1 * dz_t)[None], phi1 * w_x, phi2 * (w_x[k.to(z.device)] * w_x[l.to(z.device)])])
    for layer in rest:
        h, dh = _SiLUJet.apply(F.linear(h, layer.weight, layer.bias), dh @ layer.weight.T, d)
    return F.linear(h, net.out.weight, net.out.bias), dh @ net.out.weight.T


def _check_model(model: nn.Module) -> TimeMLP:
    net = getattr(model, "net", None)
    if not isinstance(model, ScoreModel) or not isinstance(net, TimeMLP):
        raise ValueError(
            "model must be a fpe_lab.model.ScoreModel whose net is a fpe_lab.nets.mlp.TimeMLP; "
            f"got {type(model).__name__} with net {type(net).__name__} (use fpe.score_fpe_residual instead)"
        )
    if not isinstance(net.act, nn.SiLU):
        raise ValueError(f"model.net.act must be nn.SiLU for the jet path; got {type(net.act).__name__}")
    return net


def _check_x(x: torch.Tensor, net: TimeMLP) -> None:
    if not isinstance(x, torch.Tensor) or x.ndim != 2 or x.shape[1] != net.dim:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"x must be a tensor of shape (b, {net.dim}) (the net's dim); got {shape}")


def score_jet(model: ScoreModel, x: torch.Tensor, t: torch.Tensor | float) -> ScoreJet:
    """s, ∂_t s, J and the second spatial derivatives of ``model`` at x (b, D), t (b,) or scalar.

    One batched forward pass (see the module docstring); differentiable w.r.t. the parameters.
    """
    net = _check_model(model)
    _check_x(x, net)
    check_finite(x.detach(), "x")
    t = check_time(batch_time(t, x))
    x, t = x.detach(), t.detach().contiguous()  # a scalar t arrives expanded; forward AD needs real storage
    n, dn = _net_jet(net, x, t)
    d = x.shape[1]
    # torch annotates jvp as returning 2 or 3 values; without has_aux it returns 2
    sigma, dsigma = jvp(lambda tt: model.sde.marginal(tt)[1], (t,), (torch.ones_like(t),))  # type: ignore[misc]
    inv = -1 / sigma[:, None]  # s = −n/sigma: every spatial stream is scaled by −1/sigma
    s = n * inv
    dt_s = dn[0] * inv - s * (dsigma / sigma)[:, None]
    jac = (dn[1 : 1 + d] * inv).permute(1, 2, 0)  # (k, b, i) -> (b, i, k)
    hess = (dn[1 + d :] * inv).permute(1, 2, 0)  # (p, b, i) -> (b, i, p)
    return ScoreJet(value=s, dt=dt_s, jacobian=jac, hessian_packed=hess)


def _check_linear_sde(sde: SDE) -> LinearSDE:
    if not isinstance(sde, LinearSDE):
        raise ValueError(
            f"sde must be a fpe_lab.sde.LinearSDE (drift a(t) x: VE, VP, sub-VP) for the jet path; "
            f"got {type(sde).__name__}"
        )
    return sde


def residual_from_jet(jet: ScoreJet, sde: LinearSDE, x: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
    """R = ∂_t s − [½g² (∇(∇·s) + 2Jᵀs) − a(t) (Jᵀx + s)] from a jet of s at (x, t), shape (b, D).

    For a loss that also needs s at the same points (DSM at the perturbed points): take ``jet.value``
    instead of a second forward pass. Differentiable w.r.t. whatever ``jet`` depends on.
    """
    sde = _check_linear_sde(sde)
    tt = batch_time(t, x).detach()
    s, jac = jet.value, jet.jacobian
    g2 = sde.diffusion(tt)[:, None] ** 2
    a = sde.drift_coef(tt)[:, None]
    jt_s = torch.einsum("bik,bi->bk", jac, s)  # Jᵀs = ½∇‖s‖²
    jt_x = torch.einsum("bik,bi->bk", jac, x.detach())  # Jᵀx, so ∇⟨f, s⟩ = a (Jᵀx + s)
    return jet.dt - (0.5 * g2 * (jet.grad_div + 2 * jt_s) - a * (jt_x + s))


class JetScoreFPEResidual:
    """The jet residual as a residual function; one instance, :data:`jet_score_fpe_residual`.

    ``__call__`` has the signature and result of :func:`fpe_lab.fpe.score_fpe_residual` (a
    ``fpe_lab.losses.ResidualFn``); ``with_score`` returns the jet's value stream s beside R, so a
    loss that also needs s at the same points (DSM at the perturbed points) skips its own forward
    pass (``fpe_lab.regularizers.fpe.FPERegularizer`` does this when it evaluates R at the DSM points).
    """

    def with_score(
        self,
        model: ScoreModel,
        sde: SDE,
        x: torch.Tensor,
        t: torch.Tensor | float,
        divergence: ExactDivergence | None = None,
        create_graph: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(s, R) at x (b, D), t (b,) or scalar, each of shape (b, D), from one jet pass.

        s is ``jet.value`` = −n_θ(x, t)/sigma(t), the same function as ``model(x, t)`` (equal to
        round-off); R = ∂_t s − [½g² (∇(∇·s) + 2Jᵀs) − a(t) (Jᵀx + s)]. Arguments as in ``__call__``.
        """
        if divergence is not None and not isinstance(divergence, ExactDivergence):
            raise ValueError(
                f"divergence must be None or fpe.ExactDivergence() for the jet path (it is exact); got {divergence!r}"
            )
        sde = _check_linear_sde(sde)
        with torch.set_grad_enabled(create_graph and torch.is_grad_enabled()):
            jet = score_jet(model, x, t)
            r = residual_from_jet(jet, sde, x, t)
        if create_graph:
            return jet.value, r
        return jet.value.detach(), r.detach()

    def __call__(
        self,
        model: ScoreModel,
        sde: SDE,
        x: torch.Tensor,
        t: torch.Tensor | float,
        divergence: ExactDivergence | None = None,
        create_graph: bool = False,
    ) -> torch.Tensor:
        """R = ∂_t s − [½g² (∇(∇·s) + 2Jᵀs) − a(t) (Jᵀx + s)] for f = a(t) x, shape (b, D).

        Same signature and result as :func:`fpe_lab.fpe.score_fpe_residual` for a
        ``ScoreModel(TimeMLP, ...)`` and a :class:`~fpe_lab.sde.LinearSDE`, from one jet pass.

        Args:
            model: ``fpe_lab.model.ScoreModel`` with a ``TimeMLP`` net (SiLU).
            sde: a ``LinearSDE`` (VE, VP, sub-VP): the FPE's drift a(t) x and diffusion g(t).
            x: points, shape (b, D) with D = ``model.net.dim``.
            t: times in [0, 1], shape (b,) or scalar.
            divergence: ``None`` or ``ExactDivergence()``; the jet's divergence is always exact.
            create_graph: keep the graph so R can be differentiated w.r.t. the parameters.
        """
        return self.with_score(model, sde, x, t, divergence=divergence, create_graph=create_graph)[1]

    def __repr__(self) -> str:
        return "jet_score_fpe_residual"


jet_score_fpe_residual = JetScoreFPEResidual()
"""R of a ``ScoreModel(TimeMLP)`` by one jet pass: ``jet_score_fpe_residual(model, sde, x, t, divergence=None,
create_graph=False)``; ``jet_score_fpe_residual.with_score(...)`` returns (s, R)."""
