"""Tables and the figure of the image-scale study (studies/images/run.sh).

    python studies/images/report.py runs/images                  # print the tables
    python studies/images/report.py runs/images --write DIR      # DIR/summary.md and DIR/deltas.png

Reads every study folder under the given folder (one per data set: digits-gmm, digits), summarises each
with fpe_lab.study.summarize and writes one table per metric (fpe_lab.study.table_across: mean, paired Δ to
the control [95% interval], raw p / Holm p over the data sets × arms of the metric). The figure shows each
arm's paired Δ to the control with its interval, per metric and data set. Lower is better for every metric.
Nothing is written unless --write is given.
"""

from __future__ import annotations

import argparse
import io
from pathlib import Path

from fpe_lab.study import studies_under, summarize, table_across

METRICS = (
    ("nll_gap_nats", "PF-ODE NLL gap to the exact truth (nats; digits-gmm)"),
    ("bits_per_dim", "PF-ODE bits/dim of held-out images (digits)"),
    ("score_error_rel", "relative score error E‖s − ∇log p‖²/E‖∇log p‖² (mean over t; digits-gmm)"),
    ("score_error_small_t", "score error at the smallest evaluation time (digits-gmm)"),
    ("fpe_residual_rel", "relative score-FPE residual, unbiased (mean over t)"),
    ("jacobian_asymmetry_rel", "Jacobian asymmetry ‖J − Jᵀ‖²/‖J‖² (mean over t)"),
    ("dsm", "held-out DSM loss"),
    ("step_time_s", "seconds per training step"),
)
FIGURE_METRICS = ("nll_gap_nats", "bits_per_dim", "score_error_rel", "fpe_residual_rel")


def main() -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0], allow_abbrev=False)
    p.add_argument("root", type=Path, help="the folder run.sh wrote (one study folder per data set)")
    p.add_argument("--write", type=Path, default=None, metavar="DIR", help="write summary.md and deltas.png here")
    args = p.parse_args()
    try:
        found = studies_under(args.root)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    plans = {name: plan for name, (plan, _) in found.items()}
    summaries = {name: summarize(plan, folder) for name, (plan, folder) in found.items()}
    plan = next(iter(plans.values()))
    lines = [f"Data sets: {', '.join(plans)}; seeds {list(plan.seeds)}; tiny U-Net; pre-training "
             f"{plan.pretrain_steps} DSM steps, then {plan.base.optim.steps} steps per arm continuing its weights, "
             f"EMA and Adam state. Control: `{plan.arms[0].name}`. Cells: mean, Δ to the control [95% interval] "
             "(* the interval excludes 0), raw p / Holm p over the data sets × arms of the metric. Lower is better.",
             ""]
    for metric, title in METRICS:
        lines += table_across(summaries, metric, title)
    text = "\n".join(lines)
    print(text)
    if args.write is not None:
        from matplotlib.figure import Figure

        from fpe_lab.checkpoint import atomic_write_bytes, atomic_write_text

        args.write.mkdir(parents=True, exist_ok=True)
        atomic_write_text(args.write / "summary.md", "# The image-scale study\n\n" + text + "\n")
        panels = [(name, m) for m in FIGURE_METRICS for name, rows in summaries.items()
                  if any(f"{m}_diff" in r for r in rows)]
        fig = Figure(figsize=(3.2 * len(panels), 3.2))
        for ax, (name, metric) in zip(fig.subplots(1, len(panels), squeeze=False)[0], panels, strict=True):
            rows = [r for r in summaries[name] if f"{metric}_diff" in r]
            for i, r in enumerate(rows):
                d, lo, hi = r[f"{metric}_diff"], r[f"{metric}_lo"], r[f"{metric}_hi"]
                ax.errorbar([d], [i], xerr=[[d - lo], [hi - d]], fmt="o", capsize=3)
            ax.axvline(0.0, color="k", lw=0.8)
            ax.set_yticks(range(len(rows)), [r["arm"].replace(" ", "\n") for r in rows], fontsize=6)
            ax.set_title(f"{name}: Δ {metric}", fontsize=8)
            ax.tick_params(axis="x", labelsize=7)
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=110)
        atomic_write_bytes(args.write / "deltas.png", buf.getvalue())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
