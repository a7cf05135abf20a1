"""The ODE–SDE gap figure: the truth p_eps, the PF-ODE model q_ODE, the reverse-SDE model q_SDE and
q_ODE − q_SDE, side by side on the gap grid (one row per run)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from matplotlib.figure import Figure

__all__ = ["gap_figure"]


def gap_figure(rows: Sequence[tuple[str, dict[str, Any]]]) -> Figure:
    """One row per (label, densities) with densities = {"truth", "ode", "sde": (N, N) arrays, "box": L} on
    [−L, L]²; the three densities share one colour scale per row, the difference a symmetric one."""
    if not rows:
        raise ValueError("gap_figure needs at least one (label, densities) row")
    fig = Figure(figsize=(12, 3 * len(rows)))
    axes = np.atleast_2d(fig.subplots(len(rows), 4, squeeze=False))
    for (label, d), ax in zip(rows, axes):
        box = float(d["box"])
        extent = (-box, box, -box, box)
        vmax = max(float(np.max(d[k])) for k in ("truth", "ode", "sde"))
        for a, key, title in zip(ax[:3], ("truth", "ode", "sde"), ("truth p_eps", "PF-ODE q_ODE", "reverse SDE q_SDE")):
            a.imshow(np.asarray(d[key]).T, origin="lower", extent=extent, vmin=0, vmax=vmax, cmap="viridis")
            a.set_title(f"{label}: {title}" if key == "truth" else title, fontsize=9)
        diff = np.asarray(d["ode"]) - np.asarray(d["sde"])
        lim = float(np.max(np.abs(diff))) or 1.0
        im = ax[3].imshow(diff.T, origin="lower", extent=extent, vmin=-lim, vmax=lim, cmap="RdBu_r")
        ax[3].set_title("q_ODE − q_SDE", fontsize=9)
        fig.colorbar(im, ax=ax[3], fraction=0.046)
        for a in ax:
            a.set_xticks([])
            a.set_yticks([])
    fig.tight_layout()
    return fig
