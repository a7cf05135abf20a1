"""Smoke test of ``python -m fpe_lab.run groundtruth`` on a tiny grid."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest

from fpe_lab import run
from fpe_lab.groundtruth import BoundaryWarning, ResolutionWarning


def _main(argv):
    with warnings.catch_warnings():
        # a 24² grid does not resolve the checkerboard; the warnings are the point of other tests
        warnings.simplefilter("ignore", ResolutionWarning)
        warnings.simplefilter("ignore", BoundaryWarning)
        return run.main(argv)


def test_cli_writes_npz_and_figure(tmp_path):
    out = tmp_path / "gt"
    argv = ["groundtruth", "--data", "checkerboard", "--sde", "vp", "--grid", "24", "--times", "0.1", "0.5", "1",
            "--out", str(out)]
    assert _main(argv) == 0
    with np.load(out.with_suffix(".npz")) as z:
        assert z["density"].shape == (3, 24, 24)
        assert z["log_density"].shape == (3, 24, 24)
        assert z["score"].shape == (3, 24, 24, 2)
        np.testing.assert_array_equal(z["times"], [0.1, 0.5, 1.0])
        params = json.loads(str(z["sde_params"]))
        assert params["class"] == "VPSDE" and params["beta_max"] == 20.0
        dx = np.diff(z["x"])[0] * np.diff(z["y"])[0]
        # the box holds ~all mass once the kernel spans cells (t = 0.1 is under-resolved at 24², and warns)
        np.testing.assert_allclose(z["density"][1:].sum(axis=(1, 2)) * dx, 1.0, atol=1e-6)
        assert np.all(np.isfinite(z["score"][1:]))
        # t = 0.1: kernel narrower than 2 cells; cells below its round-off are marked, not made up
        marked = ~np.isfinite(z["score"][0]).all(-1)
        assert np.all(np.isneginf(z["log_density"][0][marked]))
    assert out.with_suffix(".png").stat().st_size > 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gt.npz", "gt.png"]  # no temp files left


def test_cli_bad_input_writes_nothing(tmp_path, capsys):
    out = tmp_path / "gt"
    assert _main(["groundtruth", "--grid", "16", "--times", "0.5", "0.1", "--out", str(out)]) == 2
    assert "strictly increasing" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        _main(["groundtruth", "--grid", "4", "--out", str(out)])
    assert e.value.code == 2
    with pytest.raises(SystemExit):
        _main(["groundtruth", "--times", "1.5", "--out", str(out)])
    assert list(tmp_path.iterdir()) == []


def test_cli_failed_solve_writes_nothing(tmp_path, monkeypatch):
    import fpe_lab.groundtruth as gt

    def boom(*args, **kwargs):
        raise RuntimeError("solver died")

    monkeypatch.setattr(gt, "solve_fokker_planck", boom)
    with pytest.raises(RuntimeError, match="solver died"):
        _main(["groundtruth", "--grid", "16", "--times", "0.5", "--out", str(tmp_path / "gt")])
    assert list(tmp_path.iterdir()) == []


def test_cli_solver_breakdown_is_one_line_exit_2(tmp_path, monkeypatch, capsys):
    import fpe_lab.groundtruth as gt

    def breakdown(*args, **kwargs):
        raise gt.SolverBreakdown("log-density solve broke down: raise n_steps")

    monkeypatch.setattr(gt, "solve_fokker_planck", breakdown)
    argv = ["groundtruth", "--grid", "16", "--times", "0.5", "--method", "log_density", "--out", str(tmp_path / "gt")]
    assert _main(argv) == 2
    assert capsys.readouterr().err.strip() == "error: log-density solve broke down: raise n_steps"
    assert list(tmp_path.iterdir()) == []


def test_cli_log_density_method_starts_from_the_exact_log_p0(tmp_path):
    import torch

    from fpe_lab.data import toy_distribution
    from fpe_lab.sde import VPSDE

    out = tmp_path / "gt"
    argv = ["groundtruth", "--data", "gmm", "--sde", "vp", "--grid", "48", "--times", "0.5", "--method", "log_density",
            "--n-steps", "60", "--out", str(out), "--no-figure"]
    assert _main(argv) == 0
    with np.load(out.with_suffix(".npz")) as z:
        assert str(z["method"]) == "log_density"
        x, y = np.meshgrid(z["x"], z["y"], indexing="ij")
        pts = torch.tensor(np.stack([x.ravel(), y.ravel()], 1))
        exact = toy_distribution("gmm").perturbed_score(pts, 0.5, VPSDE()).numpy().reshape(48, 48, 2)
        err = np.abs(z["score"][0] - exact).max()  # every cell, down to the walls (p ~ 1e-14·max)
    # O(h²) at h = 0.33 on scores of size ~2: ~1e-2 (a p-based start from an underflowed grid density fails here)
    assert np.isfinite(err) and err < 5e-2, err
