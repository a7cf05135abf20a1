r"""Per-time curves over seeds: geometric mean and a ×/÷ geometric-standard-deviation band, per λ.

The residual and the score error span decades across t, so seeds are averaged in log space:

    m(t) = exp(mean_k log v_k(t)),   band = m ·/ exp(std_k log v_k(t)),

which stays positive on a log axis (a ± std band would not). One curve per λ; λ = 0 is DSM.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from fpe_lab.figures.output import save_figure, write_csv
from fpe_lab.figures.runs import Run, RunFolderError, by_lam
from fpe_lab.figures.style import FULL_WIDTH, lam_color, lam_label, new_figure, paper_style
from fpe_lab.metrics.evaluate import PerTime

__all__ = ["Panel", "seed_band", "per_time_figure"]

Panel = tuple[str, Callable[[PerTime], "tuple[float, ...] | None"], str]
"""(metric name for the CSV, its per-time values read from the report's PerTime, y label)."""


def seed_band(values: Sequence[Sequence[float]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(geometric mean, lower, upper) over seeds of positive values of shape (seeds, T)."""
    v = np.asarray(values, dtype=np.float64)
    if v.ndim != 2 or v.shape[0] == 0 or not np.all(np.isfinite(v)) or np.any(v <= 0):
        raise ValueError(f"values must be positive finite numbers of shape (seeds, T); got shape {v.shape}")
    logs = np.log(v)
    m = logs.mean(0)
    s = logs.std(0, ddof=1) if v.shape[0] > 1 else np.zeros_like(m)
    return np.exp(m), np.exp(m - s), np.exp(m + s)


def _values(run: Run, name: str, get: Callable[[PerTime], tuple[float, ...] | None]) -> tuple[float, ...]:
    values = get(run.report.per_time)
    if values is None:
        raise RunFolderError(f"run folder {run.path}: metrics.json has no per_time.{name}")
    return values


def per_time_figure(runs: Sequence[Run], panels: Sequence[Panel], out: Path, stem: str, title: str) -> list[Path]:
    """One panel per (metric, getter, y label) against t (log–log), the getter reading the metric's
    per-time values from each run's report.

    Writes ``stem.{png,pdf,csv}`` into ``out``; the CSV has one row per (metric, λ, t).
    """
    groups = by_lam(runs)
    lams = list(groups)
    times = np.asarray(runs[0].times)
    rows = []
    with paper_style():
        fig = new_figure((FULL_WIDTH, 2.4))
        axes = fig.subplots(1, len(panels), squeeze=False)
        for ax, (metric, get, ylabel) in zip(axes[0], panels):
            for lam, group in groups.items():
                values = [_values(r, metric, get) for r in group]
                m, lo, hi = seed_band(values)
                color = lam_color(lam, lams)
                ax.plot(times, m, "o-", color=color, label=f"{lam_label(lam)} (n={len(group)})")
                if len(group) > 1:
                    ax.fill_between(times, lo, hi, color=color, alpha=0.2, lw=0)
                rows += [[metric, lam, float(t), len(group), float(a), float(b), float(c)]
                         for t, a, b, c in zip(times, m, lo, hi)]
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel("diffusion time t (t = 1: prior)")
            ax.set_ylabel(ylabel)
        axes[0, 0].legend(loc="best")
        cfg = runs[0].config
        fig.suptitle(f"{title} vs t, {cfg.data.name.value}, {cfg.sde.kind.value.upper()} SDE "
                     "(geometric mean over seeds; band: ×/÷ geometric std)")
        paths = save_figure(fig, out, stem)
    paths.append(write_csv(out, stem, ["metric", "lam", "t", "n_seeds", "geo_mean", "band_lo", "band_hi"], rows))
    return paths
