r"""A study: a grid of arms (settings of any configuration fields) × seeds, and its paired summary.

Each (arm, seed) is one ordinary run folder under the study folder (:func:`fpe_lab.runs.run_dir`).
All randomness of a run (initialisation, data order, noise, probes) derives from its seed, so the arms
of one seed share it and their differences are paired. With ``pretrain_steps`` a first stage trains one
plain-DSM run per seed, and every arm of that seed starts from its EMA weights (the fine-tuning
protocol: equal steps for every arm, the DSM-only arm being the control).

A study can be stopped and restarted at any point: finished runs are skipped, interrupted ones resume
from their checkpoints. ``study.json`` records the plan; a folder holding another plan is refused, except
the same plan with fewer seeds, which grows to the new seeds in place. With
``jobs > 1`` the runs go to worker processes; when the study is interrupted (SIGINT, SIGTERM, an error)
its workers are sent SIGTERM, write a checkpoint at the end of their step and exit, and the study waits
for them before it returns.

Arms are settings that change the trained weights: the seed (the other axis of the study), settings that
do not enter the run's fingerprint (steps, checkpointing, device, threads) and evaluation settings are
refused as arm fields, since arms differing only in them would be the same run folder. A study holds at
most MAX_RUNS runs (arms × seeds).

The summary gives per arm and metric the mean over seeds, and the paired difference to the control arm
(arm − control, per seed) with a 95% t-interval over seeds, marked where the interval excludes zero, on
either side (:func:`paired_difference`; every metric is lower-is-better, so a starred negative Δ is a
significant improvement and a starred positive one a significant degradation).
"""

from __future__ import annotations

import csv
import enum
import io
import itertools
import json
import logging
import math
import os
import signal
import threading
import time
import typing
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from scipy import stats

from fpe_lab import regularizers, runs
from fpe_lab.checkpoint import atomic_write_text
from fpe_lab.config import Leaf, RunConfig, leaves
from fpe_lab.interrupts import Interrupted
from fpe_lab.metrics.evaluate import EvalReport
from fpe_lab.progress import progress_bar as tqdm
from fpe_lab.settings import strip_optional
from fpe_lab.train import TrainingInterrupted

__all__ = ["Arm", "StudyPlan", "parse_grid", "parse_arm", "run_study", "summarize", "write_summary", "SUMMARY_METRICS",
           "PLAN_NAME", "submitit_submit", "paired_difference", "paired_p_value", "holm", "MAX_RUNS",
           "WorkerFailure", "PRETRAINED", "table_across", "studies_under"]

log = logging.getLogger(__name__)

PLAN_NAME = "study.json"
MAX_RUNS = 1000
"""Most runs (arms × seeds) of one study; split a larger one into several studies."""
WORKER_STOP_S = 120.0
"""How long an interrupted study waits for a worker to checkpoint and exit before it kills it."""


# ---------------------------------------------------------------------- arms
def _leaf_by_name() -> dict[str, Leaf]:
    """Grid fields by name: the flag with dashes or underscores (``fpe_weighting``, ``fpe-weighting``)."""
    out = {}
    for leaf in leaves():
        out[leaf.flag] = leaf
        out[leaf.flag.replace("-", "_")] = leaf
    return out


def _parse_value(leaf: Leaf, text: str) -> Any:
    kind, optional = strip_optional(leaf.kind)
    if optional and text.lower() == "none":
        return None
    if isinstance(kind, type) and issubclass(kind, enum.Enum):
        try:
            return kind(text)
        except ValueError:
            raise ValueError(f"--grid {leaf.flag}: {text!r} is not one of {[m.value for m in kind]}") from None
    if kind is bool:
        if text.lower() not in ("true", "false"):
            raise ValueError(f"--grid {leaf.flag}: {text!r} is not true or false")
        return text.lower() == "true"
    if kind in (int, float, str):
        try:
            return kind(text)
        except ValueError:
            what = "an integer" if kind is int else "a number"
            raise ValueError(f"--grid {leaf.flag}: {text!r} is not {what}") from None
    raise ValueError(f"--grid {leaf.flag}: this field cannot be swept")


