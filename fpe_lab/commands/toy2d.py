"""``python -m fpe_lab.run toy2d``: train a 2-D score model with DSM (+ the score-FPE regularizer) and
evaluate it against the truth; ``python -m fpe_lab.run eval RUN_DIR`` re-evaluates a saved run.

A run folder ``OUT/<data>_<sde>_<reg>[_lam<lam>]_steps<N>_b<batch>_lr<lr>_seed<seed>`` holds
``config.json`` (the resolved :class:`fpe_lab.config.Toy2dConfig`), ``checkpoint.pt`` (model, EMA,
optimizer, step, RNG states, loss history: plain state dicts), ``metrics.json``
(:func:`fpe_lab.metrics.evaluate` of the EMA model plus a ``"training"`` section) and figures
(``score.png``: learned vs true score field; ``loss.png``: DSM and FPE terms per step).

Library entry points (reused by the study runner and the figures): :func:`add_toy2d_arguments`,
:func:`config_from_args`, :func:`run_dir_name`, :func:`run_toy2d`, :func:`evaluate_run`,
:func:`load_run`.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import time
from pathlib import Path
from typing import Any, Iterator

import torch

from fpe_lab.checkpoint import (
    CHECKPOINT_NAME,
    CONFIG_NAME,
    ConfigMismatchError,
    atomic_write_bytes,
    atomic_write_text,
    check_same_config,
    load_checkpoint,
    read_config,
    write_config,
)
from fpe_lab.commands import CLIError, one_line_errors, ranged
from fpe_lab.config import (
    DeviceChoice,
    Regularizer,
    SDEKind,
    Toy2dConfig,
    ToyData,
    build_data,
    build_loss,
    build_model,
    build_sde,
    resolve_device,
    toy2d,
)
from fpe_lab.train import TrainOptions, train

__all__ = [
    "add_parser",
    "add_toy2d_arguments",
    "config_from_args",
    "run_dir_name",
    "run_toy2d",
    "evaluate_run",
    "load_run",
    "METRICS_NAME",
]

log = logging.getLogger(__name__)

METRICS_NAME = "metrics.json"
FIGURE_TIME = 0.1  # time of the score-field figure: structure of the data still visible


# ---------------------------------------------------------------------- argument parsing
def add_toy2d_arguments(parser: argparse.ArgumentParser, defaults: Toy2dConfig | None = None) -> None:
    """The ``toy2d`` flags (issue 4 item 3), defaults from the ``toy2d`` preset."""
    d = defaults or toy2d()
    parser.add_argument("--reg", choices=[r.value for r in Regularizer], default=d.reg.value,
                        help="regularizer: none (DSM only) or fpe (DSM + lam·E w(t)‖R‖²)")
    parser.add_argument("--lam", type=ranged(float, 0.0), default=d.lam, help="weight lam >= 0 of the FPE term")
    parser.add_argument("--data", choices=[x.value for x in ToyData], default=d.data.value, help="toy data set p_0")
    parser.add_argument("--sde", choices=[s.value for s in SDEKind], default=d.sde.value, help="forward SDE")
    parser.add_argument("--steps", type=ranged(int, 1, 10**9), default=d.steps, help="optimizer steps")
    parser.add_argument("--batch", type=ranged(int, 1, 10**7), default=d.batch, help="batch size")
    parser.add_argument("--lr", type=ranged(float, 0.0, 10.0, lo_open=True), default=d.lr, help="Adam learning rate")
    parser.add_argument("--seed", type=ranged(int, 0, 2**62), default=d.seed, help="seed of init, data and noise")
    parser.add_argument("--device", choices=[c.value for c in DeviceChoice], default=d.device.value,
                        help="training device (auto: cuda if available)")
    parser.add_argument("--out", type=Path, default=Path("runs"), help="parent folder of the run folder")
    parser.add_argument("--resume", action="store_true", help="continue the run in its folder from its checkpoint")
    parser.add_argument("--dry-run", action="store_true", help="print the resolved config and run folder; do nothing")


def config_from_args(args: argparse.Namespace, base: Toy2dConfig | None = None) -> Toy2dConfig:
    """The :class:`Toy2dConfig` of the parsed flags (strings → enums); bad values raise :class:`CLIError`."""
    base = base or toy2d()
    try:
        return base.replace(
            reg=Regularizer(args.reg), lam=float(args.lam), data=ToyData(args.data), sde=SDEKind(args.sde),
            steps=int(args.steps), batch=int(args.batch), lr=float(args.lr), seed=int(args.seed),
            device=DeviceChoice(args.device),
        )
    except ValueError as e:
        raise CLIError(str(e)) from None


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "toy2d",
        help="train a 2-D score model (DSM [+ score-FPE regularizer]) and evaluate it against the truth",
        description="Train a 2-D score model with DSM (+ lam · the score-FPE residual) and evaluate it against "
        "the truth. Writes OUT/<run name>/ with config.json, checkpoint.pt, metrics.json and figures.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_toy2d_arguments(p)
    p.set_defaults(handler=_toy2d_command)
    one_line_errors(p)
    e = subparsers.add_parser(
        "eval",
        help="re-evaluate a saved toy2d run folder (rewrites its metrics.json and figures)",
        description="Re-evaluate the EMA model of a toy2d run folder against the truth.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    e.add_argument("run_dir", type=Path, help="a run folder written by toy2d")
    e.set_defaults(handler=_eval_command)
    one_line_errors(e)


# ---------------------------------------------------------------------- run folders
def run_dir_name(config: Toy2dConfig) -> str:
    """The folder name of a run, from the settings the CLI can change."""
    reg = config.reg.value + (f"_lam{config.lam:g}" if config.reg is Regularizer.FPE else "")
    return (f"{config.data.value}_{config.sde.value}_{reg}_steps{config.steps}_b{config.batch}"
            f"_lr{config.lr:g}_seed{config.seed}")


@contextlib.contextmanager
def _threads(device: torch.device) -> Iterator[None]:
    """One intra-op thread on CPU: 2-D MLP batches are too small to split, and extra threads only
    contend (measured 5 ms vs 113 ms CPU time per DSM step on a loaded 2-core machine)."""
    n = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def _prepare_run_dir(config: Toy2dConfig, out: Path, resume: bool) -> tuple[Path, bool]:
    """Create/check the run folder; returns (run_dir, whether a checkpoint is resumed)."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; it must be a folder (it is created if missing)")
    run_dir = out / run_dir_name(config)
    if run_dir.exists() and not run_dir.is_dir():
        raise ValueError(f"run folder {run_dir} exists and is a file")
    has_config = (run_dir / CONFIG_NAME).is_file()
    if has_config and not resume:
        raise ValueError(f"run folder {run_dir} already exists; pass --resume to continue it "
                         f"or `eval {run_dir}` to re-evaluate it")
    if has_config:
        check_same_config(run_dir, config.to_dict())
    run_dir.mkdir(parents=True, exist_ok=True)
    resuming = resume and (run_dir / CHECKPOINT_NAME).is_file()
    if resume and not resuming:
        log.info("nothing to resume in %s: starting from step 0", run_dir)
    return run_dir, resuming


