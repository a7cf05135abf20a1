"""Ground-truth perturbed densities and scores on 1D/2D grids.

``solve_fokker_planck(sde, p0, grid, times, method=Method.AUTO, ...) -> Solution`` solves the
Fokker–Planck equation of dx = f(x, t) dt + g(t) dw for any nonnegative p0 on a :class:`Grid`:
exactly by convolution for linear SDEs, by Scharfetter–Gummel finite volumes for any drift, or by the
same SG discretisation propagated exactly after a time change (VE/VP), or for u = log p by linearly
implicit ADI steps (any drift; accurate scores far into the tails).
"""

from fpe_lab.groundtruth.diagnostics import BoundaryWarning, ResolutionWarning, SolverBreakdown
from fpe_lab.groundtruth.grid import Grid
from fpe_lab.groundtruth.solution import Solution
from fpe_lab.groundtruth.solver import Method, solve_fokker_planck

__all__ = [
    "Grid", "Solution", "Method", "solve_fokker_planck", "BoundaryWarning", "ResolutionWarning", "SolverBreakdown",
]