def _field_metadata(path: tuple[str, ...]) -> typing.Mapping[str, Any]:
    """The dataclass field metadata of the configuration leaf at ``path`` ({} where it cannot be found)."""
    cls: Any = RunConfig
    try:
        for key in path[:-1]:
            hints = typing.get_type_hints(cls)
            if key in hints and not getattr(cls.__dataclass_fields__[key], "metadata", {}).get("options"):
                cls = strip_optional(hints[key])[0]
            else:  # a regularizer's own options section, written under its name
                cls = regularizers.get(key).Options
        return cls.__dataclass_fields__[path[-1]].metadata
    except (KeyError, ValueError, TypeError, AttributeError):
        return {}


def _check_arm_field(leaf: Leaf) -> None:
    """ValueError unless ``leaf`` is a setting an arm may change: one that changes the trained weights."""
    name = leaf.flag.replace("-", "_")
    if leaf.path == ("seed",):
        raise ValueError(f"--grid {name}: the seed is not an arm field: seeds are the study's other axis "
                         "(--seeds N, --first-seed S), paired across the arms")
    if leaf.path[0] == "eval":
        raise ValueError(f"--grid {name}: evaluation settings are not arm fields (they do not change the trained "
                         f"weights, so such arms would be one run); set it for every run with --{leaf.flag}")
    if not _field_metadata(leaf.path).get("in_hash", True):
        raise ValueError(f"--grid {name}: {name} is not an arm field (it does not change the trained weights, so "
                         f"such arms would be one run folder); set it for every run with --{leaf.flag}")


@dataclass(frozen=True)
class Arm:
    """One setting of the swept fields: ``changes`` maps config paths to values; ``name`` reads ``k=v …``."""

    name: str
    changes: tuple[tuple[tuple[str, ...], Any], ...]

    def apply(self, base: RunConfig) -> RunConfig:
        return base.override(dict(self.changes))


def parse_grid(items: Sequence[str]) -> list[Arm]:
    """``["reg=none,fpe", "lam=0.01,0.1"]`` → the cartesian product of the values, as arms (in order).

    ValueError for an unknown field, a field that is not an arm field (:func:`_check_arm_field`), a bad
    value, a repeated field, or more than MAX_RUNS arms."""
    by_name = _leaf_by_name()
    axes: list[tuple[Leaf, list[tuple[str, Any]]]] = []
    seen: set[tuple[str, ...]] = set()
    for item in items:
        name, sep, values = item.partition("=")
        if not sep or not values:
            raise ValueError(f"{item!r}: expected FIELD=V1,V2,...")
        leaf = by_name.get(name)
        if leaf is None:
            raise ValueError(f"--grid {name!r} is not a configuration field; fields: "
                             f"{sorted({leaf.flag.replace('-', '_') for leaf in leaves()})}")
        if leaf.path in seen:
            raise ValueError(f"--grid names {name!r} twice")
        _check_arm_field(leaf)
        seen.add(leaf.path)
        vals = [v.strip() for v in values.split(",")]
        if len(set(vals)) != len(vals) or "" in vals:
            raise ValueError(f"--grid {item!r}: values must be distinct and nonempty")
        axes.append((leaf, [(v, _parse_value(leaf, v)) for v in vals]))
    n_arms = math.prod(len(vals) for _, vals in axes)
    if n_arms > MAX_RUNS:
        raise ValueError(f"--grid gives {n_arms} arms ({' × '.join(str(len(v)) for _, v in axes)}); a study holds at "
                         f"most {MAX_RUNS} runs (arms × seeds): split it into several studies")
    arms = []
    for combo in itertools.product(*(vals for _, vals in axes)):
        name = " ".join(f"{leaf.flag.replace('-', '_')}={text}" for (leaf, _), (text, _) in zip(axes, combo))
        arms.append(Arm(name or "base", tuple((leaf.path, v) for (leaf, _), (_, v) in zip(axes, combo))))
    return arms


