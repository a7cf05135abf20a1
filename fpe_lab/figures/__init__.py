"""Paper figures from saved run folders (never training): one module per figure.

``python -m fpe_lab.figures RUN_DIR... --out figures/`` draws them all (:func:`make_all`); each
writes PNG, PDF and the plotted numbers as CSV.

* :mod:`~fpe_lab.figures.residual`     score-FPE residual vs t, DSM vs DSM+FPE
* :mod:`~fpe_lab.figures.score_error`  score error vs t against the exact score
* :mod:`~fpe_lab.figures.score_fields` learned vs true score fields and the error field
* :mod:`~fpe_lab.figures.curl`         curl heatmaps at a small and a moderate t
* :mod:`~fpe_lab.figures.density`      PF-ODE model density vs the true p_eps, with the NLL
* :mod:`~fpe_lab.figures.tradeoff`     residual, NLL, score error, sample quality vs λ
* :mod:`~fpe_lab.figures.convergence`  ground-truth solver error vs grid size, fitted order
"""

from fpe_lab.figures.make import FigureOptions, make_all
from fpe_lab.figures.runs import Run, RunFolderError, load_run, load_runs

__all__ = ["make_all", "FigureOptions", "Run", "RunFolderError", "load_run", "load_runs"]
