"""``python -m fpe_lab.run groundtruth`` on tiny grids: outputs, refusal to overwrite, the error contract."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest

from fpe_lab import run
from fpe_lab.commands import groundtruth as gt_cli
from fpe_lab.groundtruth import BoundaryWarning, ResolutionWarning


def _main(argv):
    """``run.main`` with exit codes from argparse (SystemExit) returned like the handler's."""
    with warnings.catch_warnings():
        # a 24² grid does not resolve the checkerboard; the warnings are the point of other tests
        warnings.simplefilter("ignore", ResolutionWarning)
        warnings.simplefilter("ignore", BoundaryWarning)
        try:
            return run.main(argv)
        except SystemExit as e:
            return e.code


def _error_lines(capsys) -> list[str]:
    """The ``error:`` lines on stderr (tqdm progress bars share stderr when the solve ran)."""
    return [line for line in capsys.readouterr().err.splitlines() if "error:" in line]


def _small(out, *extra):
    return ["groundtruth", "--data", "gmm", "--grid", "16", "--times", "0.5", "--out", str(out), *extra]


def test_cli_writes_solution_and_figure_into_the_folder(tmp_path):
    # unrelated files whose names the old suffix-swapping scheme derived from --out run.v2
    for name in ("run.npz", "run.png"):
        (tmp_path / name).write_text("keep me")
    out = tmp_path / "run.v2"
    argv = ["groundtruth", "--data", "checkerboard", "--sde", "vp", "--grid", "24", "--times", "0.1", "0.5", "1",
            "--out", str(out)]
    assert _main(argv) == 0
    with np.load(out / "solution.npz") as z:
        assert z["density"].shape == (3, 24, 24)
        assert z["log_density"].shape == (3, 24, 24)
        assert z["score"].shape == (3, 24, 24, 2)
        np.testing.assert_array_equal(z["times"], [0.1, 0.5, 1.0])
        params = json.loads(str(z["sde_params"]))
        assert params["class"] == "VPSDE" and params["beta_max"] == 20.0
        dx = np.diff(z["x"])[0] * np.diff(z["y"])[0]
        # the box holds ~all mass once the kernel spans cells (t = 0.1 is under-resolved at 24², and warns)
        np.testing.assert_allclose(z["density"][1:].sum(axis=(1, 2)) * dx, 1.0, atol=1e-6)
        # every cell finite at every time (t = 0.1: a kernel narrower than 2 cells), none marked unresolved
        assert np.isfinite(z["score"]).all() and np.isfinite(z["log_density"]).all()
        assert z["unresolved"].shape == (3, 24, 24) and not z["unresolved"].any()
    assert (out / "solution.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in out.iterdir()) == ["solution.npz", "solution.png"]  # no temp files left
    assert (out / "solution.npz").stat().st_mode & 0o777 == 0o644
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.npz", "run.png", "run.v2"]
    assert (tmp_path / "run.npz").read_text() == (tmp_path / "run.png").read_text() == "keep me"


def test_cli_refuses_existing_outputs_without_overwrite(tmp_path, capsys):
    out = tmp_path / "gt"
    assert _main(_small(out, "--no-figure")) == 0
    first = (out / "solution.npz").read_bytes()
    capsys.readouterr()
    assert _main(_small(out, "--no-figure")) == 2
    npz = out / "solution.npz"
    assert capsys.readouterr().err.splitlines() == [
        f"error: {npz} exists; pass --overwrite to replace it, or choose another --out"]
    assert (out / "solution.npz").read_bytes() == first
    assert sorted(p.name for p in out.iterdir()) == ["solution.npz"]

    # a figure alone also belongs to a previous solution, even when this run would not write one
    npz.unlink()
    (out / "solution.png").write_text("old figure")
    assert _main(_small(out, "--no-figure")) == 2
    assert _error_lines(capsys) == [
        f"error: {out / 'solution.png'} exists; pass --overwrite to replace it, or choose another --out"]
    assert sorted(p.name for p in out.iterdir()) == ["solution.png"]

    # --overwrite replaces; with --no-figure the old figure goes, so it cannot be taken for the new solution's
    assert _main(_small(out, "--no-figure", "--overwrite")) == 0
    assert sorted(p.name for p in out.iterdir()) == ["solution.npz"]
    assert (out / "solution.npz").read_bytes() == first  # same input, same arrays
    assert _main(["groundtruth", "--data", "gmm", "--grid", "16", "--times", "0.2", "--out", str(out),
                  "--overwrite"]) == 0
    with np.load(out / "solution.npz") as z:
        np.testing.assert_array_equal(z["times"], [0.2])
    assert sorted(p.name for p in out.iterdir()) == ["solution.npz", "solution.png"]


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--times", "0.5", "0.1"], "error: --times must be strictly increasing; got [0.5, 0.1]"),
        (["--grid", "4"], "error: python -m fpe_lab.run groundtruth: argument --grid: expected an integer in [8, 4096]; got 4"),
        (["--times", "1.5"], "error: python -m fpe_lab.run groundtruth: argument --times: expected a time in [0, 1]; got 1.5"),
        (["--sde", "ve", "--grid", "8"],
         "error: --grid 8 is too coarse for --data checkerboard --sde ve up to t = 1: the box [-405.2, 405.2] makes "
         "cells 101 wide, and the data box [-5.2, 5.2] must span at least 2 cells per axis for p_0 to be sampled; "
         "use --grid >= 156"),
        (["--sde", "subvp", "--method", "separable", "--grid", "16"],
         "error: --method separable cannot solve --sde subvp: it needs a drift that is a constant multiple of ½g²·x "
         "(VE, VP; not sub-VP); use --method convolution, finite_volume or log_density"),
    ],
    ids=["times-order", "grid-range", "time-range", "grid-too-coarse", "separable-subvp"],
)
def test_cli_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path, capsys, extra, message):
    (tmp_path / "unrelated.npz").write_text("keep me")
    assert _main(["groundtruth", "--out", str(tmp_path / "gt"), *extra]) == 2
    assert capsys.readouterr().err.splitlines() == [message]
    assert [p.name for p in tmp_path.iterdir()] == ["unrelated.npz"]


