"""PF-ODE integrators side by side: scipy ``solve_ivp`` RK45 (the reference) vs the batched torch DOPRI5.

Both are the Dormand–Prince 5(4) pair at the same rtol = atol; they differ in where the state lives
(scipy: float64 numpy on the host, the state copied there and back at every evaluation; torch: the
model's device and dtype) and in the error norm (scipy: one RMS over the whole batch; torch: each
sample's own RMS, every sample < 1 at every accepted step, see fpe_lab/ode.py). One run times, per case
and task, each method's full solve (wall time, NFE = batched score evaluations, ms per NFE) and its
accuracy:

* ``mixture-2d``: the exact 2-D Gaussian-mixture score (float64), VP SDE.
  NLL (``fpe_lab.likelihood.pf_ode_nll``, exact divergence, exact p_1 as the prior, eps = 1e-5): error
  against the closed form −log p_eps(x), max and mean over points.
  Samples (``fpe_lab.sampling.pf_ode_sample``, eps = 1e-3): max |x − x_ref| against a DOP853 solve at
  rtol = atol = 1e-11 (computed once, not timed).
* ``unet-8x8``: ``ScoreModel(UNet(UNetConfig.preset(UNetSize.TINY, in_channels=1, image_size=8)))``, random
  init (seeded), float32, VP SDE. NLL with one Rademacher probe per image, the *same* fixed probes for both
  methods; samples from the same x_T. No closed form: the two methods' max difference is reported.

    python benchmarks/bench_pf_ode.py --quick                  # 200 points / 8 images, loose unet tolerance
    python benchmarks/bench_pf_ode.py                          # 2,000 points / 64 images, rtol = atol = 1e-5
    python benchmarks/bench_pf_ode.py --device cuda            # the torch path on the GPU (scipy copies to host)

Methods run one after another (scipy, then torch) after a warm-up solve of each; on a shared machine
read ms/NFE as the steadier comparison. Prints a table; writes nothing.
"""

from __future__ import annotations

import argparse
import logging
import time

import torch

from fpe_lab.gmm import GaussianMixture
from fpe_lab.likelihood import FixedProbeHutchinson, pf_ode_nll
from fpe_lab.model import ScoreModel
from fpe_lab.nets.unet import UNet, UNetConfig, UNetSize
from fpe_lab.sampling import ODEMethod, pf_ode_sample
from fpe_lab.sde import VPSDE

log = logging.getLogger("bench_pf_ode")

METHODS = {"scipy RK45": ODEMethod.RK45, "torch DOPRI5": ODEMethod.DOPRI5}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(device, fn, *args, **kwargs):
    """``fn(*args, **kwargs)`` and its wall seconds, the device synchronised before and after."""
    _sync(device)
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    _sync(device)
    return out, time.perf_counter() - t0


def _mixture(device) -> GaussianMixture:
    mix = GaussianMixture(
        [0.3, 0.7], [[-1.0, 0.5], [1.5, -0.5]], [[[0.3, 0.1], [0.1, 0.2]], [[0.2, 0.0], [0.0, 0.4]]],
        dtype=torch.float64,
    )
    mix.weights, mix.means, mix.covs = mix.weights.to(device), mix.means.to(device), mix.covs.to(device)
    return mix


def mixture_rows(n: int, tol: float, device: torch.device, seed: int) -> list[dict]:
    sde, mix = VPSDE(), _mixture(device)
    score = mix.score_fn(sde)
    x = mix.sample(n, torch.Generator(device=device).manual_seed(seed)) if device.type == "cpu" else \
        mix.sample(n, torch.Generator().manual_seed(seed)).to(device)
    eps_nll, eps_sample = 1e-5, 1e-3
    true = -mix.log_prob(x, eps_nll, sde)
    prior = lambda y: mix.log_prob(y, 1.0, sde)  # noqa: E731
    x_T = sde.prior_sample((n, 2), torch.Generator().manual_seed(seed + 1), torch.float64).to(device)
    ref = pf_ode_sample(score, sde, x_T, eps=eps_sample, rtol=1e-11, atol=1e-11, method=ODEMethod.DOP853).x
    rows = []
    for name, method in METHODS.items():
        pf_ode_nll(score, sde, x[:4], eps=eps_nll, rtol=1e-3, atol=1e-3, method=method)  # warm-up
        res, wall = _timed(device, pf_ode_nll, score, sde, x, eps=eps_nll, rtol=tol, atol=tol, method=method,
                           prior_log_prob=prior)
        err = (res.nats - true).abs()
        rows.append({"case": f"mixture-2d ({n} pts, f64)", "task": "NLL", "method": name, "wall_s": wall,
                     "nfe": res.nfe, "acc": f"|NLL−exact| max {err.max():.1e} mean {err.mean():.1e}"})
        out, wall = _timed(device, pf_ode_sample, score, sde, x_T, eps=eps_sample, rtol=tol, atol=tol, method=method)
        rows.append({"case": f"mixture-2d ({n} pts, f64)", "task": "samples", "method": name, "wall_s": wall,
                     "nfe": out.nfe, "acc": f"max |x−x_ref| {(out.x - ref).abs().max():.1e}"})
    return rows


