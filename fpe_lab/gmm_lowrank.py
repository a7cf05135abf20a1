r"""Gaussian mixtures with low-rank-plus-isotropic covariances: exact p_t and ∇ log p_t in image dimension.

Data density on R^D (K components, rank r):

    p_0(x) = Σ_k w_k N(x; mu_k, Sigma_k),   Sigma_k = U_k U_kᵀ + v_k I_D,   U_k of shape (D, r), v_k > 0.

Under a linear SDE with x_t | x_0 ~ N(alpha x_0, sigma² I) each component stays of this form:

    p_t(x) = Σ_k w_k N(x; alpha mu_k, C_k),   C_k = W_k W_kᵀ + c_k I_D,   W_k = alpha U_k,  c_k = alpha² v_k + sigma².

With M_k = c_k I_r + W_kᵀ W_k = c_k I_r + alpha² U_kᵀ U_k (r × r, SPD) and its Cholesky factor L_k,
the Woodbury identity and the matrix determinant lemma give, with d = x − alpha mu_k,

    C_k⁻¹ = c_k⁻¹ (I − W_k M_k⁻¹ W_kᵀ),            i.e. (vI + UUᵀ)⁻¹ = v⁻¹(I − U(vI_r + UᵀU)⁻¹Uᵀ),
    log det C_k = (D − r) log c_k + log det M_k,   i.e. log det(vI + UUᵀ) = (D − r) log v + log det(vI_r + UᵀU),
    dᵀ C_k⁻¹ d = c_k⁻¹ (‖d‖² − ‖L_k⁻¹ W_kᵀ d‖²),
    −C_k⁻¹ d = −c_k⁻¹ (d − W_k M_k⁻¹ W_kᵀ d),
    log p_t(x) = logsumexp_k [log w_k − ½(D log 2π + log det C_k + dᵀ C_k⁻¹ d)],
    ∇ log p_t(x) = Σ_k r_k(x) (−C_k⁻¹ d),   r_k = softmax_k(log w_k + log N_k(x)).

Cost per point O(K·D·r) (plus O(K·r³) per distinct t); no D × D matrix is ever formed — only r × r
Cholesky factors and triangular solves — so D = 3072 (CIFAR-sized) is cheap. The r × r Gram matrices
U_kᵀ U_k are formed once. Everything is torch and differentiable in x and t, so the score-FPE residual
of the exact score comes from the autograd machinery in :mod:`fpe_lab.fpe` (``ForwardModeDt`` in t,
reverse mode in x). As in :mod:`fpe_lab.gmm`, the transition is built from ``sde.marginal_var``
(alpha, sigma²), smooth in t at t = 0, and t = 0 gives p_0 itself.

Shapes: x is (b, D) or any (b, *dims) with prod(dims) = D (e.g. (b, C, H, W)); ``log_prob`` returns (b,),
``score`` the shape of x. t is None (p_0), a scalar, or per-sample (b,). Parameters are stored in
float64 unless another floating ``dtype`` is given; evaluation runs in x's dtype and device.

r = 0 is allowed (isotropic components v_k I).
"""

from __future__ import annotations

import math
import os
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import torch

from fpe_lab.checks import check_batch, check_finite
from fpe_lab.gmm import GaussianMixture
from fpe_lab.sde import LinearSDE
from fpe_lab.shapes import batch_time

__all__ = ["LowRankGaussianMixture", "WEIGHT_SUM_TOL", "NPZ_KEYS"]

WEIGHT_SUM_TOL = 1e-6
"""|Σ_k w_k − 1| allowed before the weights are renormalised exactly (room for float32 round-off)."""
NPZ_KEYS = ("weights", "means", "factors", "noise_var")
"""The arrays a saved mixture holds (:meth:`LowRankGaussianMixture.save`)."""


def _tensor(v, name: str, dtype: torch.dtype) -> torch.Tensor:
    try:
        out = torch.as_tensor(v if isinstance(v, torch.Tensor) else np.asarray(v))
    except (TypeError, ValueError, RuntimeError) as e:
        raise ValueError(f"{name} must be array-like of real numbers; got {type(v).__name__}: {e}") from None
    if out.dtype == torch.bool or out.is_complex():
        raise ValueError(f"{name} must hold real numbers; got dtype {out.dtype}")
    return out.to(dtype)


