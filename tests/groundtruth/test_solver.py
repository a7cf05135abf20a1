"""Bad input to the ground-truth solvers: ValueErrors naming the argument, and the two warnings."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fpe_lab.groundtruth import BoundaryWarning, Grid, Method, ResolutionWarning, solve_fokker_planck
from fpe_lab.sde import VPSDE

GRID = Grid(((-5.0, 5.0),), (32,))


def gaussian(grid: Grid, width: float = 0.8) -> np.ndarray:
    return np.exp(-0.5 * (grid.coords**2).sum(-1) / width**2)


@pytest.mark.parametrize(
    "bounds, shape, match",
    [
        (((1.0, -1.0),), (16,), r"bounds\[0\] must be finite with lo < hi"),
        (((0.0, 0.0),), (16,), r"bounds\[0\]"),
        (((0.0, np.inf),), (16,), r"bounds\[0\]"),
        (((-1.0, 1.0),), (7,), r"shape\[0\] must be an int >= 8"),
        (((-1.0, 1.0), (-1.0, 1.0)), (16, 4), r"shape\[1\]"),
        (((-1.0, 1.0), (-1.0, 1.0)), (16,), "one entry per axis"),
        (((-1.0, 1.0),) * 3, (8, 8, 8), "1 or 2 axes"),
    ],
)
def test_grid_rejects(bounds, shape, match):
    with pytest.raises(ValueError, match=match):
        Grid(bounds, shape)


@pytest.mark.parametrize(
    "p0, match",
    [
        (-gaussian(GRID), "p0 must be nonnegative"),
        (np.where(np.arange(32) == 3, np.nan, 1.0), "p0 must be finite"),
        (np.zeros(32), "p0 must not be all zero"),
        (np.ones(31), r"p0 must have shape grid.shape = \(32,\)"),
        (np.ones((32, 1)), "p0 must have shape"),
        ("density", "p0 must be an array"),
    ],
)
def test_bad_p0(p0, match):
    with pytest.raises(ValueError, match=match):
        solve_fokker_planck(VPSDE(), p0, GRID, [0.5], progress=False)


@pytest.mark.parametrize(
    "times, match",
    [
        ([0.5, 0.2], "strictly increasing"),
        ([0.2, 0.2], "strictly increasing"),
        ([0.5, 1.5], r"lie in \[0, 1\]"),
        ([-0.1], r"lie in \[0, 1\]"),
        ([np.nan], "finite"),
        ([], "nonempty"),
    ],
)
def test_bad_times(times, match):
    with pytest.raises(ValueError, match=match):
        solve_fokker_planck(VPSDE(), gaussian(GRID), GRID, times, progress=False)


def test_bad_sde_and_options():
    p0 = gaussian(GRID)

    class NoDrift:
        def diffusion(self, t):
            return torch.ones_like(t)

    class NoDiffusion:
        def drift(self, x, t):
            return -x

    class WrongShape:
        def drift(self, x, t):
            return -x[:, :1].repeat(1, 3)

        def diffusion(self, t):
            return torch.ones_like(torch.as_tensor(t))

    with pytest.raises(ValueError, match="sde must have callable drift.*lacks drift"):
        solve_fokker_planck(NoDrift(), p0, GRID, [0.5], progress=False)
    with pytest.raises(ValueError, match="lacks diffusion"):
        solve_fokker_planck(NoDiffusion(), p0, GRID, [0.5], progress=False)
    with pytest.raises(ValueError, match="must return a tensor of the shape of x"):
        solve_fokker_planck(WrongShape(), p0, GRID, [0.5], progress=False)
    class Plain(NoDiffusion):
        def diffusion(self, t):
            return torch.ones_like(torch.as_tensor(t))

    with pytest.raises(ValueError, match="needs an SDE with a Gaussian transition"):
        solve_fokker_planck(Plain(), p0, GRID, [0.5], method=Method.CONVOLUTION, progress=False)
    with pytest.raises(ValueError, match="method must be a Method"):
        solve_fokker_planck(VPSDE(), p0, GRID, [0.5], method="fft", progress=False)
    with pytest.raises(ValueError, match="n_steps must be an int >= 1"):
        solve_fokker_planck(VPSDE(), p0, GRID, [0.5], method=Method.FINITE_VOLUME, n_steps=0, progress=False)
    with pytest.raises(ValueError, match="wall_tol"):
        solve_fokker_planck(VPSDE(), p0, GRID, [0.5], wall_tol=2.0, progress=False)
    with pytest.raises(ValueError, match="grid must be a"):
        solve_fokker_planck(VPSDE(), p0, ((-5, 5),), [0.5], progress=False)


@pytest.mark.parametrize("method", [Method.CONVOLUTION, Method.FINITE_VOLUME])
def test_boundary_warning(method):
    small = Grid(((-2.0, 2.0),), (32,))
    with pytest.warns(BoundaryWarning, match="mass reaches the boundary"):
        solve_fokker_planck(VPSDE(), gaussian(small), small, [0.5], method=method, n_steps=20, progress=False)


def test_no_warning_for_a_good_problem():
    import warnings

    grid = Grid(((-9.0, 9.0),), (128,))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        solve_fokker_planck(VPSDE(), gaussian(grid), grid, [0.5, 1.0], progress=False)


def test_resolution_warning_for_a_spiky_p0():
    import warnings

    p0 = np.zeros(32)
    p0[16] = 1.0
    with warnings.catch_warnings(), pytest.warns(ResolutionWarning, match="does not resolve p0"):
        warnings.simplefilter("ignore", BoundaryWarning)  # the spread spike reaches the walls of [−5, 5] too
        solve_fokker_planck(VPSDE(), p0, GRID, [0.5], method=Method.FINITE_VOLUME, n_steps=10, progress=False)


def test_zero_time_returns_p0_and_warns_where_p0_vanishes():
    import warnings

    grid = Grid(((-8.0, 8.0),), (56,))  # walls at p_t/max ≤ e^{−32} at t = 0.5: no BoundaryWarning
    p0 = gaussian(grid)
    sol = solve_fokker_planck(VPSDE(), p0, grid, [0.0, 0.5], progress=False)
    np.testing.assert_allclose(sol.density[0], p0 / grid.integrate(p0), rtol=1e-14)  # exp(log) round-off
    assert not sol.unresolved.any()
    p0[:4] = 0.0
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sol = solve_fokker_planck(VPSDE(), p0, grid, [0.0, 0.5], progress=False)
    # one warning, with the count and the remedy; the mask marks exactly the cells with zeros at t = 0
    assert [str(w.message) for w in caught if issubclass(w.category, ResolutionWarning)] == [
        f"{sol.unresolved.sum()} grid cells are unresolved (log p or score not finite) at t = 0: p0 is 0 there or "
        "nearby, so p_t there depends on values of p0 below the float range: pass log_p0 (the exact log-density, "
        "finite everywhere) instead of p0 (Solution.unresolved marks them)"]
    assert sol.unresolved[0, :4].all() and not sol.unresolved[1].any()