def run_toy2d(config: Toy2dConfig, out: Path, resume: bool = False, progress: bool = True) -> Path:
    """Train ``config`` in ``out/run_dir_name(config)``, evaluate it, write metrics and figures.

    Raises ValueError (bad --out, existing folder without resume, unavailable device),
    :class:`fpe_lab.checkpoint.ConfigMismatchError` (resume on another config) and
    :class:`fpe_lab.train.NonFiniteLossError`.
    """
    device = resolve_device(config.device)
    run_dir, resuming = _prepare_run_dir(config, Path(out), resume)
    write_config(run_dir, config.to_dict())
    with _threads(device):
        sde = build_sde(config.sde)
        data = build_data(config)
        model = build_model(config, sde)
        loss = build_loss(config, sde)
        options = TrainOptions(steps=config.steps, lr=config.lr, ema_decay=config.ema_decay, seed=config.seed,
                               ckpt_every=config.ckpt_every, grad_clip=config.grad_clip, progress=progress)
        log.info("run folder %s\n%s\nloss: %s", run_dir, sde, _describe_loss(config))
        result = train(model, loss, lambda g: data.sample(config.batch, g), options, device=device,
                       run_dir=run_dir, resume=resuming)
        log.info("trained %d steps in %.1f s", result.step, result.wall_s)
        log.info("%s", metrics_summary(evaluate_run(run_dir, progress=progress)))
    return run_dir


