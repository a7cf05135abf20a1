"""Training-step cost of DSM vs DSM + score-FPE regularizer (generic autograd path vs jet path).

One step = loss (fpe_lab.losses.ScoreFPELoss) + backward + Adam update of a ScoreModel(TimeMLP) on
D-dimensional points. Three variants per MLP size, same initial weights and batches:

* ``dsm``          DSM only (sigma² weighting);
* ``fpe-generic``  DSM + lam·E w(t)‖R‖², R from fpe_lab.fpe.score_fpe_residual (JVP in t + D reverse
                   passes for ∇·s + one reverse pass for ∇φ, all with create_graph=True);
* ``fpe-jet``      the same loss, R from the jet pass (fpe_lab.nets.jet) called as a plain residual
                   function, so DSM runs its own forward pass (two passes);
* ``fpe-jet-shared`` the same loss through the library path: FPERegularizer with
                   ``residual=jet_score_fpe_residual`` at the DSM points hands the jet's value stream
                   to DSM (ScoreFPELoss, SharesScore), one pass fewer; checked equal to ``fpe-jet``'s loss.

Time: the variants run round-robin (each repeat runs ``--steps`` steps of every variant in turn), so
load drifts on a shared machine hit all of them alike; the ratio is the median over repeats of
(variant step time / DSM step time in the same repeat).

Peak memory: the largest amount of tensor memory allocated during one step on top of what was live
before it (parameters, Adam state, the batch). On CUDA: torch.cuda.max_memory_allocated. On CPU: the
running sum of the allocation/free records of torch.profiler (profile_memory=True), i.e. torch's own
allocations, not the process RSS.

    python benchmarks/bench_train_step.py            # MLP 3x256 and 3x128, batch 512, D = 2
    python benchmarks/bench_train_step.py --quick    # seconds: tiny sizes, checks that it runs

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
from dataclasses import dataclass
from pathlib import Path

import torch
from step_memory import peak_step_memory, sync
from tqdm import tqdm

from fpe_lab.fpe import score_fpe_residual
from fpe_lab.losses import ScoreFPELoss
from fpe_lab.model import ScoreModel
from fpe_lab.nets.jet import jet_score_fpe_residual
from fpe_lab.nets.mlp import TimeMLP
from fpe_lab.regularizers.fpe import FPERegularizer
from fpe_lab.sde import LinearSDE, SubVPSDE, VESDE, VPSDE

log = logging.getLogger("bench_train_step")

VARIANTS = ("dsm", "fpe-generic", "fpe-jet", "fpe-jet-shared")


@dataclass(frozen=True)
class Setup:
    width: int
    depth: int
    dim: int
    batch: int
    sde: LinearSDE
    device: torch.device
    n_freq: int = 8
    dtype: torch.dtype = torch.float32


class Trainer:
    """One model, optimizer and loss for one variant; ``step()`` runs one training step."""

    def __init__(self, variant: str, setup: Setup, seed: int = 0) -> None:
        torch.manual_seed(seed)
        net = TimeMLP(dim=setup.dim, width=setup.width, depth=setup.depth, n_freq=setup.n_freq)
        self.model = ScoreModel(net, setup.sde).to(setup.device, setup.dtype)
        self.opt = torch.optim.Adam(self.model.parameters(), lr=2e-4)
        match variant:
            case "dsm":
                reg = None
            case "fpe-generic":
                reg = FPERegularizer(lam=0.1, residual=score_fpe_residual)
            case "fpe-jet":
                reg = FPERegularizer(lam=0.1, residual=_two_pass_jet_residual)
            case "fpe-jet-shared":
                reg = FPERegularizer(lam=0.1, residual=jet_score_fpe_residual)
            case _:
                raise ValueError(f"variant must be one of {VARIANTS}; got {variant!r}")
        self.loss = ScoreFPELoss(setup.sde, eps=1e-5, regularizer=reg)
        self.gen = torch.Generator(device=setup.device).manual_seed(seed + 1)
        self.x0 = torch.randn(setup.batch, setup.dim, generator=self.gen, device=setup.device, dtype=setup.dtype)

    def step(self) -> float:
        terms = self.loss(self.model, self.x0, self.gen)
        self.opt.zero_grad(set_to_none=True)
        terms.total.backward()
        self.opt.step()
        return float(terms.total.detach())


def _two_pass_jet_residual(model, sde, x, t, divergence=None, create_graph=False):
    """The jet residual as a plain function (no ``with_score``), so ScoreFPELoss runs DSM's own forward."""
    return jet_score_fpe_residual(model, sde, x, t, divergence=divergence, create_graph=create_graph)


def check_shared_loss(setup: Setup) -> None:
    """The shared-forward loss (library path) is the same number as the two-pass jet loss."""
    shared, two_pass = Trainer("fpe-jet-shared", setup), Trainer("fpe-jet", setup)
    a_terms = shared.loss(shared.model, shared.x0, shared.gen)
    b_terms = two_pass.loss(two_pass.model, two_pass.x0, two_pass.gen)
    for name in ("dsm", "reg"):
        a, b = getattr(a_terms, name).item(), getattr(b_terms, name).item()
        # float32 round-off of two evaluation orders of the same term
        if abs(a - b) > 1e-4 * abs(b):
            raise RuntimeError(f"shared-forward {name} term {a} differs from the two-pass loss's {b}")


