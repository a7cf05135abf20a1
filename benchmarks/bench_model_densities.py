"""Cost of the two model densities on a grid (fpe_lab.metrics.model_densities) for a network score.

Times ``model_densities`` for an untrained ScoreModel(TimeMLP 3×128) under VP on the box [−6.5, 6.5]²
(where the N(0, I) prior has p/max ≈ 1e-9 on the walls), eps = 1e-3, t0 = 1, at N = 64 and 128 cells
per axis, on one thread, and prints the split between the two parts:

* PF-ODE: every cell centre is one point of one batched DOPRI5 solve (per-point error control, exact
  divergence: one forward and D = 2 reverse passes per evaluation);
* reverse SDE: Scharfetter–Gummel FPE steps; each step evaluates the score at the cell faces of both
  axes at two stage times (4 forward passes over ~N² points).

Settings (chosen to bring N = 128 to about a minute on one core; see the module's report):
float64 network, ODE rtol = atol = 1e-4, 50 FPE steps, one ODE batch of all cells. On the exact
mixture score at 64² the ODE tolerance 1e-4 left TV(q_ODE, p_eps) = 2.0e-6 (1e-5: 2.5e-7, 1e-3:
8.4e-6), far below the FPE's grid floor (8e-3 at 64²); 50 steps changed that floor by 5% against 200.
Chunks of 1,024 points cost more (each chunk needs as many steps as the whole batch: NFE 4 × 164
against 170 for one solve).

The network is randomly initialised with a fixed seed: an untrained field is rough (its NFE is larger
than a trained one's) and pushes mass against the walls, so the BoundaryWarnings are expected and
silenced here. The absolute times depend on the machine's load.

    python benchmarks/bench_model_densities.py            # N = 64 and 128 (about 1.5 minutes)
    python benchmarks/bench_model_densities.py --quick    # N = 24, loose tolerance: checks that it runs

Writes nothing unless ``--out FILE.json`` is given.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
import warnings
from pathlib import Path

import torch

from fpe_lab.groundtruth import Grid
from fpe_lab.metrics import model_densities
from fpe_lab.model import ScoreModel
from fpe_lab.nets.mlp import TimeMLP
from fpe_lab.sde import VPSDE

log = logging.getLogger("bench_model_densities")

BOX = 6.5


def run(sizes: list[int], rtol: float, steps: int, dtype: torch.dtype, seed: int) -> list[dict]:
    sde = VPSDE()
    torch.manual_seed(seed)
    model = ScoreModel(TimeMLP(dim=2, width=128, depth=3), sde).to(dtype).eval()
    with torch.enable_grad():  # warm-up: first-call allocations are not timed
        xw = torch.zeros(8, 2, dtype=dtype, requires_grad=True)
        model(xw, torch.full((8,), 0.5, dtype=dtype)).sum().backward()
    rows = []
    for n in sizes:
        grid = Grid(((-BOX, BOX), (-BOX, BOX)), (n, n))
        began = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # BoundaryWarning: expected for an untrained network
            md = model_densities(model, sde, grid, eps=1e-3, ode_rtol=rtol, ode_atol=rtol, sde_steps=steps)
        wall = time.perf_counter() - began
        info = md.info
        rows.append({
            "n": n, "cells": n * n, "wall_s": wall, "ode_s": info["ode_seconds"], "ode_nfe": info["ode_nfe"],
            "ode_ms_per_nfe": 1e3 * info["ode_seconds"] / info["ode_nfe"], "sde_s": info["sde_seconds"],
            "sde_steps": info["sde_steps"], "sde_ms_per_step": 1e3 * info["sde_seconds"] / info["sde_steps"],
            "rtol": rtol, "dtype": str(dtype).removeprefix("torch."),
        })
        log.info("N = %d done in %.1f s", n, wall)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="N = 24, rtol 1e-3, 10 steps: checks that it runs")
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 128], help="cells per axis")
    parser.add_argument("--rtol", type=float, default=1e-4, help="ODE rtol = atol")
    parser.add_argument("--steps", type=int, default=50, help="reverse-FPE steps")
    parser.add_argument("--float32", action="store_true", help="network in float32 (default float64)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="write the rows as JSON here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(args.threads)
    sizes, rtol, steps = ([24], 1e-3, 10) if args.quick else (args.sizes, args.rtol, args.steps)
    rows = run(sizes, rtol, steps, torch.float32 if args.float32 else torch.float64, args.seed)

    print(f"model_densities, ScoreModel(TimeMLP 3x128) untrained, VP, box ±{BOX}, eps 1e-3, "
          f"{args.threads} thread(s), ODE rtol=atol={rtol:g}, {steps} FPE steps, {rows[0]['dtype']}")
    print(f"{'N':>5} {'cells':>7} {'total s':>8} {'ODE s':>7} {'NFE':>5} {'ms/NFE':>7} {'SDE s':>7} {'steps':>5} "
          f"{'ms/step':>8} {'ODE share':>9}")
    for r in rows:
        print(f"{r['n']:>5} {r['cells']:>7} {r['wall_s']:>8.1f} {r['ode_s']:>7.1f} {r['ode_nfe']:>5} "
              f"{r['ode_ms_per_nfe']:>7.1f} {r['sde_s']:>7.1f} {r['sde_steps']:>5} {r['sde_ms_per_step']:>8.1f} "
              f"{r['ode_s'] / (r['ode_s'] + r['sde_s']):>9.0%}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
