"""Tiny run folders for the figure tests: a few training steps and a small evaluation.

They are ordinary run folders, written by :func:`fpe_lab.runs.train` (config.json, checkpoint.pt with
EMA weights, metrics.jsonl, metrics.json with the EvalReport), with a tiny MLP, a few points per
evaluation time and a loose NLL tolerance, so a folder costs a few seconds of CPU.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from fpe_lab import runs
from fpe_lab.config import DeviceChoice, RunConfig, SDEKind, toy2d

TIMES = (0.05, 0.2, 0.5, 1.0)
TINY = {
    ("optim", "steps"): 4,
    ("optim", "batch"): 32,
    ("optim", "ckpt_every"): 4,
    ("model", "width"): 16,
    ("model", "depth"): 2,
    ("model", "n_freq"): 2,
    ("eval", "times"): TIMES,
    ("eval", "points"): 32,
    ("eval", "nll_points"): 6,
    ("eval", "rtol"): 1e-3,
    ("eval", "samples"): 16,
    ("device",): DeviceChoice.CPU,
}


def tiny_config(lam: float = 0.1, seed: int = 0, sde: SDEKind = SDEKind.VP) -> RunConfig:
    """The toy2d preset shrunk to seconds: DSM for ``lam == 0``, DSM + lam · score-FPE residual otherwise."""
    reg = "none" if lam == 0 else "fpe"
    return toy2d().override({**TINY, ("loss", "reg", "kind"): reg, ("loss", "reg", "lam"): lam, ("seed",): seed,
                             ("sde", "kind"): sde})


def make_run_folder(config: RunConfig, out: Path) -> Path:
    """Train and evaluate ``config`` into ``runs.run_dir(config, out)``; returns the folder."""
    return runs.train(config, out, progress=False).path


@pytest.fixture(scope="session")
def tiny_runs(tmp_path_factory) -> list[Path]:
    """DSM and DSM+FPE (λ = 0.1), two seeds each, gmm under VP: [DSM s0, DSM s1, FPE s0, FPE s1]."""
    out = tmp_path_factory.mktemp("runs")
    return [make_run_folder(tiny_config(lam, seed), out) for lam in (0.0, 0.1) for seed in (0, 1)]


@pytest.fixture(scope="session")
def ve_run(tmp_path_factory) -> Path:
    """One DSM+FPE run under VE (to mix with the VP runs: a mismatch)."""
    return make_run_folder(tiny_config(0.1, 0, SDEKind.VE), tmp_path_factory.mktemp("ve"))
