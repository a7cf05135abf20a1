"""Evaluation of a learned score against the truth: truth objects, sample distances, ``evaluate``."""

from fpe_lab.metrics.evaluate import DEFAULT_TIMES, EvalReport, Likelihood, PerTime, Samples, evaluate
from fpe_lab.metrics.model_densities import DensityDistances, ModelDensities, density_distances, model_densities
from fpe_lab.metrics.sample_distance import Floor, GaussianKernel, mmd2, noise_floor, sliced_wasserstein
from fpe_lab.metrics.truth import GridTruth, MixtureTruth, ToyTruth, Truth

__all__ = [
    "evaluate", "EvalReport", "PerTime", "Likelihood", "Samples", "DEFAULT_TIMES",
    "Truth", "MixtureTruth", "ToyTruth", "GridTruth",
    "sliced_wasserstein", "mmd2", "GaussianKernel", "noise_floor", "Floor",
    "model_densities", "ModelDensities", "density_distances", "DensityDistances",
]
