"""Writing figures: PNG + PDF + the plotted numbers as CSV, staged so that nothing partial is left.

All figure files of one invocation are drawn into a temporary folder next to the output folder
(:func:`staged_output`); only when every figure succeeded are they moved into place one by one with
``os.replace`` (atomic per file, same file system). A failure leaves the output folder untouched.
"""

from __future__ import annotations

import contextlib
import csv
import io
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

from matplotlib.figure import Figure

__all__ = ["FIGURE_FORMATS", "save_figure", "write_csv", "staged_output"]

FIGURE_FORMATS = ("png", "pdf")


def save_figure(fig: Figure, folder: Path, stem: str) -> list[Path]:
    """Save ``fig`` as ``folder/stem.png`` and ``folder/stem.pdf``; returns the paths."""
    paths = []
    for ext in FIGURE_FORMATS:
        path = Path(folder) / f"{stem}.{ext}"
        fig.savefig(path)
        paths.append(path)
    return paths


def write_csv(folder: Path, stem: str, header: Sequence[str], rows: Sequence[Sequence]) -> Path:
    """The numbers behind a figure as ``folder/stem.csv`` (floats with 10 significant digits)."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    for row in rows:
        if len(row) != len(header):
            raise ValueError(f"row {row!r} has {len(row)} fields; header has {len(header)}")
        w.writerow([f"{v:.10g}" if isinstance(v, float) else v for v in row])
    path = Path(folder) / f"{stem}.csv"
    path.write_text(buf.getvalue(), encoding="utf-8")
    return path


@contextlib.contextmanager
def staged_output(out: str | Path) -> Iterator[Path]:
    """Yield a temporary folder to write into; on success move its files into ``out`` (created if
    needed), on any exception delete it and leave ``out`` as it was."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"out must be a folder; {out} is a file")
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".figures-", dir=out))
    ok = False
    try:
        yield tmp
        for f in sorted(tmp.iterdir()):
            os.replace(f, out / f.name)
        ok = True
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if not ok and created:
            shutil.rmtree(out, ignore_errors=True)