def unet_rows(b: int, tol: float, device: torch.device, seed: int) -> list[dict]:
    sde = VPSDE()
    torch.manual_seed(seed)
    model = ScoreModel(UNet(UNetConfig.preset(UNetSize.TINY, in_channels=1, image_size=8)), sde).to(device).eval()
    gen = torch.Generator().manual_seed(seed)
    x = (torch.rand(b, 1, 8, 8, generator=gen) * 2 - 1).to(device)
    x_T = torch.randn(b, 1, 8, 8, generator=gen).to(device)
    probes = FixedProbeHutchinson.draw(x, generator=torch.Generator(device=device).manual_seed(seed + 1))
    rows, nats, samples = [], {}, {}
    for name, method in METHODS.items():
        pf_ode_nll(model, sde, x[:2], eps=1e-5, rtol=1e-2, atol=1e-2, method=method,  # warm-up
                   divergence=FixedProbeHutchinson(probes.probes[:, :2]))
        res, wall = _timed(device, pf_ode_nll, model, sde, x, eps=1e-5, rtol=tol, atol=tol, method=method,
                           divergence=probes)
        nats[name] = res.nats
        rows.append({"case": f"unet-8x8 ({b} imgs, f32)", "task": "NLL", "method": name, "wall_s": wall,
                     "nfe": res.nfe, "acc": f"mean {res.nats.mean():.3f} nats"})
        out, wall = _timed(device, pf_ode_sample, model, sde, x_T, eps=1e-3, rtol=tol, atol=tol, method=method)
        samples[name] = out.x
        rows.append({"case": f"unet-8x8 ({b} imgs, f32)", "task": "samples", "method": name, "wall_s": wall,
                     "nfe": out.nfe, "acc": ""})
    a, c = METHODS
    rows[-2]["acc"] += f"; max |Δ| between methods {(nats[a] - nats[c]).abs().max():.1e}"
    rows[-1]["acc"] = f"max |Δx| between methods {(samples[a] - samples[c]).abs().max():.1e}"
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="200 points at tol 1e-5 and 8 images at tol 1e-3: seconds to a minute on a CPU")
    parser.add_argument("--points", type=int, default=2000, help="2-D points (mixture case)")
    parser.add_argument("--images", type=int, default=64, help="8×8 images (U-Net case)")
    parser.add_argument("--tol", type=float, default=1e-5, help="rtol = atol of both methods")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.points < 4 or args.images < 2 or not (0 < args.tol < 1):
        parser.error("need --points >= 4, --images >= 2, 0 < --tol < 1")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    n, b = (200, 8) if args.quick else (args.points, args.images)
    unet_tol = 1e-3 if args.quick else args.tol
    rows = mixture_rows(n, args.tol, device, args.seed) + unet_rows(b, unet_tol, device, args.seed)
    print(f"PF-ODE integrators, VP SDE, device={device}, torch threads={torch.get_num_threads()}, "
          f"rtol=atol={args.tol:g} (unet: {unet_tol:g})")
    print(f"{'case':<26}{'task':<9}{'method':<14}{'wall s':>8}{'NFE':>6}{'ms/NFE':>8}{'x scipy':>9}  accuracy")
    base = {}
    for r in rows:
        key = (r["case"], r["task"])
        base.setdefault(key, r["wall_s"])
        print(f"{r['case']:<26}{r['task']:<9}{r['method']:<14}{r['wall_s']:>8.2f}{r['nfe']:>6d}"
              f"{1e3 * r['wall_s'] / r['nfe']:>8.2f}{r['wall_s'] / base[key]:>9.2f}  {r['acc']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
