"""The training loop: Adam on a loss ``loss_fn(model, x0, generator) -> LossTerms``, with EMA weights.

The loop knows nothing about SDEs, data shapes or networks: 2-D points and images differ only in
the model, the batch sampler and the loss object passed in (:class:`fpe_lab.losses.ScoreFPELoss`).

Reproducibility: all randomness comes from two generators seeded from ``seed`` — ``data`` (CPU)
for ``sample_batch`` and ``noise`` (on the training device) for the loss's t and z — plus the global
torch RNG (for anything that uses it, e.g. a Hutchinson estimator without its own generator).
A checkpoint stores the model, EMA and optimizer state, the step, the three RNG states and the loss
history, so that killing a run and resuming it gives the same weights as an uninterrupted run.

A non-finite loss or gradient stops training before the optimizer step: nothing is updated and
no checkpoint is written, so the last checkpoint on disk is the last good state.

A run grows: resuming a checkpoint at step k with ``steps`` N > k continues to N, and the result equals
an uninterrupted N-step run bitwise (nothing in the loop depends on N). SIGINT and SIGTERM finish the
current step, write a checkpoint at it and raise :class:`TrainingInterrupted`.
"""

from __future__ import annotations

import copy
import logging
import math
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from fpe_lab.progress import progress_bar as tqdm

from fpe_lab.checkpoint import CHECKPOINT_NAME, SNAPSHOT_DIR, load_checkpoint, save_checkpoint, save_snapshot
from fpe_lab.losses import LossTerms

__all__ = ["TrainOptions", "TrainResult", "NonFiniteLossError", "TrainingInterrupted", "StepRecord", "BatchSampler", "LossFn", "train", "ema_update", "ema_decay_at"]

log = logging.getLogger(__name__)

BatchSampler = Callable[[torch.Generator], torch.Tensor]
"""``sample_batch(generator) -> x0`` of shape (b, *dims), on any device (moved by the loop)."""

LossFn = Callable[[nn.Module, torch.Tensor, torch.Generator], LossTerms]
"""``loss_fn(model, x0, generator) -> LossTerms`` (e.g. :class:`fpe_lab.losses.ScoreFPELoss`)."""


class NonFiniteLossError(FloatingPointError):
    """Training produced a non-finite loss or gradient; the message says where and what is kept."""


class TrainingInterrupted(Exception):
    """SIGINT/SIGTERM arrived; a checkpoint at ``step`` was written (when there is a run folder).

    ``exit_code`` is the shell convention 128 + signal number (130 for SIGINT, 143 for SIGTERM)."""

    def __init__(self, step: int, signum: int, saved: bool) -> None:
        self.step, self.signum, self.saved = step, signum, saved
        self.exit_code = 128 + signum
        name = signal.Signals(signum).name
        super().__init__(f"{name} at step {step}: " + ("checkpoint written" if saved else "nothing saved (no run folder)"))


StepRecord = dict
"""One line of ``metrics.jsonl``: {"step", "loss", "dsm", "fpe", "lr", "grad_norm", "wall_s"}."""


@dataclass(frozen=True)
class TrainOptions:
    """Optimisation settings.

    Args:
        steps: total number of optimizer steps (a resumed run continues up to this number).
        lr: Adam learning rate.
        ema_decay: EMA of the weights, ema ← d·ema + (1 − d)·θ after every step, d = ``ema_decay_at``.
        seed: seeds the data and noise generators (and nothing global).
        ckpt_every: write a checkpoint every this many steps (and at the end), and a numbered snapshot
            ``snapshots/step_<k>.pt`` beside it.
        keep: numbered snapshots kept (the oldest are removed; 0: none).
        grad_clip: clip the global gradient norm to this value (None: no clipping).
        progress: show a tqdm bar with the DSM and FPE losses.
        fingerprint: stored in every checkpoint, so a run folder can tell whether its checkpoint
            was trained for its configuration.
    """

    steps: int
    lr: float = 2e-3
    ema_decay: float = 0.999
    seed: int = 0
    ckpt_every: int = 500
    keep: int = 3
    grad_clip: float | None = None
    progress: bool = True
    fingerprint: str = ""

    def __post_init__(self) -> None:
        for name, v in (("steps", self.steps), ("ckpt_every", self.ckpt_every)):
            if not (isinstance(v, int) and not isinstance(v, bool) and v >= 1):
                raise ValueError(f"{name} must be an int >= 1; got {v!r}")
        if not (isinstance(self.keep, int) and not isinstance(self.keep, bool) and self.keep >= 0):
            raise ValueError(f"keep must be an int >= 0; got {self.keep!r}")
        if not (isinstance(self.seed, int) and self.seed >= 0):
            raise ValueError(f"seed must be an int >= 0; got {self.seed!r}")
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be a finite number > 0; got {self.lr!r}")
        if not (isinstance(self.ema_decay, (int, float)) and 0 <= self.ema_decay < 1):
            raise ValueError(f"ema_decay must be in [0, 1); got {self.ema_decay!r}")
        if self.grad_clip is not None and not (math.isfinite(self.grad_clip) and self.grad_clip > 0):
            raise ValueError(f"grad_clip must be None or a finite number > 0; got {self.grad_clip!r}")