def parse_arm(text: str) -> Arm:
    """One explicit arm, ``"reg=fpe fpe_weighting=g2 lam=0.01"`` (FIELD=VALUE pairs, one value each)."""
    items = text.split()
    if not items or any("," in item for item in items):
        raise ValueError(f"--arm {text!r}: expected FIELD=VALUE pairs separated by spaces, one value each")
    (arm,) = parse_grid(items)
    return arm


@dataclass(frozen=True)
class StudyPlan:
    """Arms × seeds around a base configuration (all other settings shared).

    Args:
        base: the configuration every run starts from (data, SDE, steps, ...).
        arms: the swept settings; arms that resolve to the same configuration are merged (e.g. reg=none
            with any lam), keeping the first name. The first arm is the control of the paired summary.
        seeds: seeds, each >= 0, no repeats.
        pretrain_steps: None, or the steps of a plain-DSM pre-training run per seed from which every arm
            fine-tunes for ``base.optim.steps`` steps. By default (``optim.init_state`` continue) fine-tuning
            continues the pre-training run's weights, EMA and Adam state, so the control arm (plain DSM) is
            "the same number of further DSM steps"; the summary shows the pre-trained model as a row.
        finetune_lr: with ``pretrain_steps``, the learning rate of the fine-tuning arms (an arm that sets
            ``lr`` itself keeps its own); None: the base's, as in pre-training.
    """

    base: RunConfig
    arms: tuple[Arm, ...]
    seeds: tuple[int, ...]
    pretrain_steps: int | None = None
    finetune_lr: float | None = None

    def __post_init__(self) -> None:
        if not self.arms:
            raise ValueError("a study needs at least one arm")
        seeds = tuple(self.seeds)
        if not seeds or any(not (isinstance(s, int) and not isinstance(s, bool) and s >= 0) for s in seeds):
            raise ValueError(f"seeds must be a nonempty list of ints >= 0; got {list(seeds)!r}")
        if len(set(seeds)) != len(seeds):
            raise ValueError(f"seeds must not repeat a value; got {list(seeds)!r}")
        if self.pretrain_steps is not None and not (isinstance(self.pretrain_steps, int) and self.pretrain_steps >= 1):
            raise ValueError(f"pretrain_steps must be None or an int >= 1; got {self.pretrain_steps!r}")
        by_path = {leaf.path: leaf for leaf in leaves()}
        for arm in self.arms:
            for path, _ in arm.changes:
                leaf = by_path.get(tuple(path))
                if leaf is not None:
                    _check_arm_field(leaf)
        if self.finetune_lr is not None:
            if self.pretrain_steps is None:
                raise ValueError("--finetune-lr needs --pretrain-steps (it is the learning rate of the fine-tuning)")
            if isinstance(self.finetune_lr, bool) or not isinstance(self.finetune_lr, (int, float)) \
                    or not 0 < self.finetune_lr <= 10:
                raise ValueError(f"--finetune-lr must be a number in (0, 10]; got {self.finetune_lr!r}")
        init_from = ("optim", "init_from")
        if self.pretrain_steps is not None and (self.base.optim.init_from is not None
                                                or any(tuple(p) == init_from for a in self.arms for p, _ in a.changes)):
            raise ValueError("--init-from and --pretrain-steps exclude each other: with --pretrain-steps every arm "
                             "starts from its seed's pre-training run")
        unique: dict[str, Arm] = {}
        for arm in self.arms:
            config = arm.apply(self.base)  # validates every arm up front
            kind_path = ("loss", "reg", "kind")
            if (config.loss.reg.kind == regularizers.NONE and len(arm.name.split()) == len(arm.changes) > 0
                    and any(tuple(path) == kind_path for path, _ in arm.changes)):
                # reg=none: the name drops the loss.reg settings that cannot act (lam, regularizer options)
                kept = [text for (path, _), text in zip(arm.changes, arm.name.split(), strict=True)
                        if not (tuple(path[:2]) == ("loss", "reg") and tuple(path) != ("loss", "reg", "kind"))]
                arm = Arm(" ".join(kept) or "base", arm.changes)
            unique.setdefault(config.fingerprint(), arm)
        if len(unique) * len(seeds) > MAX_RUNS:
            n = len(unique) * len(seeds)
            raise ValueError(f"the study has {len(unique)} arms × {len(seeds)} seeds = {n} runs; a study holds at most "
                             f"{MAX_RUNS} runs: split it into several studies")
        object.__setattr__(self, "arms", tuple(unique.values()))
        object.__setattr__(self, "seeds", seeds)

    def pretrain_config(self, seed: int) -> RunConfig:
        base = self.base.override({("seed",): seed, ("loss", "reg", "kind"): regularizers.NONE,
                                   ("optim", "steps"): self.pretrain_steps, ("optim", "init_from"): None})
        return base

    def config(self, arm: Arm, seed: int, out: Path) -> RunConfig:
        base = self.base if self.finetune_lr is None else self.base.override({("optim", "lr"): self.finetune_lr})
        c = arm.apply(base).override({("seed",): seed})
        if self.pretrain_steps is not None:
            c = c.override({("optim", "init_from"): str(runs.run_dir(self.pretrain_config(seed), out / "pretrain"))})
        return c

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> StudyPlan:
        """Inverse of :meth:`to_dict` (e.g. of a study folder's ``study.json``)."""
        arms = tuple(Arm(a["name"], tuple((tuple(p), v) for p, v in a["changes"])) for a in d["arms"])
        return cls(RunConfig.from_dict(d["base"]), arms, tuple(d["seeds"]), d.get("pretrain_steps"),
                   d.get("finetune_lr"))

    @classmethod
    def load(cls, out: str | Path) -> StudyPlan:
        """The plan of the study folder ``out``."""
        path = Path(out) / PLAN_NAME
        try:
            return cls.from_dict(json.loads(path.read_text(encoding="utf-8")))
        except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{path} is not a study plan: {e}") from None

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "base": self.base.to_dict(), "seeds": list(self.seeds), "pretrain_steps": self.pretrain_steps,
            "arms": [{"name": a.name, "changes": [[list(p), v.value if isinstance(v, enum.Enum) else v]
                                                   for p, v in a.changes]} for a in self.arms],
        }
        if self.finetune_lr is not None:  # absent otherwise: plans saved before it existed still match
            d["finetune_lr"] = self.finetune_lr
        return d


