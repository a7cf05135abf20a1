"""Cost of the exact score-FPE residual per sample at D = 2, relative to one forward pass.

Model: fpe_lab.model.ScoreModel(fpe_lab.nets.mlp.TimeMLP(2, width, depth), VPSDE()), float32.
Every way of computing R = ∂_t s − ∇[½g² ∇·s + ½g² ‖s‖² − ⟨f, s⟩ − ∇·f] that was tried:

* ``autograd``            fpe_lab.fpe.score_fpe_residual: one forward-mode JVP in t, D reverse passes
                          over the batch sum for ∇·s, one more reverse pass for ∇φ (the library path);
* ``vmap(jacrev∘jacfwd)`` per-sample φ(x, t) with ∇·s = tr(jacfwd s), ∇φ by jacrev, ∂_t s by jacfwd in t,
                          all under torch.func.vmap (written here, for comparison only);
* ``vmap(jacrev∘jacrev)`` the same with ∇·s = tr(jacrev s) (reverse over reverse);
* ``vmap(hessian)``       explicit terms from J = jacrev s and H = jacrev(jacrev s):
                          R = ∂_t s − [½g² (Σ_i H_iki + 2Jᵀs) − a (Jᵀx + s)]  (f = a(t) x);
* ``hutchinson(n)``       the library path with Hutchinson(n, Rademacher) for ∇·s (unbiased, not exact);
* ``jet``                 fpe_lab.nets.jet.jet_score_fpe_residual (Taylor mode),
                          listed when importable.

Not listed because they fail for SiLU networks in torch 2.x: any forward-mode pass over a first
derivative (jacfwd∘jacfwd, jacfwd∘jacrev = torch.func.hessian), since aten::silu_backward has no
forward-AD formula ("Trying to use forward AD with aten::silu_backward that does not support it").

Each exact method is first checked against ``autograd`` in float64 on a small batch (max |ΔR| / max |R|).
Timing: methods run round-robin (each repeat times every method once, in turn), so load drifts on a
shared machine hit all alike; the reported ratio is the median over repeats of (method time / forward
time in the same repeat). ``--train`` times R with create_graph=True plus a backward pass of mean ‖R‖²
to the parameters, relative to forward + backward of mean ‖s‖².

    python benchmarks/bench_residual.py             # batch 4096, MLP 3x128, 7 repeats
    python benchmarks/bench_residual.py --quick     # seconds: batch 256, MLP 2x32, 3 repeats

Writes nothing unless ``--out FILE.json`` is given (written atomically).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch.func import jacfwd, jacrev, vmap
from tqdm import tqdm

from fpe_lab.fpe import Hutchinson, Probe, score_fpe_residual
from fpe_lab.model import ScoreModel
from fpe_lab.nets.mlp import TimeMLP
from fpe_lab.sde import LinearSDE, VPSDE

try:  # the Taylor-mode path; optional here
    from fpe_lab.nets.jet import jet_score_fpe_residual
except ImportError:  # pragma: no cover - depends on the checkout
    jet_score_fpe_residual = None

Method = Callable[[torch.Tensor, torch.Tensor, bool], torch.Tensor]


def _per_sample(model: ScoreModel) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """s(x1, t1) for one sample: x1 of shape (D,), t1 of shape ()."""
    return lambda x1, t1: model(x1[None], t1[None])[0]


def vmap_residual(model: ScoreModel, sde: LinearSDE, inner: Callable) -> Method:
    """R by torch.func: ∂_t s by jacfwd in t; ∇φ by jacrev of φ with ∇·s = tr(``inner`` s), inner = jacfwd or jacrev."""
    s_fn = _per_sample(model)

    def phi(x1, t1):
        s = s_fn(x1, t1)
        div_s = torch.trace(inner(s_fn)(x1, t1))
        g2 = sde.diffusion(t1) ** 2
        a = sde.drift_coef(t1)
        return 0.5 * g2 * (div_s + s @ s) - a * (x1 @ s) - a * x1.shape[0]

    def residual1(x1, t1):
        return jacfwd(s_fn, argnums=1)(x1, t1) - jacrev(phi)(x1, t1)

    def run(x, t, create_graph):
        with torch.set_grad_enabled(create_graph):
            return vmap(residual1)(x, t)

    return run


def hessian_residual(model: ScoreModel, sde: LinearSDE) -> Method:
    """R from explicit J and H (torch.func): ∂_t s − [½g² (Σ_i H_iki + 2Jᵀs) − a (Jᵀx + s)]."""
    s_fn = _per_sample(model)

    def residual1(x1, t1):
        s = s_fn(x1, t1)
        jac = jacrev(s_fn)(x1, t1)  # (D, D): J_ik
        hess = jacrev(jacrev(s_fn))(x1, t1)  # (D, D, D): H_ikl
        grad_div = torch.einsum("iki->k", hess)
        g2 = sde.diffusion(t1) ** 2
        a = sde.drift_coef(t1)
        dt_s = jacfwd(s_fn, argnums=1)(x1, t1)
        return dt_s - (0.5 * g2 * (grad_div + 2 * jac.T @ s) - a * (jac.T @ x1 + s))

    def run(x, t, create_graph):
        with torch.set_grad_enabled(create_graph):
            return vmap(residual1)(x, t)

    return run


def methods(model: ScoreModel, sde: LinearSDE, seed: int) -> dict[str, Method]:
    gen = torch.Generator().manual_seed(seed)
    out: dict[str, Method] = {
        "autograd": lambda x, t, cg: score_fpe_residual(model, sde, x, t, create_graph=cg),
        "vmap(jacrev∘jacfwd)": vmap_residual(model, sde, jacfwd),
        "vmap(jacrev∘jacrev)": vmap_residual(model, sde, jacrev),
        "vmap(hessian)": hessian_residual(model, sde),
        "hutchinson(1)": lambda x, t, cg: score_fpe_residual(
            model, sde, x, t, divergence=Hutchinson(1, Probe.RADEMACHER, gen), create_graph=cg),
        "hutchinson(4)": lambda x, t, cg: score_fpe_residual(
            model, sde, x, t, divergence=Hutchinson(4, Probe.RADEMACHER, gen), create_graph=cg),
    }
    if jet_score_fpe_residual is not None:
        out["jet"] = lambda x, t, cg: jet_score_fpe_residual(model, sde, x, t, create_graph=cg)
    return out


EXACT = ("autograd", "vmap(jacrev∘jacfwd)", "vmap(jacrev∘jacrev)", "vmap(hessian)", "jet")


def check_agreement(model: ScoreModel, sde: LinearSDE, seed: int) -> dict[str, float]:
    """max |R_method − R_autograd| / max |R_autograd| in float64 on 64 points."""
    model64 = ScoreModel(TimeMLP(2, model.net.width, model.net.depth, model.net.n_freq), sde).double()
    model64.load_state_dict(model.state_dict())
    gen = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(64, 2, generator=gen, dtype=torch.float64)
    t = 0.05 + 0.95 * torch.rand(64, generator=gen, dtype=torch.float64)
    ms = methods(model64, sde, seed)
    ref = ms["autograd"](x, t, False)
    return {name: ((ms[name](x, t, False) - ref).abs().max() / ref.abs().max()).item()
            for name in EXACT if name in ms}


def time_once(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def run(args: argparse.Namespace) -> dict:
    torch.manual_seed(args.seed)
    sde = VPSDE()
    model = ScoreModel(TimeMLP(2, args.width, args.depth), sde)
    gen = torch.Generator().manual_seed(args.seed)
    x = torch.randn(args.batch, 2, generator=gen)
    t = 0.05 + 0.95 * torch.rand(args.batch, generator=gen)
    ms = methods(model, sde, args.seed)

    def forward():
        if args.train:
            model.zero_grad(set_to_none=True)
            model(x, t).pow(2).sum(-1).mean().backward()
        else:
            with torch.no_grad():
                model(x, t)

    def make(fn: Method):
        def go():
            if args.train:
                model.zero_grad(set_to_none=True)
                fn(x, t, True).pow(2).sum(-1).mean().backward()
            else:
                fn(x, t, False)
        return go

    calls = {"forward": forward, **{name: make(fn) for name, fn in ms.items()}}
    for go in calls.values():  # warm-up (first-call overheads, allocator)
        go()
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in tqdm(range(args.repeats), desc="repeats", disable=args.quiet):
        for name, go in calls.items():
            times[name].append(time_once(go))
    ratios = {name: statistics.median(v / f for v, f in zip(times[name], times["forward"])) for name in calls}
    return {
        "setup": {"batch": args.batch, "width": args.width, "depth": args.depth, "repeats": args.repeats,
                  "train": args.train, "threads": torch.get_num_threads(), "dtype": "float32", "D": 2},
        "agreement_float64": check_agreement(model, sde, args.seed),
        "median_seconds": {name: statistics.median(v) for name, v in times.items()},
        "ratio_to_forward": ratios,
    }


def report(res: dict) -> str:
    s = res["setup"]
    base = "forward+backward" if s["train"] else "forward"
    lines = [f"score-FPE residual cost, D = 2, MLP {s['depth']}x{s['width']} SiLU, batch {s['batch']}, "
             f"{s['threads']} threads, median of {s['repeats']} round-robin repeats"
             + (" (train: R with create_graph + backward of mean |R|^2)" if s["train"] else " (eval)"),
             f"{'method':<22}{'ms/call':>10}{'us/sample':>11}{'x ' + base:>20}{'float64 |dR|/|R|':>18}"]
    for name, sec in res["median_seconds"].items():
        agree = res["agreement_float64"].get(name)
        lines.append(f"{name:<22}{1e3 * sec:>10.2f}{1e6 * sec / s['batch']:>11.3f}"
                     f"{res['ratio_to_forward'][name]:>20.1f}{'' if agree is None else f'{agree:.1e}':>18}")
    return "\n".join(lines)


def write_atomic(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(data, fh, indent=2)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny sizes: batch 256, MLP 2x32, 3 repeats")
    p.add_argument("--batch", type=int, default=4096, help="points per call (>= 1)")
    p.add_argument("--width", type=int, default=128, help="MLP width (>= 1)")
    p.add_argument("--depth", type=int, default=3, help="MLP hidden layers (>= 1)")
    p.add_argument("--repeats", type=int, default=7, help="round-robin repeats (>= 1)")
    p.add_argument("--train", action="store_true", help="time R with create_graph=True plus backward")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--out", type=Path, default=None, help="also write the results to this JSON file")
    args = p.parse_args(argv)
    if args.quick:
        args.batch, args.width, args.depth, args.repeats = 256, 32, 2, 3
    for name in ("batch", "width", "depth", "repeats"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1; got {getattr(args, name)}")
    if args.threads < 0:
        p.error(f"--threads must be >= 0; got {args.threads}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    res = run(args)
    print(report(res))
    if args.out is not None:
        write_atomic(args.out, res)


if __name__ == "__main__":
    main()
