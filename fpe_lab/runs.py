"""A run folder: its name, its files, training into it, growing it, loading and evaluating it.

``OUT/<label>-<fingerprint>/`` where the label reads ``<data>_<sde>_<reg><lam>_seed<seed>`` and the
fingerprint is a short hash of every setting that changes the trained weights except the step count
(:meth:`fpe_lab.config.RunConfig.fingerprint`), so a run can grow: ``--resume --steps N`` continues a
finished run to N steps in the same folder. The folder holds

    config.json        the resolved RunConfig (passed back with --config, it reproduces the run)
    checkpoint.pt      latest state: model, EMA, optimizer, step, RNG states, loss history (state dicts)
    snapshots/         step_<k>.pt every optim.ckpt_every steps, the newest optim.keep of them
    metrics.jsonl      one line per step: step, loss, dsm, fpe, lr, grad_norm, wall_s (``tail -f``-able)
    metrics.json       the EvalReport of the EMA weights, with the step it was computed at
    loss.png           the loss terms per step (from metrics.jsonl); score.png for 2-D data

From Python::

    from fpe_lab import config, runs
    run = runs.train(config.toy2d(), out="runs")    # trains, evaluates, returns the Run
    run = runs.load("runs/gmm_vp_fpe0.1_seed0-…")   # .config, .report, .model(), .sde, .history()
    report = runs.evaluate(run)                     # re-evaluate (writes metrics.json)
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch

from fpe_lab import build, distributed
from fpe_lab.checkpoint import (
    CHECKPOINT_NAME,
    CONFIG_NAME,
    ConfigMismatchError,
    atomic_write_bytes,
    atomic_write_text,
    load_checkpoint,
    read_config,
    write_config,
)
from fpe_lab.config import RunConfig, Weights, _hashed
from fpe_lab.losses import LossTerms
from fpe_lab.metrics.evaluate import EvalReport, evaluate as evaluate_score
from fpe_lab.sde import LinearSDE
from fpe_lab.train import TrainOptions, train as train_loop

__all__ = ["METRICS_NAME", "LOG_NAME", "Run", "run_dir", "read_history", "train", "load", "evaluate", "summary", "RunError"]

log = logging.getLogger(__name__)

METRICS_NAME = "metrics.json"
LOG_NAME = "metrics.jsonl"
FIGURE_TIME = 0.1  # time of the score-field figure: structure of the data still visible


class RunError(ValueError):
    """A run folder is missing, incomplete, or does not hold the run asked for."""


def run_dir(config: RunConfig, out: str | Path) -> Path:
    """``out/<label>-<fingerprint>``: the folder of ``config``'s run, whatever its step count."""
    return Path(out) / f"{config.label()}-{config.fingerprint()}"


@contextlib.contextmanager
def threads(n: int) -> Iterator[None]:
    """``torch.set_num_threads(n)`` inside the block (oversubscribed threads on shared cores only wait)."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@dataclass(frozen=True)
class Run:
    """One run folder: its path and resolved configuration; everything else is read on demand."""

    path: Path
    config: RunConfig

    @property
    def sde(self) -> LinearSDE:
        return build.build_sde(self.config.sde)

    @property
    def steps_done(self) -> int:
        """The step of the latest checkpoint (0 if there is none)."""
        ckpt = self.path / CHECKPOINT_NAME
        return int(load_checkpoint(ckpt)["step"]) if ckpt.is_file() else 0

    @property
    def report(self) -> EvalReport | None:
        """The EvalReport in metrics.json, or None if the run was not evaluated."""
        path = self.path / METRICS_NAME
        if not path.is_file():
            return None
        try:
            return EvalReport.from_dict(json.loads(path.read_text(encoding="utf-8")))
        except (json.JSONDecodeError, UnicodeDecodeError, ValueError) as e:
            raise RunError(f"run folder {self.path}: {METRICS_NAME} cannot be read: {e}") from None

    @property
    def is_finished(self) -> bool:
        """Trained to its planned steps and evaluated at that step."""
        report = self.report
        done = self.steps_done
        return done == self.config.optim.steps and report is not None and report.step == done

    def model(self, weights: Weights = Weights.EMA, dtype: torch.dtype = torch.float32,
              device: torch.device | str = "cpu") -> torch.nn.Module:
        """The ScoreModel with the checkpoint's EMA (or raw) weights, in eval mode."""
        model = build.build_model(self.config, self.sde)
        state = load_checkpoint(self.path / CHECKPOINT_NAME)
        trained_for = state.get("fingerprint")
        if trained_for != self.config.fingerprint():
            raise RunError(f"run folder {self.path}: its {CONFIG_NAME} (fingerprint {self.config.fingerprint()}) is not "
                           f"the configuration its checkpoint was trained with ({trained_for}); was it edited by hand?")
        try:
            model.load_state_dict(state[weights.value])
        except (KeyError, RuntimeError) as e:
            raise RunError(f"run folder {self.path}: {CHECKPOINT_NAME} does not fit its config.json "
                           f"({type(e).__name__}: {str(e).splitlines()[0]})") from None
        return model.to(device=device, dtype=dtype).eval().requires_grad_(False)

    def history(self) -> list[dict[str, Any]]:
        """The lines of metrics.jsonl (one per step)."""
        return read_history(self.path)


