"""`--reg none` vs `--reg fpe` on toy data: mean ± std over seeds of every metric, as Markdown tables.

Trains and evaluates one run folder per (data, SDE, regularizer, seed) under --out with
``fpe_lab.runs.train`` (skipping finished runs and resuming interrupted ones, so an interrupted
comparison resumes), then prints one table per (data, SDE): rows are metrics of the runs'
``EvalReport`` (time-averaged per-time metrics, NLL, sample distances), columns DSM and DSM+FPE as
mean ± std over seeds, and a verdict column:
"fpe" / "none" when that side is lower by more than the two standard deviations combined
(sqrt(sd_none² + sd_fpe²)), "≈" otherwise. Lower is better for every metric listed. Writes nothing
outside --out (the run folders and table.md).

    python benchmarks/compare_toy2d.py --steps 600 --out runs/compare   # the README table
    python benchmarks/compare_toy2d.py --quick                          # smoke test (seconds per run)
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path

from fpe_lab import runs
from fpe_lab.checkpoint import atomic_write_text
from fpe_lab.config import Dataset, DeviceChoice, RunConfig, SDEKind, toy2d
from fpe_lab.metrics.evaluate import EvalReport

log = logging.getLogger("compare_toy2d")

def _time_mean(values: tuple[float, ...] | None) -> float | None:
    return None if values is None else sum(values) / len(values)


def _nll(get: Callable) -> Callable[[EvalReport], float | None]:
    return lambda r: get(r.nll) if r.nll is not None else None


def _samples(get: Callable) -> Callable[[EvalReport], float | None]:
    return lambda r: get(r.samples) if r.samples is not None else None


# (label, the number read from a run's EvalReport, None where not measured); lower is better for all of them
METRICS: tuple[tuple[str, Callable[[EvalReport], float | None]], ...] = (
    ("FPE residual E‖R‖²", lambda r: _time_mean(r.per_time.fpe_residual)),
    ("FPE residual, relative", lambda r: _time_mean(r.per_time.fpe_residual_rel)),
    ("score error E‖s−∇log p‖²", lambda r: _time_mean(r.per_time.score_error)),
    ("score error, relative", lambda r: _time_mean(r.per_time.score_error_rel)),
    ("asymmetry ‖J−Jᵀ‖²/‖J‖²", lambda r: _time_mean(r.per_time.jacobian_asymmetry_rel)),
    ("mean abs(curl)", lambda r: _time_mean(r.per_time.curl_abs)),
    ("NLL (nats), model", _nll(lambda n: n.model_nats)),
    ("NLL gap model − true (nats)", _nll(lambda n: n.gap_nats)),
    ("SW₂ reverse-SDE vs data", _samples(lambda s: s.sliced_wasserstein.sde_vs_data)),
    ("SW₂ PF-ODE vs data", _samples(lambda s: s.sliced_wasserstein.ode_vs_data)),
    ("SW₂ PF-ODE vs SDE", _samples(lambda s: s.sliced_wasserstein.ode_vs_sde)),
    ("MMD² reverse-SDE vs data", _samples(lambda s: s.mmd2.sde_vs_data)),
    ("MMD² PF-ODE vs data", _samples(lambda s: s.mmd2.ode_vs_data)),
    ("SW₂ noise floor (data vs data)", _samples(lambda s: s.sliced_wasserstein.floor)),
)
REFERENCE_ROWS = {"SW₂ noise floor (data vs data)"}  # context, not a comparison
REGS = ("none", "fpe")
TOY_DATA = tuple(d for d in Dataset if not d.is_image)


def _mean_std(values: list[float]) -> tuple[float, float]:
    m = sum(values) / len(values)
    sd = math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return m, sd


def _fmt(m: float, sd: float) -> str:
    return f"{m:.3g} ± {sd:.2g}"


def table(rows: dict[str, list[EvalReport]]) -> list[str]:
    """Markdown rows comparing the metrics of the two regularizers (reports over seeds)."""
    out = ["| metric | DSM (`--reg none`) | DSM+FPE (`--reg fpe`) | lower |", "|---|---|---|---|"]
    for label, get in METRICS:
        stats = {}
        for reg in REGS:
            vals = [float(v) for v in (get(r) for r in rows[reg]) if v is not None]
            stats[reg] = _mean_std(vals) if vals else None
        if stats["none"] is None or stats["fpe"] is None:
            continue
        (m0, s0), (m1, s1) = stats["none"], stats["fpe"]
        margin = math.hypot(s0, s1)
        verdict = "fpe" if m1 < m0 - margin else "none" if m0 < m1 - margin else "≈"
        verdict = "—" if label in REFERENCE_ROWS else verdict
        out.append(f"| {label} | {_fmt(m0, s0)} | {_fmt(m1, s1)} | {verdict} |")
    return out


def run_config(data: Dataset, sde: SDEKind, reg: str, lam: float, seed: int, args) -> RunConfig:
    """The toy2d preset with this comparison's settings (plain DSM: reg none, lam 0)."""
    return toy2d().override({
        ("data", "name"): data, ("sde", "kind"): sde, ("loss", "reg", "kind"): reg,
        ("loss", "reg", "lam"): 0.0 if reg == "none" else lam, ("seed",): seed, ("optim", "steps"): args.steps,
        ("eval", "points"): args.eval_points, ("eval", "nll_points"): args.eval_nll_points,
        ("eval", "samples"): args.eval_samples, ("device",): DeviceChoice(args.device),
    })


