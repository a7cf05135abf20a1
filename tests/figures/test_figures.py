"""Every figure from tiny run folders: readable, non-empty PNGs with labelled axes; bad input refused."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from matplotlib.image import imread

from fpe_lab.figures import bands, convergence, curl, density, residual, score_error, score_fields, tradeoff
from fpe_lab.figures import output as output_mod
from fpe_lab.figures.__main__ import main
from fpe_lab.figures.bands import seed_band
from fpe_lab.figures.runs import RunFolderError, load_runs
from fpe_lab.figures.style import Variant, lam_color
from fpe_lab.sde import VPSDE

MODULES = (residual, score_error, tradeoff, score_fields, curl, density, convergence)
FAST = ["--field-grid", "12", "--density-grid", "8", "--solver-grids", "12", "16", "20",
        "--field-times", "0.05", "0.5", "--curl-times", "0.05", "0.5"]
STEMS = ("fpe_residual_vs_t", "score_error_vs_t", "lambda_tradeoff", "score_fields", "curl", "density",
         "solver_convergence")


@pytest.fixture()
def record_labels(monkeypatch):
    """Wrap every module's save_figure to record the x/y labels of the data axes of each figure."""
    seen: dict[str, list[tuple[str, str]]] = {}
    real = output_mod.save_figure

    def spy(fig, folder, stem):
        # data axes: those with lines, images or collections and not a colorbar (colorbars have no xlabel+ylabel pair)
        seen[stem] = [(ax.get_xlabel(), ax.get_ylabel()) for ax in fig.axes
                      if (ax.lines or ax.images or ax.collections) and ax.get_label() != "<colorbar>"]
        return real(fig, folder, stem)

    for m in (bands, tradeoff, score_fields, curl, density, convergence):  # the modules that save figures
        monkeypatch.setattr(m, "save_figure", spy)
    return seen


def test_all_figures_from_tiny_runs(tiny_runs, tmp_path, record_labels):
    out = tmp_path / "figs"
    assert main([str(d) for d in tiny_runs] + ["--out", str(out)] + FAST) == 0
    for stem in STEMS:
        img = imread(out / f"{stem}.png")
        assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100, stem
        assert float(np.std(img)) > 0.01, f"{stem}.png is blank"  # a drawn figure has contrast
        assert (out / f"{stem}.pdf").stat().st_size > 1000, stem
        lines = (out / f"{stem}.csv").read_text().splitlines()
        assert len(lines) >= 2 and "," in lines[0], stem
        axes = record_labels[stem]
        assert axes, f"{stem}: no data axes"
        for xl, yl in axes:
            assert xl.strip() and yl.strip(), f"{stem}: an axis without a label ({xl!r}, {yl!r})"
    assert not [p for p in out.iterdir() if p.name.startswith(".")], "staging folder left behind"


def test_per_time_csv_holds_the_plotted_numbers(tiny_runs, tmp_path):
    runs = load_runs(tiny_runs)
    residual.make(runs, tmp_path)
    rows = [r.split(",") for r in (tmp_path / "fpe_residual_vs_t.csv").read_text().splitlines()[1:]]
    dsm = [r for r in rows if r[0] == "fpe_residual" and float(r[1]) == 0 and float(r[2]) == runs[0].times[0]]
    vals = [r.report.per_time.fpe_residual[0] for r in runs if r.lam == 0]
    assert len(dsm) == 1
    # geometric mean of the two seeds, written with 10 significant digits
    assert float(dsm[0][4]) == pytest.approx(np.sqrt(vals[0] * vals[1]), rel=1e-9)


def test_seed_band_is_geometric():
    m, lo, hi = seed_band([[1.0, 10.0], [100.0, 10.0]])
    assert m == pytest.approx([10.0, 10.0], rel=1e-12)  # float64 round-off
    assert lo[1] == pytest.approx(10.0) and hi[1] == pytest.approx(10.0)  # identical seeds: no band
    assert lo[0] < 10 < hi[0]
    with pytest.raises(ValueError, match="positive"):
        seed_band([[1.0, -1.0]])


def test_fitted_order_of_exact_power_law():
    n = [10, 20, 40]
    assert convergence.fitted_order(n, [3.0 * v**-2.0 for v in n]) == pytest.approx(2.0, abs=1e-12)  # exact power law
    with pytest.raises(ValueError, match="grids"):
        convergence.solver_errors(VPSDE(), grids=(16, 12, 20))


def test_solver_is_second_order():
    rows = convergence.solver_errors(VPSDE(), grids=(16, 24, 32), progress=False)
    order = convergence.fitted_order([r["n"] for r in rows], [r["density_l1"] for r in rows])
    assert 1.6 < order < 2.8, rows  # 2nd-order scheme; coarse grids are pre-asymptotic (measured 2.2–2.5)


def test_palette_is_consistent():
    def rgb(hex_color):
        return tuple(int(hex_color[i:i + 2], 16) / 255 for i in (1, 3, 5))

    assert lam_color(0.0, [0.0, 0.1, 1.0]) == pytest.approx(rgb(Variant.DSM.color))
    assert lam_color(1.0, [0.0, 0.1, 1.0]) == pytest.approx(rgb(Variant.DSM_FPE.color))
    with pytest.raises(ValueError, match="lam"):
        lam_color(0.5, [0.0, 0.1, 1.0])


# ---------------------------------------------------------------------- bad input
def _fails(argv, capsys) -> str:
    assert main(argv) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]
    assert len(err) == 1 and err[0].startswith("error: "), err  # one line, no traceback (progress bars aside)
    return err[0]


