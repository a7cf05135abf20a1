"""Data sets: samples, and the exact density they are drawn from where it is known.

Every data object answers ``sample(n, generator)`` (training points or images), ``truth(sde)`` (a
:class:`fpe_lab.metrics.truth.Truth` with the exact p_t and score, or None for real images) and
``dequantization()`` (for bits/dim of quantized images, else None). :func:`load` is the one place that
maps a configured data set to its object, so the builder and the run folders never branch on kinds.
"""

from __future__ import annotations

import enum
from typing import TYPE_CHECKING, Any

from fpe_lab.data.toy import (
    GMM,
    TOY_NAMES,
    Checkerboard,
    CurveDistribution,
    EightGaussians,
    Imbalanced,
    Moons,
    Pinwheel,
    Rings,
    SwissRoll,
    ToyDistribution,
    toy_distribution,
)

if TYPE_CHECKING:
    from fpe_lab.config import DataConfig

__all__ = [
    "load",
    "Split",
    "ToyDistribution",
    "Checkerboard",
    "EightGaussians",
    "GMM",
    "CurveDistribution",
    "Rings",
    "Moons",
    "SwissRoll",
    "Pinwheel",
    "Imbalanced",
    "TOY_NAMES",
    "toy_distribution",
]


class Split(enum.Enum):
    TRAIN = "train"
    TEST = "test"


def load(config: DataConfig, split: Split = Split.TRAIN) -> Any:
    """The data object of ``config`` (a :class:`fpe_lab.config.DataConfig`) for ``split``. Distributions
    (toy sets, mixtures) are the same object for both splits: held-out points are fresh draws."""
    from fpe_lab.config import Dataset

    match config.name:
        case Dataset.CIFAR10 | Dataset.DIGITS:
            from fpe_lab.data.images import ImageSplit, load_cifar10, load_digits

            image_split = ImageSplit.TRAIN if split is Split.TRAIN else ImageSplit.TEST
            if config.name is Dataset.CIFAR10:
                if config.data_dir is None:
                    raise ValueError("data cifar10 needs data_dir (--data-dir)")
                data = load_cifar10(config.data_dir, image_split)
            else:
                data = load_digits(image_split)
            if data.image_shape != config.shape:
                raise ValueError(f"{config.name.value} images are {data.image_shape} (C, H, W); "
                                 f"expected {config.shape}")
            return data
        case Dataset.MIXTURE:
            from fpe_lab.data.mixture import lowrank_mixture_data, mixture_data

            if config.data_shape is None and config.rank == 0:
                return mixture_data(config.dim, config.components)
            return lowrank_mixture_data(config.shape, config.components, config.rank)
        case Dataset.DIGITS_GMM:
            from fpe_lab.data.digits_gmm import digits_gmm
            from fpe_lab.data.mixture import LowRankMixtureData

            return LowRankMixtureData(digits_gmm(), config.shape)
    return toy_distribution(config.name.value)