# ---------------------------------------------------------------------- running
PRETRAINED = "pretrained"
"""The summary row of the pre-training runs (with --pretrain-steps): the model every arm starts from."""


class WorkerFailure(RuntimeError):
    """A study worker process ended without reporting its run (killed from outside, out of memory)."""


def _train_one(config_json: str, out: str) -> str:
    """Train and evaluate one run (resuming it); in a worker process, quietly."""
    config = RunConfig.from_json(config_json)
    return str(runs.train(config, Path(out), resume=True, progress=False).path)


# ---------------------------------------------------------------------- worker processes
_in_run = False  # in a worker: whether a run is in progress (a signal then unwinds it, so its files stay whole)


def _worker_signal(signum: int, frame: object) -> None:
    if _in_run:
        raise Interrupted(signum)
    os._exit(128 + signum)  # idle: nothing to clean up


def _worker_init() -> None:
    """A worker leaves SIGINT (a terminal's Ctrl-C reaches the whole process group) to its parent, which
    stops the workers with SIGTERM; SIGTERM unwinds the run in progress (the training loop finishes its step
    and writes a checkpoint) and the worker exits."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _worker_signal)


def _train_in_worker(config_json: str, out: str) -> str:
    global _in_run
    _in_run = True
    try:
        return _train_one(config_json, out)
    except (Interrupted, TrainingInterrupted) as e:  # told to stop: take no further run
        for handler in logging.getLogger().handlers:
            handler.flush()
        os._exit(e.exit_code)
    finally:
        _in_run = False


def _stop_workers(pool: ProcessPoolExecutor) -> None:
    """SIGTERM to every worker, then wait up to WORKER_STOP_S for each to checkpoint and exit (SIGKILL after
    that, or at once on a second SIGINT/SIGTERM)."""
    procs = list((getattr(pool, "_processes", None) or {}).values())
    pool.shutdown(wait=False, cancel_futures=True)

    def kill(signum: int, frame: object) -> None:
        for p in procs:
            if p.is_alive():
                p.kill()

    main_thread = threading.current_thread() is threading.main_thread()
    previous = {sig: signal.signal(sig, kill) for sig in (signal.SIGINT, signal.SIGTERM)} if main_thread else {}
    try:
        for p in procs:
            if p.is_alive():
                p.terminate()
        deadline = time.monotonic() + WORKER_STOP_S
        for p in procs:
            p.join(max(0.0, deadline - time.monotonic()))
            if p.is_alive():
                p.kill()
                p.join()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _run_in_workers(todo: list[tuple[str, str]], jobs: int, bar) -> None:
    """The runs ``todo`` on ``jobs`` worker processes; on any exception or signal the workers are stopped
    (:func:`_stop_workers`) before it propagates."""
    pool = ProcessPoolExecutor(max_workers=jobs, initializer=_worker_init)
    try:
        for _ in pool.map(_train_in_worker, *zip(*todo)):
            bar.update(1)
    except BrokenProcessPool:
        _stop_workers(pool)
        raise WorkerFailure("a study worker process ended without finishing its run (killed from outside, or out of "
                            "memory?); finished runs are kept: run the study again to continue") from None
    except BaseException:
        _stop_workers(pool)
        raise
    pool.shutdown(wait=True)


def _check_plan(plan: StudyPlan, out: Path) -> None:
    path = out / PLAN_NAME
    want = plan.to_dict()
    if path.is_file():
        try:
            # through StudyPlan: a plan saved before a configuration field was added reads with its default
            saved = StudyPlan.from_dict(json.loads(path.read_text(encoding="utf-8"))).to_dict()
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{path} is not a study plan ({e}); move the study folder away") from None
        if saved != want:
            keys = sorted(k for k in set(saved) | set(want) if saved.get(k) != want.get(k))
            if keys == ["seeds"] and set(saved["seeds"]) < set(want["seeds"]):
                # the same study with more seeds: it grows in place (the finished runs are kept)
                atomic_write_text(path, json.dumps(want, indent=2) + "\n")
                return
            raise ValueError(f"study folder {out} holds another study (differs in {keys}); use another --out")
    else:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(want, indent=2) + "\n")


def _finished(folder: Path) -> bool:
    try:
        return (folder / "config.json").is_file() and runs.load(folder).is_finished
    except (ValueError, OSError):
        return False


def run_study(plan: StudyPlan, out: str | Path, jobs: int = 1, progress: bool = True,
              submit: Callable[[Callable[..., str], list[tuple[str, str]]], list[str]] | None = None) -> list[Path]:
    """Run every unfinished run of ``plan`` under ``out`` (pre-training stage first); returns the arm
    run folders in (arm, seed) order.

    ``jobs`` local worker processes (1: in this process); ``submit(fn, [(config_json, out), ...])``
    replaces both (e.g. a submitit executor, see :mod:`fpe_lab.commands.study`).
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; it must be a folder")
    _check_plan(plan, out)
    stages: list[list[tuple[RunConfig, Path]]] = []
    if plan.pretrain_steps is not None:
        stages.append([(c, out / "pretrain") for c in (plan.pretrain_config(s) for s in plan.seeds)])
    arm_runs = [(plan.config(a, s, out), out) for a in plan.arms for s in plan.seeds]
    stages.append(arm_runs)
    total = sum(len(s) for s in stages)
    bar = tqdm(total=total, desc="study", disable=not progress, dynamic_ncols=True)
    try:
        for stage in stages:
            todo = [(c.to_json(), str(o)) for c, o in stage if not _finished(runs.run_dir(c, o))]
            bar.update(len(stage) - len(todo))
            if submit is not None:
                submit(_train_one, todo)
                bar.update(len(todo))
            elif jobs == 1:
                for c, o in todo:
                    _train_one(c, o)
                    bar.update(1)
            elif todo:
                _run_in_workers(todo, jobs, bar)
    finally:
        bar.close()
    return [runs.run_dir(c, o) for c, o in arm_runs]


