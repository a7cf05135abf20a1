"""``python -m fpe_lab.run cifar10 --data-dir DIR`` and ``python -m fpe_lab.run digits``: DSM (+ the score-FPE
regularizer with a Hutchinson divergence) on images with a U-Net, then bits/dim of the EMA model under the
probability-flow ODE. Multi-GPU: ``torchrun --nproc_per_node=N -m fpe_lab.run cifar10 ...``.

Loss (FP-Diffusion, Lai et al. 2023; fpe_lab.losses.ScoreFPELoss):
    L = E ‖sigma s_θ(x_t, t) + z‖² + (lam / D) · E w(t) ‖R_θ(x_t, t)‖²,   t ~ U[eps, 1],
with R_θ from fpe_lab.fpe.score_fpe_residual: ∂_t s by a forward-mode JVP in t, ∇·s by Hutchinson
(--probes Rademacher probes), w(t) = sigma⁶/g⁴ (--fpe-weighting normalized), 1/D unless --no-per-dim.
``--init-from CKPT`` fine-tunes a checkpoint of the same architecture (the paper fine-tunes pretrained
models). With ``--bf16`` (CUDA only) the network runs under bf16 autocast for the DSM term; the residual
and its derivatives are always fp32.

A run folder ``OUT/<data>_<model>_<sde>_<reg>[_lam<lam>_p<probes>]_steps<N>_b<batch>_seed<seed>`` holds
``config.json``, ``checkpoint.pt`` (model, EMA, optimizer, step, RNG states: plain state dicts; under
torchrun rank r > 0 keeps its RNG state in ``ranks/rank<r>/``) and ``metrics.json`` (bits/dim of
``--eval-points`` test images × ``--eval-repeats`` dequantization/probe draws, solver settings, loss terms).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import torch

from fpe_lab import distributed
from fpe_lab.checkpoint import CHECKPOINT_NAME, CONFIG_NAME, ConfigMismatchError, atomic_write_text, check_same_config, load_checkpoint, write_config
from fpe_lab.commands import CLIError, one_line_errors, ranged
from fpe_lab.config import (
    DeviceChoice,
    ImageConfig,
    ImageData,
    Regularizer,
    SDEKind,
    TimeDerivativeKind,
    build_sde,
    cifar10,
    digits,
    resolve_device,
)
from fpe_lab.data.images import DataError, ImageDataset, ImageSplit, find_cifar10_dir, load_cifar10, load_digits
from fpe_lab.fpe import Hutchinson, Probe, score_fpe_residual
from fpe_lab.losses import DSMWeighting, FPEPoints, FPERegularizer, FPEWeighting, LossTerms, ScoreFPELoss
from fpe_lab.model import ScoreModel
from fpe_lab.nets.unet import UNet, UNetSize
from fpe_lab.train import TrainOptions, train

__all__ = ["add_parser", "run_images", "run_dir_name", "build_image_model",
           "build_image_loss", "evaluate_bits_per_dim", "evaluate_run", "METRICS_NAME"]

log = logging.getLogger(__name__)

METRICS_NAME = "metrics.json"


def run_dir_name(config: ImageConfig) -> str:
    reg = config.reg.value
    if config.reg is Regularizer.FPE:
        reg += f"_lam{config.lam:g}_p{config.probes}"
        if config.fpe_weighting is not FPEWeighting.NORMALIZED:
            reg += f"_w{config.fpe_weighting.value}"
        if not config.per_dim:
            reg += "_sum"
    init = "_ft" if config.init_from else ""
    return (f"{config.data.value}_{config.model.value}_{config.sde.value}_{reg}{init}_steps{config.steps}"
            f"_b{config.batch}_seed{config.seed}")


# ---------------------------------------------------------------------- building blocks
def load_data(config: ImageConfig, split: ImageSplit) -> ImageDataset:
    match config.data:
        case ImageData.CIFAR10:
            if config.data_dir is None:
                raise DataError("cifar10 needs --data-dir (the cifar-10-batches-py folder or its parent)")
            return load_cifar10(config.data_dir, split)
        case ImageData.DIGITS:
            return load_digits(split)
    raise ValueError(f"unknown data {config.data!r}")


def build_image_model(config: ImageConfig, sde) -> ScoreModel:
    """``ScoreModel(UNet(preset), sde)``, initialised from ``config.seed`` (global RNG untouched)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        net = UNet(config.unet_config())
    return ScoreModel(net, sde)


