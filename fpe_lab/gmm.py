r"""Gaussian mixtures and their exact perturbed densities and scores under a linear SDE.

Data density p_0(x) = Σ_k w_k N(x; mu_k, Sigma_k). Under an SDE with Gaussian transition
x_t | x_0 ~ N(alpha(t) x_0, sigma(t)² I), the marginal stays a mixture:

    p_t(x) = Σ_k w_k N(x; alpha mu_k, alpha² Sigma_k + sigma² I),
    ∇ log p_t(x) = Σ_k r_k(x) · (−C_k⁻¹ (x − alpha mu_k)),   r_k = softmax_k(log w_k + log N_k(x)),

with C_k = alpha² Sigma_k + sigma² I. Everything is torch and differentiable in x and t, so ∂_t s,
∇·s and ∇(∇·s) of the exact score come from autograd; log-densities use logsumexp and
triangular solves, so they stay finite far from the modes (|x| = 50) and for tiny t.

**t = 0** is allowed everywhere and gives p_0 itself (alpha(0) = 1, sigma(0) = 0 exactly), which is
also the limit t → 0⁺. The covariance is built from ``sde.marginal_var`` (alpha, sigma²), never from
sigma: sigma(t) ~ sqrt(t) has an infinite t-derivative at 0 for VE and VP, and forming sigma² as
sigma·sigma under forward-mode AD gave 0·inf = NaN for ∂_t s at t = 0 (so the score-FPE residual of the
exact score was NaN there). sigma² is analytic in t, so ∂_t s and ∂_t log p at t = 0 are the correct
one-sided limits. An empty batch x of shape (0, D) is a ``ValueError`` naming the shape.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from fpe_lab.checks import check_batch, check_finite
from fpe_lab.sde import LinearSDE
from fpe_lab.shapes import batch_time

__all__ = ["GaussianMixture"]


def _as_tensor(v, name: str, dtype: torch.dtype | None) -> torch.Tensor:
    try:
        out = torch.as_tensor(v if isinstance(v, torch.Tensor) else np.asarray(v), dtype=dtype)
    except (TypeError, ValueError, RuntimeError) as e:
        raise ValueError(f"{name} must be array-like of numbers; got {type(v).__name__}: {e}") from None
    if not out.is_floating_point():
        out = out.to(torch.float64)
    return out


class GaussianMixture:
    """p_0(x) = Σ_k w_k N(x; mu_k, Sigma_k) on R^D.

    Args:
        weights: (K,) nonnegative, finite, not all zero; normalised to sum 1.
        means: (K, D).
        covs: (K, D, D), symmetric positive definite.
        dtype: storage dtype (default: float64 unless the inputs are floating tensors).
    """

    def __init__(self, weights, means, covs, dtype: torch.dtype | None = None) -> None:
        w = _as_tensor(weights, "weights", dtype)
        mu = _as_tensor(means, "means", dtype).to(w.dtype)
        cov = _as_tensor(covs, "covs", dtype).to(w.dtype)
        if w.ndim != 1 or w.numel() == 0:
            raise ValueError(f"weights must have shape (K,) with K >= 1; got shape {tuple(w.shape)}")
        k = w.shape[0]
        if mu.ndim != 2 or mu.shape[0] != k:
            raise ValueError(f"means must have shape (K, D) = ({k}, D); got shape {tuple(mu.shape)}")
        d = mu.shape[1]
        if cov.shape != (k, d, d):
            raise ValueError(f"covs must have shape (K, D, D) = ({k}, {d}, {d}); got shape {tuple(cov.shape)}")
        check_finite(w, "weights")
        check_finite(mu, "means")
        check_finite(cov, "covs")
        if (w < 0).any():
            raise ValueError(f"weights must be nonnegative; got {w.tolist()}")
        if w.sum() <= 0:
            raise ValueError(f"weights must not all be zero; got {w.tolist()}")
        asym = (cov - cov.transpose(-1, -2)).abs().amax()
        # symmetric up to the round-off of the caller's arithmetic (A Aᵀ in BLAS need not be exact)
        if asym > 1e3 * torch.finfo(cov.dtype).eps * cov.abs().amax():
            raise ValueError(f"covs must be symmetric; max |Sigma − Sigmaᵀ| = {asym.item():.3g}")
        chol, info = torch.linalg.cholesky_ex(cov)
        if (info != 0).any():
            bad = int(torch.nonzero(info)[0])
            eig = torch.linalg.eigvalsh(cov[bad]).min().item()
            raise ValueError(
                f"covs must be positive definite; covs[{bad}] has smallest eigenvalue {eig:.3g}"
            )
        self.weights = w / w.sum()
        self.means = mu
        self.covs = cov

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    @property
    def n_components(self) -> int:
        return self.means.shape[0]

    def __repr__(self) -> str:
        return f"GaussianMixture(K={self.n_components}, D={self.dim})"

    # ------------------------------------------------------------------ sampling
    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """n samples of p_0, shape (n, D), in the mixture's dtype (n = 0 gives an empty (0, D) tensor:
        a request for no samples, not an input batch)."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"n must be a nonnegative int; got {n!r}")
        k = (torch.multinomial(self.weights, n, replacement=True, generator=generator) if n
             else torch.zeros(0, dtype=torch.long))
        z = torch.randn(n, self.dim, generator=generator, dtype=self.means.dtype)
        chol = torch.linalg.cholesky(self.covs)
        return self.means[k] + (chol[k] @ z.unsqueeze(-1)).squeeze(-1)

    # ------------------------------------------------------------------ time
    def perturbed(self, sde: LinearSDE, t: float | torch.Tensor) -> GaussianMixture:
        """The exact mixture p_t: means alpha mu_k, covariances alpha² Sigma_k + sigma² I (scalar t).

        t = 0 is allowed and gives p_0 (the same weights, means and covariances)."""
        t = torch.as_tensor(t, dtype=self.means.dtype)
        if t.ndim != 0:
            raise ValueError(f"perturbed takes a scalar t; got shape {tuple(t.shape)}")
        alpha, var = sde.marginal_var(t)
        eye = torch.eye(self.dim, dtype=self.means.dtype)
        return GaussianMixture(self.weights, alpha * self.means, alpha**2 * self.covs + var * eye)

    def _params(self, x: torch.Tensor, t, sde: LinearSDE | None):
        """Means (b|1, K, D) and covariances (b|1, K, D, D) of p_t (p_0 if t is None)."""
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise ValueError(f"x must be a floating torch tensor of shape (b, D); got {type(x).__name__} "
                             f"{getattr(x, 'dtype', '')}")
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"x must have shape (b, D) with D = {self.dim}; got shape {tuple(x.shape)}")
        check_batch(x, "x")
        check_finite(x.detach(), "x")
        mu = self.means.to(x)
        cov = self.covs.to(x)
        if t is None:
            return mu[None], cov[None]
        if sde is None:
            raise ValueError("sde must be given together with t")
        t = batch_time(t, x)
        # sigma², not sigma: smooth in t at t = 0, where sigma ~ sqrt(t) has an infinite derivative
        alpha, var = sde.marginal_var(t)
        a = alpha[:, None, None]
        eye = torch.eye(self.dim, dtype=x.dtype, device=x.device)
        return a * mu[None], a[..., None] ** 2 * cov[None] + var[:, None, None, None] * eye

    def _component_terms(self, x: torch.Tensor, t, sde):
        """log w_k + log N_k(x), shape (b, K), and component scores −C_k⁻¹(x − m_k), shape (b, K, D)."""
        mean, cov = self._params(x, t, sde)
        chol = torch.linalg.cholesky(cov)
        diff = (x[:, None, :] - mean).unsqueeze(-1)  # (b, K, D, 1)
        white = torch.linalg.solve_triangular(chol, diff, upper=False)
        maha = white.squeeze(-1).pow(2).sum(-1)
        logdet = 2 * torch.log(torch.diagonal(chol, dim1=-2, dim2=-1)).sum(-1)
        log_n = -0.5 * (maha + logdet + self.dim * math.log(2 * math.pi))
        comp_score = -torch.linalg.solve_triangular(chol.transpose(-1, -2), white, upper=True).squeeze(-1)
        return torch.log(self.weights.to(x))[None] + log_n, comp_score

    def log_prob(self, x: torch.Tensor, t=None, sde: LinearSDE | None = None) -> torch.Tensor:
        """log p_t(x) (log p_0 if t is None) for x of shape (b, D); returns (b,).

        t in [0, 1]; t = 0 gives log p_0, and ∂_t log p there is the finite one-sided limit."""
        log_wn, _ = self._component_terms(x, t, sde)
        return torch.logsumexp(log_wn, dim=-1)

    def score(self, x: torch.Tensor, t=None, sde: LinearSDE | None = None) -> torch.Tensor:
        """∇_x log p_t(x) = Σ_k r_k(x) (−C_k⁻¹(x − alpha mu_k)), shape (b, D).

        t in [0, 1]; t = 0 gives ∇ log p_0, and ∂_t s there (forward-mode AD in t) is the finite
        one-sided limit, so the score-FPE residual of this score is 0 at t = 0 too."""
        log_wn, comp_score = self._component_terms(x, t, sde)
        r = torch.softmax(log_wn, dim=-1)
        return (r.unsqueeze(-1) * comp_score).sum(-2)

    def score_fn(self, sde: LinearSDE):
        """The exact score as a ``score_fn(x, t) -> s`` callable, interchangeable with a network
        (defined at t = 0, unlike a network score −n_θ/sigma(t); see :meth:`score`)."""
        return lambda x, t: self.score(x, t, sde)
