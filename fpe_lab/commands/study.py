"""``python -m fpe_lab.run study toy2d --lam 0 0.01 0.1 1 --seeds 3 [toy2d flags]``: the λ × seed grid.

Trains and evaluates one toy2d run folder per (λ, seed) under --out (λ = 0: plain DSM), skipping
finished runs and continuing interrupted ones, with one progress bar over the runs, then writes
``summary.csv`` and ``summary.md`` (mean ± std over seeds per λ) into --out. Every toy2d flag
(--data, --sde, --steps, --batch, --lr, --device) passes through; --seed is the first seed.
Make the figures with ``python -m fpe_lab.figures OUT/*/ --out figures/``.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from fpe_lab.checkpoint import ConfigMismatchError
from fpe_lab.commands import CLIError, ranged
from fpe_lab.commands.toy2d import add_toy2d_arguments, config_from_args, run_dir_name, run_toy2d
from fpe_lab.config import Regularizer, Toy2dConfig, resolve_device
from fpe_lab.study import StudyPlan, is_finished, run_study, summarize, write_summary

__all__ = ["add_parser"]

log = logging.getLogger(__name__)


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "study",
        help="train and evaluate a grid of toy2d runs over λ and seeds; write a summary table",
        description=__doc__,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        conflict_handler="resolve",  # the study's --lam (a list) and --reg replace toy2d's
    )
    p.add_argument("preset", choices=["toy2d"], help="the experiment whose runs make up the study")
    add_toy2d_arguments(p)
    p.add_argument("--lam", type=ranged(float, 0.0), nargs="+", default=[0.0, 0.01, 0.1, 1.0],
                   help="regularizer weights λ >= 0 (0: plain DSM)")
    p.add_argument("--seeds", type=ranged(int, 1, 1000), default=3, help="number of seeds per λ: --seed, --seed+1, ...")
    p.add_argument("--reg", choices=[Regularizer.FPE.value], default=Regularizer.FPE.value,
                   help="regularizer of the λ > 0 runs (λ = 0 runs are plain DSM)")
    p.add_argument("--out", type=Path, default=Path("runs/study"), help="study folder: run folders and summary")
    p.add_argument("--resume", action="store_true", help=argparse.SUPPRESS)  # a study always resumes
    p.add_argument("--dry-run", action="store_true", help="list the runs and which are finished; train nothing")
    p.set_defaults(handler=_study_command)
    _one_line(p)


def _one_line(parser: argparse.ArgumentParser) -> None:
    def error(message: str):
        parser.exit(2, f"error: {parser.prog}: {message}\n")

    parser.error = error  # type: ignore[method-assign]


def plan_from_args(args: argparse.Namespace) -> StudyPlan:
    """The :class:`StudyPlan` of the parsed flags; bad values raise :class:`CLIError`."""
    args.lam, lams = 0.0, list(args.lam)  # config_from_args reads one λ; the plan sets it per run
    base: Toy2dConfig = config_from_args(args)
    try:
        return StudyPlan(base=base, lams=tuple(lams), seeds=tuple(range(base.seed, base.seed + args.seeds)))
    except ValueError as e:
        raise CLIError(str(e)) from None


def _run_one(config: Toy2dConfig, out: Path) -> Path:
    return run_toy2d(config, out, resume=True, progress=False)


def _study_command(args: argparse.Namespace) -> int:
    plan = plan_from_args(args)
    out = Path(args.out)
    try:
        resolve_device(plan.base.device)
        if out.exists() and not out.is_dir():
            raise ValueError(f"--out {out} is a file; it must be a folder (it is created if missing)")
        if args.dry_run:
            for c in plan.configs():
                d = out / run_dir_name(c)
                print(f"{'done' if is_finished(d, c) else 'todo'}  {d}")
            return 0
        dirs = run_study(plan, out, _run_one, run_dir_name)
        csv_path, md_path = write_summary(summarize(dirs), out)
    except (ValueError, ConfigMismatchError, FloatingPointError, FileNotFoundError) as e:
        raise CLIError(str(e)) from None
    log.info("wrote %s and %s\n%s", csv_path, md_path, md_path.read_text(encoding="utf-8"))
    return 0