def metrics_summary(metrics: dict[str, Any]) -> str:
    """A few lines of the headline numbers of a metrics.json dict (EMA weights, against the truth)."""
    m, nll = metrics["mean"], metrics["nll"]
    sw = metrics["samples"]["sliced_wasserstein"]
    curl = f", mean |curl| {m['curl_abs']:.3g}" if "curl_abs" in m else ""
    return "\n".join([
        f"mean over t in {metrics['times']}:",
        f"  score-FPE residual E‖R‖² {m['fpe_residual']:.4g} (relative to its terms {m['fpe_residual_rel']:.3g})",
        f"  score error E‖s − ∇log p‖² {m['score_error']:.4g} (relative {m['score_error_rel']:.3g})",
        f"  Jacobian asymmetry ‖J − Jᵀ‖²/‖J‖² {m['jacobian_asymmetry_rel']:.3g}{curl}",
        f"NLL {nll['model_nats']:.4f} nats vs true {nll['true_nats']:.4f} (gap {nll['gap_nats']:.4f} ± "
        f"{nll['gap_nats_sem']:.2g}, {nll['n_points']} held-out points)",
        f"sliced W2 to held-out data: reverse SDE {sw['sde_vs_data']:.3g}, PF-ODE {sw['ode_vs_data']:.3g} "
        f"(noise floor {sw['floor']:.3g})",
    ])


def _describe_loss(config: Toy2dConfig) -> str:
    dsm = f"DSM ({config.weighting.value} weighting, t ~ U[{config.eps:g}, 1])"
    if config.reg is Regularizer.NONE:
        return dsm
    return (f"{dsm} + {config.lam:g} · E w(t)‖R‖² (w: {config.fpe_weighting.value}, points: "
            f"{config.fpe_points.value}, residual: {config.residual_path.value})")


def load_run(run_dir: str | Path, weights: str = "ema", dtype: torch.dtype = torch.float64):
    """(config, model) of a run folder: the ``ScoreModel`` with its EMA (or ``"model"``) weights, in ``dtype``."""
    run_dir = Path(run_dir)
    if weights not in ("ema", "model"):
        raise ValueError(f"weights must be 'ema' or 'model'; got {weights!r}")
    config = Toy2dConfig.from_dict(read_config(run_dir))
    state = load_checkpoint(run_dir / CHECKPOINT_NAME)
    model = build_model(config, build_sde(config.sde))
    model.load_state_dict(state[weights])
    return config, model.to(dtype).eval()


