r"""Figure: score-FPE residual against t, DSM vs DSM+FPE (claim: DSM scores violate the score FPE,
mostly at small t, and the regularizer lowers the residual).

Left: E_{x~p_t}‖R_θ(x, t)‖², R_θ = ∂_t s_θ − ∇[½g²∇·s_θ + ½g²‖s_θ‖² − ⟨f, s_θ⟩ − ∇·f]; right: the
same relative to the size of its terms (metrics.json ``per_time.fpe_residual`` and
``fpe_residual_rel``, see :func:`fpe_lab.metrics.evaluate`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from fpe_lab.figures.bands import per_time_figure
from fpe_lab.figures.runs import Run

__all__ = ["make"]

STEM = "fpe_residual_vs_t"


def make(runs: Sequence[Run], out: Path) -> list[Path]:
    """Draw ``fpe_residual_vs_t.{png,pdf,csv}`` into ``out``."""
    return per_time_figure(
        runs,
        [("fpe_residual", lambda p: p.fpe_residual, r"residual $E\,\|R_\theta\|^2$  (length$^{-2}$ time$^{-2}$)"),
         ("fpe_residual_rel", lambda p: p.fpe_residual_rel,
          "relative residual\n" r"$E\|R_\theta\|^2 / E[\mathrm{terms}^2]$")],
        out, STEM, "Score-FPE residual")
