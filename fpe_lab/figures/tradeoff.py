r"""Figure: the λ trade-off — residual, NLL, score error and sample quality against the regularizer weight.

One panel per headline metric of metrics.json, mean ± std over seeds per λ (λ = 0: DSM, left of the
break of the symmetric-log axis):

* relative score-FPE residual (time average of ``per_time.fpe_residual_rel``);
* NLL gap model − truth in nats (``nll.gap_nats``; 0 = the model's PF-ODE likelihood is exact);
* relative score error (time average of ``per_time.score_error_rel``);
* sliced Wasserstein-2 of reverse-SDE samples to held-out data (``samples.sliced_wasserstein``),
  with the noise floor of two exact sample sets as a grey band.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from fpe_lab.figures.output import save_figure, write_csv
from fpe_lab.figures.runs import Run, by_lam
from fpe_lab.figures.style import FLOOR_COLOR, FULL_WIDTH, lam_color, new_figure, paper_style
from fpe_lab.metrics.evaluate import EvalReport

__all__ = ["PANELS", "make"]

STEM = "lambda_tradeoff"


def _time_mean(values: tuple[float, ...] | None) -> float | None:
    return None if values is None else sum(values) / len(values)


# (column, the number read from a run's EvalReport (None: not measured), y label, log y axis)
PANELS: tuple[tuple[str, Callable[[EvalReport], float | None], str, bool], ...] = (
    ("fpe_residual_rel", lambda r: _time_mean(r.per_time.fpe_residual_rel), "relative FPE residual\n(time average)",
     True),
    ("nll_gap_nats", lambda r: r.nll.gap_nats if r.nll is not None else None, "NLL gap model − true\n(nats)", False),
    ("score_error_rel", lambda r: _time_mean(r.per_time.score_error_rel), "relative score error\n(time average)", True),
    ("sw_sde_vs_data", lambda r: r.samples.sliced_wasserstein.sde_vs_data if r.samples is not None else None,
     "sliced W$_2$ SDE samples\nvs data (length)", False),
)


def make(runs: Sequence[Run], out: Path) -> list[Path]:
    """Draw ``lambda_tradeoff.{png,pdf,csv}``: one point per λ (mean ± std over seeds)."""
    groups = by_lam(runs)
    lams = list(groups)
    positive = [v for v in lams if v > 0]
    linthresh = min(positive) if positive else 1.0
    rows = []
    with paper_style():
        fig = new_figure((FULL_WIDTH, 2.2))
        axes = fig.subplots(1, len(PANELS), squeeze=False)
        for ax, (name, get, ylabel, logy) in zip(axes[0], PANELS):
            xs, ms, ss = [], [], []
            for lam, group in groups.items():
                vals = [float(v) for v in (get(r.report) for r in group) if v is not None]
                if not vals:
                    continue
                m = float(np.mean(vals))
                s = float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0
                xs.append(lam)
                ms.append(m)
                ss.append(s)
                rows.append([name, lam, len(vals), m, s])
                ax.errorbar([lam], [m], yerr=[[min(s, m * 0.999) if logy else s], [s]], fmt="o",
                            color=lam_color(lam, lams), capsize=2, ms=4)
            if xs:
                ax.plot(xs, ms, "-", color="0.6", lw=0.8, zorder=0)
            if name == "sw_sde_vs_data":
                floors = [r.report.samples.sliced_wasserstein.floor for r in runs if r.report.samples is not None]
                if floors:
                    ax.axhline(float(np.mean(floors)), color=FLOOR_COLOR, ls=":", lw=1, label="noise floor")
                    ax.legend(loc="best")
            if name == "nll_gap_nats":
                ax.axhline(0.0, color=FLOOR_COLOR, ls=":", lw=1)
            if not xs:
                ax.text(0.5, 0.5, "not in metrics.json", transform=ax.transAxes, ha="center", va="center")
            ax.set_xscale("symlog", linthresh=linthresh, linscale=0.5)
            ax.set_xticks(lams)
            ax.set_xticklabels([f"{v:g}" for v in lams], rotation=45 if len(lams) > 4 else 0)
            ax.minorticks_off()
            if logy and xs and min(ms) > 0 and max(ms) / min(ms) > 10:  # log only when it spans a decade
                ax.set_yscale("log")
            ax.set_xlabel("λ (0 = DSM)")
            ax.set_ylabel(ylabel)
        cfg = runs[0].config
        seeds = sorted({len(g) for g in groups.values()})
        fig.suptitle(f"λ trade-off, {cfg.data.name.value}, {cfg.sde.kind.value.upper()} SDE: mean ± std over "
                     f"{'/'.join(map(str, seeds))} seeds per λ")
        paths = save_figure(fig, out, STEM)
    paths.append(write_csv(out, STEM, ["metric", "lam", "n_seeds", "mean", "std"], rows))
    return paths
