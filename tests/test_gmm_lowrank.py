"""fpe_lab.gmm_lowrank.LowRankGaussianMixture: the Woodbury fast path against the full-covariance
GaussianMixture, the exact score's score-FPE residual up to D = 3072, memory, persistence and bad input.
All in float64."""

import math
import os
import time

import numpy as np
import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from fpe_lab.fpe import Estimate, Hutchinson, residual_sq, score_fpe_terms
from fpe_lab.gmm import GaussianMixture
from fpe_lab.gmm_lowrank import NPZ_KEYS, LowRankGaussianMixture
from fpe_lab.sde import SubVPSDE, VESDE, VPSDE

F64 = torch.float64


def random_mixture(k: int, d: int, r: int, seed: int = 0) -> LowRankGaussianMixture:
    """Weights in [0.2, 1.2] (normalised), means of norm ~3 (components overlap once sigma ~ 1),
    factors N(0, 1/D) (each column of norm ~1), v_k in [0.05, 0.25]."""
    g = torch.Generator().manual_seed(seed)
    w = torch.rand(k, generator=g, dtype=F64) + 0.2
    mu = 3 * torch.randn(k, d, generator=g, dtype=F64) / math.sqrt(d)
    u = torch.randn(k, d, r, generator=g, dtype=F64) / math.sqrt(d)
    v = 0.05 + 0.2 * torch.rand(k, generator=g, dtype=F64)
    return LowRankGaussianMixture(w / w.sum(), mu, u, v)


