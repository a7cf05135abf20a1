"""Run configs (fpe_lab/config.py): JSON round trips of every preset and their validation."""

import pytest

from fpe_lab.config import ImageConfig, ImageData, Toy2dConfig, cifar10, digits, toy2d
from fpe_lab.nets.unet import UNetSize


@pytest.mark.parametrize("preset", [toy2d, cifar10, digits], ids=lambda f: f.__name__)
def test_presets_round_trip_through_json(preset):
    config = preset()
    again = type(config).from_json(config.to_json())
    assert again == config and hash(again) == hash(config)


def test_digits_preset_and_tuple_fields():
    d = digits(model=UNetSize.SMALL)
    assert d.data is ImageData.DIGITS and d.image_shape == (1, 8, 8) and not d.hflip
    assert isinstance(ImageConfig.from_dict(d.to_dict()).image_shape, tuple)  # JSON lists come back as tuples


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: ImageConfig.from_dict({"model": "huge"}), r"model must be one of \['tiny'"),
        (lambda: ImageConfig.from_dict({"sizes": 1}), r"unknown config keys \['sizes'\] for ImageConfig"),
        (lambda: ImageConfig(model="tiny"), r"model must be a UNetSize"),
        (lambda: cifar10(probes=0), r"probes must be an int >= 1"),
        (lambda: cifar10(fd_step=0.0), r"fd_step must be a finite number"),
        (lambda: Toy2dConfig.from_json("{"), r"not valid JSON"),
        (lambda: Toy2dConfig.from_dict([1]), r"must be a JSON object"),
    ],
)
def test_bad_configs_name_the_field(make, match):
    with pytest.raises(ValueError, match=match):
        make()