@dataclass
class TrainResult:
    """What the loop leaves behind: the trained model and its EMA copy, the step reached, the history.

    ``history`` has one row per step: (total, dsm, fpe) as float64, shape (steps, 3).
    """

    model: nn.Module
    ema: nn.Module
    step: int
    history: torch.Tensor
    wall_s: float = 0.0
    resumed_from: int | None = None


def ema_decay_at(step: int, decay: float) -> float:
    """Warm-up of the EMA: min(decay, (1 + k)/(10 + k)) after k steps, so short runs are not
    dominated by the initial weights (with 0.999 the first 1000 steps would be)."""
    return min(decay, (1 + step) / (10 + step))


@torch.no_grad()
def ema_update(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """ema ← decay·ema + (1 − decay)·θ for parameters; buffers are copied."""
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p.detach(), 1 - decay)
    for e, b in zip(ema.buffers(), model.buffers()):
        e.copy_(b)


def _generators(seed: int, device: torch.device) -> dict[str, torch.Generator]:
    data = torch.Generator().manual_seed(seed)
    noise = torch.Generator(device=device).manual_seed(seed + 1_000_003)
    return {"data": data, "noise": noise}


def _rng_state(gens: dict[str, torch.Generator]) -> dict[str, torch.Tensor]:
    state = {name: g.get_state() for name, g in gens.items()}
    state["torch"] = torch.get_rng_state()
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(gens: dict[str, torch.Generator], state: dict[str, torch.Tensor]) -> None:
    for name, g in gens.items():
        g.set_state(state[name].cpu())
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"].cpu())


def _grad_norm(params: list[torch.Tensor], clip: float | None) -> torch.Tensor:
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    if clip is not None:
        return torch.nn.utils.clip_grad_norm_(params, clip)
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))


