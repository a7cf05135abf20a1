"""Collect the bridge study (studies/bridge/run.sh) into a table and a figure in this folder.

    python studies/bridge/report.py runs/bridge

For every study folder RUNS/D<D>/ (the Gaussian mixture of fpe_lab.data.mixture in D dimensions) it reads
the plan (study.json) and the finished runs, and writes into studies/bridge/:

    summary.md          per D and arm: relative residual E‖R‖²/(its terms), relative score error
                        E‖s − ∇log p‖²/E‖∇log p‖² (both averaged over the evaluation times), NLL gap
                        (model − true, nats) and its value per dimension, the regularizer's weighted share
                        of the training loss (λ_eff·reg ÷ DSM, last 100 steps); the paired differences to
                        DSM-only (fpe_lab.study.summarize: arm − DSM per seed, 95% t-interval over seeds)
                        and of unbiased − squared Hutchinson; the D whose study is missing or unfinished
    D<D>.csv            fpe_lab.study.write_summary's full table of that D
    bridge.png/.pdf     residual, score error and NLL gap against D per arm (mean over seeds, bars: the
                        seeds' range), log axes (the NLL gap on a symmetric-log axis if a gap is <= 0)

The follow-up RUNS/fixedlam_D<D>/ (run_fixed_lambda.sh: one arm, λ = 0.1 without /D) gets its own table,
paired with the main study's DSM runs of the same seeds, and a dashed line in the figure.

Text in an existing summary.md below the line ``<!-- findings -->`` is kept (the written conclusions).
"""

from __future__ import annotations

import argparse
import io
import math
import re
import sys
from pathlib import Path

from matplotlib.figure import Figure
from scipy import stats

from fpe_lab import runs
from fpe_lab.checkpoint import atomic_write_bytes, atomic_write_text
from fpe_lab.study import StudyPlan, summarize, write_summary

HERE = Path(__file__).resolve().parent
MARKER = "<!-- findings -->"
PLANNED_DIMS = (2, 8, 32, 128, 512)
METRICS = (
    ("fpe_residual_rel", "residual, rel.", lambda r: r.mean["fpe_residual_rel"]),
    ("score_error_rel", "score error, rel.", lambda r: r.mean["score_error_rel"]),
    ("nll_gap_nats", "NLL gap (nats)", lambda r: r.nll.gap_nats),
)
SHORT = {
    "reg=none": "DSM",
    "reg=fpe divergence=exact": "DSM + FPE, exact ∇·s",
    "reg=fpe divergence=hutchinson fpe_estimator=squared": "DSM + FPE, Hutchinson, ‖R̂‖²",
    "reg=fpe divergence=hutchinson fpe_estimator=unbiased": "DSM + FPE, Hutchinson, ⟨R̂₁,R̂₂⟩",
}
SQUARED, UNBIASED = (f"reg=fpe divergence=hutchinson fpe_estimator={e}" for e in ("squared", "unbiased"))


def _interval(diffs: list[float]) -> tuple[float, float, float]:
    """Mean and 95% t-interval of paired differences (infinite with one seed)."""
    n = len(diffs)
    mean = sum(diffs) / n
    if n < 2:
        return mean, -math.inf, math.inf
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (n - 1))
    half = float(stats.t.ppf(0.975, n - 1)) * sd / math.sqrt(n)
    return mean, mean - half, mean + half


def _fmt_diff(mean: float, lo: float, hi: float) -> str:
    mark = " *" if lo > 0 or hi < 0 else ""
    return f"{mean:+.3g} [{lo:+.3g}, {hi:+.3g}]{mark}"


def _cell(row: dict, name: str) -> str:
    mean = f"{row[f'{name}_mean']:.3g}"
    if f"{name}_diff" not in row:
        return mean
    return f"{mean} (Δ {_fmt_diff(row[f'{name}_diff'], row[f'{name}_lo'], row[f'{name}_hi'])})"


def _save(fig: Figure, stem: str) -> None:
    for fmt in ("png", "pdf"):
        buf = io.BytesIO()
        fig.savefig(buf, format=fmt, dpi=110)
        atomic_write_bytes(HERE / f"{stem}.{fmt}", buf.getvalue())


def _per_seed(plan: StudyPlan, folder: Path) -> dict[str, dict[str, list[float]]]:
    """arm → metric → values per seed (in plan.seeds order), read from each run's metrics.json."""
    out: dict[str, dict[str, list[float]]] = {}
    for arm in plan.arms:
        loaded = [runs.load(runs.run_dir(plan.config(arm, s, folder), folder)) for s in plan.seeds]
        reports = [run.report for run in loaded]
        out[arm.name] = {name: [get(r) for r in reports] for name, _, get in METRICS}
        out[arm.name]["nll_true_nats"] = [r.nll.true_nats for r in reports]
        out[arm.name]["reg_share"] = [_reg_share(run) for run in loaded]
    return out


