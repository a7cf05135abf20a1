"""Run folders as the figures see them: the resolved config, the metrics, the trained score model.

A run folder (written by ``python -m fpe_lab.run toy2d`` or ``study``) holds ``config.json``
(:class:`~fpe_lab.config.Toy2dConfig`), ``metrics.json`` (the dict of
:func:`fpe_lab.metrics.evaluate`) and ``checkpoint.pt`` (state dicts, EMA weights under "ema").
Figures read these and never train. Anything missing or inconsistent is a :class:`RunFolderError`
naming the folder and what is wrong, raised before any figure is drawn.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from fpe_lab.checkpoint import CHECKPOINT_NAME, CONFIG_NAME, load_checkpoint
from fpe_lab.config import Regularizer, Toy2dConfig, build_data, build_model, build_sde
from fpe_lab.figures.style import Variant
from fpe_lab.metrics.truth import MixtureTruth, ToyTruth, Truth
from fpe_lab.sde import LinearSDE

__all__ = ["METRICS_NAME", "RunFolderError", "Run", "load_run", "load_runs", "by_lam", "pick_run"]

METRICS_NAME = "metrics.json"

# What the figures read from metrics.json (the schema of fpe_lab.metrics.evaluate).
_REQUIRED_METRICS = ("times", "per_time", "mean")
_REQUIRED_PER_TIME = ("fpe_residual", "fpe_residual_rel", "score_error", "score_error_rel")


class RunFolderError(ValueError):
    """A run folder is missing, incomplete, or does not fit with the other runs of a figure."""


@dataclass(frozen=True)
class Run:
    """One finished run: its folder, resolved config and metrics dict."""

    path: Path
    config: Toy2dConfig
    metrics: dict

    @property
    def lam(self) -> float:
        """The regularizer weight actually used: 0 for plain DSM (``reg=none``), whatever ``lam`` says."""
        return 0.0 if self.config.reg is Regularizer.NONE else float(self.config.lam)

    @property
    def variant(self) -> Variant:
        return Variant.DSM if self.lam == 0 else Variant.DSM_FPE

    @property
    def seed(self) -> int:
        return self.config.seed

    @property
    def times(self) -> list[float]:
        return [float(t) for t in self.metrics["times"]]

    def per_time(self, metric: str) -> list[float]:
        try:
            return [float(v) for v in self.metrics["per_time"][metric]]
        except KeyError:
            raise RunFolderError(f"run folder {self.path}: {METRICS_NAME} has no per_time metric {metric!r}") from None

    def sde(self) -> LinearSDE:
        return build_sde(self.config.sde)

    def data(self):
        return build_data(self.config)

    def truth(self) -> Truth:
        """The exact p_t of the run's data under its SDE (closed form for mixtures, quadrature otherwise)."""
        data, sde = self.data(), self.sde()
        return MixtureTruth(data.mixture, sde) if data.mixture is not None else ToyTruth(data, sde)

    def score_model(self) -> torch.nn.Module:
        """The trained score model with the EMA weights (what ``metrics.json`` was computed with),
        float64, in eval mode."""
        path = self.path / CHECKPOINT_NAME
        if not path.is_file():
            raise RunFolderError(f"run folder {self.path} is incomplete: no {CHECKPOINT_NAME} (needed for field figures)")
        try:
            state = load_checkpoint(path)
            model = build_model(self.config, self.sde(), dtype=torch.float64)
            model.load_state_dict(state["ema"])
        except (KeyError, RuntimeError, ValueError) as e:
            raise RunFolderError(f"run folder {self.path}: cannot load the EMA weights from {CHECKPOINT_NAME}: {e}") from None
        return model.eval().requires_grad_(False)

    def __str__(self) -> str:
        return f"{self.path} ({self.variant.value}, λ={self.lam:g}, seed {self.seed})"