def submitit_submit(executor) -> Callable[[Callable[..., str], list[tuple[str, str]]], list[str]]:
    """A ``submit`` for :func:`run_study` that sends each run to a submitit executor (a SLURM
    ``AutoExecutor``, or a ``LocalExecutor`` in tests) and waits for all of them."""

    def submit(fn: Callable[..., str], todo: list[tuple[str, str]]) -> list[str]:
        jobs = [executor.submit(fn, c, o) for c, o in todo]
        return [job.result() for job in jobs]

    return submit


# ---------------------------------------------------------------------- summary
def _at_smallest_t(values: tuple[float, ...] | None, times: tuple[float, ...]) -> float | None:
    return None if values is None else values[times.index(min(times))]


def _step_time(folder: Path) -> float | None:
    hist = runs.read_history(folder)
    if len(hist) < 2:
        return None
    return (hist[-1]["wall_s"] - hist[0]["wall_s"]) / (len(hist) - 1)


SUMMARY_METRICS: tuple[tuple[str, Callable[[EvalReport], float | None]], ...] = (
    ("fpe_residual_rel", lambda r: r.mean["fpe_residual_rel"]),
    ("fpe_residual_small_t", lambda r: _at_smallest_t(r.per_time.fpe_residual, r.times)),
    ("score_error_rel", lambda r: r.mean.get("score_error_rel")),
    ("score_error_small_t", lambda r: _at_smallest_t(r.per_time.score_error, r.times)),
    ("jacobian_asymmetry_rel", lambda r: r.mean["jacobian_asymmetry_rel"]),
    ("curl_abs", lambda r: r.mean.get("curl_abs")),
    ("dsm", lambda r: r.mean["dsm"]),
    ("nll_gap_nats", lambda r: r.nll.gap_nats if r.nll is not None else None),
    ("bits_per_dim", lambda r: r.nll.model_bits_per_dim if r.nll is not None and r.nll.true_nats is None else None),
    ("sw_sde_vs_data", lambda r: r.samples.sliced_wasserstein.sde_vs_data if r.samples else None),
    ("sw_ode_vs_data", lambda r: r.samples.sliced_wasserstein.ode_vs_data if r.samples else None),
    ("mmd2_sde_vs_data", lambda r: r.samples.mmd2.sde_vs_data if r.samples else None),
    ("gap_tv_ode_sde", lambda r: r.gap.ode_vs_sde["tv"] if r.gap else None),
    ("gap_w2_ode_sde", lambda r: r.gap.ode_vs_sde["w2"] if r.gap else None),
    ("gap_kl_truth_sde", lambda r: r.gap.truth_vs_sde["kl"] if r.gap else None),
    ("sde_nll_gap_nats", lambda r: r.gap.sde_nll_nats - r.gap.true_nll_nats if r.gap else None),
)
"""(column, getter on the EvalReport): the metrics of the summary; lower is better for each."""


