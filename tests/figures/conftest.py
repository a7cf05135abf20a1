"""Tiny run folders for the figure and study tests: a few training steps and a small, loose evaluation.

They have the layout of ``python -m fpe_lab.run toy2d`` run folders (config.json, checkpoint.pt with
EMA weights, metrics.json from :func:`fpe_lab.metrics.evaluate`) but evaluate with loose ODE
tolerances and few points, so a folder costs about a second of CPU.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fpe_lab.checkpoint import write_config
from fpe_lab.commands.toy2d import run_dir_name
from fpe_lab.config import DeviceChoice, Regularizer, SDEKind, Toy2dConfig, build_data, build_loss, build_model, build_sde, toy2d
from fpe_lab.figures.runs import Run
from fpe_lab.metrics import evaluate
from fpe_lab.study import StudyPlan, run_study
from fpe_lab.train import TrainOptions, train

TINY = dict(steps=4, batch=32, width=16, depth=2, n_freq=2, ckpt_every=4, eval_points=32, eval_nll_points=6,
            eval_samples=16, device=DeviceChoice.CPU)
TIMES = (0.05, 0.2, 0.5, 1.0)


def tiny_config(**overrides) -> Toy2dConfig:
    return toy2d(**{**TINY, **overrides})


def make_run_folder(config: Toy2dConfig, out: Path) -> Path:
    """Train ``config`` for its few steps and evaluate it into ``out/run_dir_name(config)``."""
    run_dir = Path(out) / run_dir_name(config)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_config(run_dir, config.to_dict())
    sde, data = build_sde(config.sde), build_data(config)
    opts = TrainOptions(steps=config.steps, lr=config.lr, seed=config.seed, ckpt_every=config.ckpt_every, progress=False)
    res = train(build_model(config, sde), build_loss(config, sde), lambda g: data.sample(config.batch, g), opts,
                run_dir=run_dir)
    metrics = evaluate(res.ema, sde, data, Run(run_dir, config, {}).truth(), times=TIMES,
                       n_points=config.eval_points, n_nll=config.eval_nll_points, nll_rtol=1e-3, nll_atol=1e-3,
                       n_samples=config.eval_samples, sde_steps=10, sample_rtol=1e-3, sample_atol=1e-3,
                       n_projections=8, floor_repeats=2, dtype=torch.float32,
                       generator=torch.Generator().manual_seed(config.seed), progress=False)
    (run_dir / "metrics.json").write_text(json.dumps(metrics))
    return run_dir


@pytest.fixture(scope="session")
def tiny_runs(tmp_path_factory) -> list[Path]:
    """DSM and DSM+FPE (λ = 0.1), two seeds each, gmm under VP, made by the study runner."""
    out = tmp_path_factory.mktemp("study")
    plan = StudyPlan(base=tiny_config(), lams=(0.0, 0.1), seeds=(0, 1))
    return run_study(plan, out, make_run_folder, run_dir_name, progress=False)


@pytest.fixture(scope="session")
def ve_run(tmp_path_factory) -> Path:
    """One DSM+FPE run under VE (to mix with the VP runs: a mismatch)."""
    return make_run_folder(tiny_config(sde=SDEKind.VE, reg=Regularizer.FPE), tmp_path_factory.mktemp("ve"))
