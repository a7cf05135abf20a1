"""Data sets as distributions: samples together with the exact density they are drawn from."""

from fpe_lab.data.toy import (
    GMM,
    TOY_NAMES,
    Checkerboard,
    CurveDistribution,
    EightGaussians,
    Moons,
    Pinwheel,
    Rings,
    SwissRoll,
    ToyDistribution,
    toy_distribution,
)

__all__ = [
    "ToyDistribution",
    "Checkerboard",
    "EightGaussians",
    "GMM",
    "CurveDistribution",
    "Rings",
    "Moons",
    "SwissRoll",
    "Pinwheel",
    "TOY_NAMES",
    "toy_distribution",
]
