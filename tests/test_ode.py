"""fpe_lab.ode.dopri5: the batched torch Dormand–Prince 5(4) with per-sample error control.

References: scipy's RK45 (the same method; with one sample the same steps), closed-form ODE solutions,
and the batch-RMS control of scipy on the same batch (which the per-sample control must beat)."""

import math

import numpy as np
import pytest
import torch
from scipy.integrate import solve_ivp

from fpe_lab.ode import dopri5
from fpe_lab.sampling import ODEMethod, integrate_ode


def oscillators(omega: torch.Tensor):
    """y'' = −ω_i² y per sample as a first-order system y = (position, velocity); y(0) = (1, 0)."""
    def rhs(y, t):
        return torch.stack([y[:, 1], -(omega**2) * y[:, 0]], dim=1)

    y0 = torch.stack([torch.ones_like(omega), torch.zeros_like(omega)], dim=1)

    def exact(t):
        return torch.stack([torch.cos(omega * t), -omega * torch.sin(omega * t)], dim=1)

    return rhs, y0, exact


def _np_rhs(t, y):  # a non-autonomous 2-D system (numpy for scipy, torch for dopri5)
    return np.array([y[1], -25 * y[0] * (1 + 0.1 * np.sin(t)) + 0.3 * np.cos(2 * t)])


def _torch_rhs(y, t):
    return torch.stack([y[:, 1], -25 * y[:, 0] * (1 + 0.1 * math.sin(t)) + 0.3 * math.cos(2 * t)], dim=1)


@pytest.mark.parametrize("t_span", [(0.0, 3.0), (3.0, 0.5)], ids=["forward", "backward"])
@pytest.mark.parametrize("tol", [1e-4, 1e-8])
def test_one_sample_takes_scipys_rk45_steps(t_span, tol):
    """With b = 1 the per-sample norm is scipy's norm: same tableau, initial step, controller, so the
    same number of evaluations and the same end state up to float64 round-off of the stage sums."""
    y0 = [1.0, 0.0]
    ref = solve_ivp(_np_rhs, t_span, y0, method="RK45", rtol=tol, atol=tol)
    sol = dopri5(_torch_rhs, torch.tensor([y0], dtype=torch.float64), t_span, rtol=tol, atol=tol)
    assert sol.nfe == ref.nfev
    assert sol.n_accepted == len(ref.t) - 1
    assert sol.nfe == 2 + 6 * (sol.n_accepted + sol.n_rejected)  # f(y0), the initial-step probe, 6 per attempt
    # ~100 steps of round-off (summation order of the stages differs from numpy's dot): 1e-12
    np.testing.assert_allclose(sol.y[0].numpy(), ref.y[:, -1], rtol=0, atol=1e-12)


