r"""A Gaussian mixture fitted to scikit-learn's 8×8 digits: a data set with exact p_t and score at D = 64.

The shipped mixture (``fpe_lab/data/digits_gmm.npz``, read by :func:`digits_gmm`) is

    p_0(x) = Σ_{k=1}^{K} w_k N(x; mu_k, U_k U_kᵀ + v_k I_64),   K = 10, r = 53, D = 64,

on images x ∈ R^64 (or (1, 8, 8)) in the training scale of :func:`fpe_lab.data.images.load_digits`,
x = 2k/16 − 1 ∈ [−1, 1] for pixel values k ∈ {0, …, 16}. Its perturbed densities and scores under any
linear SDE are closed forms (:class:`fpe_lab.gmm_lowrank.LowRankGaussianMixture`).

How it was made (:func:`fit_digits_gmm`, run by ``studies/digits_gmm/fit.py``):

1. scikit-learn ``GaussianMixture(K, covariance_type="full", reg_covar=1/768, random_state=0,
   n_init=3, max_iter=1000, tol=1e-6)`` fitted by EM to the 1,500 train digits (float64).
   reg_covar = h²/12 with h = 2/16 the grid step: the variance of uniform noise over one grid cell,
   i.e. what dequantization would add; it is also the covariance floor (pixels that never vary,
   such as most of the border, keep exactly this variance).
2. Each covariance Sigma_k = Σ_i λ_i e_i e_iᵀ (λ descending) becomes U_k U_kᵀ + v_k I with
   U_k = [e_1 … e_r] diag(sqrt(max(λ_i − v_k, 0))) and v_k = max(mean(λ_{r+1..D}), floor) — the
   probabilistic-PCA fit of a covariance (Tipping & Bishop 1999), which keeps the top r eigenvalues
   and the trace of the rest. The shipped r = 53 is the largest number of eigenvalues above the floor
   (times 1 + 1e-6) in any component, so every discarded eigenvalue *is* the floor, v_k = 1/768 for
   all k, and the conversion is lossless up to float64 round-off: the shipped mixture is the
   scikit-learn fit. A smaller ``rank`` gives a lossy, genuinely low-rank mixture (see the study's
   summary for the log-likelihood it costs). Eigenvector signs are fixed (largest-magnitude entry
   positive) so a refit reproduces U_k, not only U_k U_kᵀ.

Log-likelihood of the shipped mixture (mean nats per image, continuous density on the scaled grid,
not bits/dim of the discrete images): :data:`TRAIN_LOG_LIKELIHOOD` on the 1,500 train digits and
:data:`TEST_LOG_LIKELIHOOD` on the 297 test digits (the gap is EM overfitting with 10 full
covariances; it does not matter for using p_0 as a data set with known score).
"""

from __future__ import annotations

import importlib.resources
from dataclasses import dataclass

import numpy as np
import torch

from fpe_lab.gmm_lowrank import LowRankGaussianMixture

__all__ = [
    "DIGITS_GMM_FILE",
    "COMPONENTS",
    "RANK",
    "DIM",
    "IMAGE_SHAPE",
    "REG_COVAR",
    "RANDOM_STATE",
    "N_INIT",
    "MAX_ITER",
    "TOL",
    "RANK_REL_TOL",
    "TRAIN_LOG_LIKELIHOOD",
    "TEST_LOG_LIKELIHOOD",
    "DigitsFit",
    "digits_gmm",
    "digits_array",
    "fit_digits_gmm",
    "to_low_rank",
]

DIGITS_GMM_FILE = "digits_gmm.npz"
"""The shipped parameters, next to this module (package ``fpe_lab.data``)."""
COMPONENTS = 10
"""K of the shipped mixture."""
RANK = 53
"""r of the shipped mixture: the most eigenvalues above the floor in any fitted covariance."""
DIM = 64
"""D = 8·8."""
IMAGE_SHAPE = (1, 8, 8)
"""(C, H, W) of one digit, as :func:`fpe_lab.data.images.load_digits`."""
REG_COVAR = (2.0 / 16) ** 2 / 12
"""h²/12 = 1/768, h = 2/16 the grid step in [−1, 1]: scikit-learn's reg_covar and the floor of v_k."""
RANDOM_STATE = 0
N_INIT = 3
MAX_ITER = 1000
TOL = 1e-6
RANK_REL_TOL = 1e-6
"""An eigenvalue counts as above the floor when λ > floor·(1 + RANK_REL_TOL) (null-space eigenvalues
equal the floor to ~1e-15 absolute; the smallest one above it is far from the threshold)."""
TRAIN_LOG_LIKELIHOOD = 41.48527436970684
"""Mean log p_0 (nats per image) of the shipped mixture on the 1,500 train digits, scaled to [−1, 1]."""
TEST_LOG_LIKELIHOOD = 18.202069762503648
"""Mean log p_0 (nats per image) of the shipped mixture on the 297 test digits."""


def digits_gmm(dtype: torch.dtype = torch.float64) -> LowRankGaussianMixture:
    """The shipped digits mixture (K = 10, r = 53, D = 64; see the module docstring).

    x of shape (b, 64) or (b, 1, 8, 8) in the [−1, 1] training scale. Raises ``FileNotFoundError``
    when the package was installed without its data file."""
    res = importlib.resources.files("fpe_lab.data").joinpath(DIGITS_GMM_FILE)
    with importlib.resources.as_file(res) as path:
        if not path.is_file():
            raise FileNotFoundError(
                f"{DIGITS_GMM_FILE} is missing from the fpe_lab.data package ({path}); reinstall fpe_lab with "
                "its package data, or recreate it with `python studies/digits_gmm/fit.py`"
            )
        return LowRankGaussianMixture.load(path, dtype=dtype)