def _training_summary(state: dict[str, Any], config: Toy2dConfig) -> dict[str, Any]:
    hist = state["history"]
    tail = hist[-max(1, min(100, hist.shape[0] // 10)):]
    return {"steps": int(state["step"]), "final_loss": float(tail[:, 0].mean()),
            "final_dsm": float(tail[:, 1].mean()), "final_fpe": float(tail[:, 2].mean()),
            "loss_tail_steps": int(tail.shape[0]), "reg": config.reg.value, "lam": config.lam}


def evaluate_run(run_dir: str | Path, progress: bool = True) -> dict[str, Any]:
    """Evaluate the EMA model of ``run_dir`` (float64) and write ``metrics.json`` and the figures.

    The metrics are :func:`fpe_lab.metrics.evaluate` (its docstring gives the schema) with the run's
    SDE, data, truth (closed form for mixtures, the toy's exact perturbed density otherwise) and a
    generator seeded from the run's seed, plus ``"training"`` (steps and the mean loss terms of the
    last steps) and ``"wall_s"`` of the evaluation.
    """
    from fpe_lab.metrics import MixtureTruth, ToyTruth, evaluate

    run_dir = Path(run_dir)
    config, model = load_run(run_dir)
    sde = build_sde(config.sde)
    data = build_data(config)
    truth = MixtureTruth(data.mixture, sde) if data.mixture is not None else ToyTruth(data, sde)
    start = time.perf_counter()
    with _threads(torch.device("cpu")):
        metrics = evaluate(model, sde, data, truth, n_points=config.eval_points, eps=config.eps,
                           generator=torch.Generator().manual_seed(config.seed + 12345),
                           n_nll=config.eval_nll_points, n_samples=config.eval_samples,
                           dtype=torch.float64, progress=progress)
        metrics["training"] = _training_summary(load_checkpoint(run_dir / CHECKPOINT_NAME), config)
        metrics["eval_wall_s"] = time.perf_counter() - start
        atomic_write_text(run_dir / METRICS_NAME, json.dumps(metrics, indent=2) + "\n")
        _write_figures(run_dir, config, model, sde, data, truth)
    return metrics


# ---------------------------------------------------------------------- figures
def _png_bytes(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    return buf.getvalue()


def _write_figures(run_dir: Path, config: Toy2dConfig, model, sde, data, truth) -> None:
    """``score.png`` (learned and true score at t = FIGURE_TIME over held-out data) and ``loss.png``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    (xlo, xhi), (ylo, yhi) = data.bounds
    n = 21
    gx, gy = torch.meshgrid(torch.linspace(xlo, xhi, n, dtype=torch.float64),
                            torch.linspace(ylo, yhi, n, dtype=torch.float64), indexing="ij")
    x = torch.stack([gx.reshape(-1), gy.reshape(-1)], -1)
    t = torch.full((x.shape[0],), FIGURE_TIME, dtype=torch.float64)
    with torch.no_grad():
        learned = model(x, t)
    true = truth.score(x, FIGURE_TIME)
    alpha, sigma = sde.marginal(torch.tensor(FIGURE_TIME, dtype=torch.float64))
    pts = alpha * data.sample(2000, torch.Generator().manual_seed(0)) + sigma * torch.randn(
        2000, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)

    fig, axes = plt.subplots(1, 2, figsize=(9, 4.3), sharex=True, sharey=True)
    for ax, field, title in ((axes[0], learned, "learned score (EMA)"), (axes[1], true, "true score")):
        ax.scatter(pts[:, 0], pts[:, 1], s=2, c="0.75", label=f"x ~ p_t, t = {FIGURE_TIME:g}")
        scale = field.norm(dim=-1, keepdim=True).clamp(min=1e-12)
        ax.quiver(x[:, 0], x[:, 1], (field / scale)[:, 0], (field / scale)[:, 1], scale.squeeze(-1),
                  cmap="viridis", angles="xy")
        ax.set_title(title)
        ax.set_xlabel("x₁")
        ax.set_aspect("equal")
    axes[0].set_ylabel("x₂")
    axes[0].legend(loc="upper right", fontsize=7)
    fig.suptitle(f"{run_dir.name}: direction of s(x, t), colour = |s|", fontsize=9)
    fig.tight_layout()
    atomic_write_bytes(run_dir / "score.png", _png_bytes(fig))
    plt.close(fig)

    hist = load_checkpoint(run_dir / CHECKPOINT_NAME)["history"]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    steps = torch.arange(1, hist.shape[0] + 1)
    ax.semilogy(steps, hist[:, 1].clamp(min=1e-300), lw=0.8, label="DSM")
    if (hist[:, 2] > 0).any():
        ax.semilogy(steps, hist[:, 2].clamp(min=1e-300), lw=0.8, label="FPE term E w(t)‖R‖²")
    ax.set_xlabel("step")
    ax.set_ylabel("loss per batch")
    ax.legend()
    fig.tight_layout()
    atomic_write_bytes(run_dir / "loss.png", _png_bytes(fig))
    plt.close(fig)


# ---------------------------------------------------------------------- handlers
def _toy2d_command(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    try:
        resolve_device(config.device)
    except ValueError as e:
        raise CLIError(str(e)) from None
    if args.dry_run:
        print(config.to_json())
        print(f"run folder: {Path(args.out) / run_dir_name(config)}")
        return 0
    try:
        run_dir = run_toy2d(config, Path(args.out), resume=args.resume)
    except (ValueError, ConfigMismatchError, FloatingPointError, FileNotFoundError) as e:  # NonFiniteLossError too
        raise CLIError(str(e)) from None
    log.info("wrote %s", run_dir)
    return 0


def _eval_command(args: argparse.Namespace) -> int:
    run_dir = Path(args.run_dir)
    if not (run_dir / CONFIG_NAME).is_file() or not (run_dir / CHECKPOINT_NAME).is_file():
        raise CLIError(f"{run_dir} is not a toy2d run folder (needs {CONFIG_NAME} and {CHECKPOINT_NAME})")
    try:
        metrics = evaluate_run(run_dir)
    except (ValueError, FileNotFoundError, FloatingPointError) as e:
        raise CLIError(str(e)) from None
    log.info("%s\nwrote %s", metrics_summary(metrics), run_dir / METRICS_NAME)
    return 0
