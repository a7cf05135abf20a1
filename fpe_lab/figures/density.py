r"""Figure: the probability-flow model density vs the true p_eps, with the NLL.

Columns: the true p_eps (closed form / quadrature), the DSM model and the DSM+FPE model (one seed
each), on one shared colour scale. The model density is exp(−NLL) of the probability-flow ODE,
log p_eps(x) = log p_T(x_T) + ∫_eps^T ∇·ṽ(x_t, t) dt (:func:`fpe_lab.likelihood.pf_ode_nll`, exact
divergence, float64), at every grid point. Panel titles give the held-out NLL of metrics.json (mean
± std over each λ's seeds) next to the true NLL of the same points.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from fpe_lab.figures.fields import PlotGrid, log_prob_on
from fpe_lab.figures.output import save_figure, write_csv
from fpe_lab.figures.runs import Run, RunFolderError, by_lam, pick_run
from fpe_lab.figures.style import DENSITY_CMAP, FULL_WIDTH, TRUTH_COLOR, Variant, new_figure, paper_style
from fpe_lab.likelihood import pf_ode_nll

__all__ = ["make", "nll_summary"]

STEM = "density"
# PF-ODE tolerances of the picture (the NLL numbers in the titles come from metrics.json, solved at the
# run's eval rtol, 1e-5 by default): 1e-4 keeps the log-density error to ~0.1 nats, ~10% of the colour
# of a pixel, and solves the 48² grid several times faster.
RTOL = ATOL = 1e-4


def nll_summary(runs: Sequence[Run]) -> tuple[float, float, float] | None:
    """(mean, std over runs of model NLL in nats, mean true NLL) from metrics.json; None without NLL."""
    vals: list[float] = []
    true: list[float] = []
    for r in runs:
        nll = r.report.nll
        if nll is None or nll.true_nats is None:
            return None
        vals.append(nll.model_nats)
        true.append(nll.true_nats)
    v = np.asarray(vals, dtype=float)
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0, float(np.mean(true))


def make(runs: Sequence[Run], out: Path, n: int = 48, lam: float | None = None, progress: bool = True) -> list[Path]:
    """Draw ``density.{png,pdf,csv}`` on an n×n grid over the data box."""
    picked = [(v, pick_run(runs, v, lam)) for v in Variant]
    missing = [v.value for v, r in picked if r is None]
    if missing:
        raise RunFolderError(f"the density figure needs a DSM run and a DSM+FPE run; none of the given run folders is "
                             f"{' or '.join(missing)}")
    chosen = [(v, r) for v, r in picked if r is not None]
    ref = chosen[0][1]
    sde, truth, bounds = ref.sde, ref.truth(), ref.data().bounds
    eps = float(ref.report.nll.eps if ref.report.nll is not None else ref.config.loss.eps)
    half = max(abs(v) for pair in bounds for v in pair)
    grid = PlotGrid(-half, half, n)
    x = grid.points
    fields = {"true": log_prob_on(truth, x, eps).numpy()}
    for v, run in chosen:
        res = pf_ode_nll(run.score_model(), sde, x, eps=eps, rtol=RTOL, atol=ATOL, progress=progress)
        fields[v.value] = -res.nats.detach().to(torch.float64).numpy()
    groups = by_lam(runs)
    nll = {v.value: nll_summary(groups[run.lam]) for v, run in chosen}

    with paper_style():
        fig = new_figure((FULL_WIDTH, 2.55))
        axes = fig.subplots(1, 3, squeeze=False)
        vmax = float(np.exp(fields["true"]).max())
        for ax, (key, log_p) in zip(axes[0], fields.items()):
            im = ax.imshow(grid.image(np.exp(log_p)), origin="lower", extent=grid.extent, cmap=DENSITY_CMAP,
                           vmin=0.0, vmax=vmax, aspect="equal", interpolation="bilinear")
            if key == "true":
                s = nll[Variant.DSM.value]
                title = "true $p_\\varepsilon$" + (f"\nNLL {s[2]:.3f} nats" if s else "")
                color = TRUTH_COLOR
            else:
                s = nll[key]
                run = dict((v.value, r) for v, r in chosen)[key]
                lam_txt = f" λ={run.lam:g}" if run.lam > 0 else ""
                title = f"{key}{lam_txt} (PF-ODE)" + (f"\nNLL {s[0]:.3f} ± {s[1]:.2g} nats" if s else "")
                color = Variant(key).color
            ax.set_title(title, color=color)
            ax.set_xlabel("$x_1$")
            ax.set_ylabel("$x_2$")
        fig.colorbar(im, ax=axes[0, :], shrink=0.9, label=r"density $p_\varepsilon(x)$ (1/area)")
        cfg = ref.config
        fig.suptitle(f"Model density vs truth at ε={eps:g}, {cfg.data.name.value}, {cfg.sde.kind.value.upper()} SDE "
                     "(NLL of held-out data, mean ± std over seeds)")
        paths = save_figure(fig, out, STEM)
    rows = [[float(x[i, 0]), float(x[i, 1])] + [float(f[i]) for f in fields.values()] for i in range(x.shape[0])]
    paths.append(write_csv(out, STEM, ["x1", "x2", "log_p_true", "log_p_dsm", "log_p_dsmfpe"], rows))
    return paths