def digits_array(split: str = "train") -> np.ndarray:
    """The 8×8 digits as float64 (n, 64) in [−1, 1], the scaling of :func:`fpe_lab.data.images.load_digits`
    (x = 2k/16 − 1). ``split``: "train" (1,500 images) or "test" (297). Needs scikit-learn."""
    from fpe_lab.data.images import ImageSplit, load_digits

    try:
        which = ImageSplit(split)
    except ValueError:
        raise ValueError(f"split must be one of {[s.value for s in ImageSplit]}; got {split!r}") from None
    data = load_digits(which)
    return data.scale(data.pixels, torch.float64).reshape(len(data), -1).numpy()


def to_low_rank(weights: np.ndarray, means: np.ndarray, covs: np.ndarray, rank: int | None = None,
                floor: float = REG_COVAR) -> LowRankGaussianMixture:
    """Convert full covariances (K, D, D) to U_k U_kᵀ + v_k I (probabilistic PCA per component).

    With Sigma_k = Σ_i λ_i e_i e_iᵀ (λ descending): U_k = [e_1 … e_r] diag(sqrt(max(λ_i − v_k, 0))),
    v_k = max(mean(λ_{r+1..D}), floor) (v_k = floor when r = D). ``rank`` None: the largest count of
    eigenvalues above floor·(1 + :data:`RANK_REL_TOL`) over the components, which is lossless when the
    covariances' smallest eigenvalues equal the floor. Each column's largest-magnitude entry is made
    positive, so the factors are reproducible, not only U Uᵀ."""
    covs = np.asarray(covs, dtype=np.float64)
    if covs.ndim != 3 or covs.shape[1] != covs.shape[2]:
        raise ValueError(f"covs must have shape (K, D, D); got shape {covs.shape}")
    if not (isinstance(floor, (int, float)) and floor > 0):
        raise ValueError(f"floor must be a positive number; got {floor!r}")
    d = covs.shape[1]
    lam, vec = np.linalg.eigh(0.5 * (covs + covs.transpose(0, 2, 1)))
    lam, vec = lam[:, ::-1], vec[:, :, ::-1]  # descending
    if rank is None:
        rank = int((lam > floor * (1 + RANK_REL_TOL)).sum(1).max())
    if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)) or not 0 <= rank <= d:
        raise ValueError(f"rank must be None or an int in [0, D = {d}]; got {rank!r}")
    rest = lam[:, rank:]
    v = np.maximum(rest.mean(1) if rest.shape[1] else np.full(len(lam), floor), floor)
    e = vec[:, :, :rank]
    pivot = np.take_along_axis(e, np.abs(e).argmax(1)[:, None, :], axis=1)  # (K, 1, r)
    e = e * np.where(pivot < 0, -1.0, 1.0)
    u = e * np.sqrt(np.maximum(lam[:, :rank] - v[:, None], 0.0))[:, None, :]
    return LowRankGaussianMixture(weights, means, u, v)


@dataclass(frozen=True)
class DigitsFit:
    """The result of :func:`fit_digits_gmm`.

    Attributes:
        mixture: the low-rank-plus-isotropic mixture.
        sklearn_train_log_likelihood: scikit-learn's mean log-likelihood (full covariances) on the train digits.
        converged, n_iter: scikit-learn's EM diagnostics for the best of the n_init runs.
        max_cov_rel_error: max_k ‖U_k U_kᵀ + v_k I − Sigma_k‖_F / ‖Sigma_k‖_F of the conversion.
    """

    mixture: LowRankGaussianMixture
    sklearn_train_log_likelihood: float
    converged: bool
    n_iter: int
    max_cov_rel_error: float


def fit_digits_gmm(n_components: int = COMPONENTS, rank: int | None = None, random_state: int = RANDOM_STATE,
                   n_init: int = N_INIT) -> DigitsFit:
    """Fit scikit-learn's full-covariance ``GaussianMixture`` to the 1,500 train digits (reg_covar and
    EM settings as in the module docstring) and convert it with :func:`to_low_rank` (``rank`` None:
    lossless). Deterministic for fixed arguments. Needs scikit-learn."""
    try:
        from sklearn.mixture import GaussianMixture as SkGaussianMixture
    except ImportError as e:
        raise ImportError("fitting the digits mixture needs scikit-learn: `pip install scikit-learn`") from e
    x = digits_array("train")
    sk = SkGaussianMixture(n_components, covariance_type="full", reg_covar=REG_COVAR, random_state=random_state,
                           n_init=n_init, max_iter=MAX_ITER, tol=TOL).fit(x)
    mix = to_low_rank(sk.weights_, sk.means_, sk.covariances_, rank=rank)
    full = mix.to_full().covs.numpy()
    err = np.linalg.norm(full - sk.covariances_, axis=(1, 2)) / np.linalg.norm(sk.covariances_, axis=(1, 2))
    return DigitsFit(mixture=mix, sklearn_train_log_likelihood=float(sk.score(x)), converged=bool(sk.converged_),
                     n_iter=int(sk.n_iter_), max_cov_rel_error=float(err.max()))