def read_history(folder: str | Path) -> list[dict[str, Any]]:
    """The records of ``folder/metrics.jsonl``, one per training step ([] if there is none)."""
    path = Path(folder) / LOG_NAME
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def load(path: str | Path) -> Run:
    """The run in folder ``path``; :class:`RunError` if it is not a run folder."""
    path = Path(path)
    if not (path / CONFIG_NAME).is_file():
        raise RunError(f"{path} is not a run folder (no {CONFIG_NAME})")
    try:
        config = RunConfig.from_dict(read_config(path))
    except ValueError as e:
        raise RunError(f"run folder {path}: {CONFIG_NAME} is not a run configuration: {e}") from None
    return Run(path, config)


# ---------------------------------------------------------------------- training
def _check_same_run(folder: Path, config: RunConfig) -> None:
    saved = RunConfig.from_dict(read_config(folder))
    a, b = _hashed(saved), _hashed(config)
    diff = [f"{k}: saved {a[k]!r} vs requested {b[k]!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    if diff:
        raise ConfigMismatchError(f"run folder {folder} holds a different run ({'; '.join(diff)})")


def _prepare(config: RunConfig, out: Path, resume: bool) -> tuple[Path, bool]:
    """Check the folder (creating nothing yet); returns (folder, whether a checkpoint is resumed)."""
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, f"--out {out} is a file, not a folder (a folder is created if missing)", str(out))
    folder = run_dir(config, out)
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"run folder {folder} exists and is a file")
    if (folder / CONFIG_NAME).is_file():
        if not resume:
            raise ValueError(f"run folder {folder} already exists; pass --resume to continue or grow it "
                             f"(--resume --steps N), or `eval {folder}` to re-evaluate it")
        _check_same_run(folder, config)
    resuming = resume and (folder / CHECKPOINT_NAME).is_file()
    if resuming:
        done = int(load_checkpoint(folder / CHECKPOINT_NAME)["step"])
        if done > config.optim.steps:
            raise ValueError(f"run folder {folder} is at step {done}; --steps {config.optim.steps} would shrink it "
                             f"(pass --steps >= {done})")
    return folder, resuming


class _StepLog:
    """metrics.jsonl: on resume cut back to the checkpoint's step (atomically), then one line per step."""

    def __init__(self, path: Path, resume_step: int) -> None:
        kept = []
        if resume_step > 0 and path.is_file():
            kept = [line for line in path.read_text(encoding="utf-8").splitlines()
                    if line.strip() and json.loads(line)["step"] <= resume_step]
        atomic_write_text(path, "".join(line + "\n" for line in kept))
        self.file = path.open("a", encoding="utf-8")

    def __call__(self, record: dict[str, Any]) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


