"""`--reg none` vs `--reg fpe` on toy data: mean ± std over seeds of every metric, as Markdown tables.

Trains and evaluates one run folder per (data, SDE, regularizer, seed) under --out (skipping runs that
already have metrics.json, so an interrupted comparison resumes), then prints one table per
(data, SDE): rows are the metrics of ``fpe_lab.metrics.evaluate`` (time-averaged per-time metrics,
NLL, sample distances), columns DSM and DSM+FPE as mean ± std over seeds, and a verdict column:
"fpe" / "none" when that side is lower by more than the two standard deviations combined
(sqrt(sd_none² + sd_fpe²)), "≈" otherwise. Lower is better for every metric listed. Writes nothing
outside --out (the run folders and table.md).

    python benchmarks/compare_toy2d.py --steps 600 --out runs/compare   # the README table
    python benchmarks/compare_toy2d.py --quick                          # smoke test (seconds per run)
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from pathlib import Path

from fpe_lab.checkpoint import atomic_write_text
from fpe_lab.commands.toy2d import METRICS_NAME, run_dir_name, run_toy2d
from fpe_lab.config import Regularizer, SDEKind, ToyData, toy2d

log = logging.getLogger("compare_toy2d")

# (label, path into metrics.json); lower is better for all of them
METRICS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("FPE residual E‖R‖²", ("mean", "fpe_residual")),
    ("FPE residual, relative", ("mean", "fpe_residual_rel")),
    ("score error E‖s−∇log p‖²", ("mean", "score_error")),
    ("score error, relative", ("mean", "score_error_rel")),
    ("asymmetry ‖J−Jᵀ‖²/‖J‖²", ("mean", "jacobian_asymmetry_rel")),
    ("mean abs(curl)", ("mean", "curl_abs")),
    ("NLL (nats), model", ("nll", "model_nats")),
    ("NLL gap model − true (nats)", ("nll", "gap_nats")),
    ("SW₂ reverse-SDE vs data", ("samples", "sliced_wasserstein", "sde_vs_data")),
    ("SW₂ PF-ODE vs data", ("samples", "sliced_wasserstein", "ode_vs_data")),
    ("SW₂ PF-ODE vs SDE", ("samples", "sliced_wasserstein", "ode_vs_sde")),
    ("MMD² reverse-SDE vs data", ("samples", "mmd2", "sde_vs_data")),
    ("MMD² PF-ODE vs data", ("samples", "mmd2", "ode_vs_data")),
    ("SW₂ noise floor (data vs data)", ("samples", "sliced_wasserstein", "floor")),
)
REFERENCE_ROWS = {"SW₂ noise floor (data vs data)"}  # context, not a comparison


def _get(metrics: dict, path: tuple[str, ...]) -> float | None:
    for key in path:
        if not isinstance(metrics, dict) or key not in metrics:
            return None
        metrics = metrics[key]
    return float(metrics)


def _mean_std(values: list[float]) -> tuple[float, float]:
    m = sum(values) / len(values)
    sd = math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return m, sd


def _fmt(m: float, sd: float) -> str:
    return f"{m:.3g} ± {sd:.2g}"


def table(rows: dict[Regularizer, list[dict]]) -> list[str]:
    """Markdown rows comparing the metrics of the two regularizers (lists over seeds)."""
    out = ["| metric | DSM (`--reg none`) | DSM+FPE (`--reg fpe`) | lower |", "|---|---|---|---|"]
    for label, path in METRICS:
        stats = {}
        for reg in (Regularizer.NONE, Regularizer.FPE):
            vals = [v for v in (_get(m, path) for m in rows[reg]) if v is not None]
            stats[reg] = _mean_std(vals) if vals else None
        if stats[Regularizer.NONE] is None or stats[Regularizer.FPE] is None:
            continue
        (m0, s0), (m1, s1) = stats[Regularizer.NONE], stats[Regularizer.FPE]
        margin = math.hypot(s0, s1)
        verdict = "fpe" if m1 < m0 - margin else "none" if m0 < m1 - margin else "≈"
        verdict = "—" if label in REFERENCE_ROWS else verdict
        out.append(f"| {label} | {_fmt(m0, s0)} | {_fmt(m1, s1)} | {verdict} |")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", nargs="+", choices=[d.value for d in ToyData], default=["gmm", "8gaussians"])
    p.add_argument("--sde", nargs="+", choices=[s.value for s in SDEKind], default=["vp", "ve"])
    p.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 per setting")
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--lam", type=float, default=toy2d().lam)
    p.add_argument("--eval-points", type=int, default=500, help="points per time of the per-time metrics")
    p.add_argument("--eval-nll-points", type=int, default=100)
    p.add_argument("--eval-samples", type=int, default=500)
    p.add_argument("--out", type=Path, default=Path("runs/compare_toy2d"))
    p.add_argument("--quick", action="store_true", help="smoke test: 1 data set, 1 SDE, 2 seeds, 20 steps, tiny eval")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    if args.quick:
        args.data, args.sde, args.seeds, args.steps = args.data[:1], args.sde[:1], 2, 20
        args.eval_points, args.eval_nll_points, args.eval_samples = 20, 4, 16
    if args.seeds < 1 or args.steps < 1:
        p.error(f"--seeds and --steps must be >= 1; got {args.seeds}, {args.steps}")
    if args.out.exists() and not args.out.is_dir():
        p.error(f"--out {args.out} is a file")

    settings = [(ToyData(d), SDEKind(s)) for d in args.data for s in args.sde]
    runs = [(d, s, r, seed) for d, s in settings for r in (Regularizer.NONE, Regularizer.FPE) for seed in range(args.seeds)]
    results: dict[tuple, dict[Regularizer, list[dict]]] = {}
    failed: dict[tuple, dict[Regularizer, int]] = {}
    start = time.perf_counter()
    for i, (data, sde, reg, seed) in enumerate(runs, 1):
        config = toy2d(data=data, sde=sde, reg=reg, lam=args.lam, seed=seed, steps=args.steps,
                       eval_points=args.eval_points, eval_nll_points=args.eval_nll_points,
                       eval_samples=args.eval_samples)
        run_dir = args.out / run_dir_name(config)
        rows = results.setdefault((data, sde), {Regularizer.NONE: [], Regularizer.FPE: []})
        if not (run_dir / METRICS_NAME).is_file():
            print(f"[{i}/{len(runs)}] {run_dir.name} ({time.perf_counter() - start:.0f} s so far)", file=sys.stderr)
            try:
                run_toy2d(config, args.out, resume=True, progress=False)
            except FloatingPointError as e:  # a diverged run is reported in the table, not hidden
                print(f"  failed: {e}", file=sys.stderr)
                failed.setdefault((data, sde), {Regularizer.NONE: 0, Regularizer.FPE: 0})[reg] += 1
                continue
        rows[reg].append(json.loads((run_dir / METRICS_NAME).read_text()))

    lines = [f"Command: `python benchmarks/compare_toy2d.py --steps {args.steps} --seeds {args.seeds} "
             f"--data {' '.join(args.data)} --sde {' '.join(args.sde)} --lam {args.lam:g} "
             f"--eval-points {args.eval_points} --eval-nll-points {args.eval_nll_points} "
             f"--eval-samples {args.eval_samples}` (mean ± std over {args.seeds} seeds; EMA weights; "
             f"'lower' names the side lower by more than the combined std, ≈ otherwise; lower is better).", ""]
    for (data, sde), rows in results.items():
        lines += [f"**{data.value}, {sde.value.upper() if sde is not SDEKind.SUBVP else 'sub-VP'}**", ""]
        lines += table(rows)
        n_fail = failed.get((data, sde), {Regularizer.NONE: 0, Regularizer.FPE: 0})
        lines += [f"| runs finished / diverged | {len(rows[Regularizer.NONE])} / {n_fail[Regularizer.NONE]} | "
                  f"{len(rows[Regularizer.FPE])} / {n_fail[Regularizer.FPE]} | — |", ""]
    text = "\n".join(lines)
    print(text)
    atomic_write_text(args.out / "table.md", text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