def test_per_sample_control_meets_the_tolerance_for_an_easy_and_a_hard_sample():
    """999 slow oscillators (ω = 1) and one fast one (ω = 40) over t ∈ [0, 1] at rtol = atol = 1e-6.

    scipy's RMS over the batch divides the fast sample's error by ~sqrt(1000): its global error reaches
    ~450 × its tolerance scale (atol + rtol|y|). Per-sample control accepts a step only when the fast
    sample's own error norm is < 1, so the fast sample is solved exactly as if it were alone (same steps,
    same result: its global error is ~13 × its local tolerance after 6 periods, the usual accumulation of
    local errors), and the slow ones, riding along on its small steps, are far inside theirs."""
    n, tol = 1000, 1e-6
    omega = torch.ones(n, dtype=torch.float64)
    omega[0] = 40.0
    rhs, y0, exact = oscillators(omega)
    scale = tol + tol * exact(1.0).abs()

    sol = dopri5(rhs, y0, (0.0, 1.0), rtol=tol, atol=tol)
    rel = (sol.y - exact(1.0)).abs() / scale
    assert (sol.max_error_norm < 1).all()  # every sample met the tolerance at every accepted step
    alone_rhs, alone_y0, _ = oscillators(omega[:1])
    alone = dopri5(alone_rhs, alone_y0, (0.0, 1.0), rtol=tol, atol=tol)
    # the hard sample dictates the steps: identical to solving it alone (float64 round-off)
    torch.testing.assert_close(sol.y[0], alone.y[0], rtol=0, atol=1e-12)
    assert sol.nfe == alone.nfe
    assert rel[0].max() < 20  # measured 12.9: accumulated local errors over 6 periods
    assert rel[1:].max() < 1e-2  # measured 1.4e-9

    # the same batch through scipy's RK45 (the reference): the fast sample is let through
    flat = integrate_ode(lambda y, t: rhs(y.reshape(n, 2), t).reshape(-1), y0.reshape(-1), (0.0, 1.0),
                         method=ODEMethod.RK45, rtol=tol, atol=tol)
    rel_scipy = (flat.y.reshape(n, 2) - exact(1.0)).abs() / scale
    assert rel_scipy[0].max() > 100  # measured 448
    # ... and integrate_ode's DOPRI5 with batch=n is the per-sample solver above
    flat5 = integrate_ode(lambda y, t: rhs(y.reshape(n, 2), t).reshape(-1), y0.reshape(-1), (0.0, 1.0),
                          method=ODEMethod.DOPRI5, rtol=tol, atol=tol, batch=n)
    assert flat5.nfe == sol.nfe
    torch.testing.assert_close(flat5.y.reshape(n, 2), sol.y, rtol=0, atol=0)


def test_error_shrinks_with_tolerance_like_a_fifth_order_method():
    """Adaptive DOPRI5 on a smooth problem: global error ∝ tol (the controller sets h ∝ tol^(1/5)), while
    NFE grows ~tol^(−1/5): 100× tighter tolerance costs ~2.5× evaluations (allow 1.8–3.5)."""
    rhs, y0, exact = oscillators(torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64))
    errs, nfes = [], []
    for tol in (1e-6, 1e-8, 1e-10):
        sol = dopri5(rhs, y0, (0.0, 2.0), rtol=tol, atol=tol)
        errs.append((sol.y - exact(2.0)).abs().max().item())
        nfes.append(sol.nfe)
    assert errs[0] > errs[1] > errs[2]
    assert errs[2] < 1e-8
    for a, b in zip(nfes, nfes[1:]):
        assert 1.8 < b / a < 3.5, nfes


def test_keeps_dtype_and_device_and_counts_every_evaluation():
    calls = []

    def rhs(y, t):
        assert y.dtype == torch.float32 and y.device == y0.device and isinstance(t, float)
        calls.append(t)
        return -y

    y0 = torch.randn(7, 3, 2, generator=torch.Generator().manual_seed(0))
    sol = dopri5(rhs, y0, (0.0, 1.0), rtol=1e-4, atol=1e-5)
    assert sol.y.dtype == torch.float32 and sol.y.shape == y0.shape
    assert sol.nfe == len(calls)
    # float32: the exact e^{-1} y0 to ~tol (relative 1e-4 per step accumulates to ~1e-4)
    torch.testing.assert_close(sol.y, y0 * math.exp(-1.0), rtol=1e-3, atol=1e-4)
    assert min(calls) >= 0.0 and max(calls) <= 1.0  # never evaluated outside [t0, t1]


def test_backward_integration_and_first_step():
    rhs, y0, exact = oscillators(torch.tensor([2.0], dtype=torch.float64))
    # integrate from t = 1 back to 0 starting at the exact state: must return to (1, 0)
    sol = dopri5(rhs, exact(1.0), (1.0, 0.0), rtol=1e-10, atol=1e-10, first_step=1e-3)
    torch.testing.assert_close(sol.y, y0, rtol=0, atol=1e-8)


