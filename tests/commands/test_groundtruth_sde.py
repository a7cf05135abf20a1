"""The groundtruth command builds its SDE through the run builder, with the training flags."""

from __future__ import annotations

import json

import numpy as np

from fpe_lab import run as cli


def test_groundtruth_takes_the_training_sde_flags(tmp_path):
    rc = cli.main(["groundtruth", "--data", "gmm", "--sde", "vp", "--beta-max", "10", "--grid", "64", "--times", "0.5",
                   "--no-figure", "--out", str(tmp_path)])
    assert rc == 0
    params = json.loads(str(np.load(tmp_path / "solution.npz")["sde_params"]))
    assert params["class"] == "VPSDE" and params["beta_max"] == 10.0 and params["beta_min"] == 0.1


def test_groundtruth_refuses_bad_sde_coefficients_like_training(tmp_path, capsys):
    assert cli.main(["groundtruth", "--sde", "ve", "--sigma-max", "0.001", "--out", str(tmp_path)]) == 2
    assert "sigma_max must be a finite number" in capsys.readouterr().err
