r"""Figure: conservativity — the curl ∂s_y/∂x − ∂s_x/∂y of the learned score, DSM vs DSM+FPE.

A true score is a gradient, so its curl is zero everywhere; a network is not constrained to be one.
Rows: DSM, DSM+FPE (one seed each); columns: a small and a moderate t. Diverging colour map centred
on zero with symmetric limits shared by the two rows of a column; grey contours: the true p_t at 10⁻²
and 10⁻¹ of its maximum (where the data are). The title of each panel gives E_{p_t}|curl| from
metrics.json (mean over the run's seeds is in the λ trade-off figure).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from fpe_lab.figures.fields import curl_on, log_prob_on, plot_grid
from fpe_lab.figures.output import save_figure, write_csv
from fpe_lab.figures.runs import Run, RunFolderError, pick_run
from fpe_lab.figures.style import COLUMN_WIDTH, SIGNED_CMAP, Variant, new_figure, paper_style

__all__ = ["DEFAULT_TIMES", "make"]

STEM = "curl"
DEFAULT_TIMES: tuple[float, ...] = (0.05, 0.5)


def make(runs: Sequence[Run], out: Path, times: Sequence[float] = DEFAULT_TIMES, n: int = 64,
         lam: float | None = None) -> list[Path]:
    """Draw ``curl.{png,pdf,csv}`` for the lowest-seed DSM run and DSM+FPE run at ``lam`` (default: largest λ)."""
    picked = [(v, pick_run(runs, v, lam)) for v in Variant]
    missing = [v.value for v, r in picked if r is None]
    if missing:
        raise RunFolderError(f"the curl figure needs a DSM run and a DSM+FPE run; none of the given run folders is "
                             f"{' or '.join(missing)}")
    chosen = [(v, r) for v, r in picked if r is not None]
    ref = chosen[0][1]
    sde, truth, bounds = ref.sde, ref.truth(), ref.data().bounds
    models = {v: r.score_model() for v, r in chosen}
    columns, rows = [], []
    for t in times:
        grid = plot_grid(bounds, sde, float(t), n)
        x = grid.points
        log_p = log_prob_on(truth, x, float(t)).numpy()
        curls = {v: curl_on(m, x, float(t)).numpy() for v, m in models.items()}
        columns.append((float(t), grid, log_p, curls))
        rows += [[float(t), float(x[i, 0]), float(x[i, 1])] + [float(curls[v][i]) for v in Variant]
                 for i in range(x.shape[0])]

    with paper_style():
        nt = len(times)
        fig = new_figure((max(COLUMN_WIDTH, 1.75 * nt + 0.5), 4.1))
        axes = fig.subplots(2, nt, squeeze=False)
        for j, (t, grid, log_p, curls) in enumerate(columns):
            # robust symmetric limit: the 99th percentile of |curl| over both rows (a few grid corners far
            # from the data would otherwise wash out the map)
            lim = max(float(np.percentile(np.abs(np.concatenate(list(curls.values()))), 99)), 1e-12)
            p_rel = grid.image(np.exp(log_p - log_p.max()))
            for i, (v, run) in enumerate(chosen):
                ax = axes[i, j]
                im = ax.imshow(grid.image(curls[v]), origin="lower", extent=grid.extent, cmap=SIGNED_CMAP,
                               vmin=-lim, vmax=lim, aspect="equal")
                ax.contour(grid.axis, grid.axis, p_rel, levels=[1e-2, 1e-1], colors="0.35", linewidths=0.5)
                k = run.times.index(t) if t in run.times else None
                curl_abs = run.report.per_time.curl_abs
                stat = f", $E|$curl$|$={curl_abs[k]:.2g}" if k is not None and curl_abs is not None else ""
                ax.set_title(f"{v.value}, t = {t:g}{stat}", color=v.color, fontsize=7)
                ax.set_xlabel("$x_1$")
                ax.set_ylabel("$x_2$")
                ax.tick_params(labelsize=6)
            fig.colorbar(im, ax=axes[:, j], orientation="horizontal", shrink=0.85,
                         label=r"curl $\partial_1 s_2 - \partial_2 s_1$ (1/length$^2$)")
        cfg = ref.config
        fig.suptitle(f"Curl of the learned score, {cfg.data.name.value}, {cfg.sde.kind.value.upper()} "
                     f"(DSM+FPE λ={chosen[1][1].lam:g})")
        paths = save_figure(fig, out, STEM)
    paths.append(write_csv(out, STEM, ["t", "x1", "x2", "curl_dsm", "curl_dsmfpe"], rows))
    return paths