def _reg_share(run) -> float:
    """(lam_eff · regularizer term) / DSM term of the training loss, averaged over the last 100 steps
    (lam_eff = lam/D with --per-dim): how much the regularizer weighs against DSM in the objective."""
    reg = run.config.loss.reg
    lam = reg.lam / run.config.dim if reg.per_dim else reg.lam
    tail = run.history()[-100:]
    return sum(lam * h["fpe"] / h["dsm"] for h in tail) / len(tail)


def _fixed_lambda(runs_dir: Path, done: dict) -> dict[int, dict[str, list[float]]]:
    """D → metric → per-seed values of the finished fixed-λ follow-up (RUNS/fixedlam_D<D>), for the D whose
    main study is finished too (its DSM runs are the control) and whose seeds match."""
    out = {}
    for d in sorted(runs_dir.iterdir()):
        m = re.fullmatch(r"fixedlam_D(\d+)", d.name)
        if not m or not (d / "study.json").is_file() or int(m.group(1)) not in done:
            continue
        plan = StudyPlan.load(d)
        try:
            summarize(plan, d)  # raises for unfinished runs
        except ValueError as e:
            sys.stderr.write(f"skipping {d.name}: {e}\n")
            continue
        (vals,) = _per_seed(plan, d).values()
        if len(vals["fpe_residual_rel"]) == len(done[int(m.group(1))]["reg=none"]["fpe_residual_rel"]):
            out[int(m.group(1))] = vals
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs_dir", type=Path, help="the RUNS_DIR given to run.sh")
    args = p.parse_args(argv)
    folders = {}
    if args.runs_dir.is_dir():
        for d in args.runs_dir.iterdir():
            m = re.fullmatch(r"D(\d+)", d.name)
            if m and (d / "study.json").is_file():
                folders[int(m.group(1))] = d
    if not folders:
        sys.stderr.write(f"error: no study folders D<D>/ (with study.json) in {args.runs_dir}\n")
        return 2
    lines = ["# The bridge study: from 2-D to high-dimensional Gaussian mixtures", "",
             "Written by `python studies/bridge/report.py RUNS` from the runs of `bash studies/bridge/run.sh RUNS` "
             "(sizes and settings: the header of run.sh). Every number is a mean over seeds of a run's "
             "metrics.json; Δ: paired difference to DSM-only (arm − DSM, same seed) with its 95% t-interval over "
             "seeds, * where it excludes 0 (with 2 seeds the t-quantile is 12.7, so only large, consistent "
             "effects are marked). Residual and score error are averaged over the evaluation times; the "
             "residual is exact for D ≤ 16 and an unbiased Hutchinson estimate (⟨R̂₁, R̂₂⟩, 2 probes) above. "
             "Lower is better everywhere.", ""]
    done: dict[int, dict[str, dict[str, list[float]]]] = {}
    missing: list[str] = []
    for dim in sorted(folders):
        folder = folders[dim]
        plan = StudyPlan.load(folder)
        try:
            rows = summarize(plan, folder)
        except ValueError as e:
            missing.append(f"D = {dim}: {e}")
            continue
        write_summary(rows, HERE, stem=folder.name)
        (HERE / f"{folder.name}.md").unlink(missing_ok=True)  # the csv holds it; summary.md has the table
        seeds = _per_seed(plan, folder)
        done[dim] = seeds
        base = plan.base
        lines += [f"## D = {dim} ({len(plan.seeds)} seeds, {base.optim.steps} steps, MLP {base.model.depth}×"
                  f"{base.model.width}, true NLL {sum(seeds['reg=none']['nll_true_nats']) / len(plan.seeds):.4g} "
                  "nats)", "",
                  "| arm | " + " | ".join(label for _, label, _ in METRICS)
                  + " | NLL gap / D | λ_eff·reg ÷ DSM | s/step |",
                  "|---" * (len(METRICS) + 4) + "|"]
        for row in rows:
            step = row.get("step_time_s_mean")
            lines.append(f"| {SHORT.get(row['arm'], row['arm'])} | "
                         + " | ".join(_cell(row, name) for name, _, _ in METRICS)
                         + f" | {row['nll_gap_nats_mean'] / dim:.3g} | "
                         + f"{sum(seeds[row['arm']]['reg_share']) / len(plan.seeds):.2g} | "
                         + (f"{step:.3f} |" if step is not None else "— |"))
        if SQUARED in seeds and UNBIASED in seeds:
            cells = [_fmt_diff(*_interval([u - s for u, s in zip(seeds[UNBIASED][name], seeds[SQUARED][name])]))
                     for name, _, _ in METRICS]
            lines.append("| unbiased − squared (paired) | " + " | ".join(cells) + " | | | |")
        lines.append("")
    fixed = _fixed_lambda(args.runs_dir, done)
    if fixed:
        lines += ["## Follow-up: a fixed weight λ = 0.1 instead of λ/D (`run_fixed_lambda.sh`)", "",
                  "The squared-Hutchinson arm with `per_dim=false lam=0.1` (at D = 2 the main study's arms have "
                  "this same λ_eff = 0.2/2). Δ: paired difference to the main study's DSM-only run of the same "
                  "seed; the last column to the main study's squared arm with λ/D.", "",
                  "| D | " + " | ".join(label for _, label, _ in METRICS) + " | λ_eff·reg ÷ DSM | "
                  "residual, rel.: Δ to λ/D arm |", "|---" * (len(METRICS) + 3) + "|"]
        for dim, vals in sorted(fixed.items()):
            cells = []
            for name, _, _ in METRICS:
                mean = sum(vals[name]) / len(vals[name])
                diff = _interval([a - b for a, b in zip(vals[name], done[dim]["reg=none"][name])])
                cells.append(f"{mean:.3g} (Δ {_fmt_diff(*diff)})")
            vs = _interval([a - b for a, b in zip(vals["fpe_residual_rel"], done[dim][SQUARED]["fpe_residual_rel"])])
            share = sum(vals["reg_share"]) / len(vals["reg_share"])
            lines.append(f"| {dim} | " + " | ".join(cells) + f" | {share:.2g} | {_fmt_diff(*vs)} |")
        lines.append("")
    planned_missing = [d for d in PLANNED_DIMS if d not in folders]
    if missing or planned_missing:
        lines += ["## Missing", ""] + [f"* {m}" for m in missing] + \
                 [f"* D = {d}: no study folder {args.runs_dir}/D{d}" for d in planned_missing] + [""]
    old = (HERE / "summary.md").read_text(encoding="utf-8") if (HERE / "summary.md").is_file() else ""
    kept = old[old.index(MARKER):] if MARKER in old else MARKER + "\n"
    atomic_write_text(HERE / "summary.md", "\n".join(lines) + "\n" + kept)

    dims = sorted(done)
    arms = list(dict.fromkeys(a for d in dims for a in done[d]))
    fig = Figure(figsize=(13.5, 4.4))
    axes = fig.subplots(1, len(METRICS))
    for ax, (name, label, _) in zip(axes, METRICS):
        for k, arm in enumerate(arms):
            xs = [d for d in dims if arm in done[d]]
            vals = [done[d][arm][name] for d in xs]
            mean = [sum(v) / len(v) for v in vals]
            err = [[m - min(v) for m, v in zip(mean, vals)], [max(v) - m for m, v in zip(mean, vals)]]
            # a small offset in D per arm, so that the bars of arms at one D do not overlap
            ax.errorbar([x * 1.06 ** (k - 1.5) for x in xs], mean, yerr=err, marker="o", ms=4, lw=1, capsize=2,
                        label=SHORT.get(arm, arm))
        if fixed:
            xs = sorted(fixed)
            vals = [fixed[d][name] for d in xs]
            mean = [sum(v) / len(v) for v in vals]
            err = [[m - min(v) for m, v in zip(mean, vals)], [max(v) - m for m, v in zip(mean, vals)]]
            ax.errorbar(xs, mean, yerr=err, marker="s", ms=4, lw=1, ls="--", capsize=2, color="k",
                        label="DSM + FPE, Hutchinson, ‖R̂‖², fixed λ = 0.1")
        ax.set_xscale("log", base=2)
        if name == "nll_gap_nats" and any(v <= 0 for d in dims for a in done[d] for v in done[d][a][name]):
            ax.set_yscale("symlog", linthresh=0.1)  # a gap can be negative (the model's NLL is an estimate)
            ax.axhline(0, color="0.6", lw=0.6)
        else:
            ax.set_yscale("log")
        ax.set_xlabel("D")
        ax.set_title(label, fontsize=10)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=7)
    fig.suptitle("Gaussian mixture in D dimensions, VP: mean over seeds (bars: range over seeds)", fontsize=10)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    _save(fig, "bridge")
    n_missing = len(missing) + len(planned_missing)
    sys.stderr.write(f"wrote {HERE / 'summary.md'} and bridge.png/.pdf for D = {dims}"
                     + (f"; missing: {n_missing}" if n_missing else "") + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
