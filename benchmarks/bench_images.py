"""Training-step cost on images: DSM vs DSM + score-FPE regularizer with 1, 2, 4 Hutchinson probes.

One step = loss + backward + Adam update of ScoreModel(UNet) on a batch of random images of the shape of
``--data`` (3×32×32 for cifar10, 1×8×8 for digits; no data are read), with the model and loss of the
``cifar10``/``digits`` presets built by fpe_lab.build (sigma² DSM + (lam/D)·E w(t)‖R‖², R from
fpe_lab.fpe.score_fpe_residual with fpe_lab.fpe.Hutchinson(n_probes)), eps = 1e-3. Variants share initial weights
and batches and run round-robin (each repeat runs ``--steps`` steps of every variant), so load drift on
a shared machine hits all alike; a ratio is the median over repeats of (variant / DSM in that repeat).

Peak memory: tensor memory allocated during one step above what was live before it. CUDA:
torch.cuda.max_memory_allocated. CPU: running sum of torch.profiler's allocation/free records
(profile_memory=True), i.e. torch's own allocations, not process RSS (as benchmarks/bench_train_step.py).

    python benchmarks/bench_images.py                  # tiny U-Net, 3×32×32 (CIFAR-10 size), batch 8, CPU
    python benchmarks/bench_images.py --quick          # seconds: 1×8×8 images, checks that it runs
    python benchmarks/bench_images.py --device cuda --model ddpmpp --batch 48   # the paper's size on a GPU
    python benchmarks/bench_images.py --batch 64 --reg-batch 8 --variants dsm fpe-p1  # and fpe-p1-b8: R on 8 of 64

Prints a table; writes nothing.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time

import torch
from step_memory import peak_step_memory, sync

from fpe_lab import build
from fpe_lab.config import RunConfig, SDEKind, cifar10, digits
from fpe_lab.nets.unet import UNetSize

VARIANTS = ("dsm", "fpe-p1", "fpe-p2", "fpe-p4")
PRESETS = {"cifar10": cifar10, "digits": digits}


def _config(variant: str, args) -> RunConfig:
    """The image preset of ``--data`` with this variant's regularizer (DSM: reg none, lam 0)."""
    changes = {("model", "unet"): UNetSize(args.model), ("sde", "kind"): SDEKind(args.sde),
               ("optim", "batch"): args.batch, ("loss", "eps"): 1e-3}
    if variant == "dsm":
        changes[("loss", "reg", "kind")] = "none"
    else:  # fpe-p<probes> or fpe-p<probes>-b<reg batch>
        probes, _, sub = variant.removeprefix("fpe-p").partition("-b")
        changes[("loss", "reg", "kind")] = "fpe"
        changes[("loss", "reg", "probes")] = int(probes)
        if sub:
            changes[("loss", "reg", "n_points")] = int(sub)
    return PRESETS[args.data]().override(changes)


class Trainer:
    """One variant: its own copy of the (identically initialised) model, Adam, loss and generators."""

    def __init__(self, variant: str, args, device: torch.device) -> None:
        self.config = _config(variant, args)
        self.sde = build.build_sde(self.config.sde)
        self.model = build.build_model(self.config, self.sde).to(device).train()
        self.loss = build.build_loss(self.config, self.sde)
        self.opt = torch.optim.Adam(self.model.parameters(), lr=2e-4)
        self.gen = torch.Generator(device=device).manual_seed(0)
        self.data = torch.Generator(device=device).manual_seed(1)
        self.shape = (args.batch, *self.config.data.name.shape)
        self.device = device

    def step(self) -> None:
        x0 = torch.rand(self.shape, generator=self.data, device=self.device) * 2 - 1
        terms = self.loss(self.model, x0, self.gen)
        self.opt.zero_grad(set_to_none=True)
        terms.total.backward()
        self.opt.step()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", choices=[s.value for s in UNetSize], default="tiny")
    p.add_argument("--data", choices=list(PRESETS), default="cifar10",
                   help="image shape and preset: cifar10 (3×32×32) or digits (1×8×8)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--sde", choices=[s.value for s in SDEKind], default="vp")
    p.add_argument("--steps", type=int, default=2, help="timed steps per variant per repeat")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads on CPU (1: no contention)")
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS),
                   help="variants to time (dsm always)")
    p.add_argument("--reg-batch", type=int, default=None,
                   help="also time fpe-p1-b<N>: one probe, the residual on the first N points of each batch")
    p.add_argument("--quick", action="store_true", help="digits (1×8×8 images), batch 2, 1 repeat: runs in seconds")
    args = p.parse_args()
    if args.quick:
        args.data, args.batch, args.steps, args.repeats = "digits", 2, 1, 1
    for name in ("batch", "steps", "repeats", "threads"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1; got {getattr(args, name)}")
    if args.reg_batch is not None and not 1 <= args.reg_batch <= args.batch:
        p.error(f"--reg-batch must be in [1, --batch {args.batch}]; got {args.reg_batch}")
    variants = ("dsm", *(v for v in VARIANTS if v in args.variants and v != "dsm"))
    variants += (f"fpe-p1-b{args.reg_batch}",) if args.reg_batch is not None else ()
    logging.basicConfig(level=logging.WARNING)
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    trainers = {v: Trainer(v, args, device) for v in variants}
    for t in trainers.values():  # warm-up: first forward-mode call, allocator, kernels
        t.step()
    times: dict[str, list[float]] = {v: [] for v in variants}
    for _ in range(args.repeats):
        for v, t in trainers.items():
            sync(device)
            start = time.perf_counter()
            for _ in range(args.steps):
                t.step()
            sync(device)
            times[v].append((time.perf_counter() - start) / args.steps)
    mem = {v: peak_step_memory(t.step, t.device) for v, t in trainers.items()}
    cfg = trainers["dsm"].config
    n_params = sum(q.numel() for q in trainers["dsm"].model.parameters())
    print(f"U-Net {cfg.model.unet.value} ({n_params / 1e6:.2f}M params), images {cfg.data.name.shape}, "
          f"batch {args.batch}, {cfg.sde.kind.value.upper()}, device {device}"
          + (f", {torch.get_num_threads()} thread(s)" if device.type == "cpu"
             else f" ({torch.cuda.get_device_name(device)})")
          + f", torch {torch.__version__}; {args.repeats} repeats × {args.steps} steps")
    print(f"peak memory: {'cuda max_memory_allocated' if device.type == 'cuda' else 'torch.profiler CPU allocations'}"
          " above the memory live before the step")
    print(f"{'variant':>11} {'ms/step':>9} {'x DSM time':>11} {'(range)':>15} {'peak MiB':>9} {'x DSM mem':>10}")
    for v in variants:
        ratios = [a / b for a, b in zip(times[v], times["dsm"])]
        print(f"{v:>11} {1e3 * statistics.median(times[v]):9.1f} {statistics.median(ratios):11.2f} "
              f"{f'({min(ratios):.2f}-{max(ratios):.2f})':>15} {mem[v] / 2**20:9.1f} {mem[v] / mem['dsm']:10.2f}")


if __name__ == "__main__":
    main()