def paired_difference(diffs: Sequence[float]) -> tuple[float, float, float, bool]:
    """(mean, lo, hi, significant) of the paired differences ``diffs`` (arm − control, one per seed): their
    mean with a 95% t-interval over seeds, significant where the interval excludes zero on either side
    (lo > 0: the arm is worse, hi < 0: better, every metric being lower-is-better). One difference has no
    interval: (d, −inf, +inf, False)."""
    n = len(diffs)
    if n == 0:
        raise ValueError("paired_difference needs at least one difference")
    mean = sum(diffs) / n
    if n > 1:
        sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (n - 1))
        half = float(stats.t.ppf(0.975, n - 1)) * sd / math.sqrt(n)
    else:
        half = math.inf
    lo, hi = mean - half, mean + half
    return mean, lo, hi, bool(n > 1 and (lo > 0 or hi < 0))


def paired_p_value(diffs: Sequence[float]) -> float:
    """Two-sided p-value of the paired t-test of ``diffs`` (mean 0 under the null); 1.0 for fewer than two
    differences or none that vary and a zero mean."""
    n = len(diffs)
    if n < 2:
        return 1.0
    mean = sum(diffs) / n
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (n - 1))
    if sd == 0:
        return 1.0 if mean == 0 else 0.0
    return float(2 * stats.t.sf(abs(mean) / (sd / math.sqrt(n)), n - 1))


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjustment of m p-values (family-wise error rate): sorted ascending, the k-th
    (from 0) becomes max over j ≤ k of min(1, (m − j) p_(j)); returned in the input order."""
    m = len(p_values)
    order = sorted(range(m), key=lambda i: p_values[i])
    adjusted, running = [0.0] * m, 0.0
    for k, i in enumerate(order):
        running = max(running, min(1.0, (m - k) * p_values[i]))
        adjusted[i] = running
    return adjusted


def summarize(plan: StudyPlan, out: str | Path) -> list[dict[str, Any]]:
    """Per arm: mean over seeds of each metric (and step time), and the paired difference to the control
    (the first arm): mean, 95% t-interval over seeds, and whether it excludes zero.

    ValueError naming the run folder that is unfinished or whose metrics.json cannot be read."""
    out = Path(out)
    values: dict[str, dict[int, dict[str, float]]] = {}
    folders = {arm.name: [runs.run_dir(plan.config(arm, seed, out), out) for seed in plan.seeds] for arm in plan.arms}
    if plan.pretrain_steps is not None:  # the pre-trained model itself, against which the control must not lose
        folders = {PRETRAINED: [runs.run_dir(plan.pretrain_config(s), out / "pretrain") for s in plan.seeds],
                   **folders}
    for name_, arm_folders in folders.items():
        per_seed: dict[int, dict[str, float]] = {}
        for seed, folder in zip(plan.seeds, arm_folders, strict=True):
            run = runs.load(folder)
            report = run.report
            if report is None or not run.is_finished:
                raise ValueError(f"run folder {folder} is not finished (steps done {run.steps_done} of "
                                 f"{run.config.optim.steps}, metrics {'present' if report else 'missing'})")
            measured = {name: get(report) for name, get in SUMMARY_METRICS}
            measured["step_time_s"] = _step_time(folder)
            per_seed[seed] = {k: v for k, v in measured.items() if v is not None}
        values[name_] = per_seed
    control = plan.arms[0].name
    names = [n for n, _ in SUMMARY_METRICS] + ["step_time_s"]
    rows = []
    for arm_name in folders:
        row: dict[str, Any] = {"arm": arm_name, "n_seeds": len(plan.seeds)}
        for name in names:
            vals = [values[arm_name][s][name] for s in plan.seeds if name in values[arm_name][s]]
            if not vals:
                continue
            row[f"{name}_mean"] = sum(vals) / len(vals)
            if arm_name == control or name == "step_time_s":
                continue
            diffs = [values[arm_name][s][name] - values[control][s][name] for s in plan.seeds
                     if name in values[arm_name][s] and name in values[control][s]]
            (row[f"{name}_diff"], row[f"{name}_lo"], row[f"{name}_hi"],
             row[f"{name}_sig"]) = paired_difference(diffs)
            row[f"{name}_p"] = paired_p_value(diffs)
        rows.append(row)
    return rows


def write_summary(rows: list[dict[str, Any]], out: str | Path, stem: str = "summary") -> tuple[Path, Path]:
    """``out/stem.csv`` (every number) and ``out/stem.md`` (one table per metric: per arm the mean over seeds,
    the paired difference to the control [95% CI] with a * where the interval excludes zero, and the paired
    t-test's p), written atomically. The pre-trained model, where there is one, is the first row."""
    out = Path(out)
    names = [n for n, _ in SUMMARY_METRICS] + ["step_time_s"]
    names = [n for n in names if any(f"{n}_mean" in r for r in rows)]
    cols = ["arm", "n_seeds"] + [f"{n}_{k}" for n in names for k in ("mean", "diff", "lo", "hi", "sig", "p")]
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(cols)
    for r in rows:
        w.writerow([r.get(c, "") if not isinstance(r.get(c), float) else f"{r[c]:.6g}" for c in cols])
    csv_path, md_path = out / f"{stem}.csv", out / f"{stem}.md"
    atomic_write_text(csv_path, buf.getvalue())
    control = next(r["arm"] for r in rows if r["arm"] != PRETRAINED)
    lines = [f"Mean over {rows[0]['n_seeds']} seeds; Δ: paired difference to the control arm `{control}` (same seeds) "
             "with its 95% t-interval, * where it excludes zero; p: the paired t-test (not adjusted for the "
             "number of comparisons). Lower is better for every metric.", ""]
    for n in names:
        lines += [f"### {n}", "", "| arm | mean | Δ to the control [95% CI] | p |", "|---|---|---|---|"]
        for r in rows:
            if f"{n}_mean" not in r:
                continue
            if f"{n}_diff" in r:
                mark = " *" if r[f"{n}_sig"] else ""
                delta = f"{r[f'{n}_diff']:+.3g} [{r[f'{n}_lo']:+.3g}, {r[f'{n}_hi']:+.3g}]{mark}"
                lines.append(f"| {r['arm']} | {r[f'{n}_mean']:.4g} | {delta} | {r[f'{n}_p']:.2g} |")
            else:
                lines.append(f"| {r['arm']} | {r[f'{n}_mean']:.4g} | — | — |")
        lines.append("")
    atomic_write_text(md_path, "\n".join(lines))
    return csv_path, md_path


def table_across(summaries: dict[str, list[dict[str, Any]]], metric: str, title: str) -> list[str]:
    """Markdown lines of one metric across several studies (one column each, e.g. one per data set) from
    their :func:`summarize` rows: per arm the mean, its paired Δ to the control [95% interval] (* where it
    excludes 0), the raw p and Holm's p adjusted over every (study × arm) comparison of this metric. The
    control is each study's first arm that is not the pre-trained row. Empty when no study has the metric."""
    rows = {name: {r["arm"]: r for r in summary} for name, summary in summaries.items()}
    arms: list[str] = []
    for summary in summaries.values():
        arms += [r["arm"] for r in summary if r["arm"] not in arms]
    if not any(f"{metric}_mean" in r for by_arm in rows.values() for r in by_arm.values()):
        return []
    tests = [(name, arm) for name, by_arm in rows.items() for arm in arms if f"{metric}_p" in by_arm.get(arm, {})]
    adjusted = dict(zip(tests, holm([rows[n][a][f"{metric}_p"] for n, a in tests]), strict=True))
    names = list(summaries)
    lines = [f"### {title}", "", "| arm | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for arm in arms:
        cells = []
        for name in names:
            r = rows[name].get(arm, {})
            if f"{metric}_mean" not in r:
                cells.append("—")
            elif f"{metric}_diff" not in r:
                cells.append(f"{r[f'{metric}_mean']:.4g}")
            else:
                star = " *" if r[f"{metric}_sig"] else ""
                cells.append(f"{r[f'{metric}_mean']:.4g}, Δ {r[f'{metric}_diff']:+.3g} "
                             f"[{r[f'{metric}_lo']:+.3g}, {r[f'{metric}_hi']:+.3g}]{star}, "
                             f"p {r[f'{metric}_p']:.2g} / {adjusted[(name, arm)]:.2g}")
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    return lines + [""]


def studies_under(root: str | Path) -> dict[str, tuple[StudyPlan, Path]]:
    """Every study folder directly under ``root`` (one with a ``study.json``), by folder name, sorted, with its
    plan; relative or absolute ``root``. ValueError when there is none."""
    folders = sorted(path.parent for path in Path(root).resolve().glob(f"*/{PLAN_NAME}"))
    if not folders:
        raise ValueError(f"no study folder (with {PLAN_NAME}) under {root}")
    return {f.name: (StudyPlan.load(f), f) for f in folders}
