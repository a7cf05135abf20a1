"""A run folder: its name, its files, training into it, growing it, loading and evaluating it.

``OUT/<label>-<fingerprint>/`` where the label reads ``<data>_<sde>_<reg><lam>_seed<seed>`` and the
fingerprint is a short hash of every setting that changes the trained weights except the step count
(:meth:`fpe_lab.config.RunConfig.fingerprint`), so a run can grow: ``--resume --steps N`` continues a
finished run to N steps in the same folder. The folder holds

    config.json        the resolved RunConfig (passed back with --config, it reproduces the run)
    checkpoint.pt      latest state: model, EMA, optimizer, step, RNG states, loss history (state dicts)
    snapshots/         step_<k>.pt every optim.ckpt_every steps, the newest optim.keep of them
    metrics.jsonl      one line per step: step, loss, dsm, reg, lr, grad_norm, wall_s (``tail -f``-able)
    metrics.json       the EvalReport of the EMA weights, with the step it was computed at; its ``settings``
                       record the evaluation settings used: ``eval`` (the eval section), ``eval_seed`` and
                       ``device``. ``eval RUN --eval-… --device …`` overrides them for that evaluation only:
                       config.json is written by training alone and never rewritten by ``eval``
    loss.png           the loss terms per step (from metrics.jsonl); score.png for 2-D data
    init_from.json     with --init-from only: the source checkpoint, its fingerprint and step, which weights
                       were read and their sha256 (:func:`fpe_lab.checkpoint.weights_sha256`); the same
                       record is stored in every checkpoint under ``init_from``
    run.lock           the lock of the process training or evaluating in the folder (an exclusive
                       ``fcntl.flock``; the file names its pid and command while held, and is left empty)

One process at a time works in a run folder: training (including its evaluation) and ``eval`` hold the
folder's lock, and a second process is refused with :class:`RunBusyError` naming the holder. The lock
is the operating system's, so it is released when the process ends, however it ends.

A checkpoint records the fingerprint of the configuration it was trained with; resuming or evaluating
a checkpoint whose fingerprint is not that of the folder's config.json (or that records none) is refused.

Folders named by an earlier fingerprint rule stay valid (:meth:`fpe_lab.config.RunConfig.legacy_fingerprints`:
cifar10 folders from before its data entered by content): :func:`run_dir` finds such a folder when the
current name does not exist, a checkpoint stamped with a legacy fingerprint of its config is accepted, and
resuming it keeps that stamp.

From Python::

    from fpe_lab import config, runs
    run = runs.train(config.toy2d(), out="runs")    # trains, evaluates, returns the Run
    run = runs.load("runs/gmm_vp_fpe0.1_seed0-…")   # .config, .report, .model(), .sde, .history()
    report = runs.evaluate(run)                     # re-evaluate (writes metrics.json)
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import io
import json
import logging
import os
import shlex
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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
    weights_sha256,
    write_config,
)
from fpe_lab.config import Dataset, InitState, RunConfig, Weights, _hashed
from fpe_lab.losses import LossTerms
from fpe_lab.metrics.evaluate import EvalReport
from fpe_lab.metrics.evaluate import evaluate as evaluate_score
from fpe_lab.sde import LinearSDE
from fpe_lab.train import MAX_STEPS, TrainOptions
from fpe_lab.train import train as train_loop

__all__ = ["METRICS_NAME", "LOG_NAME", "LOCK_NAME", "INIT_FROM_NAME", "Run", "run_dir", "read_history", "train", "load",
           "evaluate", "summary", "RunError", "RunBusyError", "lock_run", "check_limits", "MAX_EVAL_SEED"]

log = logging.getLogger(__name__)

METRICS_NAME = "metrics.json"
LOG_NAME = "metrics.jsonl"
LOCK_NAME = "run.lock"
INIT_FROM_NAME = "init_from.json"
MAX_EVAL_SEED = 2**62
"""Largest evaluation seed (the run seed's bound; torch generators take at most 64-bit seeds)."""
FIGURE_TIME = 0.1  # time of the score-field figure: structure of the data still visible


class RunError(ValueError):
    """A run folder is missing, incomplete, or does not hold the run asked for."""


class RunBusyError(RuntimeError):
    """Another process holds the run folder's lock (training or evaluating in it): not bad input, the
    command line tools exit 1."""


_held_locks: dict[str, int] = {}  # run folders whose lock this process holds, with the nesting depth


def _holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 65536, 0).decode("utf-8"))
        return f"pid {info['pid']}, {info['purpose']} since {info['since']}: {info['command']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "holder unknown: its lock file is not written yet"


