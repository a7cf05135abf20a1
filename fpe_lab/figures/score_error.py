r"""Figure: score error against the exact score vs t, DSM vs DSM+FPE.

Left: E_{x~p_t}‖s_θ(x, t) − ∇log p_t(x)‖² (truth in closed form for mixtures, by quadrature for the
other toy sets); right: relative to E‖∇log p_t‖² (metrics.json ``per_time.score_error`` and
``score_error_rel``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from fpe_lab.figures.bands import per_time_figure
from fpe_lab.figures.runs import Run

__all__ = ["make"]

STEM = "score_error_vs_t"


def make(runs: Sequence[Run], out: Path) -> list[Path]:
    """Draw ``score_error_vs_t.{png,pdf,csv}`` into ``out``."""
    return per_time_figure(
        runs,
        [("score_error", lambda p: p.score_error, r"score error $E\,\|s_\theta - \nabla\log p_t\|^2$  (length$^{-2}$)"),
         ("score_error_rel", lambda p: p.score_error_rel,
          "relative score error\n" r"$E\|s_\theta - \nabla\log p_t\|^2 / E\|\nabla\log p_t\|^2$")],
        out, STEM, "Score error")
