"""Sliced Wasserstein and MMD (fpe_lab.metrics.sample_distance) against closed forms."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fpe_lab.metrics.sample_distance import GaussianKernel, _w2_squared_1d, mmd2, noise_floor, sliced_wasserstein


def gen(seed):
    return torch.Generator().manual_seed(seed)


@pytest.mark.analytic
def test_sliced_wasserstein_of_a_pure_shift_is_norm_over_sqrt_d():
    x = torch.randn(500, 3, generator=gen(0), dtype=torch.float64)
    delta = torch.tensor([0.3, -0.4, 1.2], dtype=torch.float64)
    got = sliced_wasserstein(x, x + delta, n_projections=4000, generator=gen(1))
    # SW₂² = E_θ (θ·δ)² = ‖δ‖²/D; MC over 4k directions (D = 3: sd of (θ·δ)²/E = 0.89): SW rel sd 0.7%
    assert got == pytest.approx(delta.norm().item() / math.sqrt(3), rel=0.03)
    # and exactly the RMS of θ·δ over the directions used
    theta = torch.randn(4000, 3, generator=gen(1), dtype=torch.float64)
    theta = theta / theta.norm(dim=-1, keepdim=True)
    assert got == pytest.approx((theta @ delta).pow(2).mean().sqrt().item(), rel=1e-10)  # float64 round-off


def test_sliced_wasserstein_with_unequal_sizes_is_exact():
    """Repeating every point twice does not change the empirical measure, so nor the distance."""
    x = torch.randn(37, 2, generator=gen(2), dtype=torch.float64)
    y = torch.randn(50, 2, generator=gen(3), dtype=torch.float64) + 0.5
    a = sliced_wasserstein(x, y, n_projections=64, generator=gen(4))
    b = sliced_wasserstein(x.repeat_interleave(2, dim=0), y, n_projections=64, generator=gen(4))
    c = sliced_wasserstein(x.repeat(3, 1), y.repeat(2, 1), n_projections=64, generator=gen(4))
    assert a == pytest.approx(b, rel=1e-12) and a == pytest.approx(c, rel=1e-12)  # float64 round-off
    assert sliced_wasserstein(y, x, n_projections=64, generator=gen(4)) == pytest.approx(a, rel=1e-12)
    assert sliced_wasserstein(x, x, n_projections=64, generator=gen(4)) == 0.0


@pytest.mark.analytic
def test_mmd2_matches_closed_form_for_two_gaussians():
    """N(0, s²I) vs N(δ, s²I), kernel exp(−‖·‖²/(2ℓ²)) in D dims:
    MMD² = 2 c (1 − exp(−‖δ‖²/(2(ℓ² + 2s²)))),  c = (ℓ²/(ℓ² + 2s²))^{D/2}."""
    d, s, ell = 2, 0.7, 0.5
    delta = torch.tensor([0.4, 0.3], dtype=torch.float64)
    c = (ell**2 / (ell**2 + 2 * s**2)) ** (d / 2)
    exact = 2 * c * (1 - math.exp(-delta.pow(2).sum().item() / (2 * (ell**2 + 2 * s**2))))
    kernel = GaussianKernel((ell,))
    g = gen(5)
    est = torch.tensor([
        mmd2(s * torch.randn(800, d, generator=g, dtype=torch.float64),
             delta + s * torch.randn(800, d, generator=g, dtype=torch.float64), kernel=kernel)
        for _ in range(8)
    ])
    sem = est.std() / math.sqrt(len(est))
    assert abs(est.mean() - exact) < 4 * sem  # unbiased U-statistic: CLT over 8 repeats, 4 standard errors
    assert exact > 10 * sem  # and the test can tell it from 0


def test_mmd2_is_unbiased_for_identical_laws():
    """E[MMD²_u] = 0 when P = Q; the biased V-statistic would sit at ~2/(n − 1) · (1 − E k) > 0."""
    g = gen(8)
    est = torch.tensor([mmd2(torch.randn(40, 2, generator=g), torch.randn(40, 2, generator=g)) for _ in range(300)],
                       dtype=torch.float64)
    assert abs(est.mean()) < 4 * est.std() / math.sqrt(len(est))  # CLT over 300 repeats, 4 standard errors


def test_floor_separates_identical_from_shifted_laws():
    sample = lambda n, g: torch.randn(n, 2, generator=g, dtype=torch.float64)  # noqa: E731
    g = gen(6)
    sw = lambda a, b: sliced_wasserstein(a, b, n_projections=64, generator=gen(7))  # noqa: E731
    for dist in (sw, mmd2):
        floor = noise_floor(sample, 500, dist, repeats=5, generator=g)
        same = dist(sample(500, g), sample(500, g))
        shifted = dist(sample(500, g), sample(500, g) + 0.4)
        assert same < floor.mean + 3 * floor.std  # fixed seed; same law scores like the floor
        assert shifted > floor.mean + 5 * floor.std  # 0.4 shift (SW ≈ 0.28) is far above it
        assert floor.repeats == 5 and floor.std > 0


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: sliced_wasserstein(torch.zeros(5, 2), torch.zeros(5, 3)), "coordinates"),
        (lambda: sliced_wasserstein(torch.zeros(1, 2), torch.zeros(5, 2)), "x must"),
        (lambda: sliced_wasserstein(torch.zeros(5, 2), torch.zeros(5, 2), n_projections=0), "n_projections"),
        (lambda: mmd2(torch.zeros(5, 2), torch.full((5, 2), float("nan"))), "finite"),
        (lambda: GaussianKernel((0.0,)), "bandwidths"),
        (lambda: noise_floor(lambda n, g: torch.zeros(n, 2), 1, mmd2), "n must"),
    ],
)
def test_bad_input_raises(call, match):
    with pytest.raises(ValueError, match=match):
        call()


@settings(max_examples=30, deadline=None)
@given(n=st.integers(2, 12), m=st.integers(2, 12), seed=st.integers(0, 2**16))
def test_unequal_size_w2_equals_the_equal_size_expansion(n, m, seed):
    """Repeating x m times and y n times gives two n·m-point sets with the same empirical measures,
    for which W₂² is the plain mean of squared sorted differences."""
    g = gen(seed)
    a = torch.randn(3, n, generator=g, dtype=torch.float64)
    b = torch.randn(3, m, generator=g, dtype=torch.float64) + 0.3
    direct = _w2_squared_1d(a, b)
    expanded = (a.repeat_interleave(m, dim=1).sort(-1).values - b.repeat_interleave(n, dim=1).sort(-1).values)
    torch.testing.assert_close(direct, expanded.pow(2).mean(-1), rtol=1e-12, atol=1e-14)  # float64 round-off