def _init_from(model: ScoreModel, path_text: str, config: ImageConfig) -> None:
    """Load the EMA (else model) weights of a checkpoint (or run folder) of the same architecture."""
    path = Path(path_text)
    if path.is_dir():
        path = path / CHECKPOINT_NAME
    if not path.is_file():
        raise ValueError(f"--init-from {path_text}: no checkpoint there (expected a file or a run folder with {CHECKPOINT_NAME})")
    state = load_checkpoint(path)
    sd = state.get("ema", state.get("model", state))
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ValueError(f"--init-from {path}: not a state dict (expected the 'ema' or 'model' entry of a checkpoint)")
    own = model.state_dict()
    missing, unexpected = sorted(own.keys() - sd.keys()), sorted(sd.keys() - own.keys())
    shapes = [f"{k}: {tuple(sd[k].shape)} vs {tuple(own[k].shape)}" for k in sorted(own.keys() & sd.keys())
              if sd[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        parts = [f"{len(missing)} missing keys (e.g. {missing[0]})" if missing else "",
                 f"{len(unexpected)} unexpected keys (e.g. {unexpected[0]})" if unexpected else "",
                 f"{len(shapes)} shape mismatches (e.g. {shapes[0]})" if shapes else ""]
        c, h, w = config.image_shape
        raise ValueError(f"--init-from {path} is a checkpoint of another architecture: {', '.join(p for p in parts if p)}; "
                         f"this run needs --model {config.model.value} for {c}×{h}×{w} images")
    model.load_state_dict(sd)
    log.info("initialised from %s", path)


def _fp32_residual(score_fn, sde, x, t, divergence=None, create_graph=False, time_derivative=None):
    """score_fpe_residual with autocast disabled: derivatives of the score in fp32."""
    with torch.autocast(device_type=x.device.type, enabled=False):
        return score_fpe_residual(score_fn, sde, x.float(), t.float(), divergence=divergence,
                                  create_graph=create_graph, time_derivative=time_derivative)


def build_image_loss(config: ImageConfig, sde) -> ScoreFPELoss:
    match config.reg:
        case Regularizer.NONE:
            reg = None
        case Regularizer.FPE:
            reg = FPERegularizer(
                lam=config.lam / config.dim if config.per_dim else config.lam,
                weighting=config.fpe_weighting, points=FPEPoints.PERTURBED, n_points=config.fpe_batch,
                divergence=Hutchinson(config.probes, config.probe),
                residual=functools.partial(_fp32_residual, time_derivative=config.dt.build(config.fd_step, config.eps)),
            )
    return ScoreFPELoss(sde=sde, eps=config.eps, weighting=DSMWeighting.SIGMA2, regularizer=reg)


def _bf16(loss_fn):
    """The loss under CUDA bf16 autocast; the residual inside (``_fp32_residual``) opts out."""

    def wrapped(model, x0, generator) -> LossTerms:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            terms = loss_fn(model, x0, generator)
        return LossTerms(total=terms.total.float(), dsm=terms.dsm.float(), fpe=terms.fpe.float())

    return wrapped


def evaluate_bits_per_dim(model: ScoreModel, sde, test: ImageDataset, config: ImageConfig, device: torch.device,
                          progress: bool = True) -> dict[str, Any]:
    """bits/dim of the first ``eval_points`` test images under the PF-ODE, ``eval_repeats`` times.

    Each repeat draws a fresh uniform dequantization and one Rademacher probe per image (frozen for the
    solve); RK45 at rtol = atol = ``eval_rtol`` from t = eps. Returns the mean, each repeat's mean, the
    spread (max − min of repeat means), the standard error over images and the solver settings; and,
    as a cheap check, the DSM variational bound on the same images (``fpe_lab.likelihood.dsm_nll_bound``,
    16 stratified times per image), which should lie above the PF-ODE number up to noise.
    """
    from fpe_lab.likelihood import UniformDequantization, dsm_nll_bound, pf_ode_nll

    n = min(config.eval_points, len(test))
    x = test.scale(test.pixels[:n]).to(device)
    deq = UniformDequantization(test.levels, -1.0, 1.0)
    per_repeat, all_bpd, settings = [], [], {}
    for r in range(config.eval_repeats):
        gen = torch.Generator(device=device).manual_seed(config.eval_seed + 7919 * (r + 1))
        res = pf_ode_nll(model, sde, x, eps=config.eps, divergence=Hutchinson(1, Probe.RADEMACHER, generator=gen),
                         rtol=config.eval_rtol, atol=config.eval_rtol, dequantization=deq, generator=gen,
                         batch_size=config.eval_batch, progress=progress)
        per_repeat.append(float(res.bits_per_dim.mean()))
        all_bpd.append(res.bits_per_dim.cpu())
        settings = res.settings
    bpd = torch.cat(all_bpd)
    gen = torch.Generator(device=device).manual_seed(config.eval_seed + 104729)
    bound = torch.cat([
        dsm_nll_bound(model, sde, chunk, eps=config.eps, n_times=16, generator=gen, dequantization=deq).bits_per_dim.cpu()
        for chunk in x.split(config.eval_batch)
    ])
    return {
        "bits_per_dim": float(bpd.mean()),
        "bits_per_dim_per_repeat": per_repeat,
        "bits_per_dim_spread": max(per_repeat) - min(per_repeat),
        "bits_per_dim_sem": float(bpd.std() / math.sqrt(bpd.numel())) if bpd.numel() > 1 else None,
        "dsm_bound_bits_per_dim": float(bound.mean()),
        "dsm_bound_sem": float(bound.std() / math.sqrt(bound.numel())) if bound.numel() > 1 else None,
        "n_points": n,
        "repeats": config.eval_repeats,
        "eval_seed": config.eval_seed,
        "solver": settings,
    }


# ---------------------------------------------------------------------- the run
def _prepare_run_dir(config: ImageConfig, out: Path, resume: bool, env: distributed.DistEnv) -> tuple[Path, bool]:
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; it must be a folder (it is created if missing)")
    run_dir = out / run_dir_name(config)
    has_config = (run_dir / CONFIG_NAME).is_file()
    if has_config and not resume:
        raise ValueError(f"run folder {run_dir} already exists; pass --resume to continue it")
    if has_config:
        check_same_config(run_dir, config.to_dict())
    distributed.barrier(env)  # every rank checks before rank 0 writes
    if env.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_config(run_dir, config.to_dict())
    distributed.barrier(env)
    rank_dir = run_dir if env.is_main else run_dir / "ranks" / f"rank{env.rank}"
    rank_dir.mkdir(parents=True, exist_ok=True)
    resuming = resume and (rank_dir / CHECKPOINT_NAME).is_file()
    if resume and not resuming:
        log.info("nothing to resume in %s: starting from step 0", rank_dir)
    return run_dir, resuming


def run_images(config: ImageConfig, out: Path, resume: bool = False, progress: bool = True,
               env: distributed.DistEnv | None = None) -> Path:
    """Train ``config`` in ``out/run_dir_name(config)`` and write bits/dim to its ``metrics.json``."""
    env = env or distributed.DistEnv()
    device = env.device() if env.is_distributed else resolve_device(config.device)
    if config.bf16 and device.type != "cuda":
        raise ValueError("--bf16 needs CUDA (bf16 autocast is only used on GPUs); drop it on CPU")
    if config.batch % env.world_size:
        raise ValueError(f"--batch {config.batch} must be divisible by the number of processes {env.world_size}")
    train_set = load_data(config, ImageSplit.TRAIN)
    if train_set.image_shape != config.image_shape:
        raise ValueError(f"data images are {train_set.image_shape} (C, H, W) but the config expects {config.image_shape}")
    run_dir, resuming = _prepare_run_dir(config, Path(out), resume, env)
    rank_dir = run_dir if env.is_main else run_dir / "ranks" / f"rank{env.rank}"
    sde = build_sde(config.sde)
    model = build_image_model(config, sde)
    if config.init_from and not resuming:
        _init_from(model, config.init_from, config)
    model.to(device)
    ddp = distributed.wrap(model, env)  # broadcasts rank 0's weights; never called (see fpe_lab.distributed)
    module = distributed.unwrap(ddp)
    hooks = distributed.average_gradients_in_backward(module, env)
    loss = build_image_loss(config, sde)
    loss_fn = _bf16(loss) if config.bf16 else loss
    loss_fn = distributed.agree_on_nonfinite(loss_fn, env)
    local_batch = config.batch // env.world_size
    options = TrainOptions(steps=config.steps, lr=config.lr, ema_decay=config.ema_decay,
                           seed=distributed.rank_seed(config.seed, env), ckpt_every=config.ckpt_every,
                           grad_clip=config.grad_clip, progress=progress and env.is_main)
    log.info("run folder %s (%d process(es), device %s)\n%s\nU-Net %s: %.2fM parameters", run_dir, env.world_size,
             device, sde, config.model.value, sum(p.numel() for p in module.parameters()) / 1e6)
    result = train(module, loss_fn, lambda g: train_set.sample(local_batch, g, hflip=config.hflip), options,
                   device=device, run_dir=rank_dir, resume=resuming)
    for h in hooks:
        h.remove()
    log.info("trained %d steps in %.1f s", result.step, result.wall_s)
    if env.is_main:
        metrics: dict[str, Any] = {"training": _training_summary(result.history, result.step)}
        if config.eval_points > 0:
            start = time.perf_counter()
            test_set = load_data(config, ImageSplit.TEST)
            metrics["likelihood"] = evaluate_bits_per_dim(result.ema, sde, test_set, config, device, progress)
            metrics["likelihood"]["wall_s"] = time.perf_counter() - start
            lik = metrics["likelihood"]
            log.info("bits/dim %.4f (EMA, PF-ODE, %d test images × %d repeats); DSM bound %.4f",
                     lik["bits_per_dim"], lik["n_points"], config.eval_repeats, lik["dsm_bound_bits_per_dim"])
        atomic_write_text(run_dir / METRICS_NAME, json.dumps(metrics, indent=2) + "\n")
    distributed.barrier(env)
    return run_dir


def _training_summary(history: torch.Tensor, step: int) -> dict[str, Any]:
    hist = history[:step]
    tail = hist[-max(1, min(100, step // 10)):]
    return {"steps": step, "final_loss": float(tail[:, 0].mean()), "final_dsm": float(tail[:, 1].mean()),
            "final_fpe": float(tail[:, 2].mean()), "loss_tail_steps": int(tail.shape[0])}


# ---------------------------------------------------------------------- CLI
def _add_arguments(p: argparse.ArgumentParser, data: ImageData) -> None:
    d = cifar10() if data is ImageData.CIFAR10 else digits()
    if data is ImageData.CIFAR10:
        p.add_argument("--data-dir", type=Path, required=True,
                       help="the cifar-10-batches-py folder (or its parent) of https://www.cs.toronto.edu/~kriz/cifar.html")
    p.add_argument("--reg", choices=[r.value for r in Regularizer], default=d.reg.value,
                   help="none: DSM only; fpe: DSM + (lam/D)·E w(t)‖R‖²")
    p.add_argument("--lam", type=ranged(float, 0.0), default=d.lam, help="weight of the FPE term")
    p.add_argument("--sde", choices=[s.value for s in SDEKind], default=d.sde.value, help="forward SDE")
    p.add_argument("--model", choices=[s.value for s in UNetSize], default=d.model.value,
                   help="U-Net size (tiny: CPU seconds; ddpmpp / ddpmpp-deep: the paper's CIFAR-10 networks)")
    p.add_argument("--steps", type=ranged(int, 1, 10**9), default=d.steps, help="optimizer steps")
    p.add_argument("--batch", type=ranged(int, 1, 10**6), default=d.batch, help="global batch size")
    p.add_argument("--probes", type=ranged(int, 1, 1024), default=d.probes, help="Hutchinson probes per sample")
    p.add_argument("--dt", choices=[k.value for k in TimeDerivativeKind], default=d.dt.value,
                   help="∂_t s in the residual: jvp (forward mode, exact) or fd (central difference clipped to "
                   "[eps, 1], extra evaluations with dropout off)")
    p.add_argument("--fd-step", type=ranged(float, 0.0, 0.5, lo_open=True), default=d.fd_step,
                   help="h of the finite-difference ∂_t s (with --dt fd)")
    p.add_argument("--fpe-weighting", choices=[w.value for w in FPEWeighting], default=d.fpe_weighting.value,
                   help="w(t) of the FPE term: normalized = sigma⁶/g⁴, g2 = g² (the paper's code), one")
    p.add_argument("--per-dim", action=argparse.BooleanOptionalAction, default=d.per_dim,
                   help="divide the FPE term by D = C·H·W")
    p.add_argument("--eps", type=ranged(float, 0.0, 0.5, lo_open=True), default=d.eps,
                   help="smallest time t of training and of the PF-ODE solve")
    p.add_argument("--lr", type=ranged(float, 0.0, 10.0, lo_open=True), default=d.lr, help="Adam learning rate")
    p.add_argument("--seed", type=ranged(int, 0, 2**62), default=d.seed, help="seed of init, data and noise")
    p.add_argument("--ckpt-every", type=ranged(int, 1, 10**9), default=d.ckpt_every, help="checkpoint interval (steps)")
    p.add_argument("--device", choices=[c.value for c in DeviceChoice], default=d.device.value,
                   help="training device when not under torchrun (auto: cuda if available)")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast for the DSM network pass (CUDA only)")
    p.add_argument("--init-from", type=str, default=None, metavar="CKPT",
                   help="fine-tune from this checkpoint (or run folder) of the same architecture")
    _add_eval_arguments(p, min_points=0)
    p.add_argument("--out", type=Path, default=Path("runs"), help="parent folder of the run folder")
    p.add_argument("--resume", action="store_true", help="continue the run in its folder from its checkpoint")
    p.add_argument("--dry-run", action="store_true", help="print the resolved config and run folder; do nothing")


def _add_eval_arguments(p: argparse.ArgumentParser, min_points: int) -> None:
    d = ImageConfig()
    p.add_argument("--eval-points", type=ranged(int, min_points, 10**6), default=d.eval_points,
                   help="test images for bits/dim" + (" (0: skip)" if min_points == 0 else ""))
    p.add_argument("--eval-repeats", type=ranged(int, 1, 100), default=d.eval_repeats,
                   help="repeats of the test images (dequantization and probe redrawn; 5 in Score SDE)")
    p.add_argument("--eval-rtol", type=ranged(float, 0.0, 1.0, lo_open=True), default=d.eval_rtol,
                   help="RK45 rtol = atol of the PF-ODE solve")
    p.add_argument("--eval-seed", type=ranged(int, 0, 2**62), default=d.eval_seed,
                   help="seed of the dequantization noise and Hutchinson probes")


def add_parser(subparsers) -> None:
    for data, help_text in ((ImageData.CIFAR10, "train a U-Net score model on CIFAR-10 (DSM [+ FPE]); bits/dim"),
                            (ImageData.DIGITS, "the same on scikit-learn's 8×8 digits (offline, CPU-sized)")):
        p = subparsers.add_parser(data.value, help=help_text, description=__doc__,
                                  formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        _add_arguments(p, data)
        p.set_defaults(handler=_handler, image_data=data)
        one_line_errors(p)
    e = subparsers.add_parser("images-eval", help="bits/dim of a saved cifar10/digits run (EMA weights)",
                              description="Re-evaluate bits/dim of the EMA model of a cifar10/digits run folder; "
                              "writes RUN_DIR/bpd_seed<S>_n<N>_r<R>.json.",
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    e.add_argument("run_dir", type=Path, help="a run folder written by cifar10 or digits")
    _add_eval_arguments(e, min_points=1)
    e.add_argument("--device", choices=[c.value for c in DeviceChoice], default="auto", help="evaluation device")
    e.set_defaults(handler=_eval_handler)
    one_line_errors(e)


def config_from_args(args: argparse.Namespace, image_shape: tuple[int, int, int]) -> ImageConfig:
    data: ImageData = args.image_data
    try:
        return ImageConfig(
            data=data, data_dir=str(args.data_dir) if data is ImageData.CIFAR10 else None, image_shape=image_shape,
            model=UNetSize(args.model), sde=SDEKind(args.sde), reg=Regularizer(args.reg), lam=float(args.lam),
            probes=int(args.probes), dt=TimeDerivativeKind(args.dt), fd_step=float(args.fd_step), fpe_weighting=FPEWeighting(args.fpe_weighting), per_dim=bool(args.per_dim),
            eps=float(args.eps), steps=int(args.steps), batch=int(args.batch), lr=float(args.lr),
            seed=int(args.seed), ckpt_every=int(args.ckpt_every), hflip=data is ImageData.CIFAR10,
            bf16=bool(args.bf16), device=DeviceChoice(args.device),
            init_from=str(args.init_from) if args.init_from else None, eval_points=int(args.eval_points),
            eval_repeats=int(args.eval_repeats), eval_rtol=float(args.eval_rtol), eval_seed=int(args.eval_seed),
        )
    except ValueError as e:
        raise CLIError(str(e)) from None


def _handler(args: argparse.Namespace) -> int:
    try:
        env = distributed.init_from_env()
    except (ValueError, RuntimeError) as e:
        raise CLIError(f"distributed setup failed: {e}") from None
    distributed.quiet_other_ranks(env)
    try:
        match args.image_data:
            case ImageData.CIFAR10:
                find_cifar10_dir(args.data_dir)
                shape = (3, 32, 32)
            case ImageData.DIGITS:
                shape = load_digits(ImageSplit.TEST).image_shape
        config = config_from_args(args, shape)
        if args.dry_run:
            if env.is_main:
                print(config.to_json())
                print(f"run folder: {Path(args.out) / run_dir_name(config)}")
            return 0
        run_dir = run_images(config, Path(args.out), resume=args.resume, env=env)
    except (ValueError, ConfigMismatchError, FloatingPointError, FileNotFoundError) as e:  # DataError, NonFiniteLossError
        raise CLIError(str(e)) from None
    finally:
        distributed.shutdown(env)
    log.info("wrote %s", run_dir)
    return 0


def evaluate_run(run_dir: Path, device: torch.device, progress: bool = True, **eval_settings: Any) -> dict[str, Any]:
    """bits/dim of the EMA weights of ``run_dir`` with ``eval_settings`` (eval_points, eval_repeats, eval_rtol,
    eval_seed) replacing the run's; written to ``run_dir/bpd_seed<S>_n<N>_r<R>.json`` and returned."""
    from fpe_lab.checkpoint import read_config

    config = dataclasses.replace(ImageConfig.from_dict(read_config(run_dir)), **eval_settings)
    sde = build_sde(config.sde)
    model = build_image_model(config, sde)
    model.load_state_dict(load_checkpoint(run_dir / CHECKPOINT_NAME)["ema"])
    model.to(device).eval()
    result = evaluate_bits_per_dim(model, sde, load_data(config, ImageSplit.TEST), config, device, progress)
    name = f"bpd_seed{config.eval_seed}_n{result['n_points']}_r{config.eval_repeats}.json"
    atomic_write_text(run_dir / name, json.dumps(result, indent=2) + "\n")
    log.info("bits/dim %.4f (repeats %s) -> %s", result["bits_per_dim"],
             ", ".join(f"{b:.4f}" for b in result["bits_per_dim_per_repeat"]), run_dir / name)
    return result


def _eval_handler(args: argparse.Namespace) -> int:
    run_dir = Path(args.run_dir)
    if not (run_dir / CONFIG_NAME).is_file() or not (run_dir / CHECKPOINT_NAME).is_file():
        raise CLIError(f"{run_dir} is not an image run folder (needs {CONFIG_NAME} and {CHECKPOINT_NAME})")
    try:
        evaluate_run(run_dir, resolve_device(DeviceChoice(args.device)), eval_points=int(args.eval_points),
                     eval_repeats=int(args.eval_repeats), eval_rtol=float(args.eval_rtol), eval_seed=int(args.eval_seed))
    except (ValueError, FileNotFoundError, KeyError) as e:
        raise CLIError(f"cannot evaluate {run_dir}: {e}") from None
    return 0
