"""Training-step cost of the bridge study's arms against D: DSM vs DSM + score-FPE with exact or Hutchinson ∇·s.

For each D, the Gaussian-mixture data set ``--data mixture --data-dim D`` (fpe_lab.data.mixture) and the
objects the study trains, built by ``fpe_lab.build`` from the ``toy2d`` preset with ``--per-dim``, the
normalized weighting and the generic residual path (R from ``fpe_lab.fpe.score_fpe_residual``: a JVP in
t, the divergence, one more reverse pass for ∇φ, all with create_graph=True). Variants:

* ``dsm``         DSM only;
* ``exact``       DSM + (lam/D)·E w‖R‖², exact ∇·s (D reverse passes; D ≤ 8 only, as in the study);
* ``squared``     the same with a 1-probe Rademacher Hutchinson ∇·s and the estimate ‖R̂‖²;
* ``unbiased``    the same with ⟨R̂₁, R̂₂⟩ from two residuals with independent probes.

One step = loss + backward + Adam update (float32, MLP 3×128). Time: the variants run round-robin
(each repeat runs ``--steps`` steps of every variant in turn, so load drifts on a shared machine hit all
alike); the ratio is the median over repeats of (variant step time / DSM step time in the same repeat).

Peak memory: torch's own CPU allocations during one step above what was live before it, from
torch.profiler's ``profile_memory`` alloc/free records (``step_memory.peak_step_memory``; on CUDA
``max_memory_allocated``) — not tracemalloc, which does not see torch's allocator, and not process RSS.

    python benchmarks/bench_bridge.py            # D = 2 8 32 128 512 3072, batch 256, 7 repeats x 3 steps
    python benchmarks/bench_bridge.py --quick    # the same D, batch 64, 3 repeats x 1 step
    python benchmarks/bench_bridge.py --truth-only --truth-points 64   # only the exact truth's cost

Then the exact truth the study's evaluation needs at each D: ms per point of the score and log p_t (t = 0.5,
VP, float64, chunks of ``--truth-points``) through the full-covariance path (``fpe_lab.gmm``: one D×D
Cholesky per point and component; D ≤ 512, beyond that a chunk's covariances outgrow memory) and through
the low-rank path (``fpe_lab.gmm_lowrank``, Woodbury, O(K·D·r)) for the same mixture (rank 0) and with 8
extra directions per component (``--mixture-rank 8``), with the largest difference between the two paths'
scores where both run.

Writes nothing unless ``--out FILE.json`` is given.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import time
from pathlib import Path

import torch
from step_memory import peak_step_memory, sync

from fpe_lab import build
from fpe_lab.config import RunConfig, toy2d

log = logging.getLogger("bench_bridge")

VARIANTS = ("dsm", "exact", "squared", "unbiased")
EXACT_MAX_D = 8
"""The exact-divergence variant runs for D ≤ 8 only (D reverse passes per step), as in the study."""


def variant_config(variant: str, dim: int, batch: int) -> RunConfig:
    """The study's configuration of one arm at dimension ``dim``."""
    base = {("data", "name"): "mixture", ("data", "dim"): dim, ("optim", "batch"): batch,
            ("loss", "reg", "per_dim"): True, ("loss", "reg", "fpe", "weighting"): "normalized",
            ("loss", "reg", "fpe", "residual_path"): "generic"}
    match variant:
        case "dsm":
            arm = {("loss", "reg", "kind"): "none"}
        case "exact":
            arm = {("loss", "reg", "divergence"): "exact"}
        case "squared" | "unbiased":
            arm = {("loss", "reg", "divergence"): "hutchinson", ("loss", "reg", "estimator"): variant}
        case _:
            raise ValueError(f"variant must be one of {VARIANTS}; got {variant!r}")
    return toy2d().override({**base, **arm})


class Trainer:
    """Model, Adam and loss of one variant from ``fpe_lab.build``; ``step()`` runs one training step."""

    def __init__(self, config: RunConfig) -> None:
        sde = build.build_sde(config.sde)
        self.model = build.build_model(config, sde)
        self.loss = build.build_loss(config, sde)
        self.opt = torch.optim.Adam(self.model.parameters(), lr=config.optim.lr)
        data = build.build_data(config)
        self.gen = torch.Generator().manual_seed(1)
        self.x0 = data.sample(config.optim.batch, torch.Generator().manual_seed(0)).float()

    def step(self) -> float:
        terms = self.loss(self.model, self.x0, self.gen)
        self.opt.zero_grad(set_to_none=True)
        terms.total.backward()
        self.opt.step()
        return float(terms.total.detach())


def bench_dim(dim: int, batch: int, steps: int, repeats: int, warmup: int) -> dict:
    variants = [v for v in VARIANTS if v != "exact" or dim <= EXACT_MAX_D]
    trainers = {v: Trainer(variant_config(v, dim, batch)) for v in variants}
    device = torch.device("cpu")
    for tr in trainers.values():
        for _ in range(warmup):
            tr.step()
    times: dict[str, list[float]] = {v: [] for v in variants}
    for _ in range(repeats):
        for v, tr in trainers.items():
            sync(device)
            t0 = time.perf_counter()
            for _ in range(steps):
                tr.step()
            sync(device)
            times[v].append((time.perf_counter() - t0) / steps)
    mem = {v: peak_step_memory(tr.step, device) for v, tr in trainers.items()}
    out = {}
    for v in variants:
        ratios = [a / b for a, b in zip(times[v], times["dsm"])]
        out[v] = {"ms_per_step_median": 1e3 * statistics.median(times[v]),
                  "time_ratio_median": statistics.median(ratios),
                  "time_ratio_range": [min(ratios), max(ratios)],
                  "peak_step_mib": mem[v] / 2**20,
                  "memory_ratio": mem[v] / mem["dsm"] if mem["dsm"] else float("nan")}
    return out


