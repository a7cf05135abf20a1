"""Tables and figures of the fine-tuning protocol pilot (studies/finetune_protocol/run.sh).

    python studies/finetune_protocol/report.py runs/protocol                 # print the tables
    python studies/finetune_protocol/report.py runs/protocol --write DIR     # summary.md and the figures

Reads every study folder under the given folder (one per data set), summarises each with
fpe_lab.study.summarize (per arm: mean over seeds, the paired difference to the control arm with its 95%
t-interval, the paired t-test's p), and writes one table per metric: rows are the pre-trained model and the
arms, columns the data sets; each cell is the mean and Δ to the control [95% interval], raw p and the Holm
p adjusted over all (data set × arm) comparisons of that metric. Lower is better for every metric. Then the
direction Deveney et al. bound: W2(q_ODE, q_SDE) of every run against its time-integrated residual
∫ sqrt(E‖R‖²) dt (trapezoids over the evaluation times), with Spearman's rank correlation (figure
gap_vs_residual.png), and per data set the truth, q_ODE, q_SDE and q_ODE − q_SDE of the pre-trained model
and each arm at the first seed (gap_arms_<data>.png, from each run's gap.npz).
Nothing is written unless --write is given; paths may be relative or absolute.
"""

from __future__ import annotations

import argparse
import io
import json
import math
from pathlib import Path

import numpy as np
from scipy import stats

from fpe_lab import runs
from fpe_lab.study import PRETRAINED, studies_under, summarize, table_across

METRICS = (
    ("nll_gap_nats", "PF-ODE NLL gap to the truth (nats)"),
    ("sde_nll_gap_nats", "reverse-SDE model NLL gap to the truth (nats, on the gap grid)"),
    ("gap_tv_ode_sde", "TV(q_ODE, q_SDE): the ODE–SDE gap"),
    ("gap_w2_ode_sde", "W2(q_ODE, q_SDE)"),
    ("gap_kl_truth_sde", "KL(p_eps ‖ q_SDE)"),
    ("score_error_rel", "relative score error E‖s − ∇log p‖²/E‖∇log p‖² (mean over t)"),
    ("fpe_residual_rel", "relative score-FPE residual (mean over t)"),
    ("jacobian_asymmetry_rel", "Jacobian asymmetry ‖J − Jᵀ‖²/‖J‖² (mean over t)"),
)


def _rho(points) -> float:
    """Spearman's ρ of W2(q_ODE, q_SDE) against the integrated residual over ``points``."""
    return float(stats.spearmanr([q[1] for q in points], [q[2] for q in points])[0])


