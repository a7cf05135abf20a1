r"""High-order denoising score matching (Lu et al., ICML 2022): match ∇s_θ (and ∇ tr ∇s_θ) to the
conditional moments of the noise at the DSM points.

With ε̂ = −sigma s_θ (detached) and w = z − ε̂, the targets with conditional mean zero at the true score are

    E2 = sigma² ∇s_θ + I − w wᵀ,
    E3 = sigma³ ∇_x tr(∇s_θ) + ‖w‖² w − tr(Ĉ) w − 2Ĉ w,      Ĉ = sigma² ∇s_θ + I (detached),

and the penalty is (‖E2‖²_F + (tr E2)²)/D (+ ‖E3‖²/D at order 3), or its projection on Rademacher
probes v for images. Derivation and the probe forms: docs/derivations.md#high-order-dsm.
Options (``--hodsm-…``): the order.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from fpe_lab.fpe import Probe, ScoreFn, check_score, draw_probe, jacobian_of, jvp_x, vjp
from fpe_lab.regularizers.base import Regularizer, check_lam, check_n_points, check_probes, first, leaf
from fpe_lab.sde import LinearSDE
from fpe_lab.settings import Section, setting
from fpe_lab.shapes import flat_dim

if TYPE_CHECKING:
    from fpe_lab.config import RunConfig

__all__ = ["HODSMOptions", "HODSMRegularizer"]


@dataclass(frozen=True)
class HODSMOptions(Section):
    """Settings of high-order DSM (flags ``--hodsm-<field>``)."""

    order: int = setting(2, "2 (second order) or 3 (with the third-order trace term)")

    def __post_init__(self) -> None:
        if isinstance(self.order, bool) or self.order not in (2, 3):
            raise ValueError(f"hodsm order must be 2 or 3 (second- or third-order score matching); got {self.order!r}")


@dataclass(frozen=True)
class HODSMRegularizer(Regularizer):
    r"""Per-sample high-order DSM penalty at the (first n_points) DSM points, shape (m,).

    * ``probes=None`` (exact; D×D matrices, for low-dimensional points): order 2
      (‖E2‖²_F + (tr E2)²)/D; order 3 adds ‖E3‖²/D.
    * ``probes=k`` (images, no D×D matrix): per Rademacher probe v, (‖E2 v‖² + (vᵀE2 v)²)/D (+ ‖E3_v‖²/D),
      averaged over the k probes; the exact score stays stationary.

    Args:
        lam: weight lam ≥ 0 in the loss.
        order: 2 or 3.
        n_points: evaluate at the first ``n_points`` DSM points only (None: all).
        probes: None (exact Jacobian) or the number k ≥ 1 of Rademacher probes (images).
    """

    Options = HODSMOptions

    lam: float
    order: int = 2
    n_points: int | None = None
    probes: int | None = None

    def __post_init__(self) -> None:
        check_lam(self.lam)
        HODSMOptions(order=self.order)
        check_n_points(self.n_points)
        check_probes(self.probes)

    @classmethod
    def from_config(cls, config: RunConfig, options: HODSMOptions, lam: float) -> HODSMRegularizer:
        reg = config.loss.reg
        exact = reg.divergence.value == "exact"
        return cls(lam=lam, order=options.order, n_points=reg.n_points, probes=None if exact else reg.probes)

    @classmethod
    def inert(cls, config: RunConfig, options: HODSMOptions) -> frozenset[str]:
        # Rademacher probes only: ``probe`` never matters; ``probes`` only with a Hutchinson divergence
        exact = config.loss.reg.divergence.value == "exact"
        return frozenset({"probes", "probe"} if exact else {"probe"})

    def __call__(
        self,
        score_fn: ScoreFn,
        sde: LinearSDE,
        x0: torch.Tensor,
        t: torch.Tensor,
        z: torch.Tensor,
        generator: torch.Generator | None,
    ) -> torch.Tensor:
        x_t, tt, zz = first(self.n_points, sde.perturb(x0, t, z), t, z)
        x = leaf(x_t)
        sigma = sde.marginal(tt)[1][:, None]
        if self.probes is None:
            return self._exact(score_fn, x, tt, zz, sigma)
        pen = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
        for _ in range(self.probes):
            pen = pen + self._projected(score_fn, x, tt, zz, sigma, draw_probe(x, Probe.RADEMACHER, generator))
        return pen / self.probes

    def _exact(
        self, score_fn: ScoreFn, x: torch.Tensor, t: torch.Tensor, z: torch.Tensor, sigma: torch.Tensor
    ) -> torch.Tensor:
        """(‖E2‖²_F + (tr E2)²)/D (+ ‖E3‖²/D), shape (b,); sigma of shape (b, 1)."""
        s = check_score(score_fn(x, t), x)
        b, d = x.shape[0], flat_dim(x)
        w = z.reshape(b, d) + sigma * s.detach().reshape(b, d)  # z − ε̂, ε̂ = −sigma s_θ (stop-gradient)
        jac = jacobian_of(s, x, create_graph=True)
        eye = torch.eye(d, dtype=x.dtype, device=x.device)
        cov = sigma[:, :, None] ** 2 * jac + eye  # sigma² ∇s_θ + I
        e2 = cov - w[:, :, None] * w[:, None, :]
        pen = (e2.pow(2).sum((1, 2)) + torch.diagonal(e2, dim1=1, dim2=2).sum(-1) ** 2) / d
        if self.order == 3:
            tr_jac = torch.diagonal(jac, dim1=1, dim2=2).sum(-1)
            grad_tr = vjp(tr_jac, x, torch.ones_like(tr_jac)).reshape(b, d)  # ∇_x tr ∇s_θ per sample
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
        s, jv = jvp_x(score_fn, x, t, v)
        check_score(s, x)
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
            grad_vjv = vjp(v_j_v, x, torch.ones_like(v_j_v)).reshape(b, d)  # ∇_x(vᵀJv): reverse over forward
            c_v = cv.detach()
            e3 = sigma**3 * grad_vjv + (wv**2 - (vf * c_v).sum(-1, keepdim=True)) * w - 2 * wv * c_v
            pen = pen + e3.pow(2).sum(-1) / d
        return pen
