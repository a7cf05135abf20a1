"""Shared problems for the ground-truth tests: Gaussian mixtures on grids and their exact p_t."""

from __future__ import annotations

import numpy as np
import torch

from fpe_lab.gmm import GaussianMixture
from fpe_lab.groundtruth import Grid


def mixture_1d() -> GaussianMixture:
    return GaussianMixture([0.3, 0.7], [[-1.5], [1.0]], [[[0.25]], [[0.16]]], dtype=torch.float64)


def mixture_2d() -> GaussianMixture:
    """Three anisotropic, correlated components (not separable)."""
    covs = [[[0.30, 0.10], [0.10, 0.20]], [[0.20, -0.05], [-0.05, 0.25]], [[0.16, 0.0], [0.0, 0.36]]]
    return GaussianMixture([0.5, 0.3, 0.2], [[1.2, 0.3], [-1.0, 1.0], [0.0, -1.5]], covs, dtype=torch.float64)


def on_grid(fn, grid: Grid) -> np.ndarray:
    """Evaluate a torch function of points (b, D) -> (b, ...) at the cell centres, shape (*grid.shape, ...)."""
    x = torch.from_numpy(grid.coords.reshape(-1, grid.ndim))
    out = fn(x).detach().numpy()
    return out.reshape(*grid.shape, *out.shape[1:])


def score_error_bands(score: np.ndarray, exact_score: np.ndarray, exact_log_p: np.ndarray, levels=(1e-3, 1e-6, 1e-10)):
    """max |s − s_exact| over the cells where p ≥ level·max p, for each level."""
    rel = exact_log_p - exact_log_p.max()
    err = np.abs(score - exact_score).max(axis=-1)
    return {lvl: float(err[rel >= np.log(lvl)].max()) for lvl in levels}
