r"""Figure: learned vs true score fields at a few t, and the error field.

Columns are times. Top row: the true log p_t relative to its maximum (colour) with the directions of the true score
∇log p_t (arrows). Rows 2–3: DSM and DSM+FPE (one seed each): arrows are the learned score's
directions, colour is the error in noise-prediction units σ(t)·|s_θ − ∇log p_t| (comparable across
t, since the score grows like 1/σ), on one shared log colour scale. White contours: p_t at 10⁻² and
10⁻¹ of its maximum (where the data are).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from matplotlib.colors import LogNorm

from fpe_lab.figures.fields import log_prob_on, plot_grid, score_on
from fpe_lab.figures.output import save_figure, write_csv
from fpe_lab.figures.runs import Run, RunFolderError, pick_run
from fpe_lab.figures.style import DENSITY_CMAP, ERROR_CMAP, FULL_WIDTH, Variant, new_figure, paper_style

__all__ = ["DEFAULT_TIMES", "make"]

STEM = "score_fields"
DEFAULT_TIMES: tuple[float, ...] = (0.05, 0.2, 0.5)
_ARROWS = 13  # arrows per axis (subsampled from the grid) — dense enough to read the flow, sparse enough to see colour


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.maximum(np.linalg.norm(v, axis=-1, keepdims=True), 1e-300)


def _arrows(ax, grid, s: np.ndarray, color: str) -> None:
    idx = np.linspace(0, grid.n - 1, min(_ARROWS, grid.n)).round().astype(int)
    xs = grid.axis[idx]
    u = _unit(grid.image(s)[np.ix_(idx, idx)])
    xx, yy = np.meshgrid(xs, xs, indexing="xy")
    ax.quiver(xx, yy, u[..., 0], u[..., 1], color=color, angles="xy", pivot="mid", scale=_ARROWS * 1.6,
              width=0.006, headwidth=3.5, headlength=3.5)


def make(runs: Sequence[Run], out: Path, times: Sequence[float] = DEFAULT_TIMES, n: int = 64,
         lam: float | None = None) -> list[Path]:
    """Draw ``score_fields.{png,pdf,csv}``: the lowest-seed DSM run and DSM+FPE run at ``lam``
    (default: the largest λ) evaluated on an n×n grid at each of ``times``."""
    picked = [(v, pick_run(runs, v, lam)) for v in Variant]
    missing = [v.value for v, r in picked if r is None]
    if missing:
        at = "" if lam is None else f" at λ={lam:g}"
        raise RunFolderError(f"the score-field figure needs a DSM run and a DSM+FPE run{at}; "
                             f"none of the given run folders is {' or '.join(missing)}")
    chosen = [(v, r) for v, r in picked if r is not None]
    ref = chosen[0][1]
    sde, truth, bounds = ref.sde, ref.truth(), ref.data().bounds
    models = {v: r.score_model() for v, r in chosen}
    rows, panels = [], []
    for t in times:
        grid = plot_grid(bounds, sde, float(t), n)
        x = grid.points
        sigma = float(sde.marginal(torch.tensor(float(t), dtype=torch.float64))[1])
        s_true = truth.score(x, float(t))
        log_p = log_prob_on(truth, x, float(t))
        errs = {}
        for v, model in models.items():
            s = score_on(model, x, float(t))
            errs[v] = (s, (sigma * (s - s_true).norm(dim=-1)).numpy())
        panels.append((t, grid, s_true.numpy(), log_p.numpy(), errs))
        for i in range(x.shape[0]):
            rows.append([float(t), float(x[i, 0]), float(x[i, 1]), float(log_p[i]), float(s_true[i, 0]),
                         float(s_true[i, 1])] + [float(errs[v][0][i, k]) for v in Variant for k in (0, 1)])
    all_err = np.concatenate([e for *_, errs in panels for _, e in errs.values()])
    norm = LogNorm(vmin=max(np.percentile(all_err, 1), 1e-6), vmax=max(all_err.max(), 1e-5))

    with paper_style():
        nt = len(times)
        fig = new_figure((FULL_WIDTH, 6.6))
        axes = fig.subplots(3, nt, squeeze=False)
        for j, (t, grid, true_s, true_lp, errs) in enumerate(panels):
            p_rel = grid.image(np.exp(true_lp - true_lp.max()))
            ax = axes[0, j]
            # log p_t relative to its maximum: one colour scale for every t (p_t spreads out with t)
            im_p = ax.imshow(grid.image(true_lp - true_lp.max()), origin="lower", extent=grid.extent, cmap=DENSITY_CMAP,
                             vmin=-12, vmax=0, aspect="equal")
            _arrows(ax, grid, true_s, "white")
            ax.set_title(f"t = {t:g}")
            for i, v in enumerate(Variant, start=1):
                ax = axes[i, j]
                s, e = errs[v]
                im_e = ax.imshow(grid.image(e), origin="lower", extent=grid.extent, cmap=ERROR_CMAP, norm=norm,
                                 aspect="equal")
                ax.contour(grid.axis, grid.axis, p_rel, levels=[1e-2, 1e-1], colors="white", linewidths=0.5)
                _arrows(ax, grid, s.numpy(), "black")
            for i in range(3):
                axes[i, j].set_xlabel("$x_1$")
                axes[i, j].set_ylabel("$x_2$")
                axes[i, j].tick_params(labelsize=6)
        for i, v in enumerate(Variant, start=1):
            axes[i, 0].annotate(v.value, xy=(0, 0.5), xycoords="axes fraction", xytext=(-38, 0),
                                textcoords="offset points", rotation=90, va="center", ha="center",
                                color=v.color, fontweight="bold")
        axes[0, 0].annotate("truth", xy=(0, 0.5), xycoords="axes fraction", xytext=(-38, 0),
                            textcoords="offset points", rotation=90, va="center", ha="center", fontweight="bold")
        fig.colorbar(im_p, ax=axes[0, :], shrink=0.9, label=r"$\log p_t - \max\log p_t$ (true)")
        fig.colorbar(im_e, ax=axes[1:, :], shrink=0.6,
                     label=r"$\sigma(t)\,|s_\theta - \nabla\log p_t|$ (ε-prediction error)")
        cfg = ref.config
        fig.suptitle(f"Score fields, {cfg.data.name.value}, {cfg.sde.kind.value.upper()} SDE (arrows: directions; "
                     f"DSM+FPE λ={chosen[1][1].lam:g}; seed {ref.seed})")
        paths = save_figure(fig, out, STEM)
    header = ["t", "x1", "x2", "log_p_true", "s_true_1", "s_true_2", "s_dsm_1", "s_dsm_2", "s_dsmfpe_1", "s_dsmfpe_2"]
    paths.append(write_csv(out, STEM, header, rows))
    return paths