class LowRankGaussianMixture:
    """p_0(x) = Σ_k w_k N(x; mu_k, U_k U_kᵀ + v_k I) on R^D (see the module docstring for the formulas).

    Args:
        weights: (K,), K >= 1, each > 0, summing to 1 (within :data:`WEIGHT_SUM_TOL`; renormalised).
        means: (K, D), D >= 1.
        factors: (K, D, r), r >= 0: the low-rank factors U_k.
        noise_var: (K,), each > 0: the isotropic variances v_k.
        dtype: floating storage dtype (default float64).

    All inputs must be finite. Invalid input raises ``ValueError`` naming the argument and what is allowed.
    """

    def __init__(self, weights, means, factors, noise_var, dtype: torch.dtype = torch.float64) -> None:
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating torch dtype; got {dtype!r}")
        w = _tensor(weights, "weights", dtype)
        mu = _tensor(means, "means", dtype)
        u = _tensor(factors, "factors", dtype)
        v = _tensor(noise_var, "noise_var", dtype)
        if w.ndim != 1 or w.numel() == 0:
            raise ValueError(f"weights must have shape (K,) with K >= 1; got shape {tuple(w.shape)}")
        k = w.shape[0]
        if mu.ndim != 2 or mu.shape[0] != k or mu.shape[1] == 0:
            raise ValueError(f"means must have shape (K, D) = ({k}, D) with D >= 1; got shape {tuple(mu.shape)}")
        d = mu.shape[1]
        if u.ndim != 3 or u.shape[:2] != (k, d):
            raise ValueError(f"factors must have shape (K, D, r) = ({k}, {d}, r); got shape {tuple(u.shape)}")
        if v.shape != (k,):
            raise ValueError(f"noise_var must have shape (K,) = ({k},); got shape {tuple(v.shape)}")
        for t, name in ((w, "weights"), (mu, "means"), (u, "factors"), (v, "noise_var")):
            check_finite(t, name)
        if (w <= 0).any():
            raise ValueError(f"weights must all be > 0; got min {w.min().item()!r}")
        total = w.sum().item()
        if abs(total - 1.0) > WEIGHT_SUM_TOL:
            raise ValueError(f"weights must sum to 1 (within {WEIGHT_SUM_TOL:g}); got sum {total!r}")
        if (v <= 0).any():
            raise ValueError(f"noise_var must all be > 0 (v_k I keeps each covariance positive definite); "
                             f"got min {v.min().item()!r}")
        self.weights = w / w.sum()
        self.means = mu
        self.factors = u
        self.noise_var = v
        self.gram = u.transpose(-1, -2) @ u  # (K, r, r) U_kᵀ U_k, formed once

    # ------------------------------------------------------------------ properties
    @property
    def dim(self) -> int:
        """D."""
        return self.means.shape[1]

    @property
    def n_components(self) -> int:
        """K."""
        return self.means.shape[0]

    @property
    def rank(self) -> int:
        """r, the number of columns of each U_k."""
        return self.factors.shape[2]

    def __repr__(self) -> str:
        v = self.noise_var
        return (f"LowRankGaussianMixture(K={self.n_components}, D={self.dim}, r={self.rank}, "
                f"noise_var in [{v.min().item():.3g}, {v.max().item():.3g}], dtype={self.means.dtype})")

    # ------------------------------------------------------------------ conversions
    def to_full(self) -> GaussianMixture:
        """The same law as a :class:`~fpe_lab.gmm.GaussianMixture` with covariances U_k U_kᵀ + v_k I,
        shape (K, D, D): forms D × D matrices, so for tests and small D only."""
        cov = self.factors @ self.factors.transpose(-1, -2)
        cov = 0.5 * (cov + cov.transpose(-1, -2))
        cov = cov + self.noise_var[:, None, None] * torch.eye(self.dim, dtype=cov.dtype)
        return GaussianMixture(self.weights, self.means, cov, dtype=self.means.dtype)

    def perturbed(self, sde: LinearSDE, t: float | torch.Tensor) -> LowRankGaussianMixture:
        """The exact p_t (scalar t) as a mixture of the same form: means alpha mu_k, factors alpha U_k,
        noise variances alpha² v_k + sigma². t = 0 gives p_0."""
        tt = torch.as_tensor(t, dtype=self.means.dtype)
        if tt.ndim != 0:
            raise ValueError(f"perturbed takes a scalar t; got shape {tuple(tt.shape)}")
        alpha, var = sde.marginal_var(tt)
        return LowRankGaussianMixture(self.weights, alpha * self.means, alpha * self.factors,
                                      alpha**2 * self.noise_var + var, dtype=self.means.dtype)

    # ------------------------------------------------------------------ sampling
    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """n samples of p_0, shape (n, D), in the mixture's dtype: x = mu_k + U_k z_r + sqrt(v_k) z_D.

        Draws, in order from ``generator``: component indices k ~ w, z_D ~ N(0, I_D) of shape (n, D),
        z_r ~ N(0, I_r) of shape (n, r). O(n·D·r). n = 0 gives an empty (0, D) tensor."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"n must be a nonnegative int; got {n!r}")
        dt = self.means.dtype
        k = (torch.multinomial(self.weights, n, replacement=True, generator=generator) if n
             else torch.zeros(0, dtype=torch.long))
        z_d = torch.randn(n, self.dim, generator=generator, dtype=dt)
        z_r = torch.randn(n, self.rank, generator=generator, dtype=dt)
        low = torch.einsum("ndr,nr->nd", self.factors[k], z_r)
        return self.means[k] + low + self.noise_var[k].sqrt()[:, None] * z_d

    # ------------------------------------------------------------------ density and score
    def _flatten(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise ValueError(f"x must be a floating torch tensor of shape (b, D) or (b, *dims); got "
                             f"{type(x).__name__} {getattr(x, 'dtype', '')}")
        if x.ndim < 2:
            raise ValueError(f"x must have shape (b, D) or (b, *dims) with prod(dims) = {self.dim}; "
                             f"got shape {tuple(x.shape)}")
        check_batch(x, "x")
        flat = x.reshape(x.shape[0], -1)
        if flat.shape[1] != self.dim:
            raise ValueError(f"x must have D = {self.dim} coordinates per sample; got shape {tuple(x.shape)} "
                             f"({flat.shape[1]} per sample)")
        check_finite(x.detach(), "x")
        return flat

    def _component_terms(self, x: torch.Tensor, t, sde: LinearSDE | None, want_score: bool):
        """log w_k + log N_k(x) of shape (b, K), and (if ``want_score``) −C_k⁻¹ d of shape (b, K, D)."""
        xf = self._flatten(x)
        mu, u, gram = self.means.to(xf), self.factors.to(xf), self.gram.to(xf)
        v, logw = self.noise_var.to(xf), torch.log(self.weights.to(xf))
        if t is None:
            alpha = torch.ones(1, dtype=xf.dtype, device=xf.device)
            var = torch.zeros(1, dtype=xf.dtype, device=xf.device)
        else:
            if sde is None:
                raise ValueError("sde must be given together with t")
            # sigma², not sigma: smooth in t at t = 0, where sigma ~ sqrt(t) has an infinite derivative
            alpha, var = sde.marginal_var(batch_time(t, xf))  # (b,) each
        d_dim, r = self.dim, self.rank
        a2 = alpha**2
        c = a2[:, None] * v[None] + var[:, None]  # (b|1, K)
        eye_r = torch.eye(r, dtype=xf.dtype, device=xf.device)
        m = c[..., None, None] * eye_r + a2[:, None, None, None] * gram[None]  # (b|1, K, r, r)
        chol = torch.linalg.cholesky(m)
        d = xf[:, None, :] - alpha[:, None, None] * mu[None]  # (b, K, D)
        wtd = alpha[:, None, None] * torch.einsum("bkd,kdr->bkr", d, u)  # W_kᵀ d, (b, K, r)
        z = torch.linalg.solve_triangular(chol, wtd.unsqueeze(-1), upper=False)  # L⁻¹ Wᵀ d, (b, K, r, 1)
        maha = (d.pow(2).sum(-1) - z.squeeze(-1).pow(2).sum(-1)) / c
        logdet = (d_dim - r) * torch.log(c) + 2 * torch.log(torch.diagonal(chol, dim1=-2, dim2=-1)).sum(-1)
        log_wn = logw[None] - 0.5 * (maha + logdet + d_dim * math.log(2 * math.pi))
        if not want_score:
            return log_wn, None
        y = torch.linalg.solve_triangular(chol.transpose(-1, -2), z, upper=True).squeeze(-1)  # M⁻¹ Wᵀ d
        w_y = alpha[:, None, None] * torch.einsum("kdr,bkr->bkd", u, y)  # W M⁻¹ Wᵀ d, (b, K, D)
        return log_wn, -(d - w_y) / c[..., None]

    def log_prob(self, x: torch.Tensor, t=None, sde: LinearSDE | None = None) -> torch.Tensor:
        """log p_t(x) (log p_0 if t is None) for x of shape (b, D) or (b, *dims); returns (b,).

        t: scalar or (b,) in [0, 1], with ``sde``; t = 0 gives log p_0."""
        log_wn, _ = self._component_terms(x, t, sde, want_score=False)
        return torch.logsumexp(log_wn, dim=-1)

    def score(self, x: torch.Tensor, t=None, sde: LinearSDE | None = None) -> torch.Tensor:
        """∇_x log p_t(x) = Σ_k r_k(x) (−C_k⁻¹(x − alpha mu_k)), the shape of x ((b, D) or (b, *dims)).

        t: scalar or (b,) in [0, 1], with ``sde``; None gives ∇ log p_0."""
        log_wn, comp = self._component_terms(x, t, sde, want_score=True)
        resp = torch.softmax(log_wn, dim=-1)
        return (resp.unsqueeze(-1) * comp).sum(-2).reshape(x.shape)

    def score_fn(self, sde: LinearSDE):
        """The exact score as ``score_fn(x, t) -> s`` (x of shape (b, *dims), t of shape (b,) or scalar),
        interchangeable with a network in :mod:`fpe_lab.fpe`."""
        return lambda x, t: self.score(x, t, sde)

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | os.PathLike) -> Path:
        """Write the parameters (float64 arrays :data:`NPZ_KEYS`) to an ``.npz`` file, atomically: a temp
        file in the target folder, then ``os.replace``. Returns the path."""
        path = Path(path)
        if path.suffix != ".npz":
            raise ValueError(f"path must end in .npz; got {str(path)!r}")
        arrays = {k: getattr(self, k).detach().cpu().to(torch.float64).numpy() for k in NPZ_KEYS}
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent if str(path.parent) else ".")
        try:
            with os.fdopen(fd, "wb") as fh:
                np.savez(fh, **arrays)
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the file the usual permissions
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, dtype: torch.dtype = torch.float64) -> LowRankGaussianMixture:
        """The mixture saved by :meth:`save` (the arrays :data:`NPZ_KEYS`; no pickles are read)."""
        path = Path(path)
        try:
            with np.load(path, allow_pickle=False) as f:
                missing = [k for k in NPZ_KEYS if k not in f.files]
                if missing:
                    raise ValueError(f"{path} is not a saved LowRankGaussianMixture: missing arrays {missing} "
                                     f"(has {sorted(f.files)}; needs {list(NPZ_KEYS)})")
                arrays = {k: f[k] for k in NPZ_KEYS}
        except (OSError, EOFError, zipfile.BadZipFile) as e:
            if isinstance(e, FileNotFoundError):
                raise
            raise ValueError(f"cannot read {path} as an .npz file: {e}") from e
        return cls(arrays["weights"], arrays["means"], arrays["factors"], arrays["noise_var"], dtype=dtype)