def test_cli_grid_check_admits_the_smallest_grid_it_names(tmp_path):
    """--grid 156 (the minimum named above for VE) solves; the check does not reject usable grids."""
    argv = ["groundtruth", "--sde", "ve", "--grid", "156", "--times", "1", "--out", str(tmp_path / "gt"), "--no-figure"]
    assert _main(argv) == 0
    with np.load(tmp_path / "gt" / "solution.npz") as z:
        assert np.isfinite(z["density"]).all() and z["density"].max() > 0


def test_cli_bad_input_from_a_shell_is_one_line(tmp_path):
    """The real entry point: no traceback, no warnings, exactly one stderr line, exit 2."""
    cmd = [sys.executable, "-m", "fpe_lab.run", "groundtruth", "--sde", "ve", "--grid", "8", "--out", str(tmp_path / "gt")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 2, proc.stderr
    assert len(proc.stderr.splitlines()) == 1 and proc.stderr.startswith("error: --grid 8 is too coarse"), proc.stderr
    assert list(tmp_path.iterdir()) == []


def test_cli_out_under_a_file_or_on_a_file_is_exit_1(tmp_path, capsys):
    blocker = tmp_path / "afile"
    blocker.write_text("keep me")
    assert _main(_small(blocker / "sub")) == 1
    assert capsys.readouterr().err.splitlines() == [
        f"error: --out {blocker / 'sub'}: {blocker} is a file, not a folder; choose an --out inside a folder"]
    assert _main(_small(blocker)) == 1
    assert capsys.readouterr().err.splitlines() == [
        f"error: --out {blocker} is a file, not a folder: pass a folder path (it receives solution.npz and solution.png)"]
    assert blocker.read_text() == "keep me" and [p.name for p in tmp_path.iterdir()] == ["afile"]


def test_cli_unwritable_folder_is_exit_1_before_solving(tmp_path, capsys, monkeypatch):
    import fpe_lab.groundtruth as gt

    def must_not_solve(*args, **kwargs):
        raise AssertionError("solved although the output folder is unwritable")

    monkeypatch.setattr(gt, "solve_fokker_planck", must_not_solve)
    locked = tmp_path / "locked"
    locked.mkdir()
    if os.geteuid() == 0:  # root writes through chmod 0o500: make os.access answer as for an ordinary user
        monkeypatch.setattr(gt_cli.os, "access", lambda path, mode: os.fspath(path) != os.fspath(locked))
    else:
        locked.chmod(0o500)
    try:
        assert _main(_small(locked / "gt")) == 1
    finally:
        locked.chmod(0o700)
    assert capsys.readouterr().err.splitlines() == [
        f"error: --out {locked / 'gt'}: cannot write in {locked} (permission denied); choose a writable folder or "
        "change its permissions"]
    assert list(locked.iterdir()) == []


def test_cli_disk_full_while_writing_is_exit_1_one_line(tmp_path, capsys, monkeypatch):
    def full(path, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(gt_cli, "atomic_write_bytes", full)
    out = tmp_path / "gt"
    assert _main(_small(out)) == 1
    assert _error_lines(capsys) == [
        f"error: cannot write {out / 'solution.npz'}: No space left on device; check the folder's permissions and "
        "free space, or choose another --out"]
    assert list(out.iterdir()) == []


def test_cli_failed_solve_writes_nothing(tmp_path, monkeypatch, capsys):
    import fpe_lab.groundtruth as gt

    def boom(*args, **kwargs):
        raise RuntimeError("solver died")

    monkeypatch.setattr(gt, "solve_fokker_planck", boom)
    argv = ["groundtruth", "--grid", "16", "--times", "0.5", "--out", str(tmp_path / "gt")]
    assert _main(argv) == 1  # an unexpected error: one line, no traceback (fpe_lab.run's contract)
    assert _error_lines(capsys) == ["error: unexpected RuntimeError: solver died (rerun with --debug for the traceback)"]
    with pytest.raises(RuntimeError, match="solver died"):
        _main(["--debug", *argv])
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
    with np.load(out / "solution.npz") as z:
        assert str(z["method"]) == "log_density"
        x, y = np.meshgrid(z["x"], z["y"], indexing="ij")
        pts = torch.tensor(np.stack([x.ravel(), y.ravel()], 1))
        exact = toy_distribution("gmm").perturbed_score(pts, 0.5, VPSDE()).numpy().reshape(48, 48, 2)
        err = np.abs(z["score"][0] - exact).max()  # every cell, down to the walls (p ~ 1e-14·max)
    # O(h²) at h = 0.33 on scores of size ~2: ~1e-2 (a p-based start from an underflowed grid density fails here)
    assert np.isfinite(err) and err < 5e-2, err


def test_cli_readme_example_is_clean(tmp_path, capsys):
    """The README's command at a smaller grid: t = 0.01 has a kernel of 0.5 cell, and every cell of every
    time is finite, nothing is unresolved, no warning is printed, and the bulk matches the exact score."""
    import torch

    from fpe_lab.data import toy_distribution
    from fpe_lab.sde import VPSDE

    out = tmp_path / "gt"
    argv = ["groundtruth", "--data", "checkerboard", "--sde", "vp", "--grid", "192", "--times", "0.01", "0.1", "1",
            "--out", str(out), "--no-figure"]
    assert run.main(argv) == 0
    assert [line for line in capsys.readouterr().err.splitlines() if "warning" in line.lower()] == []
    with np.load(out / "solution.npz") as z:
        assert np.isfinite(z["score"]).all() and np.isfinite(z["log_density"]).all() and not z["unresolved"].any()
        x, y = np.meshgrid(z["x"], z["y"], indexing="ij")
        pts = torch.tensor(np.stack([x.ravel(), y.ravel()], 1))
        data = toy_distribution("checkerboard")
        exact = data.perturbed_score(pts, 0.01, VPSDE()).numpy().reshape(192, 192, 2)
        lp = data.perturbed_log_prob(pts, 0.01, VPSDE()).numpy().reshape(192, 192)
        bulk = lp - lp.max() >= np.log(1e-6)
        # band-limited sums where p ≥ 1e-6·max: round-off (measured 5e-9 at 256²)
        assert np.abs(z["score"][0] - exact)[bulk].max() < 1e-6
        assert z["log_density"][0].min() - z["log_density"][0].max() < -300  # the tails are there, in log space


def test_cli_refuses_a_time_below_the_grid_resolution(tmp_path, capsys):
    """--times 1e-300: one error line naming the time and the smallest one the grid resolves; exit 2,
    nothing written (it used to write p_t with zero mass)."""
    out = tmp_path / "gt"
    assert _main(["groundtruth", "--data", "gmm", "--grid", "32", "--times", "1e-300", "0.5", "--out", str(out)]) == 2
    lines = _error_lines(capsys)
    assert len(lines) == 1 and lines[0].startswith("error: t = 1e-300 is below what the grid resolves"), lines
    assert "the smallest time this grid resolves is t = " in lines[0]
    assert not out.exists()


def test_cli_prints_each_solver_warning_as_one_line(tmp_path, capsys):
    """Cells a p-based solver leaves at p = 0 are marked in the file and reported by one warning line with
    their count and the remedy."""
    out = tmp_path / "gt"
    argv = ["groundtruth", "--data", "checkerboard", "--grid", "48", "--times", "1e-6", "1", "--method", "finite_volume",
            "--n-steps", "4", "--out", str(out), "--no-figure"]
    assert run.main(argv) == 0
    warned = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning: ")]
    with np.load(out / "solution.npz") as z:
        count = int(z["unresolved"].sum())
        assert count > 0
        np.testing.assert_array_equal(z["unresolved"], ~np.isfinite(z["score"]).all(-1) | ~np.isfinite(z["log_density"]))
    unresolved = [line for line in warned if "unresolved" in line]
    assert len(unresolved) == 1 and unresolved[0].startswith(f"warning: {count} grid cells are unresolved"), warned
    assert "Method.CONVOLUTION" in unresolved[0]  # the remedy


def test_abbreviated_flags_are_refused(tmp_path, capsys):
    """--overwr is not --overwrite: one error line, exit 2, nothing written (argparse would expand it)."""
    out = tmp_path / "gt"
    assert run.main(_small(out, "--no-fig")) == 2
    assert run.main(_small(out, "--overwr")) == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 2 and all(line.startswith("error: ") for line in lines), lines
    assert "--no-fig" in lines[0] and "--overwr" in lines[1]
    assert not out.exists()


def test_figures_command_refuses_abbreviated_flags(tmp_path, capsys):
    """python -m fpe_lab.figures: --solver is not --solver-grids (exit 2, one error line)."""
    from fpe_lab.figures.__main__ import build_parser

    with pytest.raises(SystemExit) as info:
        build_parser().parse_args([str(tmp_path), "--solver", "16"])
    assert info.value.code == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "--solver" in lines[0], lines