def _read_json(path: Path, run_dir: Path) -> dict:
    if not path.is_file():
        raise RunFolderError(f"run folder {run_dir} is incomplete: no {path.name}")
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RunFolderError(f"run folder {run_dir}: {path.name} is not valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise RunFolderError(f"run folder {run_dir}: {path.name} must hold a JSON object; got {type(value).__name__}")
    return value


def load_run(path: str | Path) -> Run:
    """Read one run folder; :class:`RunFolderError` if it is missing or incomplete."""
    run_dir = Path(path)
    if not run_dir.is_dir():
        raise RunFolderError(f"run folder {run_dir} does not exist (or is not a folder)")
    try:
        config = Toy2dConfig.from_dict(_read_json(run_dir / CONFIG_NAME, run_dir))
    except RunFolderError:
        raise
    except ValueError as e:
        raise RunFolderError(f"run folder {run_dir}: {CONFIG_NAME} is not a toy2d config: {e}") from None
    metrics = _read_json(run_dir / METRICS_NAME, run_dir)
    missing = [k for k in _REQUIRED_METRICS if k not in metrics]
    missing += [f"per_time.{k}" for k in _REQUIRED_PER_TIME if k not in metrics.get("per_time", {})]
    if missing:
        raise RunFolderError(f"run folder {run_dir} is incomplete: {METRICS_NAME} lacks {', '.join(missing)}")
    n_t = len(metrics["times"])
    for k in _REQUIRED_PER_TIME:
        values = metrics["per_time"][k]
        if len(values) != n_t or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in values):
            raise RunFolderError(f"run folder {run_dir}: per_time.{k} in {METRICS_NAME} must be {n_t} finite numbers")
    return Run(run_dir, config, metrics)


def load_runs(paths: Sequence[str | Path]) -> list[Run]:
    """Read several run folders that belong in one figure: same data set, SDE and evaluation times.

    Raises :class:`RunFolderError` naming the offending folder for a missing/incomplete folder, a
    folder given twice, or a data set / SDE / time grid that differs from the first run's.
    """
    if not paths:
        raise RunFolderError("no run folders given")
    runs: list[Run] = []
    seen: dict[Path, Path] = {}
    for p in paths:
        run = load_run(p)
        key = run.path.resolve()
        if key in seen:
            raise RunFolderError(f"run folder {run.path} is given twice")
        seen[key] = run.path
        runs.append(run)
    first = runs[0]
    for run in runs[1:]:
        for what, a, b in (
            ("data set", first.config.data.value, run.config.data.value),
            ("SDE", first.config.sde.value, run.config.sde.value),
            ("evaluation times", first.times, run.times),
        ):
            if a != b:
                raise RunFolderError(
                    f"run folder {run.path} has {what} {b} but {first.path} has {a}: one figure compares runs of "
                    "one data set and SDE; pass them separately"
                )
        twins = [r for r in runs if r is not run and r.lam == run.lam and r.seed == run.seed]
        if twins:
            raise RunFolderError(f"run folders {twins[0].path} and {run.path} are the same (λ={run.lam:g}, seed {run.seed})")
    return runs


def by_lam(runs: Sequence[Run]) -> dict[float, list[Run]]:
    """Runs grouped by λ (0 = DSM), in increasing λ, each group sorted by seed."""
    groups: dict[float, list[Run]] = {}
    for run in runs:
        groups.setdefault(run.lam, []).append(run)
    return {lam: sorted(groups[lam], key=lambda r: r.seed) for lam in sorted(groups)}


def pick_run(runs: Sequence[Run], variant: Variant, lam: float | None = None) -> Run | None:
    """The lowest-seed run of ``variant`` (for DSM+FPE: at ``lam``, default the largest λ); None if absent."""
    groups = by_lam(runs)
    match variant:
        case Variant.DSM:
            chosen = groups.get(0.0)
        case Variant.DSM_FPE:
            positive = [v for v in groups if v > 0]
            if lam is None:
                chosen = groups[max(positive)] if positive else None
            else:
                chosen = groups.get(float(lam))
    return chosen[0] if chosen else None