def _finished(folder: Path) -> bool:
    try:
        return runs.load(folder).is_finished
    except (runs.RunError, ValueError, OSError):
        return False


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", nargs="+", choices=[d.value for d in TOY_DATA], default=["gmm", "8gaussians"])
    p.add_argument("--sde", nargs="+", choices=[s.value for s in SDEKind], default=["vp", "ve"])
    p.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 per setting")
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--lam", type=float, default=toy2d().loss.reg.lam, help="λ of the DSM+FPE runs (> 0)")
    p.add_argument("--eval-points", type=int, default=500, help="points per time of the per-time metrics")
    p.add_argument("--eval-nll-points", type=int, default=100)
    p.add_argument("--eval-samples", type=int, default=500)
    p.add_argument("--device", choices=[d.value for d in DeviceChoice], default=toy2d().device.value)
    p.add_argument("--out", type=Path, default=Path("runs/compare_toy2d"))
    p.add_argument("--quick", action="store_true", help="smoke test: 1 data set, 1 SDE, 2 seeds, 20 steps, tiny eval")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    if args.quick:
        args.data, args.sde, args.seeds, args.steps = args.data[:1], args.sde[:1], 2, 20
        args.eval_points, args.eval_nll_points, args.eval_samples = 20, 4, 16
    if args.seeds < 1 or args.steps < 1:
        p.error(f"--seeds and --steps must be >= 1; got {args.seeds}, {args.steps}")
    if not args.lam > 0:
        p.error(f"--lam must be > 0 (the DSM+FPE weight; DSM is always compared); got {args.lam:g}")
    if args.out.exists() and not args.out.is_dir():
        p.error(f"--out {args.out} is a file")

    settings = [(Dataset(d), SDEKind(s)) for d in args.data for s in args.sde]
    todo = [(d, s, r, seed) for d, s in settings for r in REGS for seed in range(args.seeds)]
    try:
        configs = [run_config(d, s, r, args.lam, seed, args) for d, s, r, seed in todo]
    except ValueError as e:
        p.error(str(e))
    results: dict[tuple, dict[str, list[EvalReport]]] = {}
    failed: dict[tuple, dict[str, int]] = {}
    start = time.perf_counter()
    for i, ((data, sde, reg, _seed), config) in enumerate(zip(todo, configs), 1):
        folder = runs.run_dir(config, args.out)
        rows = results.setdefault((data, sde), {reg: [] for reg in REGS})
        if not _finished(folder):
            print(f"[{i}/{len(todo)}] {folder.name} ({time.perf_counter() - start:.0f} s so far)", file=sys.stderr)
            try:
                runs.train(config, args.out, resume=True, progress=False)
            except FloatingPointError as e:  # a diverged run is reported in the table, not hidden
                print(f"  failed: {e}", file=sys.stderr)
                failed.setdefault((data, sde), {reg: 0 for reg in REGS})[reg] += 1
                continue
        report = runs.load(folder).report
        if report is None:
            raise AssertionError(f"run folder {folder}: no metrics.json after training")
        rows[reg].append(report)

    lines = [f"Command: `python benchmarks/compare_toy2d.py --steps {args.steps} --seeds {args.seeds} "
             f"--data {' '.join(args.data)} --sde {' '.join(args.sde)} --lam {args.lam:g} "
             f"--eval-points {args.eval_points} --eval-nll-points {args.eval_nll_points} "
             f"--eval-samples {args.eval_samples}` (mean ± std over {args.seeds} seeds; EMA weights; "
             f"'lower' names the side lower by more than the combined std, ≈ otherwise; lower is better).", ""]
    for (data, sde), rows in results.items():
        lines += [f"**{data.value}, {sde.value.upper() if sde is not SDEKind.SUBVP else 'sub-VP'}**", ""]
        lines += table(rows)
        n_fail = failed.get((data, sde), {reg: 0 for reg in REGS})
        lines += [f"| runs finished / diverged | {len(rows['none'])} / {n_fail['none']} | "
                  f"{len(rows['fpe'])} / {n_fail['fpe']} | — |", ""]
    text = "\n".join(lines)
    print(text)
    atomic_write_text(args.out / "table.md", text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