def _integrated_residual(report) -> float:
    t, r = report.times, [math.sqrt(max(v, 0.0)) for v in report.per_time.fpe_residual]
    return sum(0.5 * (r[i] + r[i + 1]) * (t[i + 1] - t[i]) for i in range(len(t) - 1))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("root", type=Path, help="the folder run.sh wrote (one study folder per data set)")
    p.add_argument("--write", type=Path, default=None, metavar="DIR", help="write summary.md and the figure here")
    p.add_argument("--title", default="Fine-tuning protocol pilot", help="the heading of summary.md")
    args = p.parse_args()
    try:
        studies = studies_under(args.root)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    first_plan = next(iter(studies.values()))[0]
    control = first_plan.arms[0].name
    lines = [f"Data sets: {', '.join(studies)}; seeds {list(first_plan.seeds)}; pre-training "
             f"{first_plan.pretrain_steps} DSM steps, then {first_plan.base.optim.steps} steps per arm continuing "
             f"its weights, EMA and Adam state. Control: `{control}`. Cells: mean, Δ to the control [95% interval] "
             "(* the interval excludes 0), raw p / Holm p over the data sets × arms of the metric. Lower is better.",
             ""]
    summaries = {name: summarize(plan, folder) for name, (plan, folder) in studies.items()}
    for metric, title in METRICS:
        lines += table_across(summaries, metric, title)
    # the direction of the ODE–SDE bound: W2(ODE, SDE) against the integrated residual, over every run
    points = []
    for name, (plan, folder) in studies.items():
        labelled = [(PRETRAINED, runs.run_dir(plan.pretrain_config(s), folder / "pretrain")) for s in plan.seeds]
        labelled += [(a.name, runs.run_dir(plan.config(a, s, folder), folder)) for a in plan.arms for s in plan.seeds]
        for arm, rf in labelled:
            report = runs.load(rf).report
            if report is not None and report.gap is not None:
                points.append((name, _integrated_residual(report), report.gap.ode_vs_sde["w2"],
                               report.gap.ode_vs_sde["tv"], arm, report.mean.get("score_error_rel", math.nan)))
    fit = [q for q in points if q[5] < 0.5]  # runs whose score was not destroyed (relative score error < 0.5)
    if len(fit) >= 3:  # a study evaluated with --eval-gap-grid (not the convergence check)
        rho, pval = stats.spearmanr([q[1] for q in points], [q[2] for q in points])
        rho_fit, pval_fit = stats.spearmanr([q[1] for q in fit], [q[2] for q in fit])
        lines += ["### The ODE–SDE gap against the time-integrated residual", "",
                  f"Spearman rank correlation of W2(q_ODE, q_SDE) with ∫ sqrt(E‖R‖²) dt over all {len(points)} "
                  f"runs: ρ = {rho:.3f} (p = {pval:.2g}); over the {len(fit)} runs whose relative score error is "
                  f"below 0.5 (excluding the collapsed ones): ρ = {rho_fit:.3f} (p = {pval_fit:.2g}). Each data set "
                  "separately: " + ", ".join(f"{n} ρ = {_rho([q for q in fit if q[0] == n]):.3f}" for n in studies)
                  + ".", ""]
    text = "\n".join(lines)
    print(text)
    if args.write is not None:
        from matplotlib.figure import Figure

        from fpe_lab.checkpoint import atomic_write_bytes, atomic_write_text

        args.write.mkdir(parents=True, exist_ok=True)
        atomic_write_text(args.write / "summary.md", f"# {args.title}\n\n" + text + "\n")
        if len(fit) < 3:
            return 0
        fig = Figure(figsize=(5, 4))
        ax = fig.subplots()
        for name in studies:
            for collapsed in (False, True):
                sel = [q for q in points if q[0] == name and (q[5] >= 0.5) == collapsed]
                ax.loglog([q[1] for q in sel], [q[2] for q in sel], "x" if collapsed else "o", alpha=0.7,
                          label=f"{name}{' (score error > 0.5)' if collapsed else ''}")
        ax.set_xlabel("∫ sqrt(E‖R‖²) dt over the evaluation times")
        ax.set_ylabel("W2(q_ODE, q_SDE) on the gap grid")
        ax.set_title(f"Spearman ρ = {rho:.2f} (all {len(points)} runs), {rho_fit:.2f} ({len(fit)} not collapsed)",
                     fontsize=9)
        ax.legend(fontsize=8)
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=110)
        atomic_write_bytes(args.write / "gap_vs_residual.png", buf.getvalue())
        atomic_write_text(args.write / "points.json", json.dumps(points) + "\n")
        from fpe_lab.figures.gap import gap_figure

        for name, (plan, folder) in studies.items():
            seed = plan.seeds[0]
            labelled = [(PRETRAINED, runs.run_dir(plan.pretrain_config(seed), folder / "pretrain"))]
            labelled += [(a.name, runs.run_dir(plan.config(a, seed, folder), folder)) for a in plan.arms]
            rows = [(f"{name} {arm.replace('reg=', '').replace('fpe_weighting=', '').replace('lam=', 'λ ')}",
                     dict(np.load(rf / "gap.npz"))) for arm, rf in labelled]
            buf = io.BytesIO()
            gap_figure(rows).savefig(buf, format="png", dpi=70)
            atomic_write_bytes(args.write / f"gap_arms_{name}.png", buf.getvalue())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