FULL_TRUTH_MAX_D = 512
"""The full-covariance truth is timed for D ≤ 512 (b·K·D² float64 per chunk: 4 GiB at D = 3072, b = 64)."""


def bench_truth(dim: int, points: int) -> dict:
    """ms per point of the exact score + log p_t at t = 0.5 (VP) through each truth path at dimension ``dim``."""
    from fpe_lab.data.mixture import MixtureTruth, lowrank_mixture_data, mixture_data
    from fpe_lab.sde import VPSDE

    sde = VPSDE()
    x = torch.randn(points, dim, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    out: dict = {}
    paths = {"full": (lambda: MixtureTruth(mixture_data(dim, 4).mixture, sde)) if dim <= FULL_TRUTH_MAX_D else None,
             "lowrank0": lambda: lowrank_mixture_data((dim,), 4, 0).truth(sde),
             "lowrank8": lambda: lowrank_mixture_data((dim,), 4, 8).truth(sde)}
    scores = {}
    for name, make in paths.items():
        if make is None:
            continue
        truth = make()
        truth.score(x[:2], 0.5)  # warm-up
        start = time.perf_counter()
        scores[name] = truth.score(x, 0.5)
        truth.log_prob(x, 0.5)
        out[name] = 1e3 * (time.perf_counter() - start) / points
    if "full" in scores:
        out["max_abs_diff_full_lowrank0"] = float((scores["full"] - scores["lowrank0"]).abs().max())
    return out


def _positive_int(s: str) -> int:
    v = int(s)
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be an int >= 1; got {s}")
    return v


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--quick", action="store_true", help="batch 64, 3 repeats of 1 step, 1 warm-up step")
    p.add_argument("--dims", type=_positive_int, nargs="+", default=[2, 8, 32, 128, 512, 3072], help="the D")
    p.add_argument("--batch", type=_positive_int, default=256)
    p.add_argument("--steps", type=_positive_int, default=3, help="timed steps per variant per repeat")
    p.add_argument("--repeats", type=_positive_int, default=7)
    p.add_argument("--warmup", type=_positive_int, default=2)
    p.add_argument("--threads", type=_positive_int, default=1,
                   help="torch CPU threads (1: no oversubscription on a shared machine)")
    p.add_argument("--truth-points", type=_positive_int, default=256, help="points per exact-truth timing")
    p.add_argument("--truth-only", action="store_true", help="time only the exact truth, no training steps")
    p.add_argument("--out", type=Path, default=None, help="also write the results as JSON here")
    args = p.parse_args(argv)
    if args.quick:
        args.batch, args.steps, args.repeats, args.warmup = 64, 1, 3, 1
    if any(d > 4096 for d in args.dims):
        p.error(f"--dims must be <= 4096 (the mixture data set's limit); got {args.dims}")
    if args.out is not None and args.out.is_dir():
        p.error(f"--out must be a file path; {args.out} is a directory")
    return args


def main(argv: list[str] | None = None) -> dict:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    header = (f"torch {torch.__version__}, cpu, threads {torch.get_num_threads()}, load avg {os.getloadavg()[0]:.1f}, "
              f"VP, MLP 3x128, batch {args.batch}, {args.repeats} repeats x {args.steps} steps, float32; "
              "peak memory: torch.profiler CPU allocations above the memory live before the step")
    results: dict = {"header": header, "dims": {}}
    print(header)
    print(f"{'D':>5} " + " ".join(f"{v + ' ms':>12} {'x DSM t':>8} {'x DSM mem':>9}" for v in VARIANTS))
    for dim in [] if args.truth_only else args.dims:
        res = bench_dim(dim, args.batch, args.steps, args.repeats, args.warmup)
        results["dims"][str(dim)] = res
        cells = []
        for v in VARIANTS:
            r = res.get(v)
            cells.append(f"{'-':>12} {'-':>8} {'-':>9}" if r is None else
                         f"{r['ms_per_step_median']:12.1f} {r['time_ratio_median']:8.2f} {r['memory_ratio']:9.2f}")
        print(f"{dim:>5} " + " ".join(cells), flush=True)
    print(f"\nexact truth (score + log p_t, t = 0.5, float64, {args.truth_points} points): ms per point")
    print(f"{'D':>5} {'full cov.':>10} {'low-rank r=0':>13} {'low-rank r=8':>13} {'max|Δ score| full vs r=0':>26}")
    results["truth"] = {}
    for dim in args.dims:
        r = bench_truth(dim, args.truth_points)
        results["truth"][str(dim)] = r
        full = f"{r['full']:10.3f}" if "full" in r else f"{'-':>10}"
        diff = f"{r['max_abs_diff_full_lowrank0']:26.1e}" if "full" in r else f"{'-':>26}"
        print(f"{dim:>5} {full} {r['lowrank0']:13.3f} {r['lowrank8']:13.3f} {diff}", flush=True)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.out.with_suffix(args.out.suffix + ".tmp")
        tmp.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
        os.replace(tmp, args.out)
    return results


if __name__ == "__main__":
    main()
