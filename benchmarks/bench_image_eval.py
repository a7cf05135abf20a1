"""Where the time of an image evaluation goes: the per-time metrics per point, and the PF-ODE NLL solve.

For the tiny U-Net of the ``digits`` (1×8×8) and ``cifar10`` (3×32×32) presets, untrained (the cost does not
depend on the weights much; the NFE does, so it is reported beside the time), on one CPU thread:

* per-time metrics, per point: the two Hutchinson residual evaluations (score_fpe_terms with 2 probes,
  twice: the unbiased ⟨R̂₁, R̂₂⟩ and term scale) and the Jacobian asymmetry (2 probes), as
  fpe_lab.metrics.per_time does them;
* the PF-ODE NLL of ``--nll-points`` points: seconds and score evaluations (NFE) for the batched torch
  Dormand–Prince in float32 (the CPU default) and scipy's RK45 in float64 (the paper protocol), at the
  tolerance given.

    python benchmarks/bench_image_eval.py                  # both presets
    python benchmarks/bench_image_eval.py --quick          # digits only, fewer points

Prints a table; writes nothing.
"""

from __future__ import annotations

import argparse
import time

import torch

from fpe_lab import build
from fpe_lab.config import cifar10, digits
from fpe_lab.likelihood import FixedProbeHutchinson, pf_ode_nll
from fpe_lab.metrics.per_time import per_time_samples
from fpe_lab.sampling import ODEMethod

PRESETS = {"digits": digits, "cifar10": lambda: cifar10(data_dir="unused")}


def _timed(fn, *args, **kwargs):
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("--points", type=int, default=8, help="points of the per-time metrics (default 8)")
    p.add_argument("--nll-points", type=int, default=8, help="points of the NLL solve (default 8)")
    p.add_argument("--rtol", type=float, default=1e-4, help="rtol = atol of the NLL solve (default 1e-4)")
    p.add_argument("--quick", action="store_true", help="digits only, 4 points")
    args = p.parse_args()
    torch.set_num_threads(1)
    names = ["digits"] if args.quick else list(PRESETS)
    points = 4 if args.quick else args.points
    print(f"{'preset':8} {'D':>5} {'per-time s/point':>17} {'NLL dopri5 f32 s (NFE)':>24} "
          f"{'NLL rk45 f64 s (NFE)':>22}")
    for name in names:
        config = PRESETS[name]()
        sde = build.build_sde(config.sde)
        g = torch.Generator().manual_seed(0)
        shape = config.data.shape
        x0 = torch.rand((max(points, args.nll_points), *shape), generator=g) * 2 - 1
        row = []
        for dtype, method in ((torch.float32, ODEMethod.DOPRI5), (torch.float64, ODEMethod.RK45)):
            model = build.build_model(config, sde, dtype=dtype).eval().requires_grad_(False)
            if dtype is torch.float32:
                _, secs = _timed(per_time_samples, model, sde, x0[:points].float(), 0.5, exact=False, probes=2,
                                 batch_size=points, generator=torch.Generator().manual_seed(1), dtype=dtype)
                per_point = secs / points
            x = x0[: args.nll_points].to(dtype)
            div = FixedProbeHutchinson.draw(x, 1, generator=torch.Generator().manual_seed(2))
            res, secs = _timed(pf_ode_nll, model, sde, x, eps=config.loss.eps, method=method, rtol=args.rtol,
                               atol=args.rtol, divergence=div)
            row.append(f"{secs:8.1f} ({res.nfe:4d})")
        d = 1
        for n in shape:
            d *= n
        print(f"{name:8} {d:5d} {per_point:17.2f} {row[0]:>24} {row[1]:>22}", flush=True)


if __name__ == "__main__":
    main()