def matmul_flop_ratio(setup: Setup) -> dict[str, float | None]:
    """Matmul FLOPs of a step relative to DSM's, counting a backward pass as 2 forward passes.

    DSM forward: 2b [(D + 2F) H + (L − 1) H² + H D]. The jet adds K = 1 + D + D(D+1)/2 streams
    through layers 2..L and the output (the first layer's spatial streams are W1's columns; its
    ∂_t stream is a (2F × H) product). The generic path is not counted (nested autograd).
    """
    b, d, h, depth, n_freq = setup.batch, setup.dim, setup.width, setup.depth, setup.n_freq
    k = 1 + d + d * (d + 1) // 2
    dsm = 2 * b * ((d + 2 * n_freq) * h + (depth - 1) * h * h + h * d)
    streams = 2 * b * (2 * n_freq * h + k * ((depth - 1) * h * h + h * d))
    return {
        "dsm": 1.0,
        "fpe-generic": None,
        "fpe-jet": (2 * dsm + streams) / dsm,  # DSM's own forward + the jet
        "fpe-jet-shared": (dsm + streams) / dsm,  # the jet's value stream serves DSM
    }


def bench_size(setup: Setup, steps: int, repeats: int, warmup: int) -> dict:
    check_shared_loss(setup)
    trainers = {v: Trainer(v, setup) for v in VARIANTS}
    for tr in trainers.values():
        for _ in range(warmup):
            tr.step()
    times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for _ in tqdm(range(repeats), desc=f"MLP {setup.depth}x{setup.width}", leave=False):
        for v, tr in trainers.items():
            sync(setup.device)
            t0 = time.perf_counter()
            for _ in range(steps):
                tr.step()
            sync(setup.device)
            times[v].append((time.perf_counter() - t0) / steps)
    mem = {v: peak_step_memory(tr.step, setup.device) for v, tr in trainers.items()}
    flops = matmul_flop_ratio(setup)
    out = {}
    for v in VARIANTS:
        ratios = [a / b for a, b in zip(times[v], times["dsm"])]
        out[v] = {
            "ms_per_step_median": 1e3 * statistics.median(times[v]),
            "ms_per_step_min": 1e3 * min(times[v]),
            "time_ratio_median": statistics.median(ratios),
            "time_ratio_range": [min(ratios), max(ratios)],
            "peak_step_mib": mem[v] / 2**20,
            "memory_ratio": mem[v] / mem["dsm"] if mem["dsm"] else float("nan"),
            "matmul_flop_ratio": flops[v],
        }
    return out


def _positive_int(s: str) -> int:
    v = int(s)
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be an int >= 1; got {s}")
    return v


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="3x32, batch 64, 3 repeats of 1 step (overrides those options): checks that it runs",
    )
    p.add_argument("--widths", type=_positive_int, nargs="+", default=[256, 128], help="MLP widths")
    p.add_argument("--depth", type=_positive_int, default=3, help="hidden layers")
    p.add_argument("--dim", type=_positive_int, default=2, help="data dimension D")
    p.add_argument("--batch", type=_positive_int, default=512)
    p.add_argument("--sde", choices=["ve", "vp", "subvp"], default="vp")
    p.add_argument("--steps", type=_positive_int, default=5, help="timed steps per variant per repeat")
    p.add_argument("--repeats", type=_positive_int, default=7)
    p.add_argument("--warmup", type=_positive_int, default=2)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument(
        "--threads",
        type=_positive_int,
        default=1,
        help="torch CPU threads; 1 because on a shared, oversubscribed machine every multi-threaded op "
        "waits for a time slice (measured: a 512x256x256 matmul took 28 ms with 2 threads, 2.7 ms with 1)",
    )
    p.add_argument("--out", type=Path, default=None, help="also write the results as JSON here")
    args = p.parse_args(argv)
    if args.quick:
        args.widths, args.batch, args.steps, args.repeats, args.warmup = [32], 64, 1, 3, 1
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: CUDA is not available")
    if args.out is not None and args.out.is_dir():
        p.error(f"--out must be a file path; {args.out} is a directory")
    return args


def _write_json_atomic(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> dict:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parse_args(argv)
    match args.sde:
        case "ve":
            sde = VESDE()
        case "vp":
            sde = VPSDE()
        case "subvp":
            sde = SubVPSDE()
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    header = (
        f"torch {torch.__version__}, device {device}, threads {torch.get_num_threads()}, "
        f"load avg {os.getloadavg()[0]:.1f}, sde {args.sde}, D {args.dim}, batch {args.batch}, "
        f"{args.repeats} repeats x {args.steps} steps, float32"
    )
    results = {"header": header, "sizes": {}}
    mem_kind = "cuda max_memory_allocated" if device.type == "cuda" else "torch.profiler CPU allocations"
    print(f"\n{header}\npeak memory: {mem_kind}, above the memory live before the step")
    print(
        f"{'MLP':>8} {'variant':>15} {'ms/step':>9} {'x DSM time':>11} {'(range)':>13} "
        f"{'peak MiB':>9} {'x DSM mem':>10} {'x DSM mm-FLOP':>14}"
    )
    for width in args.widths:
        setup = Setup(width=width, depth=args.depth, dim=args.dim, batch=args.batch, sde=sde, device=device)
        res = bench_size(setup, args.steps, args.repeats, args.warmup)
        name = f"{args.depth}x{width}"
        results["sizes"][name] = res
        for v, r in res.items():
            lo, hi = r["time_ratio_range"]
            print(
                f"{name:>8} {v:>15} {r['ms_per_step_median']:9.1f} {r['time_ratio_median']:11.2f} "
                f"{f'{lo:.2f}-{hi:.2f}':>13} {r['peak_step_mib']:9.1f} {r['memory_ratio']:10.2f} "
                f"{'-' if r['matmul_flop_ratio'] is None else format(r['matmul_flop_ratio'], '.2f'):>14}"
            )
    if args.out is not None:
        _write_json_atomic(args.out, results)
    return results


if __name__ == "__main__":
    main()
