"""fpe_lab.data.digits_gmm: the shipped Gaussian mixture of the 8×8 digits (K = 10, r = 53, D = 64), its
log-likelihood, a deterministic refit, the covariance conversion, and the exact score's FPE residual."""

import numpy as np
import pytest
import torch

from fpe_lab.data import digits_gmm as dg
from fpe_lab.fpe import Estimate, Hutchinson, residual_sq
from fpe_lab.gmm_lowrank import LowRankGaussianMixture
from fpe_lab.sde import VPSDE

pytest.importorskip("sklearn")  # the digits themselves ship with scikit-learn


@pytest.fixture(scope="module")
def shipped() -> LowRankGaussianMixture:
    return dg.digits_gmm()


def test_shipped_file_has_the_documented_shape(shipped):
    assert (shipped.n_components, shipped.rank, shipped.dim) == (dg.COMPONENTS, dg.RANK, dg.DIM) == (10, 53, 64)
    assert shipped.means.dtype == torch.float64
    # lossless conversion: every v_k is the covariance floor (float64 round-off of an eigen-decomposition)
    torch.testing.assert_close(shipped.noise_var, torch.full((10,), dg.REG_COVAR, dtype=torch.float64),
                               rtol=1e-12, atol=0)
    assert float(shipped.means.min()) >= -1 and float(shipped.means.max()) <= 1  # means of data in [−1, 1]


@pytest.mark.parametrize("split, expected", [("train", dg.TRAIN_LOG_LIKELIHOOD), ("test", dg.TEST_LOG_LIKELIHOOD)])
def test_shipped_log_likelihood_is_the_recorded_one(shipped, split, expected):
    ll = float(shipped.log_prob(torch.from_numpy(dg.digits_array(split))).mean())
    # float64 evaluation of the same parameters (sums over 64 dims, ~1e-12); a refit or edit of the file
    # moves the mean by far more (EM from random_state 1, 2, 3 ends 0.06–0.09 nats higher)
    assert abs(ll - expected) < 1e-6


def test_refit_is_deterministic_and_lossless(shipped):
    """The documented fit reproduces the shipped file (~5 s): the same EM solution, the same factors."""
    fit = dg.fit_digits_gmm()
    mix = fit.mixture
    assert fit.converged and (mix.n_components, mix.rank, mix.dim) == (10, 53, 64)
    assert fit.max_cov_rel_error < 1e-12  # lossless conversion: float64 round-off of eigh and U Uᵀ
    x = torch.from_numpy(dg.digits_array("train"))
    # the converted mixture's likelihood is scikit-learn's (same covariances to round-off)
    assert abs(float(mix.log_prob(x).mean()) - fit.sklearn_train_log_likelihood) < 1e-9
    # deterministic EM (fixed random_state): equal up to BLAS summation order
    for name in ("weights", "means", "noise_var"):
        torch.testing.assert_close(getattr(mix, name), getattr(shipped, name), rtol=1e-8, atol=1e-10)
    # covariances U Uᵀ (sign- and rotation-free) and the sign-fixed factors themselves
    torch.testing.assert_close(mix.to_full().covs, shipped.to_full().covs, rtol=1e-8, atol=1e-10)
    # the factors' columns are eigenvectors: where two eigenvalues nearly coincide they are fixed only up to a
    # rotation within their eigenspace, so entries of order 1e-9 move with the BLAS thread count (measured
    # 1.2e-8 at 2 threads); U Uᵀ above is what defines the mixture
    torch.testing.assert_close(mix.factors, shipped.factors, rtol=1e-6, atol=1e-7)


def test_shipped_mixture_is_a_working_data_set(shipped):
    x = shipped.sample(256, torch.Generator().manual_seed(0))
    assert x.shape == (256, 64)
    assert x.abs().mean() < 1.5  # samples live around the [−1, 1] pixel range (no blow-up)
    img = x[:8].reshape(8, *dg.IMAGE_SHAPE)
    s = shipped.score(img, 0.3, VPSDE())
    assert s.shape == img.shape and torch.isfinite(s).all()


def test_exact_digits_score_has_zero_fpe_residual(shipped):
    sde, t = VPSDE(), 0.5  # components overlap: real Hutchinson noise (measured z: exact −0.5, ×1.1 49)
    x = shipped.perturbed(sde, t).sample(64, torch.Generator().manual_seed(1)).reshape(64, *dg.IMAGE_SHAPE)
    score = shipped.score_fn(sde)

    def est(fn):
        probes = Hutchinson(1, generator=torch.Generator().manual_seed(2))
        return Estimate(residual_sq(fn, sde, x, t, divergence=probes))

    exact, wrong = est(score), est(lambda x, t: 1.1 * score(x, t))
    assert exact.se > 0
    assert abs(exact.mean) < 4 * exact.se  # E⟨R̂₁, R̂₂⟩ = ‖R‖² = 0
    assert wrong.mean > 4 * wrong.se  # can fail: ×1.1 has ‖R‖² > 0


def test_to_low_rank_keeps_top_eigenvalues_and_the_trace():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(3, 6, 6))
    covs = a @ a.transpose(0, 2, 1) + 0.5 * np.eye(6)
    w, mu = np.array([0.2, 0.3, 0.5]), rng.normal(size=(3, 6))
    exact = dg.to_low_rank(w, mu, covs, rank=6, floor=0.1)
    # rank D: U Uᵀ + floor I = Sigma (float64 round-off)
    np.testing.assert_allclose(exact.to_full().covs.numpy(), covs, rtol=0, atol=1e-12)
    low = dg.to_low_rank(w, mu, covs, rank=2, floor=0.1)
    lam = np.linalg.eigvalsh(covs)[:, ::-1]
    lam_low = np.linalg.eigvalsh(low.to_full().covs.numpy())[:, ::-1]
    np.testing.assert_allclose(lam_low[:, :2], lam[:, :2], rtol=1e-12)  # top r kept (round-off)
    np.testing.assert_allclose(lam_low.sum(1), lam.sum(1), rtol=1e-12)  # v = mean of the rest: trace kept
    assert dg.to_low_rank(w, mu, covs, floor=0.1).rank == 6  # default: every eigenvalue is above the floor
    with pytest.raises(ValueError, match=r"rank must be None or an int in \[0, D = 6\]"):
        dg.to_low_rank(w, mu, covs, rank=7)
    with pytest.raises(ValueError, match="covs must have shape"):
        dg.to_low_rank(w, mu, covs[:, :, :5])
    with pytest.raises(ValueError, match="floor must be a positive number"):
        dg.to_low_rank(w, mu, covs, floor=0.0)
    with pytest.raises(ValueError, match="split must be one of"):
        dg.digits_array("valid")
