"""``python -m fpe_lab.run report STUDY_DIR [--out DIR]``: the summary of any study folder.

Reads the study's plan (``study.json``) and its finished run folders, from a relative or an absolute path,
and writes ``summary.csv`` and ``summary.md`` (one table per metric: the pre-trained model where there is
one, then each arm by the settings that tell it apart, with its paired difference to the control) into
``--out`` (default: the study folder). Nothing is trained; an unfinished run is named in the error.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from fpe_lab.commands import CLIError, one_line_errors, path_arg
from fpe_lab.study import StudyPlan, summarize, write_summary

__all__ = ["add_parser"]

log = logging.getLogger(__name__)


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("report", help="tables of a study folder (summary.csv, summary.md)",
                              description=(__doc__ or "").split("\n\n")[1].replace("\n", " "), allow_abbrev=False)
    p.add_argument("study_dir", type=path_arg, help="a folder written by `study`")
    p.add_argument("--out", type=path_arg, default=None, metavar="DIR",
                   help="where to write (default: the study folder)")
    p.set_defaults(handler=_report_command)
    one_line_errors(p)


def _report_command(args: argparse.Namespace) -> int:
    folder = Path(args.study_dir)
    out = Path(args.out) if args.out is not None else folder
    try:
        plan = StudyPlan.load(folder)
        rows = summarize(plan, folder)
        if out.exists() and not out.is_dir():
            raise ValueError(f"--out {out} is a file; it must be a folder (it is created if missing)")
        out.mkdir(parents=True, exist_ok=True)
        csv_path, md_path = write_summary(rows, out)
    except (ValueError, FileNotFoundError) as e:
        raise CLIError(str(e)) from None
    log.info("wrote %s and %s\n%s", csv_path, md_path, md_path.read_text(encoding="utf-8"))
    return 0
