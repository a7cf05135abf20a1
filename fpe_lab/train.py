"""The training loop: Adam on a loss ``loss_fn(model, x0, generator) -> LossTerms``, with EMA weights.

The loop knows nothing about SDEs, data shapes or networks: 2-D points and images differ only in
the model, the batch sampler and the loss object passed in (:class:`fpe_lab.losses.ScoreFPELoss`).

Reproducibility: all randomness comes from generators seeded from ``seed`` — ``data`` (CPU) for
``sample_batch``, ``noise`` (on the training device) for the loss's t and z, and the global torch RNG
(CPU, and CUDA's when training on a GPU) for anything that draws from it, e.g. the U-Net's dropout. The
global RNG is seeded at the start of training inside ``torch.random.fork_rng``, so the caller's global
state neither matters nor changes. A checkpoint stores the model, EMA and optimizer state, the step, the
RNG states (``data``, ``noise``, ``torch`` and, on CUDA, ``cuda``) and the loss history, so that killing
a run and resuming it gives the same weights as an uninterrupted run, and two runs of one configuration
write equal checkpoints. A checkpoint also stores the run's ``fingerprint``; resuming a checkpoint whose
fingerprint is not the one asked for is refused.

A non-finite loss or gradient stops training before the optimizer step: nothing is updated and
no checkpoint is written, so the last checkpoint on disk is the last good state.

A run grows: resuming a checkpoint at step k with ``steps`` N > k continues to N, and the result equals
an uninterrupted N-step run bitwise (nothing in the loop depends on N). SIGINT and SIGTERM finish the
current step, write a checkpoint at it and raise :class:`TrainingInterrupted` (also when the signal came
during the last step: the caller then skips what follows training).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import torch
from torch import nn

from fpe_lab.checkpoint import CHECKPOINT_NAME, SNAPSHOT_DIR, load_checkpoint, save_checkpoint, save_snapshot
from fpe_lab.losses import LossTerms
from fpe_lab.progress import progress_bar as tqdm

__all__ = ["TrainOptions", "TrainResult", "NonFiniteLossError", "TrainingInterrupted", "StepRecord", "BatchSampler",
           "LossFn", "train", "ema_update", "ema_decay_at", "MAX_STEPS"]

log = logging.getLogger(__name__)

MAX_STEPS = 10**9
"""Most optimizer steps of one run (beyond any real run; larger counts are typing errors)."""

GLOBAL_SEED_OFFSET = 2_000_003
"""The global torch RNG of a run is seeded with ``seed + GLOBAL_SEED_OFFSET`` (the data generator uses
``seed``, the noise generator ``seed + 1_000_003``: three distinct streams)."""

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
        saved_note = "checkpoint written" if saved else "nothing saved (no run folder)"
        super().__init__(f"{name} at step {step}: {saved_note}")


StepRecord = dict
"""One line of ``metrics.jsonl``: {"step", "loss", "dsm", "reg", "lr", "grad_norm", "wall_s"}."""


@dataclass(frozen=True)
class TrainOptions:
    """Optimisation settings.

    Args:
        steps: total number of optimizer steps (a resumed run continues up to this number).
        lr: Adam learning rate.
        ema_decay: EMA of the weights, ema ← d·ema + (1 − d)·θ after every step, d = ``ema_decay_at``.
        seed: seeds the data and noise generators and, inside the call only, the global torch RNG.
        ckpt_every: write a checkpoint every this many steps (and at the end), and a numbered snapshot
            ``snapshots/step_<k>.pt`` beside it.
        keep: numbered snapshots kept (the oldest are removed; 0: none).
        grad_clip: clip the global gradient norm to this value (None: no clipping).
        progress: show a tqdm bar with the DSM and FPE losses.
        fingerprint: stored in every checkpoint, so a run folder can tell whether its checkpoint
            was trained for its configuration; when nonempty, resuming a checkpoint that stores another
            fingerprint (or none) is refused.
        init_from: a record of the weights the run started from (source fingerprint, step, checksum), stored
            in every checkpoint under ``init_from`` (None: not stored).
        initial: {"ema", "optimizer", "step"} of a run this one continues (``--init-state continue``): its EMA
            and Adam state are loaded (at this run's ``lr``), and the EMA warm-up counts on from its step, so
            fine-tuning continues training rather than restarting it (None: fresh EMA and optimizer).
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
    init_from: dict | None = None
    initial: dict | None = None

    def __post_init__(self) -> None:
        for name, v in (("steps", self.steps), ("ckpt_every", self.ckpt_every)):
            if not (isinstance(v, int) and not isinstance(v, bool) and v >= 1):
                raise ValueError(f"{name} must be an int >= 1; got {v!r}")
        if self.steps > MAX_STEPS:
            raise ValueError(f"steps must be an int in [1, {MAX_STEPS}]; got {self.steps!r}")
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
    for eb, b in zip(ema.buffers(), model.buffers()):
        eb.copy_(b)


def _generators(seed: int, device: torch.device) -> dict[str, torch.Generator]:
    data = torch.Generator().manual_seed(seed)
    noise = torch.Generator(device=device).manual_seed(seed + 1_000_003)
    return {"data": data, "noise": noise}


def _rng_state(gens: dict[str, torch.Generator], device: torch.device) -> dict[str, torch.Tensor]:
    state = {name: g.get_state() for name, g in gens.items()}
    state["torch"] = torch.get_rng_state()
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(gens: dict[str, torch.Generator], state: dict[str, torch.Tensor], device: torch.device) -> None:
    for name, g in gens.items():
        g.set_state(state[name].cpu())
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"].cpu(), device)


@contextlib.contextmanager
def _own_global_rng(seed: int, device: torch.device):
    """The global torch RNG (and the training GPU's) seeded from ``seed`` inside the block and restored
    after it: dropout and anything else that draws from it is reproducible, and the caller's state is
    left as it was."""
    devices = [device.index if device.index is not None else torch.cuda.current_device()] \
        if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed + GLOBAL_SEED_OFFSET)
        yield


