"""The ODE–SDE gap in the evaluation: exact scores close it to the grid floor, a score that violates the
score FPE opens it, KL(p‖q_ODE) agrees with the pointwise PF-ODE NLL gap, VE starts from the exact p_t0."""

from __future__ import annotations

import json

import pytest
import torch

from fpe_lab import run as cli
from fpe_lab.data.toy import toy_distribution
from fpe_lab.likelihood import pf_ode_nll
from fpe_lab.metrics.gap import MAX_START_SIGMA, gap_window, ode_sde_gap
from fpe_lab.sde import SubVPSDE, VESDE, VPSDE

EPS = 1e-3


def _gap(score_fn, sde, n=64, seed=0):
    data = toy_distribution("gmm")
    return ode_sde_gap(score_fn, sde, data, data.truth(sde), n=n, eps=EPS, nll_points=400,
                       generator=torch.Generator().manual_seed(seed))


def _lagged(sde, lag):
    exact = toy_distribution("gmm").score_fn(sde)
    return lambda x, t: exact(x, (t + lag).clamp(max=1.0))


@pytest.mark.parametrize("sde", [VPSDE(), SubVPSDE()], ids=["vp", "subvp"])
def test_the_exact_score_closes_the_gap_to_the_grid_floor(sde):
    data = toy_distribution("gmm")
    report, dens, _ = _gap(data.score_fn(sde), sde)
    assert report.t0 == 1.0 and report.start == "prior" and report.nll_points_outside == 0
    # q_ODE is pointwise (ODE tolerance 1e-4; measured TV 1.9e-5 VP, 3.2e-6 sub-VP at 64²); q_SDE carries the
    # finite-volume error of the narrowest component on the ±6.5 box (measured TV 0.065 → 0.038 from 48² to 64²
    # for VP, 0.113 → 0.081 for sub-VP: the floor a gap must exceed)
    assert report.truth_vs_ode["tv"] < 1e-3 and report.ode_vs_sde["tv"] < 0.1
    # the SDE model's held-out NLL is the truth's up to that smoothing (measured +0.11 VP, +0.12 sub-VP at 64²)
    assert 0 < report.sde_nll_nats - report.true_nll_nats < 0.2


def test_a_score_that_violates_the_fpe_opens_the_gap_and_kl_matches_the_pointwise_nll_gap():
    sde = VPSDE()
    floor = _gap(toy_distribution("gmm").score_fn(sde), sde)[0].ode_vs_sde["tv"]
    report, _, _ = _gap(_lagged(sde, 0.1), sde)
    assert report.ode_vs_sde["tv"] > 1.5 * floor  # lag 0.05 measured 0.071 against the floor 0.038 at 64²
    # KL(p_eps‖q_ODE) on the grid is E_p[log p − log q_ODE], the NLL gap the pointwise PF-ODE measures
    data = toy_distribution("gmm")
    x = data.sample(400, torch.Generator().manual_seed(3))
    res = pf_ode_nll(_lagged(sde, 0.1), sde, x, eps=EPS, rtol=1e-6, atol=1e-6)
    gap = res.nats - (-data.truth(sde).log_prob(x, EPS))
    se = float(gap.std() / 400**0.5)
    # within 4 standard errors (CLT over 400 points) plus the grid's quadrature error of the KL (~0.02 at 48²)
    assert abs(report.truth_vs_ode["kl"] - float(gap.mean())) < 4 * se + 0.05


def test_ve_starts_from_the_exact_marginal_inside_the_window():
    sde = VESDE()
    t0 = gap_window(sde, EPS)
    sigma = float(sde.marginal(torch.tensor([t0], dtype=torch.float64))[1])
    assert 0.5 < t0 < 1 and abs(sigma - MAX_START_SIGMA) < 1e-3  # the largest t0 with sigma(t0) <= 1 (4 digits)
    report, _, _ = _gap(toy_distribution("gmm").score_fn(sde), sde, n=48)
    # started from the exact p_t0: q_ODE is p_eps to the ODE tolerance (measured 1.5e-9), q_SDE to the grid
    # (measured TV 0.164 on the ±11 box at 48²)
    assert report.start == "caller" and report.t0 == t0
    assert report.truth_vs_ode["tv"] < 1e-3 and report.ode_vs_sde["tv"] < 0.25


def test_eval_gap_grid_writes_its_keys_and_figure(tmp_path):
    rc = cli.main(["toy2d", "--steps", "5", "--eval-gap-grid", "24", "--eval-points", "20", "--eval-nll-points", "20",
                   "--eval-samples", "0", "--eval-times", "0.5", "--out", str(tmp_path)])
    assert rc == 0
    (folder,) = tmp_path.iterdir()
    gap = json.loads((folder / "metrics.json").read_text())["gap"]
    assert {"grid", "box", "t0", "start", "ode_vs_sde", "truth_vs_ode", "truth_vs_sde", "sde_nll_nats",
            "sde_nll_sem", "true_nll_nats", "nll_points", "nll_points_outside", "ode_mass", "wall_s",
            "boundary"} == set(gap)
    assert gap["boundary"]  # five steps of training leave mass on the walls: recorded, not a crash
    assert set(gap["ode_vs_sde"]) >= {"tv", "kl", "hellinger", "w2"}
    assert (folder / "gap.png").is_file() and (folder / "gap.npz").is_file()
    # off by default, and refused where there is no 2-D grid
    assert cli.main(["digits", "--eval-gap-grid", "24", "--dry-run"]) == 2
