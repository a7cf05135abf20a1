"""Ground-truth perturbed densities and scores on 1D/2D grids."""

from fpe_lab.groundtruth.grid import Grid

__all__ = ["Grid"]