class _History:
    """The per-step (total, dsm, fpe) rows, float64, in a buffer that doubles when full (nothing of
    size ``steps`` is allocated up front)."""

    def __init__(self, steps: int) -> None:
        self.buf = torch.zeros(min(steps, 1024), 3, dtype=torch.float64)

    def set(self, step: int, row: torch.Tensor) -> None:
        if step >= self.buf.shape[0]:
            grown = torch.zeros(max(2 * self.buf.shape[0], step + 1), 3, dtype=torch.float64)
            grown[: self.buf.shape[0]] = self.buf
            self.buf = grown
        self.buf[step] = row

    def load(self, rows: torch.Tensor) -> None:
        for_rows = torch.zeros(max(self.buf.shape[0], rows.shape[0]), 3, dtype=torch.float64)
        for_rows[: rows.shape[0]] = rows
        self.buf = for_rows

    def upto(self, step: int) -> torch.Tensor:
        return self.buf[:step].clone()


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
        ValueError: the checkpoint to resume does not fit the model, or was trained for another
            fingerprint than ``options.fingerprint``.
    """
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    with _own_global_rng(options.seed, device):
        return _train(model, loss_fn, sample_batch, options, device=device, run_dir=run_dir, resume=resume,
                      on_step=on_step, main_dir=main_dir)


def _train(model, loss_fn, sample_batch, options: TrainOptions, *, device: torch.device, run_dir, resume: bool,
           on_step, main_dir) -> TrainResult:
    model.to(device)
    ema = copy.deepcopy(model).requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=options.lr)
    gens = _generators(options.seed, device)
    history = _History(options.steps)
    step = 0
    ckpt_path = Path(run_dir) / CHECKPOINT_NAME if run_dir is not None else None
    resumed_from = None

    rng_only = main_dir is not None and Path(main_dir).resolve() != Path(run_dir or main_dir).resolve()
    ema_offset = 0  # steps the EMA warm-up has already counted (a continued run's source steps)
    if options.initial is not None and not resume:
        try:
            ema.load_state_dict(options.initial["ema"])
            optimizer.load_state_dict(options.initial["optimizer"])
        except (KeyError, RuntimeError, ValueError, TypeError) as e:
            raise ValueError(f"the run to continue does not fit this model: {type(e).__name__}: "
                             f"{str(e).splitlines()[0]}") from None
        for group in optimizer.param_groups:
            group["lr"] = options.lr
        ema_offset = int(options.initial["step"])
    if resume:
        if ckpt_path is None or not ckpt_path.is_file():
            raise FileNotFoundError(f"cannot resume: no {CHECKPOINT_NAME} in {run_dir}")
        state = load_checkpoint(ckpt_path, map_location=device)
        if options.fingerprint and state.get("fingerprint") != options.fingerprint:
            found = state.get("fingerprint") or "none"
            raise ValueError(f"checkpoint {ckpt_path} was trained with fingerprint {found}, not {options.fingerprint} "
                             "(the run asked for); it is not this run's checkpoint")
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
            _set_rng_state(gens, state["rng"], device)
            step = int(state["step"])
            ema_offset = int(state.get("ema_offset", 0))
        except (KeyError, RuntimeError, ValueError, TypeError) as e:
            raise ValueError(f"checkpoint {ckpt_path} does not fit this model: {type(e).__name__}: "
                             f"{str(e).splitlines()[0]}") from None
        if step > options.steps:
            raise ValueError(f"checkpoint in {run_dir} is at step {step}, beyond steps={options.steps}")
        history.load(state["history"][:step].to(dtype=torch.float64, device="cpu"))
        resumed_from = step
        log.info("resumed from %s at step %d", ckpt_path, step)

    def save(snapshot: bool) -> None:
        if ckpt_path is None:
            return
        if rng_only:
            save_checkpoint(ckpt_path, {"step": step, "rng": _rng_state(gens, device),
                                        "fingerprint": options.fingerprint})
            return
        state = {
            "model": model.state_dict(),
            "ema": ema.state_dict(),
            "optimizer": optimizer.state_dict(),
            "step": step,
            "rng": _rng_state(gens, device),
            "history": history.upto(step),
            "ema_offset": ema_offset,
            "fingerprint": options.fingerprint,
        }
        if options.init_from is not None:
            state["init_from"] = options.init_from
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
                        f"non-finite loss at step {step + 1} (dsm={vals['dsm']:.4g}, reg={vals['reg']:.4g}); "
                        f"training stopped, {last_good()}; try a smaller learning rate or lam"
                    )
                optimizer.zero_grad(set_to_none=True)
                terms.total.backward()
                gnorm = _grad_norm(params, options.grad_clip)
                if not torch.isfinite(gnorm):
                    raise NonFiniteLossError(
                        f"non-finite gradient at step {step + 1} (loss {float(terms.total.detach()):.4g}); "
                        f"training stopped, {last_good()}; try a smaller learning rate or lam"
                    )
                optimizer.step()
                ema_update(ema, model, ema_decay_at(ema_offset + step, options.ema_decay))
                vals = terms.floats()
                history.set(step, torch.tensor([vals["total"], vals["dsm"], vals["reg"]], dtype=torch.float64))
                step += 1
                periodic = step % options.ckpt_every == 0
                if periodic or step == options.steps:
                    save(snapshot=periodic)
                if on_step is not None:
                    on_step({"step": step, "loss": vals["total"], "dsm": vals["dsm"], "reg": vals["reg"],
                             "lr": optimizer.param_groups[0]["lr"], "grad_norm": float(gnorm),
                             "wall_s": time.perf_counter() - start})
                if options.progress:
                    for k in ("dsm", "reg"):
                        smooth[k] = vals[k] if k not in smooth else 0.95 * smooth[k] + 0.05 * vals[k]
                    bar.update(1)
                    if step % 10 == 0 or step == options.steps:
                        bar.set_postfix(dsm=f"{smooth['dsm']:.4g}", reg=f"{smooth['reg']:.4g}", refresh=False)
                if caught and step < options.steps:
                    save(snapshot=False)
                    raise TrainingInterrupted(step, caught[0], saved=ckpt_path is not None)
            if caught:  # during the last step: its checkpoint is written; what follows training is skipped
                raise TrainingInterrupted(step, caught[0], saved=ckpt_path is not None)
        finally:
            bar.close()
    model.eval()
    ema.eval()
    return TrainResult(model=model, ema=ema, step=step, history=history.upto(options.steps),
                       wall_s=time.perf_counter() - start,
                       resumed_from=resumed_from)


class _catch_signals:
    """Within the block, SIGINT and SIGTERM are recorded (the list holds their numbers) instead of
    raising at once, so the loop can finish its step and save. Outside the main thread: no-op."""

    def __enter__(self) -> list[int]:
        self.caught: list[int] = []
        # what signal.signal returns and accepts: a handler, SIG_DFL or SIG_IGN (ints), or None (not set from Python)
        self.previous: dict[int, Callable[[int, FrameType | None], Any] | int | None] = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.previous[sig] = signal.signal(sig, lambda signum, frame: self.caught.append(signum))
        return self.caught

    def __exit__(self, *exc) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
