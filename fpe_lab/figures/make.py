"""All figures from one set of run folders, written together or not at all."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from fpe_lab.figures import convergence, curl, density, residual, score_error, score_fields, tradeoff
from fpe_lab.figures.output import staged_output
from fpe_lab.figures.runs import RunFolderError, load_runs, pick_run
from fpe_lab.figures.style import Variant
from fpe_lab.progress import progress_bar as tqdm

__all__ = ["FigureOptions", "make_all"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FigureOptions:
    """Resolution and times of the figures that evaluate models on grids.

    Args:
        lam: the DSM+FPE weight shown in the field figures (None: the largest λ of the runs).
        field_times: times of the score-field figure; curl_times: of the curl figure (small, moderate).
        field_grid: points per axis of the score-field and curl grids; density_grid: of the PF-ODE density.
        solver_grids: cells per axis of the solver-convergence study (>= 3, increasing).
    """

    lam: float | None = None
    field_times: tuple[float, ...] = score_fields.DEFAULT_TIMES
    curl_times: tuple[float, ...] = curl.DEFAULT_TIMES
    field_grid: int = 64
    density_grid: int = 48
    solver_grids: tuple[int, ...] = convergence.DEFAULT_GRIDS

    def __post_init__(self) -> None:
        for name in ("field_times", "curl_times"):
            ts = getattr(self, name)
            if not ts or any(not (0 < float(t) <= 1) for t in ts):
                raise ValueError(f"{name} must be a nonempty list of times in (0, 1]; got {list(ts)!r}")
        for name, lo in (("field_grid", 8), ("density_grid", 8)):
            v = getattr(self, name)
            if not isinstance(v, int) or v < lo:
                raise ValueError(f"{name} must be an int >= {lo}; got {v!r}")
        g = list(self.solver_grids)
        if len(g) < 3 or any(not isinstance(n, int) or n < 8 for n in g) or g != sorted(set(g)):
            raise ValueError(f"solver_grids must be >= 3 increasing ints >= 8; got {g!r}")


def make_all(run_dirs: Sequence[str | Path], out: str | Path, options: FigureOptions = FigureOptions(),
             progress: bool = True) -> list[Path]:
    """Read the run folders, check them, draw every figure into a staging folder, then move all files
    into ``out``. Any bad input raises :class:`RunFolderError` before anything is written to ``out``."""
    runs = load_runs(run_dirs)
    for v in Variant:
        run = pick_run(runs, v, options.lam)
        if run is None:
            what = "" if options.lam is None or v is Variant.DSM else f" at λ={options.lam:g}"
            raise RunFolderError(f"the figures compare DSM with DSM+FPE: none of the given run folders is "
                                 f"{v.value}{what} (λ of the runs: {sorted({r.lam for r in runs})})")
        run.score_model()  # the checkpoint loads (else: RunFolderError naming the folder)
    sde = runs[0].sde
    jobs = [
        ("residual vs t", lambda d: residual.make(runs, d)),
        ("score error vs t", lambda d: score_error.make(runs, d)),
        ("λ trade-off", lambda d: tradeoff.make(runs, d)),
        ("score fields", lambda d: score_fields.make(runs, d, options.field_times, options.field_grid, options.lam)),
        ("curl", lambda d: curl.make(runs, d, options.curl_times, options.field_grid, options.lam)),
        ("density", lambda d: density.make(runs, d, options.density_grid, options.lam, progress=False)),
        ("solver convergence", lambda d: convergence.make(sde, runs[0].config.sde.kind.value.upper(), d,
                                                          options.solver_grids, progress=False)),
    ]
    written: list[Path] = []
    with staged_output(out) as stage:
        for name, job in tqdm(jobs, desc="figures", disable=not progress, dynamic_ncols=True):
            log.debug("drawing %s", name)
            written += [Path(out) / p.name for p in job(stage)]
    log.info("wrote %d files to %s", len(written), out)
    return written
