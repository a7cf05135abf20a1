"""``python -m fpe_lab.run study toy2d --grid reg=none,fpe lam=0.01,0.1,1 --seeds 5 [toy2d flags]``.

The cartesian product of ``--grid`` (FIELD=V1,V2,… with FIELD a configuration field, named as its flag
with dashes or underscores) × seeds, around the preset with the other flags applied (``--data``,
``--sde``, ``--steps``, …). One run folder per (arm, seed) under ``--out``, plus ``summary.csv`` and
``summary.md``: per arm the mean over seeds and the paired difference to the first arm (the control)
(``--arm 'FIELD=V FIELD=V'`` adds single arms after the grid's)
with a 95% interval. ``--pretrain-steps K`` first trains one plain-DSM run per seed and makes every
arm fine-tune from it. ``--jobs N`` runs N local worker processes; ``--slurm-partition P`` submits each
run as a SLURM job through submitit (``pip install -e ".[cluster]"``). Interrupted studies resume.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from fpe_lab import runs
from fpe_lab.build import resolve_device
from fpe_lab.checkpoint import ConfigMismatchError
from fpe_lab.commands import CLIError, EnvironmentFailure, one_line_errors, path_arg
from fpe_lab.commands.train import PRESETS, add_config_arguments, config_from_args
from fpe_lab.config import toy2d
from fpe_lab.interrupts import Interrupted
from fpe_lab.study import (
    StudyPlan,
    WorkerFailure,
    parse_arm,
    parse_grid,
    run_study,
    submitit_submit,
    summarize,
    write_summary,
)
from fpe_lab.train import MAX_STEPS, TrainingInterrupted

__all__ = ["add_parser"]

log = logging.getLogger(__name__)


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("study", help="train and evaluate a grid of arms × seeds; write a paired summary",
                              description=__doc__, allow_abbrev=False)
    p.add_argument("preset", choices=[name for name, _, _ in PRESETS], help="the preset every run starts from")
    add_config_arguments(p, toy2d(), skip=("seed",))
    p.add_argument("--grid", nargs="+", default=[], metavar="FIELD=V1,V2",
                   help="swept fields: the arms are their cartesian product")
    p.add_argument("--arm", action="append", default=[], metavar="'FIELD=V FIELD=V'",
                   help="one more arm (repeatable), after the grid's; the first arm of all is the control")
    p.add_argument("--seeds", type=int, default=3, help="seeds 0 … N−1 (default: 3)")
    p.add_argument("--first-seed", type=int, default=0, help="first seed (default: 0)")
    p.add_argument("--pretrain-steps", type=int, default=None,
                   help="a plain-DSM pre-training run of this many steps per seed, from which every arm fine-tunes")
    p.add_argument("--finetune-lr", type=float, default=None,
                   help="with --pretrain-steps: the fine-tuning arms' learning rate (default: the preset's lr)")
    p.add_argument("--jobs", type=int, default=1, help="local worker processes (default: 1)")
    p.add_argument("--slurm-partition", default=None, help="submit each run to this SLURM partition via submitit")
    p.add_argument("--out", type=path_arg, default=Path("runs/study"), help="study folder (default: runs/study)")
    p.add_argument("--dry-run", action="store_true", help="list the runs and which are finished; train nothing")
    p.set_defaults(handler=_study_command)
    one_line_errors(p)


def plan_from_args(args: argparse.Namespace) -> StudyPlan:
    preset = dict((name, fn) for name, fn, _ in PRESETS)[args.preset]
    base = config_from_args(args, preset)
    if not 1 <= args.seeds <= 1000:
        raise CLIError(f"--seeds must be in [1, 1000]; got {args.seeds}")
    if args.first_seed < 0:
        raise CLIError(f"--first-seed must be >= 0; got {args.first_seed}")
    if not 1 <= args.jobs <= 64:
        raise CLIError(f"--jobs must be in [1, 64]; got {args.jobs}")
    if args.pretrain_steps is not None and not 1 <= args.pretrain_steps <= MAX_STEPS:
        raise CLIError(f"--pretrain-steps must be in [1, {MAX_STEPS}]; got {args.pretrain_steps}")
    try:
        arms = (parse_grid(args.grid) if args.grid or not args.arm else []) + [parse_arm(a) for a in args.arm]
        return StudyPlan(base=base, arms=tuple(arms), seeds=tuple(range(args.first_seed, args.first_seed + args.seeds)),
                         pretrain_steps=args.pretrain_steps, finetune_lr=args.finetune_lr)
    except ValueError as e:
        raise CLIError(str(e)) from None


def _slurm_submit(partition: str, out: Path):
    try:
        import submitit
    except ImportError:
        raise CLIError('--slurm-partition needs submitit: pip install -e ".[cluster]"') from None

    executor = submitit.AutoExecutor(folder=out / "slurm", cluster="slurm")
    executor.update_parameters(slurm_partition=partition, timeout_min=24 * 60, cpus_per_task=1)
    return submitit_submit(executor)


def _study_command(args: argparse.Namespace) -> int:
    plan = plan_from_args(args)
    out = Path(args.out)
    try:
        resolve_device(plan.base.device)
        if out.exists() and not out.is_dir():
            raise ValueError(f"--out {out} is a file; it must be a folder (it is created if missing)")
        if args.dry_run:
            for arm in plan.arms:
                for seed in plan.seeds:
                    folder = runs.run_dir(plan.config(arm, seed, out), out)
                    done = (folder / "config.json").is_file() and runs.load(folder).is_finished
                    print(f"{'done' if done else 'todo'}  {arm.name}  seed {seed}  {folder}")
            return 0
        submit = _slurm_submit(args.slurm_partition, out) if args.slurm_partition else None
        run_study(plan, out, jobs=args.jobs, submit=submit)
        csv_path, md_path = write_summary(summarize(plan, out), out)
    except (ValueError, ConfigMismatchError, FloatingPointError, FileNotFoundError) as e:
        raise CLIError(str(e)) from None
    except (runs.RunBusyError, WorkerFailure) as e:
        raise EnvironmentFailure(str(e)) from None
    except TrainingInterrupted as e:  # its checkpoint is written; the study resumes when run again (no --resume)
        raise Interrupted(e.signum) from None
    log.info("wrote %s and %s\n%s", csv_path, md_path, md_path.read_text(encoding="utf-8"))
    return 0