@contextlib.contextmanager
def lock_run(folder: str | Path, purpose: str) -> Iterator[None]:
    """Hold the run folder's lock for the block: an exclusive, non-blocking ``fcntl.flock`` on
    ``folder/run.lock``, into which this process writes its pid, command, ``purpose`` and start time.
    :class:`RunBusyError` naming the holder if another process has it. Re-entrant within a process
    (training holds it through its own evaluation). Released when the block ends; the operating system
    releases it when the process ends, also on a crash or kill."""
    folder = Path(folder)
    key = str(folder.resolve())
    if key in _held_locks:
        _held_locks[key] += 1
        try:
            yield
        finally:
            _held_locks[key] -= 1
        return
    fd = os.open(folder / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RunBusyError(f"run folder {folder} is in use by another process ({_holder(fd)}); wait for it to "
                               "finish or stop it") from None
        command = " ".join(shlex.join(getattr(sys, "orig_argv", sys.argv)).split())  # one line, for error messages
        info = {"pid": os.getpid(), "command": command[:300] + ("…" if len(command) > 300 else ""), "purpose": purpose,
                "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        os.ftruncate(fd, 0)  # written in place (a replaced file would be another lock): read only by _holder
        os.pwrite(fd, (json.dumps(info) + "\n").encode("utf-8"), 0)
        _held_locks[key] = 1
        try:
            yield
        finally:
            del _held_locks[key]
            os.ftruncate(fd, 0)
    finally:
        os.close(fd)  # releases the lock


def _check_trained_for(ckpt: Path, state: dict[str, Any], config: RunConfig) -> str:
    """RunError unless the checkpoint ``state`` (read from ``ckpt``) was trained with ``config``'s fingerprint
    or one of its legacy fingerprints (a folder made under an earlier rule); returns the fingerprint it carries."""
    got = state.get("fingerprint")
    if got is not None and got in config.legacy_fingerprints():  # checked first: reads no data files
        return got
    want = config.fingerprint()
    if got != want:
        raise RunError(f"{ckpt} was trained with fingerprint {got or 'none (it records none)'} but "
                       f"{ckpt.parent / CONFIG_NAME} has fingerprint {want}: it is not the configuration its "
                       "checkpoint was trained with (swapped in from another run, or config.json edited by hand?)")
    return want


def check_limits(config: RunConfig) -> None:
    """ValueError for settings the configuration accepts but a run cannot use, so that they fail before
    training rather than after it: more than MAX_STEPS steps, an NLL tolerance of 1 or more, an evaluation
    seed beyond MAX_EVAL_SEED."""
    steps = config.optim.steps
    if steps > MAX_STEPS:
        raise ValueError(f"steps must be an integer in [1, {MAX_STEPS}]; got {steps}")
    rtol = config.eval.rtol
    if rtol is not None and not rtol < 1:
        raise ValueError(f"eval_rtol must be a finite number in (0, 1); got {rtol!r}")
    seed = config.eval.seed
    if seed is not None and seed > MAX_EVAL_SEED:
        raise ValueError(f"eval_seed must be an integer in [0, {MAX_EVAL_SEED}]; got {seed}")


def run_dir(config: RunConfig, out: str | Path) -> Path:
    """``out/<label>-<fingerprint>``: the folder of ``config``'s run, whatever its step count. When that folder
    does not exist but a run folder named by one of ``config.legacy_fingerprints()`` does (made under an
    earlier fingerprint rule), that one: it holds this run, and resuming or evaluating continues it there."""
    out = Path(out)
    folder = out / f"{config.label()}-{config.fingerprint()}"
    if not folder.exists():
        for old in config.legacy_fingerprints():
            legacy = out / f"{config.label()}-{old}"
            if (legacy / CONFIG_NAME).is_file():
                return legacy
    return folder


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
        _check_trained_for(self.path / CHECKPOINT_NAME, state, self.config)
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
    records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    for r in records:  # before 0.3 the regularizer's term was logged as "fpe"
        if "fpe" in r and "reg" not in r:
            r["reg"] = r.pop("fpe")
    return records


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
    if saved.data.name is Dataset.CIFAR10 and config.data.name is Dataset.CIFAR10:
        # the data enter by content: the folder's name (run_dir) and its checkpoint's stamp (_check_trained_for)
        # hold the data of the requested data_dir; the saved one may be another spelling, unreachable from here
        saved = saved.override({("data", "data_dir"): config.data.data_dir})
    a, b = _hashed(saved), _hashed(config)
    diff = [f"{k}: saved {a[k]!r} vs requested {b[k]!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    if diff:
        raise ConfigMismatchError(f"run folder {folder} holds a different run ({'; '.join(diff)})")


def _prepare(config: RunConfig, out: Path, resume: bool) -> tuple[Path, bool, str]:
    """Check the folder (creating nothing yet); returns (folder, whether a checkpoint is resumed, the
    fingerprint to stamp checkpoints with: the resumed checkpoint's, which may be a legacy one, else
    ``config.fingerprint()``)."""
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(
            errno.ENOTDIR, f"--out {out} is a file, not a folder (a folder is created if missing)", str(out)
        )
    folder = run_dir(config, out)
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"run folder {folder} exists and is a file")
    if (folder / CONFIG_NAME).is_file():
        if not resume:
            raise ValueError(f"run folder {folder} already exists; pass --resume to continue or grow it "
                             f"(--resume --steps N), or `eval {folder}` to re-evaluate it")
        _check_same_run(folder, config)
    resuming = resume and (folder / CHECKPOINT_NAME).is_file()
    if not resuming:
        return folder, False, config.fingerprint()
    state = load_checkpoint(folder / CHECKPOINT_NAME)
    fingerprint = _check_trained_for(folder / CHECKPOINT_NAME, state, config)
    done = int(state["step"])
    if done > config.optim.steps:
        raise ValueError(f"run folder {folder} is at step {done}; --steps {config.optim.steps} would shrink it "
                         f"(pass --steps >= {done})")
    return folder, True, fingerprint


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
    input is checked before the folder is created: a failure before training leaves nothing behind. The
    main process holds the folder's lock (:func:`lock_run`) from its creation to the end of evaluation.
    Raises ValueError (bad input), ConfigMismatchError, RunError (a checkpoint of another configuration),
    RunBusyError, NonFiniteLossError, TrainingInterrupted.
    """
    check_limits(config)
    env = env or distributed.DistEnv()
    device = env.device() if env.is_distributed else build.resolve_device(config.device)
    if config.optim.bf16 and device.type != "cuda":
        raise ValueError("bf16 needs CUDA (bf16 autocast is only used on GPUs); drop --bf16 on CPU")
    if config.optim.batch % env.world_size:
        raise ValueError(f"--batch {config.optim.batch} must be divisible by the number of processes {env.world_size}")
    folder, resuming, fingerprint = _prepare(config, Path(out), resume)
    with threads(config.threads), contextlib.ExitStack() as held:
        sde = build.build_sde(config.sde)
        data = build.build_data(config)
        model = build.build_model(config, sde)
        loss = build.build_loss(config, sde)
        init_record, initial = None, None
        if not resuming:
            initial = build.init_weights(model, config)
            init_record = _init_from_record(config)
        distributed.barrier(env)
        if env.is_main:
            folder.mkdir(parents=True, exist_ok=True)
            held.enter_context(lock_run(folder, "training"))
            # again under the lock: another process may have written the folder since the first look
            folder, resuming, fingerprint = _prepare(config, Path(out), resume)
            if resuming:
                init_record = load_checkpoint(folder / CHECKPOINT_NAME).get("init_from")
            write_config(folder, config.to_dict())
            if init_record is not None and not resuming:
                atomic_write_text(folder / INIT_FROM_NAME, json.dumps(init_record, indent=2) + "\n")
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
                               progress=progress and env.is_main, fingerprint=fingerprint,
                               init_from=init_record, initial=initial)
        log.info("run folder %s (%d process(es), device %s)\n%s", folder, env.world_size, device, sde)
        step_log = _StepLog(folder / LOG_NAME, load_checkpoint(folder / CHECKPOINT_NAME)["step"] if resuming else 0) \
            if env.is_main else None
        try:
            batches = build.batch_sampler(config, data, config.optim.batch // env.world_size)
            result = train_loop(module, loss_fn, batches, options, device=device, run_dir=rank_dir, resume=resuming,
                                on_step=step_log, main_dir=folder)
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


def _init_from_record(config: RunConfig) -> dict[str, Any] | None:
    """What ``optim.init_from`` started the run from: the source checkpoint's path, fingerprint and step,
    which weights were read and their sha256 (None without --init-from)."""
    text = config.optim.init_from
    if text is None:
        return None
    path = build.init_checkpoint(text)
    state = load_checkpoint(path)  # build.init_weights has read it already: it exists and holds the weights
    key = "model" if config.optim.init_state is InitState.CONTINUE else config.optim.init_weights.value
    step = state.get("step")
    return {"path": str(path), "fingerprint": state.get("fingerprint"), "step": int(step) if step is not None else None,
            "weights": key, "sha256": weights_sha256(state[key]), "state": config.optim.init_state.value}


def _bf16(loss_fn):
    """The loss under CUDA bf16 autocast (the residual inside opts out, see fpe_lab.build)."""

    def wrapped(model, x0, generator) -> LossTerms:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            terms = loss_fn(model, x0, generator)
        return LossTerms(total=terms.total.float(), dsm=terms.dsm.float(), reg=terms.reg.float())

    return wrapped


# ---------------------------------------------------------------------- evaluation
def evaluate(run: Run, progress: bool = True, device: torch.device | str | None = None,
             allow_partial: bool = False) -> EvalReport:
    """Evaluate the EMA weights of ``run`` with its ``config.eval`` settings; write metrics.json and figures.

    Points: float64 on the CPU against the exact truth of the toy set. Images: the model's dtype on
    ``device`` (default: the configured device), held-out test images, bits/dim with dequantization.
    An unfinished run (fewer steps done than planned) is refused unless ``allow_partial``; the report
    records the step it was computed at, and its ``settings`` the evaluation settings (``eval``,
    ``eval_seed``, ``device``). Writes metrics.json and the figures only, never config.json; the device
    and the settings are checked before anything is read or written. Holds the folder's lock.
    """
    config = run.config
    check_limits(config)
    device = torch.device(device) if device is not None else build.resolve_device(config.device)
    with lock_run(run.path, "evaluation"):
        return _evaluate(run, progress, device, allow_partial)


def _evaluate(run: Run, progress: bool, device: torch.device, allow_partial: bool) -> EvalReport:
    config = run.config
    done = run.steps_done
    if done == 0:
        raise RunError(f"run folder {run.path} has no checkpoint to evaluate")
    if done < config.optim.steps and not allow_partial:
        raise RunError(f"run folder {run.path} is unfinished: {done} of {config.optim.steps} steps done; "
                       "resume it with --resume, or pass --allow-partial to evaluate it as it is")
    with threads(config.threads):
        sde = run.sde
        data = build.build_eval_data(config)
        truth, dequantization = data.truth(sde), data.dequantization()
        if config.data.is_image:  # the U-Net: its own dtype, on the device
            dtype = torch.float32
        else:  # points: float64 on the CPU, against the exact truth
            device, dtype = torch.device("cpu"), torch.float64
        model = run.model(dtype=dtype, device=device)
        e = config.eval.resolve(device.type)
        assert e.times is not None and e.points is not None and e.nll_points is not None and e.rtol is not None
        assert e.repeats is not None and e.ode is not None
        report = evaluate_score(
            model, sde, data, truth, times=e.times, n_points=e.points, eps=config.loss.eps,
            generator=torch.Generator().manual_seed(config.eval_seed), n_nll=e.nll_points, nll_rtol=e.rtol,
            nll_repeats=e.repeats, dequantization=dequantization, n_samples=e.samples, probes=e.probes,
            batch_size=e.batch, dtype=dtype, device=device, step=done, progress=progress, gap_grid=e.gap_grid,
            ode_method=e.ode)
        report = dataclasses.replace(report, settings={**report.settings, "eval": e.to_dict(),
                                                       "eval_seed": config.eval_seed, "device": str(device)})
        atomic_write_text(run.path / METRICS_NAME, json.dumps(report.to_dict(), indent=2) + "\n")
        _write_figures(run, model, sde, data, truth)
        if report.gap_densities is not None:
            _write_gap(run, report.gap_densities)
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
        lines.append(
            f"bits/dim {nll.model_bits_per_dim:.4f} ({nll.n_points} test points × {nll.repeats} repeats){bound}"
        )
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


def _write_gap(run: Run, densities: dict[str, Any]) -> None:
    """``gap.npz`` (the gridded truth, q_ODE, q_SDE and the box) and ``gap.png`` (:mod:`fpe_lab.figures.gap`)."""
    import numpy as np

    from fpe_lab.figures.gap import gap_figure

    buf = io.BytesIO()
    # Any: mypy checks the ** values against savez_compressed's allow_pickle: bool as well
    arrays: dict[str, Any] = {k: np.asarray(v) for k, v in densities.items()}
    np.savez_compressed(buf, **arrays)
    atomic_write_bytes(run.path / "gap.npz", buf.getvalue())
    atomic_write_bytes(run.path / "gap.png", _png(gap_figure([(run.config.label(), densities)])))


def _write_figures(run: Run, model, sde, data, truth) -> None:
    """``loss.png`` from metrics.jsonl; for 2-D data ``score.png`` (learned and true score at FIGURE_TIME)."""
    from matplotlib.figure import Figure

    hist = run.history()
    if hist:
        fig = Figure(figsize=(6, 3.5))
        ax = fig.subplots()
        steps = [h["step"] for h in hist]
        ax.semilogy(steps, [max(h["dsm"], 1e-300) for h in hist], lw=0.8, label="DSM")
        if any(h["reg"] > 0 for h in hist):
            ax.semilogy(steps, [max(h["reg"], 1e-300) for h in hist], lw=0.8, label="regularizer term")
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
