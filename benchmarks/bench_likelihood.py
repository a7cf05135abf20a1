"""PF-ODE NLL cost (fpe_lab.likelihood.pf_ode_nll) for many points.

Times −log p_eps(x) of N points (default 10,000) under the probability-flow ODE of a ScoreModel(TimeMLP
3×128) on 2-D data, VP SDE, RK45 at rtol = atol = 1e-5, eps = 1e-5 (Score SDE's likelihood settings).
Variants, side by side in one run on the same points and weights:

* ``exact-f32``         exact divergence (D = 2 reverse passes), float32 network  (the toy2d default);
* ``exact-f64``         the same in float64 (the verification path);
* ``hutchinson-f32``    one Rademacher probe, fixed per solve (what images use);
* ``exact-f32-chunked`` exact, solved in chunks of 1,000 points (separate adaptive solves);
* ``mixture-exact``     the exact Gaussian-mixture score (float64): the cost of the ODE machinery with
                        a cheap, smooth score, and a check that the NLL matches the closed form.

The network is randomly initialised with a fixed seed (its NFE is typical of an untrained, rough
field; a trained one is smoother). Per variant: wall time, NFE (score evaluations on the whole batch),
ms per NFE, and wall time relative to ``exact-f32``. Full solves run one after another, so on a shared
machine their ratios drift with the load; a second table times one right-hand-side evaluation of each
variant round-robin (median of 5 repeats), which is robust to that.

    python benchmarks/bench_likelihood.py             # 10,000 points
    python benchmarks/bench_likelihood.py --quick     # 200 points at tol 1e-4: checks that it runs

Writes nothing unless ``--out FILE.json`` is given (written atomically).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from fpe_lab.fpe import ExactDivergence, Hutchinson
from fpe_lab.gmm import GaussianMixture
from fpe_lab.likelihood import pf_ode_nll
from fpe_lab.model import ScoreModel
from fpe_lab.nets.mlp import TimeMLP
from fpe_lab.sde import VPSDE

log = logging.getLogger("bench_likelihood")


def _mixture() -> GaussianMixture:
    return GaussianMixture(
        [0.3, 0.7], [[-1.0, 0.5], [1.5, -0.5]], [[[0.3, 0.1], [0.1, 0.2]], [[0.2, 0.0], [0.0, 0.4]]],
        dtype=torch.float64,
    )


def run(n_points: int, rtol: float, atol: float, eps: float, seed: int) -> list[dict]:
    sde = VPSDE()
    mix = _mixture()
    x = mix.sample(n_points, torch.Generator().manual_seed(seed))
    torch.manual_seed(seed)
    net32 = ScoreModel(TimeMLP(dim=2, width=128, depth=3), sde).eval()
    net64 = ScoreModel(TimeMLP(dim=2, width=128, depth=3), sde).double().eval()
    net64.load_state_dict(net32.state_dict())
    variants = {
        "exact-f32": lambda: pf_ode_nll(net32, sde, x.float(), eps=eps, rtol=rtol, atol=atol),
        "exact-f64": lambda: pf_ode_nll(net64, sde, x, eps=eps, rtol=rtol, atol=atol),
        "hutchinson-f32": lambda: pf_ode_nll(
            net32, sde, x.float(), eps=eps, rtol=rtol, atol=atol,
            divergence=Hutchinson(generator=torch.Generator().manual_seed(seed + 1))),
        "exact-f32-chunked": lambda: pf_ode_nll(net32, sde, x.float(), eps=eps, rtol=rtol, atol=atol,
                                                batch_size=min(1000, n_points)),
        "mixture-exact": lambda: pf_ode_nll(mix.score_fn(sde), sde, x, eps=eps, rtol=rtol, atol=atol),
    }
    with torch.enable_grad():  # warm-up: first-call allocations and kernel selection are not timed
        for net, dt in ((net32, torch.float32), (net64, torch.float64)):
            xw = x[:8].to(dt).requires_grad_(True)
            net(xw, torch.full((8,), 0.5, dtype=dt)).sum().backward()
    rows = []
    for name, fn in variants.items():
        t0 = time.perf_counter()
        res = fn()
        wall = time.perf_counter() - t0
        row = {"variant": name, "n_points": n_points, "wall_s": wall, "nfe": res.nfe,
               "ms_per_nfe": 1e3 * wall / res.nfe, "nats": float(res.nats.mean())}
        if name == "mixture-exact":
            row["max_err_vs_closed_form"] = float((res.nats + mix.log_prob(x, eps, sde)).abs().max())
        rows.append(row)
        log.info("%s done in %.2f s", name, wall)
    base = rows[0]["wall_s"]
    for r in rows:
        r["time_vs_exact_f32"] = r["wall_s"] / base
    return rows


def rhs_cost(n_points: int, seed: int, repeats: int = 5) -> list[dict]:
    """Cost of one right-hand-side evaluation (score + divergence on all points), round-robin.

    Full solves take minutes each, so load on a shared machine drifts between variants; here every
    repeat times each variant once in turn and the ratio is the median over repeats of
    (variant time / exact-f32 time in the same repeat).
    """
    from fpe_lab.likelihood import _freeze

    sde = VPSDE()
    torch.manual_seed(seed)
    net32 = ScoreModel(TimeMLP(dim=2, width=128, depth=3), sde).eval()
    net64 = ScoreModel(TimeMLP(dim=2, width=128, depth=3), sde).double().eval()
    net64.load_state_dict(net32.state_dict())
    x = _mixture().sample(n_points, torch.Generator().manual_seed(seed))
    chunk = min(1000, n_points)

    def one(net, xs, divergence):
        for c in xs.split(chunk if divergence == "chunked" else xs.shape[0]):
            xx = c.detach().requires_grad_(True)
            div = _freeze(Hutchinson() if divergence == "hutchinson" else ExactDivergence(), xx)
            div(net(xx, torch.full((c.shape[0],), 0.5, dtype=c.dtype)), xx)

    variants = {
        "exact-f32": lambda: one(net32, x.float(), "exact"),
        "exact-f64": lambda: one(net64, x, "exact"),
        "hutchinson-f32": lambda: one(net32, x.float(), "hutchinson"),
        "exact-f32-chunked": lambda: one(net32, x.float(), "chunked"),
    }
    for fn in variants.values():  # warm-up
        fn()
    times: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(repeats):
        for name, fn in variants.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    base = times["exact-f32"]
    return [{"variant": k, "ms_per_eval": 1e3 * statistics.median(v),
             "ratio_vs_exact_f32": statistics.median(a / b for a, b in zip(v, base))} for k, v in times.items()]


def _write_atomic(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--n-points", type=int, default=10_000, help="points whose NLL is computed")
    parser.add_argument("--quick", action="store_true", help="200 points at tol 1e-4: a smoke run")
    parser.add_argument("--tol", type=float, default=1e-5, help="rtol = atol of RK45")
    parser.add_argument("--eps", type=float, default=1e-5, help="start time of the ODE")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="also write the rows to this JSON file")
    args = parser.parse_args(argv)
    if args.n_points < 1 or not (0 < args.tol < 1) or not (0 < args.eps < 1):
        parser.error("need --n-points >= 1, 0 < --tol < 1, 0 < --eps < 1")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    n = 200 if args.quick else args.n_points
    tol = 1e-4 if args.quick else args.tol
    rows = run(n, tol, tol, args.eps, args.seed)
    print(f"PF-ODE NLL, VP, RK45 rtol=atol={tol:g}, eps={args.eps:g}, {n} points, "
          f"torch threads={torch.get_num_threads()}")
    print(f"{'variant':<20}{'wall s':>9}{'NFE':>7}{'ms/NFE':>9}{'x exact-f32':>13}{'mean nats':>11}")
    for r in rows:
        print(f"{r['variant']:<20}{r['wall_s']:>9.2f}{r['nfe']:>7d}{r['ms_per_nfe']:>9.2f}"
              f"{r['time_vs_exact_f32']:>13.2f}{r['nats']:>11.4f}")
    cost = rhs_cost(n, args.seed)
    print(f"one right-hand side (score + divergence of {n} points), median of 5 round-robin repeats:")
    print(f"{'variant':<20}{'ms/eval':>9}{'x exact-f32':>13}")
    for r in cost:
        print(f"{r['variant']:<20}{r['ms_per_eval']:>9.2f}{r['ratio_vs_exact_f32']:>13.2f}")
    mix_row = rows[-1]
    print(f"mixture-exact: max |NLL − closed form| = {mix_row['max_err_vs_closed_form']:.3g} nats "
          "(prior mismatch + RMS-controlled ODE error)")
    if args.out is not None:
        _write_atomic(args.out, {"solves": rows, "rhs_cost": cost})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