def test_missing_folder(tiny_runs, tmp_path, capsys):
    out = tmp_path / "figs"
    msg = _fails([str(tiny_runs[0]), str(tmp_path / "nope"), "--out", str(out)] + FAST, capsys)
    assert "nope" in msg and "does not exist" in msg
    assert not out.exists()


def test_incomplete_folder(tiny_runs, tmp_path, capsys):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_runs[0], broken)
    (broken / "metrics.json").unlink()
    out = tmp_path / "figs"
    msg = _fails([str(broken), str(tiny_runs[2]), "--out", str(out)] + FAST, capsys)
    assert str(broken) in msg and "metrics.json" in msg
    data = json.loads((tiny_runs[0] / "metrics.json").read_text())
    del data["per_time"]["score_error"]
    (broken / "metrics.json").write_text(json.dumps(data))
    msg = _fails([str(broken), "--out", str(out)] + FAST, capsys)
    assert str(broken) in msg and "per_time.score_error" in msg
    (broken / "metrics.json").write_text(json.dumps(json.loads((tiny_runs[0] / "metrics.json").read_text())))
    (broken / "checkpoint.pt").unlink()
    msg = _fails([str(broken), str(tiny_runs[2]), "--out", str(out)] + FAST, capsys)
    assert str(broken) in msg and "checkpoint.pt" in msg
    assert not out.exists()


def test_unfinished_run_names_steps_done_and_planned(tiny_runs, tmp_path, capsys):
    grown = tmp_path / "grown"
    shutil.copytree(tiny_runs[0], grown)
    config = json.loads((grown / "config.json").read_text())
    config["optim"]["steps"] = 8  # planned 8, trained 4: an interrupted (or growing) run
    (grown / "config.json").write_text(json.dumps(config))
    out = tmp_path / "figs"
    msg = _fails([str(grown), str(tiny_runs[2]), "--out", str(out)] + FAST, capsys)
    assert str(grown) in msg and "not finished" in msg and "4 of 8" in msg
    with pytest.raises(RunFolderError, match="4 of 8"):
        load_runs([tiny_runs[2], grown])
    config["optim"]["steps"] = 4
    (grown / "config.json").write_text(json.dumps(config))
    metrics = json.loads((grown / "metrics.json").read_text())
    metrics["step"] = 2  # a report of older weights than the checkpoint's
    (grown / "metrics.json").write_text(json.dumps(metrics))
    msg = _fails([str(grown), str(tiny_runs[2]), "--out", str(out)] + FAST, capsys)
    assert str(grown) in msg and "not finished" in msg and "step 2" in msg
    assert not out.exists()


def test_sde_coefficients_must_match(tiny_runs, tmp_path):
    other = tmp_path / "other_beta"
    shutil.copytree(tiny_runs[2], other)
    config = json.loads((other / "config.json").read_text())
    config["sde"]["beta_max"] = 10.0  # same SDE kind, another forward process
    (other / "config.json").write_text(json.dumps(config))
    with pytest.raises(RunFolderError, match="SDE coefficients") as e:
        load_runs([tiny_runs[0], other])
    assert str(other) in str(e.value) and "beta_max=10" in str(e.value)


def test_runs_read_lam_and_report(tiny_runs):
    runs = load_runs(tiny_runs)
    assert [(r.lam, r.seed) for r in runs] == [(0.0, 0), (0.0, 1), (0.1, 0), (0.1, 1)]
    assert [r.variant for r in runs] == [Variant.DSM] * 2 + [Variant.DSM_FPE] * 2
    assert all(r.report.step == 4 and r.times == [0.05, 0.2, 0.5, 1.0] for r in runs)
    with pytest.raises(RunFolderError, match="given twice"):
        load_runs([tiny_runs[0], tiny_runs[0]])


def test_mismatched_sde_and_missing_variant(tiny_runs, ve_run, tmp_path, capsys):
    out = tmp_path / "figs"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    msg = _fails([str(tiny_runs[0]), str(ve_run), "--out", str(out)] + FAST, capsys)
    assert str(ve_run) in msg and "SDE" in msg and "ve" in msg
    msg = _fails([str(tiny_runs[0]), str(tiny_runs[1]), "--out", str(out)] + FAST, capsys)
    assert "DSM+FPE" in msg
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]  # nothing written, nothing removed


def test_failure_mid_way_writes_nothing(tiny_runs, tmp_path, monkeypatch, capsys):
    def boom(*args, **kwargs):
        raise RunFolderError("density failed")

    monkeypatch.setattr(tradeoff, "make", boom)  # third figure: the first two are already drawn when it fails
    out = tmp_path / "figs"
    assert "density failed" in _fails([str(d) for d in tiny_runs] + ["--out", str(out)] + FAST, capsys)
    assert not out.exists()  # a folder the call created is removed again
    out.mkdir()
    (out / "keep.txt").write_text("x")
    assert "density failed" in _fails([str(d) for d in tiny_runs] + ["--out", str(out)] + FAST, capsys)
    # the residual/score figures drawn before the failure were not moved in; the existing file is kept
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]


def test_bad_options(tiny_runs, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:  # argparse-level: one line, exit code 2
        main([str(tiny_runs[0]), "--field-times", "0", "--out", str(tmp_path)])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "(0, 1]" in err and len(err.strip().splitlines()) == 1
    msg = _fails([str(tiny_runs[0]), "--solver-grids", "16", "32", "--out", str(tmp_path)] , capsys)
    assert "solver_grids" in msg


def test_an_unwritable_out_is_one_error_line_with_exit_1(tiny_runs, tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")  # --out under a file: the folder cannot be made (as read-only, for root too)
    assert main([str(d) for d in tiny_runs] + ["--out", str(blocker / "figs")] + FAST) == 1
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]
    assert len(err) == 1 and "cannot write the figures" in err[0] and "a_file" in err[0], err