def points(mix: LowRankGaussianMixture, n: int, seed: int = 1) -> torch.Tensor:
    """Samples of p_0 and the same spread 3× wider (far from the modes), (2n, D)."""
    x = mix.sample(n, torch.Generator().manual_seed(seed))
    return torch.cat([x, 3 * x])


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max over samples of ‖a − b‖ / ‖b‖ (rows; scalars per sample for (b,))."""
    a2, b2 = a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1)
    return float(((a2 - b2).norm(dim=-1) / b2.norm(dim=-1)).max())


# ----------------------------------------------------------------------------- agreement with the full form
@pytest.mark.parametrize("d, r", [(8, 3), (64, 8), (8, 0), (8, 12)], ids=["D8r3", "D64r8", "D8r0", "D8r12>D"])
@pytest.mark.parametrize("t", [None, 0.0, 1e-3, 0.3, 1.0])
def test_fast_path_equals_full_covariance_mixture(any_sde, d, r, t):
    mix = random_mixture(4, d, r, seed=d + r)
    full = mix.to_full()
    assert isinstance(full, GaussianMixture)
    x = points(mix, 16)
    sde = None if t is None else any_sde
    lp, lp_full = mix.log_prob(x, t, sde), full.log_prob(x, t, sde)
    s, s_full = mix.score(x, t, sde), full.score(x, t, sde)
    # float64 round-off: Woodbury vs a D×D Cholesky, covariance condition numbers < 1e3 (measured < 2e-14)
    assert rel_err(lp, lp_full) < 1e-10
    assert rel_err(s, s_full) < 1e-10


def test_per_sample_time_equals_scalar_time_row_by_row(any_sde):
    mix = random_mixture(3, 64, 8)
    x = points(mix, 4)
    t = torch.linspace(0.0, 1.0, x.shape[0], dtype=F64)
    s, lp = mix.score(x, t, any_sde), mix.log_prob(x, t, any_sde)
    full = mix.to_full()
    assert rel_err(s, full.score(x, t, any_sde)) < 1e-10  # float64 round-off, as above
    for i in (0, 3, 7):
        row = x[i : i + 1]
        # the same arithmetic on a batch of one: agreement to a few ulps
        torch.testing.assert_close(s[i : i + 1], mix.score(row, float(t[i]), any_sde), rtol=1e-13, atol=1e-13)
        torch.testing.assert_close(lp[i : i + 1], mix.log_prob(row, float(t[i]), any_sde), rtol=1e-13, atol=1e-13)


def test_score_is_the_gradient_of_log_prob_and_perturbed_is_p_t(any_sde):
    mix = random_mixture(5, 64, 8, seed=3)
    x = points(mix, 8).requires_grad_(True)
    t = 0.2
    (grad,) = torch.autograd.grad(mix.log_prob(x, t, any_sde).sum(), x)
    assert rel_err(mix.score(x.detach(), t, any_sde), grad) < 1e-10  # float64 round-off of two computations
    p_t = mix.perturbed(any_sde, t)
    assert (p_t.dim, p_t.n_components, p_t.rank) == (64, 5, 8)
    assert rel_err(p_t.log_prob(x.detach()), mix.log_prob(x.detach(), t, any_sde)) < 1e-12  # same formulas, reordered
    assert rel_err(p_t.score(x.detach()), mix.score(x.detach(), t, any_sde)) < 1e-12


def test_t_zero_is_p_0_and_images_are_flattened():
    mix = random_mixture(3, 48, 4)
    x = points(mix, 4)
    sde = VPSDE()
    torch.testing.assert_close(mix.log_prob(x, 0.0, sde), mix.log_prob(x), rtol=0, atol=0)
    img = x.reshape(-1, 3, 4, 4)
    s_img = mix.score(img, 0.4, sde)
    assert s_img.shape == img.shape
    torch.testing.assert_close(s_img.reshape(x.shape), mix.score(x, 0.4, sde), rtol=0, atol=0)
    torch.testing.assert_close(mix.log_prob(img, 0.4, sde), mix.log_prob(x, 0.4, sde), rtol=0, atol=0)
    fn = mix.score_fn(sde)
    tt = torch.full((x.shape[0],), 0.4, dtype=F64)
    torch.testing.assert_close(fn(img, tt), s_img, rtol=0, atol=0)


def test_sample_moments_match_the_mixture():
    mix = random_mixture(3, 6, 2, seed=5)
    n = 40_000
    x = mix.sample(n, torch.Generator().manual_seed(0))
    assert x.shape == (n, 6) and x.dtype == F64
    full = mix.to_full()
    mean = full.weights @ full.means
    second = torch.einsum("k,kij->ij", full.weights, full.covs + full.means[:, :, None] * full.means[:, None, :])
    cov = second - torch.outer(mean, mean)
    se = (cov.diagonal() / n).sqrt()
    assert torch.all((x.mean(0) - mean).abs() < 5 * se)  # 5 SE per coordinate at this fixed seed
    # sample covariance: relative Frobenius error ~ sqrt(D/n) ≈ 0.01; 0.05 leaves room
    assert (torch.cov(x.T) - cov).norm() / cov.norm() < 0.05
    assert mix.sample(0).shape == (0, 6)
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    torch.testing.assert_close(mix.sample(5, g1), mix.sample(5, g2), rtol=0, atol=0)


def test_float32_mixture_evaluates_in_float32():
    mix64 = random_mixture(3, 16, 2)
    mix32 = LowRankGaussianMixture(mix64.weights, mix64.means, mix64.factors, mix64.noise_var, dtype=torch.float32)
    x = points(mix64, 4)
    s = mix32.score(x.float(), 0.3, VESDE())
    assert s.dtype == torch.float32
    assert rel_err(s.double(), mix64.score(x, 0.3, VESDE())) < 1e-4  # float32 round-off


# ----------------------------------------------------------------------------- score FPE residual
def residual_estimate(fn, sde, x, t, seed: int = 2) -> Estimate:
    """Per-sample unbiased ⟨R̂₁, R̂₂⟩ (two independent Hutchinson probe sets), as fpe.residual_sq computes it."""
    return Estimate(residual_sq(fn, sde, x, t, divergence=Hutchinson(1, generator=torch.Generator().manual_seed(seed))))


def roundoff_floor(fn, sde, x, t) -> float:
    """(1e-12 · rms size of the score-FPE terms)²: float64 round-off of an exactly cancelling R.

    Where the components are well separated, the Hutchinson noise of the exact score vanishes
    (within one component ∇·s is constant in x) and ⟨R̂₁, R̂₂⟩ = ‖R_round-off‖² > 0 with a tiny SE;
    measured sqrt(mean)/scale ≤ 3e-16 there, so 1e-12 leaves four orders of margin."""
    scale = score_fpe_terms(fn, sde, x, t, divergence=Hutchinson(1, generator=torch.Generator().manual_seed(9))).scale
    return float((1e-12 * scale).pow(2).mean())


def check_residual(mix, sde, x, t, lag: float | None = None) -> dict[str, tuple[float, float]]:
    """Exact score: |mean| < 4 SE (+ round-off floor). Wrong scores at the same points — ×1.1, and the
    score at the lagged time t − ``lag`` when given — must read mean > 4 SE above that band, so the
    check can fail. Returns {name: (mean, SE)}."""
    exact = mix.score_fn(sde)
    floor = roundoff_floor(exact, sde, x, t)
    est = residual_estimate(exact, sde, x, t)
    assert est.se > 0
    assert abs(est.mean) < 4 * est.se + floor, (est.mean, est.se, floor)  # E⟨R̂₁, R̂₂⟩ = ‖R‖² = 0
    wrong = {"scaled": lambda x, t: 1.1 * exact(x, t)}
    if lag is not None:
        assert float(torch.as_tensor(t).min()) > lag
        wrong["lagged"] = lambda x, t: exact(x, t - lag)
    out = {"exact": (est.mean, est.se)}
    for name, fn in wrong.items():
        bad = residual_estimate(fn, sde, x, t)
        out[name] = (bad.mean, bad.se)
        assert bad.mean - floor > 4 * bad.se, (name, bad.mean, bad.se)  # ‖R‖² > 0 is detected
    return out


@pytest.mark.parametrize("sde", [VPSDE(), VESDE(), SubVPSDE()], ids=["vp", "ve", "subvp"])
def test_exact_score_has_zero_fpe_residual_at_d64(sde):
    mix = random_mixture(10, 64, 8)
    t = 0.6  # components overlap here: the Hutchinson noise is real, the z-test meaningful
    x = mix.perturbed(sde, t).sample(64, torch.Generator().manual_seed(1))
    # measured z = mean/SE: exact −2.3 (VP), 0.4 (VE), −2.3 (sub-VP); ×1.1: 53, 8.8, 53
    check_residual(mix, sde, x, t)


def test_exact_score_has_zero_fpe_residual_with_per_sample_times_at_d64():
    sde = VPSDE()
    mix = random_mixture(10, 64, 8)
    g = torch.Generator().manual_seed(4)
    t = 0.4 + 0.4 * torch.rand(64, generator=g, dtype=F64)
    x0 = mix.sample(64, g)
    alpha, var = sde.marginal_var(t)
    x = alpha[:, None] * x0 + var.sqrt()[:, None] * torch.randn(x0.shape, generator=g, dtype=F64)
    check_residual(mix, sde, x, t)


def test_exact_score_has_zero_fpe_residual_on_cifar_sized_images():
    """D = 3072 as (b, 3, 32, 32), K = 10, r = 8, 32 points (~2 s)."""
    sde = VPSDE()
    mix = random_mixture(10, 3072, 8)
    t = 0.6
    x = mix.perturbed(sde, t).sample(32, torch.Generator().manual_seed(1)).reshape(32, 3, 32, 32)
    # measured z = mean/SE: exact 0.0, ×1.1 226, lagged by 0.03 36
    check_residual(mix, sde, x, t, lag=0.03)


@pytest.mark.slow
@pytest.mark.parametrize("t", [0.02, 0.2, 0.6, 1.0])
def test_exact_score_residual_on_cifar_sized_images_all_sdes_and_times(any_sde, t):
    """Exact score only: at small t the components are separated and only the round-off floor remains."""
    mix = random_mixture(10, 3072, 8)
    x = mix.perturbed(any_sde, t).sample(32, torch.Generator().manual_seed(1)).reshape(32, 3, 32, 32)
    exact = mix.score_fn(any_sde)
    floor = roundoff_floor(exact, any_sde, x, t)
    est = residual_estimate(exact, any_sde, x, t)
    assert abs(est.mean) < 4 * est.se + floor, (est.mean, est.se, floor)  # E = 0, or round-off where SE ≈ 0


# ----------------------------------------------------------------------------- memory and time at D = 3072
def test_cifar_sized_score_never_forms_a_d_by_d_matrix():
    """K = 10, r = 8, D = 3072, batch 16: every allocation is at most the (b, K, D) difference tensor
    (3.9 MB), far below one D × D float64 matrix (75 MB); and the score takes milliseconds."""
    k, d, r, b = 10, 3072, 8, 16
    mix = random_mixture(k, d, r)
    x = mix.sample(b, torch.Generator().manual_seed(0))
    sde = VPSDE()
    mix.score(x, 0.5, sde)  # warm-up (lazy initialisation)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        s = mix.score(x, torch.full((b,), 0.5, dtype=F64), sde)
        mix.log_prob(x, 0.5, sde)
    biggest = max(e.cpu_memory_usage for e in prof.events())
    assert s.shape == (b, d)
    assert 0 < biggest <= b * k * d * 8 < d * d * 8
    start = time.perf_counter()
    mix.score(x, 0.5, sde)
    # measured ~15 ms on one core; 2 s allows a loaded shared machine, a (b, K, D, D) path would take minutes
    assert time.perf_counter() - start < 2.0


# ----------------------------------------------------------------------------- persistence
def test_save_load_round_trip(tmp_path):
    mix = random_mixture(4, 12, 3)
    path = mix.save(tmp_path / "mix.npz")
    assert path == tmp_path / "mix.npz"
    assert os.listdir(tmp_path) == ["mix.npz"]  # the temp file was renamed, nothing left behind
    with np.load(path) as f:
        assert sorted(f.files) == sorted(NPZ_KEYS)
    back = LowRankGaussianMixture.load(path)
    for name in NPZ_KEYS:
        torch.testing.assert_close(getattr(back, name), getattr(mix, name), rtol=0, atol=0)
    x = points(mix, 3)
    torch.testing.assert_close(back.score(x, 0.3, VESDE()), mix.score(x, 0.3, VESDE()), rtol=0, atol=0)
    mix.save(path)  # overwriting is allowed (os.replace)
    assert repr(back) == repr(mix) and "K=4, D=12, r=3" in repr(mix)


def test_load_rejects_foreign_files(tmp_path):
    np.savez(tmp_path / "other.npz", weights=np.ones(2) / 2, means=np.zeros((2, 3)))
    with pytest.raises(ValueError, match=r"missing arrays \['factors', 'noise_var'\]"):
        LowRankGaussianMixture.load(tmp_path / "other.npz")
    (tmp_path / "junk.npz").write_bytes(b"not a zip file")
    with pytest.raises(ValueError):
        LowRankGaussianMixture.load(tmp_path / "junk.npz")
    with pytest.raises(FileNotFoundError):
        LowRankGaussianMixture.load(tmp_path / "absent.npz")
    with pytest.raises(ValueError, match="must end in .npz"):
        random_mixture(2, 3, 1).save(tmp_path / "mix.pt")


# ----------------------------------------------------------------------------- bad input
GOOD = dict(weights=[0.25, 0.75], means=np.zeros((2, 5)), factors=np.ones((2, 5, 2)), noise_var=[0.1, 0.2])


@pytest.mark.parametrize("change, message", [
    (dict(weights=[[0.5, 0.5]]), r"weights must have shape \(K,\)"),
    (dict(weights=[]), r"weights must have shape \(K,\) with K >= 1"),
    (dict(weights=[0.5, 0.6]), "weights must sum to 1"),
    (dict(weights=[1.0, 0.0]), "weights must all be > 0"),
    (dict(weights=[1.5, -0.5]), "weights must all be > 0"),
    (dict(weights=[float("nan"), 0.5]), "weights must be finite"),
    (dict(means=np.zeros((3, 5))), r"means must have shape \(K, D\) = \(2, D\)"),
    (dict(means=np.zeros((2, 0))), "with D >= 1"),
    (dict(means=np.full((2, 5), np.inf)), "means must be finite"),
    (dict(factors=np.ones((2, 4, 2))), r"factors must have shape \(K, D, r\) = \(2, 5, r\)"),
    (dict(factors=np.ones((2, 5))), r"factors must have shape"),
    (dict(factors=np.full((2, 5, 2), np.nan)), "factors must be finite"),
    (dict(noise_var=[0.1]), r"noise_var must have shape \(K,\) = \(2,\)"),
    (dict(noise_var=[0.1, 0.0]), "noise_var must all be > 0"),
    (dict(noise_var=[0.1, -1.0]), "noise_var must all be > 0"),
    (dict(noise_var=[0.1, float("inf")]), "noise_var must be finite"),
    (dict(weights="abc"), "weights must"),
    (dict(noise_var=[True, True]), "noise_var must hold real numbers"),
])
def test_bad_parameters_raise(change, message):
    with pytest.raises(ValueError, match=message):
        LowRankGaussianMixture(**{**GOOD, **change})


def test_bad_dtype_and_evaluation_inputs_raise():
    with pytest.raises(ValueError, match="dtype must be a floating torch dtype"):
        LowRankGaussianMixture(**GOOD, dtype=torch.int64)
    mix = LowRankGaussianMixture(**GOOD)
    assert mix.rank == 2
    x = torch.zeros(3, 5, dtype=F64)
    with pytest.raises(ValueError, match="D = 5 coordinates"):
        mix.score(torch.zeros(3, 4, dtype=F64))
    with pytest.raises(ValueError, match="empty batch"):
        mix.log_prob(torch.zeros(0, 5, dtype=F64))
    with pytest.raises(ValueError, match="x must be finite"):
        mix.score(torch.full((2, 5), float("nan"), dtype=F64))
    with pytest.raises(ValueError, match="floating torch tensor"):
        mix.score(torch.zeros(3, 5, dtype=torch.int64))
    with pytest.raises(ValueError, match="floating torch tensor"):
        mix.score(np.zeros((3, 5)))
    with pytest.raises(ValueError, match=r"got shape \(5,\)"):
        mix.score(torch.zeros(5, dtype=F64))
    with pytest.raises(ValueError, match="sde must be given together with t"):
        mix.score(x, 0.5)
    with pytest.raises(ValueError, match=r"t has shape \(2,\)"):
        mix.score(x, torch.zeros(2, dtype=F64), VPSDE())
    with pytest.raises(ValueError, match="t must lie in"):
        mix.log_prob(x, 1.5, VPSDE())
    with pytest.raises(ValueError, match="scalar t"):
        mix.perturbed(VPSDE(), torch.zeros(2))
    with pytest.raises(ValueError, match="n must be a nonnegative int"):
        mix.sample(-1)