def train(config: RunConfig, out: str | Path = "runs", resume: bool = False, progress: bool = True,
          env: distributed.DistEnv | None = None, evaluate_after: bool = True) -> Run:
    """Train ``config`` in ``run_dir(config, out)``, evaluate its EMA weights, write metrics and figures.

    ``resume`` continues (or grows, when ``config.optim.steps`` is larger) the run in its folder. Every
    input is checked before the folder is created: a failure before training leaves nothing behind.
    Raises ValueError (bad input), ConfigMismatchError, NonFiniteLossError, TrainingInterrupted.
    """
    env = env or distributed.DistEnv()
    device = env.device() if env.is_distributed else build.resolve_device(config.device)
    if config.optim.bf16 and device.type != "cuda":
        raise ValueError("bf16 needs CUDA (bf16 autocast is only used on GPUs); drop --bf16 on CPU")
    if config.optim.batch % env.world_size:
        raise ValueError(f"--batch {config.optim.batch} must be divisible by the number of processes {env.world_size}")
    folder, resuming = _prepare(config, Path(out), resume)
    with threads(config.threads):
        sde = build.build_sde(config.sde)
        data = build.build_data(config)
        model = build.build_model(config, sde)
        loss = build.build_loss(config, sde)
        if not resuming:
            build.init_weights(model, config)
        distributed.barrier(env)
        if env.is_main:
            folder.mkdir(parents=True, exist_ok=True)
            write_config(folder, config.to_dict())
        distributed.barrier(env)
        rank_dir = folder if env.is_main else folder / "ranks" / f"rank{env.rank}"
        rank_dir.mkdir(parents=True, exist_ok=True)
        resuming = resuming and (rank_dir / CHECKPOINT_NAME).is_file()
        model.to(device)
        module = distributed.unwrap(distributed.wrap(model, env))
        hooks = distributed.average_gradients_in_backward(module, env)
        loss_fn = distributed.agree_on_nonfinite(_bf16(loss) if config.optim.bf16 else loss, env)
        options = TrainOptions(steps=config.optim.steps, lr=config.optim.lr, ema_decay=config.optim.ema_decay,
                               seed=distributed.rank_seed(config.seed, env), ckpt_every=config.optim.ckpt_every,
                               keep=config.optim.keep, grad_clip=config.optim.grad_clip,
                               progress=progress and env.is_main, fingerprint=config.fingerprint())
        log.info("run folder %s (%d process(es), device %s)\n%s", folder, env.world_size, device, sde)
        step_log = _StepLog(folder / LOG_NAME, load_checkpoint(folder / CHECKPOINT_NAME)["step"] if resuming else 0) \
            if env.is_main else None
        try:
            result = train_loop(module, loss_fn, build.batch_sampler(config, data, config.optim.batch // env.world_size),
                                options, device=device, run_dir=rank_dir, resume=resuming, on_step=step_log,
                                main_dir=folder)
        finally:
            if step_log is not None:
                step_log.close()
            for h in hooks:
                h.remove()
        log.info("trained %d steps in %.1f s", result.step, result.wall_s)
    run = Run(folder, config)
    if env.is_main and evaluate_after:
        report = evaluate(run, progress=progress, device=device)
        log.info("%s", summary(report))
    distributed.barrier(env)
    return run


def _bf16(loss_fn):
    """The loss under CUDA bf16 autocast (the residual inside opts out, see fpe_lab.build)."""

    def wrapped(model, x0, generator) -> LossTerms:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            terms = loss_fn(model, x0, generator)
        return LossTerms(total=terms.total.float(), dsm=terms.dsm.float(), fpe=terms.fpe.float())

    return wrapped


# ---------------------------------------------------------------------- evaluation
def evaluate(run: Run, progress: bool = True, device: torch.device | str | None = None,
             allow_partial: bool = False) -> EvalReport:
    """Evaluate the EMA weights of ``run`` with its ``config.eval`` settings; write metrics.json and figures.

    Points: float64 on the CPU against the exact truth of the toy set. Images: the model's dtype on
    ``device`` (default: the configured device), held-out test images, bits/dim with dequantization.
    An unfinished run (fewer steps done than planned) is refused unless ``allow_partial``; the report
    records the step it was computed at.
    """
    config = run.config
    done = run.steps_done
    if done == 0:
        raise RunError(f"run folder {run.path} has no checkpoint to evaluate")
    if done < config.optim.steps and not allow_partial:
        raise RunError(f"run folder {run.path} is unfinished: {done} of {config.optim.steps} steps done; "
                       "resume it with --resume, or pass --allow-partial to evaluate it as it is")
    from fpe_lab.metrics.truth import MixtureTruth, ToyTruth

    with threads(config.threads):
        sde = run.sde
        data = build.build_eval_data(config)
        if config.data.name.is_image:
            from fpe_lab.likelihood import UniformDequantization

            device = torch.device(device) if device is not None else build.resolve_device(config.device)
            dtype, truth = torch.float32, None
            dequantization = UniformDequantization(data.levels, -1.0, 1.0)
        else:
            device, dtype, dequantization = torch.device("cpu"), torch.float64, None
            truth = MixtureTruth(data.mixture, sde) if data.mixture is not None else ToyTruth(data, sde)
        model = run.model(dtype=dtype, device=device)
        e = config.eval
        report = evaluate_score(
            model, sde, data, truth, times=e.times, n_points=e.points, eps=config.loss.eps,
            generator=torch.Generator().manual_seed(config.eval_seed), n_nll=e.nll_points, nll_rtol=e.rtol,
            nll_repeats=e.repeats, dequantization=dequantization, n_samples=e.samples, probes=e.probes,
            batch_size=e.batch, dtype=dtype, device=device, step=done, progress=progress)
        atomic_write_text(run.path / METRICS_NAME, json.dumps(report.to_dict(), indent=2) + "\n")
        _write_figures(run, model, sde, data, truth)
    return report


def summary(report: EvalReport) -> str:
    """A few lines of the headline numbers of a report."""
    m = report.mean
    lines = [f"mean over t in {list(report.times)} (step {report.step}):",
             f"  score-FPE residual E‖R‖² {m['fpe_residual']:.4g} (relative to its terms {m['fpe_residual_rel']:.3g})",
             f"  Jacobian asymmetry ‖J − Jᵀ‖²/‖J‖² {m['jacobian_asymmetry_rel']:.3g}"
             + (f", mean |curl| {m['curl_abs']:.3g}" if "curl_abs" in m else ""),
             f"  DSM loss E‖sigma s + z‖² {m['dsm']:.4g}"]
    if "score_error" in m:
        lines.append(f"  score error E‖s − ∇log p‖² {m['score_error']:.4g} (relative {m['score_error_rel']:.3g})")
    nll = report.nll
    if nll is not None and nll.true_nats is not None:
        lines.append(f"NLL {nll.model_nats:.4f} nats vs true {nll.true_nats:.4f} (gap {nll.gap_nats:.4f} ± "
                     f"{nll.gap_nats_sem:.2g}, {nll.n_points} held-out points)")
    elif nll is not None:
        bound = f"; DSM bound {nll.dsm_bound_bits_per_dim:.4f}" if nll.dsm_bound_bits_per_dim is not None else ""
        lines.append(f"bits/dim {nll.model_bits_per_dim:.4f} ({nll.n_points} test points × {nll.repeats} repeats){bound}")
    if report.samples is not None:
        sw = report.samples.sliced_wasserstein
        lines.append(f"sliced W2 to held-out data: reverse SDE {sw.sde_vs_data:.3g}, PF-ODE {sw.ode_vs_data:.3g} "
                     f"(noise floor {sw.floor:.3g})")
    return "\n".join(lines)


# ---------------------------------------------------------------------- figures
def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    return buf.getvalue()


def _write_figures(run: Run, model, sde, data, truth) -> None:
    """``loss.png`` from metrics.jsonl; for 2-D data ``score.png`` (learned and true score at FIGURE_TIME)."""
    from matplotlib.figure import Figure

    hist = run.history()
    if hist:
        fig = Figure(figsize=(6, 3.5))
        ax = fig.subplots()
        steps = [h["step"] for h in hist]
        ax.semilogy(steps, [max(h["dsm"], 1e-300) for h in hist], lw=0.8, label="DSM")
        if any(h["fpe"] > 0 for h in hist):
            ax.semilogy(steps, [max(h["fpe"], 1e-300) for h in hist], lw=0.8, label="regularizer term")
        ax.set_xlabel("step")
        ax.set_ylabel("loss per batch")
        ax.legend()
        fig.tight_layout()
        atomic_write_bytes(run.path / "loss.png", _png(fig))
    if run.config.dim != 2 or truth is None:
        return
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
    fig = Figure(figsize=(9, 4.3))
    axes = fig.subplots(1, 2, sharex=True, sharey=True)
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
    fig.suptitle(f"{run.path.name}: direction of s(x, t), colour = |s|", fontsize=9)
    fig.tight_layout()
    atomic_write_bytes(run.path / "score.png", _png(fig))
