"""Run folders as the figures see them: finished 2-D runs with their evaluation report, grouped by λ.

Folders are read by :func:`fpe_lab.runs.load` (``config.json``, the :class:`~fpe_lab.config.RunConfig`;
``metrics.json``, the :class:`~fpe_lab.metrics.evaluate.EvalReport`; ``checkpoint.pt``, the EMA
weights). Figures read these and never train. What is figure-specific lives here: a run must be
finished (trained to its planned steps and evaluated at that step), hold 2-D toy data with a known
truth, and fit with the other runs of a figure (one data set, SDE and time grid). Anything else is a
:class:`RunFolderError` naming the folder and what is wrong, raised before any figure is drawn.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from fpe_lab import build, regularizers
from fpe_lab import runs as run_folders
from fpe_lab.checkpoint import CHECKPOINT_NAME
from fpe_lab.config import RunConfig, Weights
from fpe_lab.figures.style import Variant
from fpe_lab.metrics.evaluate import EvalReport
from fpe_lab.metrics.truth import Truth
from fpe_lab.sde import LinearSDE

__all__ = ["RunFolderError", "Run", "load_run", "load_runs", "by_lam", "pick_run"]

METRICS_NAME = run_folders.METRICS_NAME


class RunFolderError(ValueError):
    """A run folder is missing, unfinished, or does not fit with the other runs of a figure."""


@dataclass(frozen=True)
class Run:
    """One finished run: its folder (:class:`fpe_lab.runs.Run`) and the report of its final weights."""

    folder: run_folders.Run
    report: EvalReport

    @property
    def path(self) -> Path:
        return self.folder.path

    @property
    def config(self) -> RunConfig:
        return self.folder.config

    @property
    def lam(self) -> float:
        """The regularizer weight: 0 for plain DSM (``reg none``)."""
        reg = self.config.loss.reg
        return 0.0 if reg.kind == regularizers.NONE else float(reg.lam)

    @property
    def variant(self) -> Variant:
        return Variant.DSM if self.lam == 0 else Variant.DSM_FPE

    @property
    def seed(self) -> int:
        return self.config.seed

    @property
    def times(self) -> list[float]:
        return [float(t) for t in self.report.times]

    @property
    def sde(self) -> LinearSDE:
        return self.folder.sde

    def data(self):
        """The run's toy distribution (``bounds``, ``sample``, exact p_0)."""
        return build.build_data(self.config)

    def truth(self) -> Truth:
        """The exact p_t of the run's data under its SDE (closed form for mixtures, quadrature otherwise)."""
        data, sde = self.data(), self.sde
        return data.truth(sde)

    def score_model(self) -> torch.nn.Module:
        """The trained score model with the EMA weights (what ``metrics.json`` was computed with),
        float64, in eval mode."""
        try:
            return self.folder.model(weights=Weights.EMA, dtype=torch.float64)
        except (run_folders.RunError, ValueError, FileNotFoundError) as e:
            raise RunFolderError(f"run folder {self.path}: cannot load the EMA weights from {CHECKPOINT_NAME}: "
                                 f"{e}") from None

    def __str__(self) -> str:
        return f"{self.path} ({self.variant.value}, λ={self.lam:g}, seed {self.seed})"


def load_run(path: str | Path) -> Run:
    """Read one finished 2-D run folder; :class:`RunFolderError` if it is missing, unfinished or not 2-D."""
    path = Path(path)
    if not path.is_dir():
        raise RunFolderError(f"run folder {path} does not exist (or is not a folder)")
    try:
        folder = run_folders.load(path)
        config = folder.config
        if config.dim != 2:
            raise RunFolderError(f"run folder {path} holds {config.data.name.value} data of dimension {config.dim}; "
                                 "the figures need runs on 2-D data")
        done, planned = folder.steps_done, config.optim.steps
        report = folder.report
    except (run_folders.RunError, ValueError, OSError) as e:
        if isinstance(e, RunFolderError):
            raise
        raise RunFolderError(str(e) if str(path) in str(e) else f"run folder {path}: {e}") from None
    if done != planned or report is None or report.step != done:
        what = f"{done} of {planned} planned steps done"
        if done == 0:
            what += f" (no {CHECKPOINT_NAME})"
        elif report is None:
            what += f", not evaluated (no {METRICS_NAME})"
        elif report.step != done:
            what += f", {METRICS_NAME} is of step {report.step}"
        hint = f"evaluate it with `python -m fpe_lab.run eval {path}`" if done == planned else \
            f"finish it with `python -m fpe_lab.run toy2d --config {path / 'config.json'} --resume --out {path.parent}`"
        raise RunFolderError(f"run folder {path} is not finished: {what}; {hint}")
    pt = report.per_time
    missing = [name for name, v in (("score_error", pt.score_error), ("score_error_rel", pt.score_error_rel))
               if v is None]
    if missing:
        raise RunFolderError(f"run folder {path} is incomplete: {METRICS_NAME} lacks "
                             f"{', '.join('per_time.' + m for m in missing)} (evaluated without the exact truth)")
    return Run(folder, report)


def _coefficients(config: RunConfig) -> str:
    sde = config.sde.to_dict()
    return " ".join(f"{k}={v:g}" for k, v in sorted(sde.items()) if k != "kind")


def load_runs(paths: Sequence[str | Path]) -> list[Run]:
    """Read several run folders that belong in one figure: same data set, SDE and evaluation times.

    Raises :class:`RunFolderError` naming the offending folder for a missing/unfinished folder, a
    folder given twice, two folders of the same λ and seed, or a data set / SDE (kind or coefficients)
    / time grid that differs from the first run's.
    """
    if not paths:
        raise RunFolderError("no run folders given")
    loaded: list[Run] = []
    seen: set[Path] = set()
    for p in paths:
        run = load_run(p)
        key = run.path.resolve()
        if key in seen:
            raise RunFolderError(f"run folder {run.path} is given twice")
        seen.add(key)
        loaded.append(run)
    first = loaded[0]
    for run in loaded[1:]:
        for what, a, b in (
            ("data set", first.config.data.name.value, run.config.data.name.value),
            ("SDE", first.config.sde.kind.value, run.config.sde.kind.value),
            ("SDE coefficients", _coefficients(first.config), _coefficients(run.config)),
            ("evaluation times", first.times, run.times),
        ):
            if a != b:
                raise RunFolderError(
                    f"run folder {run.path} has {what} {b} but {first.path} has {a}: one figure compares runs of "
                    "one data set and SDE; pass them separately"
                )
    for i, run in enumerate(loaded):
        twins = [r for r in loaded[:i] if r.lam == run.lam and r.seed == run.seed]
        if twins:
            raise RunFolderError(f"run folders {twins[0].path} and {run.path} are the same run "
                                 f"(λ={run.lam:g}, seed {run.seed})")
    return loaded


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