def test_non_finite_right_hand_side_raises():
    with pytest.raises(FloatingPointError, match="non-finite"):
        dopri5(lambda y, t: y * math.nan, torch.ones(3, 2), (0.0, 1.0))
    # finite at t0, non-finite from t = 0.3 on: caught inside the step that reaches it, naming the times
    with pytest.raises(FloatingPointError, match="non-finite in the step from t="):
        dopri5(lambda y, t: y * math.inf if t > 0.3 else -y, torch.ones(2, 1, dtype=torch.float64), (0.0, 1.0))


def test_unreachable_tolerance_and_max_steps_raise():
    y0 = torch.ones(2, 1, dtype=torch.float32)
    with pytest.raises(ValueError, match="below 10 × the torch.float32 epsilon"):  # float32 eps = 1.2e-7
        dopri5(lambda y, t: torch.cos(30 * y + t), y0, (0.0, 1.0), rtol=1e-7, atol=1e-7)
    dopri5(lambda y, t: torch.cos(30 * y + t), y0, (0.0, 1.0), rtol=2e-6, atol=1e-7)  # above the floor: runs
    with pytest.raises(RuntimeError, match="step size"):  # a singularity at t = 0.5: the step collapses
        dopri5(lambda y, t: y**2, torch.full((2, 1), 2.0, dtype=torch.float64), (0.0, 1.0))
    with pytest.raises(RuntimeError, match="max_steps=3"):
        dopri5(lambda y, t: -y, y0.double(), (0.0, 1.0), rtol=1e-9, atol=1e-9, max_steps=3)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"rtol": 0.0}, "rtol"), ({"atol": math.nan}, "atol"), ({"rtol": True}, "rtol"),
        ({"y0": torch.zeros(0, 2)}, r"empty batch: shape \(0, 2\)"),
        ({"y0": torch.zeros(3, 0)}, r"empty batch: shape \(3, 0\)"),
        ({"y0": torch.zeros(3, 2, dtype=torch.long)}, "floating"),
        ({"y0": torch.tensor([[math.inf]])}, "finite"),
        ({"t_span": (0.5, 0.5)}, "t_span"),
        ({"first_step": 2.0}, "first_step"), ({"max_steps": 0}, "max_steps"),
    ],
)
def test_bad_arguments_raise(kwargs, match):
    args = {"y0": torch.zeros(3, 2), "t_span": (0.0, 1.0), **kwargs}
    with pytest.raises(ValueError, match=match):
        dopri5(lambda y, t: -y, **args)


def test_wrong_rhs_shape_raises():
    with pytest.raises(ValueError, match=r"must return the shape of y \(3, 2\)"):
        dopri5(lambda y, t: y[:, :1], torch.zeros(3, 2), (0.0, 1.0))


def test_integrate_ode_batch_argument():
    y0 = torch.zeros(6)
    with pytest.raises(ValueError, match="batch"):
        integrate_ode(lambda y, t: -y, y0, (0.0, 1.0), method=ODEMethod.DOPRI5, batch=4)
    with pytest.raises(ValueError, match=r"empty batch: shape \(0,\)"):
        integrate_ode(lambda y, t: -y, torch.zeros(0), (0.0, 1.0))


@pytest.mark.gpu
def test_cuda_state_stays_on_the_device_and_matches_cpu():
    rhs, y0, exact = oscillators(torch.linspace(1.0, 5.0, 64, dtype=torch.float64))
    omega = torch.linspace(1.0, 5.0, 64, dtype=torch.float64, device="cuda")
    rhs_cuda, y0_cuda, _ = oscillators(omega)
    cpu = dopri5(rhs, y0, (0.0, 1.0), rtol=1e-8, atol=1e-8)
    gpu = dopri5(rhs_cuda, y0_cuda, (0.0, 1.0), rtol=1e-8, atol=1e-8)
    assert gpu.y.is_cuda and gpu.nfe == cpu.nfe
    torch.testing.assert_close(gpu.y.cpu(), cpu.y, rtol=0, atol=1e-10)  # same float64 arithmetic
