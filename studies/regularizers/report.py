"""Collect the regularizer study (studies/regularizers/run.sh) into tables and figures in this folder.

    python studies/regularizers/report.py runs/regularizers

For every study folder RUNS/<data>_<sde>/ it reads the plan (study.json) and the finished runs, and
writes into studies/regularizers/:

    summary.md                   per (data, SDE) and arm: paired differences to DSM-only with 95% intervals
    <data>_<sde>.csv             fpe_lab.study.write_summary's full table of that study
    residual_vs_t.png/.pdf       E‖R‖² against t per arm (mean over seeds), one panel per (data, SDE)
    score_error_vs_t.png/.pdf    E‖s − ∇log p‖² against t per arm
    lambda_tradeoff.png/.pdf     NLL gap and relative residual against λ for the g²-weighted arms, with
                                 the normalized-weighting arm and DSM-only as reference lines
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from matplotlib.figure import Figure

from fpe_lab import runs
from fpe_lab.checkpoint import atomic_write_bytes, atomic_write_text
from fpe_lab.study import StudyPlan, summarize, write_summary

HERE = Path(__file__).resolve().parent
COLUMNS = (
    ("nll_gap_nats", "NLL gap (nats)"),
    ("fpe_residual_rel", "residual, rel."),
    ("fpe_residual_small_t", "E‖R‖² at t=0.02"),
    ("score_error_rel", "score error, rel."),
    ("score_error_small_t", "score error at t=0.02"),
    ("jacobian_asymmetry_rel", "asymmetry"),
    ("sw_sde_vs_data", "SW₂ samples"),
)


def _cell(row: dict, name: str) -> str:
    if f"{name}_diff" not in row:
        return f"{row[f'{name}_mean']:.3g}" if f"{name}_mean" in row else "—"
    mark = " *" if row[f"{name}_sig"] else ""
    return f"{row[f'{name}_diff']:+.3g} [{row[f'{name}_lo']:+.3g}, {row[f'{name}_hi']:+.3g}]{mark}"


def _short(arm: str) -> str:
    return arm.replace("reg=", "").replace(" fpe_weighting=", " w=").replace(" lam=", " λ=")


def _save(fig: Figure, stem: str) -> None:
    import io

    for fmt in ("png", "pdf"):
        buf = io.BytesIO()
        fig.savefig(buf, format=fmt, dpi=110)
        atomic_write_bytes(HERE / f"{stem}.{fmt}", buf.getvalue())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs_dir", type=Path, help="the RUNS_DIR given to run.sh")
    args = p.parse_args(argv)
    studies = (sorted(d for d in args.runs_dir.iterdir() if (d / "study.json").is_file())
               if args.runs_dir.is_dir() else [])
    if not studies:
        sys.stderr.write(f"error: no study folders (with study.json) in {args.runs_dir}\n")
        return 2
    lines = ["Paired differences to the DSM-only arm (arm − DSM, same seed; mean over seeds and 95% t-interval; "
             "* where it excludes 0; lower is better everywhere). Rows of DSM-only give its mean.", ""]
    per_time: dict[str, dict[str, dict[str, list[float]]]] = {}
    tradeoff: dict[str, list[dict]] = {}
    for folder in studies:
        plan = StudyPlan.load(folder)
        try:
            rows = summarize(plan, folder)
        except ValueError as e:
            sys.stderr.write(f"skipping {folder.name}: {e}\n")
            continue
        write_summary(rows, HERE, stem=folder.name)
        (HERE / f"{folder.name}.md").unlink(missing_ok=True)  # the csv holds it; summary.md has the table
        tradeoff[folder.name] = rows
        lines += [f"### {folder.name.replace('_', ', ')} ({len(plan.seeds)} seeds; {plan.pretrain_steps} DSM steps, "
                  f"then {plan.base.optim.steps} fine-tuning steps per arm)", "",
                  "| arm | " + " | ".join(label for _, label in COLUMNS) + " | s/step |",
                  "|---" * (len(COLUMNS) + 2) + "|"]
        for row in rows:
            step = row.get("step_time_s_mean")
            lines.append(f"| {row['arm']} | " + " | ".join(_cell(row, n) for n, _ in COLUMNS)
                         + f" | {step:.3f} |" if step is not None else " | — |")
        lines.append("")
        curves: dict[str, dict[str, list[float]]] = {}
        for arm in plan.arms:
            reports = [runs.load(runs.run_dir(plan.config(arm, s, folder), folder)).report for s in plan.seeds]
            curves[arm.name] = {
                "times": list(reports[0].times),
                "residual": [sum(r.per_time.fpe_residual[k] for r in reports) / len(reports)
                             for k in range(len(reports[0].times))],
                "score_error": [sum(r.per_time.score_error[k] for r in reports) / len(reports)
                                for k in range(len(reports[0].times))],
            }
        per_time[folder.name] = curves
    compact = []
    for metric, label in (("nll_gap_nats", "NLL gap to the truth (nats)"), ("fpe_residual_rel", "relative residual"),
                          ("score_error_rel", "relative score error"), ("jacobian_asymmetry_rel", "Jacobian asymmetry"),
                          ("sw_sde_vs_data", "SW₂ of reverse-SDE samples")):
        names = list(tradeoff)
        compact += [f"**Paired difference in {label}, arm − DSM-only** (mean over seeds; * where the 95% interval "
                    "excludes 0; the DSM-only row gives its mean)", "",
                    "| arm | " + " | ".join(n.replace("_", ", ") for n in names) + " |",
                    "|---" * (len(names) + 1) + "|"]
        arms = [r["arm"] for r in tradeoff[names[0]]]
        for arm in arms:
            cells = []
            for n in names:
                row = next(r for r in tradeoff[n] if r["arm"] == arm)
                if f"{metric}_diff" in row:
                    cells.append(f"{row[f'{metric}_diff']:+.3g}{' *' if row[f'{metric}_sig'] else ''}")
                else:
                    cells.append(f"{row[f'{metric}_mean']:.3g}" if f"{metric}_mean" in row else "—")
            compact.append(f"| {_short(arm)} | " + " | ".join(cells) + " |")
        compact.append("")
    atomic_write_text(HERE / "summary.md", "\n".join(compact + lines) + "\n")

    names = list(per_time)
    for metric, label, stem in (("residual", "E‖R‖²", "residual_vs_t"),
                                ("score_error", "E‖s − ∇log p‖²", "score_error_vs_t")):
        cols = min(4, len(names))
        rows_n = (len(names) + cols - 1) // cols
        fig = Figure(figsize=(3.6 * cols, 3.0 * rows_n + 0.8))
        axes = fig.subplots(rows_n, cols, squeeze=False)
        for ax, name in zip(axes.flat, names):
            for arm, c in per_time[name].items():
                ax.loglog(c["times"], c[metric], marker="o", ms=3, lw=1, label=_short(arm))
            ax.set_title(name.replace("_", ", "), fontsize=9)
            ax.set_xlabel("t")
            ax.set_ylabel(label)
        for ax in list(axes.flat)[len(names):]:
            ax.set_visible(False)
        handles, labels = axes.flat[0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="lower center", ncol=min(4, cols + 1), fontsize=7)
        fig.tight_layout(rect=(0, 0.1, 1, 1))
        _save(fig, stem)

    cols = min(4, len(names))
    blocks = (len(names) + cols - 1) // cols
    fig = Figure(figsize=(3.6 * cols, 5.6 * blocks + 0.6))
    grid = fig.subplots(2 * blocks, cols, squeeze=False)
    for ax in grid.flat:
        ax.set_visible(False)
    for k, name in enumerate(names):
        axes = [[grid[2 * (k // cols) + i][k % cols]] for i in range(2)]
        axes = {0: {0: axes[0][0]}, 1: {0: axes[1][0]}}
        rows = tradeoff[name]
        g2 = sorted((float(r["arm"].split("lam=")[1]), r) for r in rows if "fpe_weighting=g2" in r["arm"])
        ref = {r["arm"]: r for r in rows}
        for i, (metric, label) in enumerate((("nll_gap_nats", "NLL gap (nats)"),
                                             ("fpe_residual_rel", "residual, rel."))):
            ax = axes[i][0]
            ax.set_visible(True)
            ax.semilogx([lam for lam, _ in g2], [r[f"{metric}_mean"] for _, r in g2], marker="o", label="FPE, w = g²")
            for arm, color, ls in (("reg=none", "k", "--"), ("reg=fpe fpe_weighting=normalized lam=0.1", "C1", ":")):
                if arm in ref:
                    ax.axhline(ref[arm][f"{metric}_mean"], ls=ls, color=color, label=_short(arm))
            ax.set_xlabel("λ (g²-weighted residual)")
            ax.set_ylabel(label)
            ax.set_yscale("log")
            if i == 0:
                ax.set_title(name.replace("_", ", "), fontsize=9)
    h, lab = grid[0][0].get_legend_handles_labels()
    fig.legend(h, lab, loc="lower center", ncol=3, fontsize=7)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    _save(fig, "lambda_tradeoff")
    sys.stderr.write(f"wrote {HERE / 'summary.md'} and figures for {len(names)} studies\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