def train(
    model: nn.Module,
    loss_fn: LossFn,
    sample_batch: BatchSampler,
    options: TrainOptions,
    *,
    device: torch.device | str = "cpu",
    run_dir: str | Path | None = None,
    resume: bool = False,
    on_step: Callable[[StepRecord], None] | None = None,
    main_dir: str | Path | None = None,
) -> TrainResult:
    """Train ``model`` in place up to ``options.steps`` steps; returns it with its EMA copy.

    Args:
        model: the score model, e.g. ``ScoreModel(TimeMLP(...), sde)``; moved to ``device``.
        loss_fn: ``loss_fn(model, x0, generator) -> LossTerms``; generator is the noise generator.
        sample_batch: ``sample_batch(generator) -> x0``, generator the CPU data generator.
        options: steps, lr, EMA, seed, checkpoint interval and snapshots kept.
        device: training device.
        run_dir: folder for ``checkpoint.pt`` and ``snapshots/`` (None: no checkpoints). Must exist.
        resume: continue from ``run_dir/checkpoint.pt`` (model, EMA, optimizer, step, RNG states);
            its step may be below ``options.steps`` (an interrupted run, or a finished run grown).
        on_step: called after every completed step with its :data:`StepRecord` (``metrics.jsonl``).
        main_dir: under DDP, the main process's run folder when ``run_dir`` is another rank's: that rank
            saves only its step and RNG states (weights and optimizer states equal the main process's)
            and resumes from the main checkpoint plus its own RNG states.

    Raises:
        NonFiniteLossError: non-finite loss or gradient; raised before the update, so the model
            and the checkpoint on disk keep the last good state.
        TrainingInterrupted: SIGINT/SIGTERM (handled only when called from the main thread); the
            checkpoint at the step reached is written first.
    """
    device = torch.device(device)
    model.to(device)
    ema = copy.deepcopy(model).requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=options.lr)
    gens = _generators(options.seed, device)
    history = torch.zeros(options.steps, 3, dtype=torch.float64)
    step = 0
    ckpt_path = Path(run_dir) / CHECKPOINT_NAME if run_dir is not None else None
    resumed_from = None

    rng_only = main_dir is not None and Path(main_dir).resolve() != Path(run_dir or main_dir).resolve()
    if resume:
        if ckpt_path is None or not ckpt_path.is_file():
            raise FileNotFoundError(f"cannot resume: no {CHECKPOINT_NAME} in {run_dir}")
        state = load_checkpoint(ckpt_path, map_location=device)
        if rng_only:  # another rank: the weights and optimizer are the main process's, the RNG state its own
            own_step, rng = int(state["step"]), state["rng"]
            state = load_checkpoint(Path(main_dir) / CHECKPOINT_NAME, map_location=device)
            if int(state["step"]) != own_step:
                raise ValueError(f"{ckpt_path} is at step {own_step} but {Path(main_dir) / CHECKPOINT_NAME} at step "
                                 f"{state['step']}: the processes stopped at different steps; resume from a snapshot")
            state["rng"] = rng
        try:
            model.load_state_dict(state["model"])
            ema.load_state_dict(state["ema"])
            optimizer.load_state_dict(state["optimizer"])
            _set_rng_state(gens, state["rng"])
            step = int(state["step"])
        except (KeyError, RuntimeError, ValueError, TypeError) as e:
            raise ValueError(f"checkpoint {ckpt_path} does not fit this model: {type(e).__name__}: "
                             f"{str(e).splitlines()[0]}") from None
        if step > options.steps:
            raise ValueError(f"checkpoint in {run_dir} is at step {step}, beyond steps={options.steps}")
        history[:step] = state["history"][:step]
        resumed_from = step
        log.info("resumed from %s at step %d", ckpt_path, step)

    def save(snapshot: bool) -> None:
        if ckpt_path is None:
            return
        if rng_only:
            save_checkpoint(ckpt_path, {"step": step, "rng": _rng_state(gens), "fingerprint": options.fingerprint})
            return
        state = {
            "model": model.state_dict(),
            "ema": ema.state_dict(),
            "optimizer": optimizer.state_dict(),
            "step": step,
            "rng": _rng_state(gens),
            "history": history[:step].clone(),
            "fingerprint": options.fingerprint,
        }
        save_checkpoint(ckpt_path, state)
        if snapshot and options.keep > 0:
            save_snapshot(ckpt_path.parent / SNAPSHOT_DIR, step, state, keep=options.keep)

    def last_good() -> str:
        if ckpt_path is not None and ckpt_path.is_file():
            saved = load_checkpoint(ckpt_path)["step"]
            return f"last good checkpoint: step {saved} in {ckpt_path}"
        return "no checkpoint written"

    model.train()
    start = time.perf_counter()
    bar = tqdm(total=options.steps, initial=step, disable=not options.progress, desc="train", dynamic_ncols=True)
    smooth: dict[str, float] = {}
    with _catch_signals() as caught:
        try:
            while step < options.steps:
                x0 = sample_batch(gens["data"]).to(device=device, dtype=next(model.parameters()).dtype)
                terms = loss_fn(model, x0, gens["noise"])
                if not terms.is_finite():
                    vals = terms.floats()
                    raise NonFiniteLossError(
                        f"non-finite loss at step {step + 1} (dsm={vals['dsm']:.4g}, fpe={vals['fpe']:.4g}); "
                        f"training stopped, {last_good()}; try a smaller learning rate or lam"
                    )
                optimizer.zero_grad(set_to_none=True)
                terms.total.backward()
                gnorm = _grad_norm(params, options.grad_clip)
                if not torch.isfinite(gnorm):
                    raise NonFiniteLossError(
                        f"non-finite gradient at step {step + 1} (loss {float(terms.total):.4g}); "
                        f"training stopped, {last_good()}; try a smaller learning rate or lam"
                    )
                optimizer.step()
                ema_update(ema, model, ema_decay_at(step, options.ema_decay))
                vals = terms.floats()
                history[step] = torch.tensor([vals["total"], vals["dsm"], vals["fpe"]], dtype=torch.float64)
                step += 1
                periodic = step % options.ckpt_every == 0
                if periodic or step == options.steps:
                    save(snapshot=periodic)
                if on_step is not None:
                    on_step({"step": step, "loss": vals["total"], "dsm": vals["dsm"], "fpe": vals["fpe"],
                             "lr": optimizer.param_groups[0]["lr"], "grad_norm": float(gnorm),
                             "wall_s": time.perf_counter() - start})
                if options.progress:
                    for k in ("dsm", "fpe"):
                        smooth[k] = vals[k] if k not in smooth else 0.95 * smooth[k] + 0.05 * vals[k]
                    bar.update(1)
                    if step % 10 == 0 or step == options.steps:
                        bar.set_postfix(dsm=f"{smooth['dsm']:.4g}", fpe=f"{smooth['fpe']:.4g}", refresh=False)
                if caught and step < options.steps:
                    save(snapshot=False)
                    raise TrainingInterrupted(step, caught[0], saved=ckpt_path is not None)
        finally:
            bar.close()
    model.eval()
    ema.eval()
    return TrainResult(model=model, ema=ema, step=step, history=history, wall_s=time.perf_counter() - start,
                       resumed_from=resumed_from)


class _catch_signals:
    """Within the block, SIGINT and SIGTERM are recorded (the list holds their numbers) instead of
    raising at once, so the loop can finish its step and save. Outside the main thread: no-op."""

    def __enter__(self) -> list[int]:
        self.caught: list[int] = []
        self.previous: dict[int, object] = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.previous[sig] = signal.signal(sig, lambda signum, frame: self.caught.append(signum))
        return self.caught

    def __exit__(self, *exc) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
