"""The study runner: one run folder per (λ, seed), finished runs skipped, summary table, bad input."""

from __future__ import annotations

import json

import pytest

from fpe_lab.commands.toy2d import run_dir_name
from fpe_lab.run import main as run_main
from fpe_lab.study import StudyPlan, run_study, summarize, write_summary

from conftest import make_run_folder, tiny_config  # tests/figures/conftest.py (rootdir-relative import)


def test_grid_is_complete_and_second_call_skips(tiny_runs, tmp_path):
    assert len(tiny_runs) == 4 and all((d / "metrics.json").is_file() for d in tiny_runs)
    cfgs = [json.loads((d / "config.json").read_text()) for d in tiny_runs]
    assert [(c["reg"], c["seed"]) for c in cfgs] == [("none", 0), ("none", 1), ("fpe", 0), ("fpe", 1)]
    calls = []

    def counting(config, out):
        calls.append(config)
        return make_run_folder(config, out)

    plan = StudyPlan(base=tiny_config(), lams=(0.0, 0.1), seeds=(0, 1))
    again = run_study(plan, tiny_runs[0].parent, counting, run_dir_name, progress=False)
    assert again == tiny_runs and calls == []  # everything finished: nothing retrained
    # 2×1 grid in a fresh folder: λ = 0 finished, λ = 0.1 interrupted (config, no metrics): only the latter runs
    small = StudyPlan(base=tiny_config(), lams=(0.0, 0.1), seeds=(0,))
    make_run_folder(small.configs()[0], tmp_path)
    interrupted = tmp_path / run_dir_name(small.configs()[1])
    interrupted.mkdir()
    (interrupted / "config.json").write_text(json.dumps(small.configs()[1].to_dict()))
    run_study(small, tmp_path, counting, run_dir_name, progress=False)
    assert [c.lam for c in calls] == [0.1] and (interrupted / "metrics.json").is_file()


def test_summary_mean_and_std(tiny_runs, tmp_path):
    rows = summarize(tiny_runs)
    assert [r["lam"] for r in rows] == [0.0, 0.1] and [r["n_runs"] for r in rows] == [2, 2]
    vals = [json.loads((d / "metrics.json").read_text())["mean"]["score_error"] for d in tiny_runs[:2]]
    mean = sum(vals) / 2
    assert rows[0]["score_error_mean"] == pytest.approx(mean, rel=1e-12)  # float64 round-off
    assert rows[0]["score_error_std"] == pytest.approx(abs(vals[0] - vals[1]) / 2**0.5, rel=1e-12)  # n−1 std of two
    csv_path, md_path = write_summary(rows, tmp_path)
    assert csv_path.read_text().splitlines()[0].startswith("lam,method,n_runs,fpe_residual_mean")
    md = md_path.read_text()
    assert "| 0 | DSM | 2 |" in md and "| 0.1 | DSM+FPE | 2 |" in md and " ± " in md


def test_folder_with_other_config_is_refused(tmp_path):
    plan = StudyPlan(base=tiny_config(), lams=(0.1,), seeds=(0,))
    run_dir = tmp_path / run_dir_name(plan.configs()[0])
    run_dir.mkdir()
    other = plan.configs()[0].replace(eval_points=33)
    (run_dir / "config.json").write_text(json.dumps(other.to_dict()))
    with pytest.raises(ValueError, match="different config"):
        run_study(plan, tmp_path, make_run_folder, run_dir_name, progress=False)


@pytest.mark.parametrize("kw, match", [
    (dict(lams=(), seeds=(0,)), "lams"),
    (dict(lams=(-1.0,), seeds=(0,)), "lams"),
    (dict(lams=(0.1, 0.1), seeds=(0,)), "repeat"),
    (dict(lams=(0.1,), seeds=(0, 0)), "repeat"),
    (dict(lams=(0.1,), seeds=(-1,)), "seeds"),
])
def test_plan_validation(kw, match):
    with pytest.raises(ValueError, match=match):
        StudyPlan(base=tiny_config(), **kw)


def test_cli_dry_run_and_bad_input(tiny_runs, tmp_path, capsys):
    out = tiny_runs[0].parent
    assert run_main(["study", "toy2d", "--lam", "0", "0.1", "--seeds", "2", "--steps", "4", "--batch", "32",
                     "--out", str(tmp_path / "s"), "--dry-run"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 4 and all(line.startswith("todo") for line in lines)
    (tmp_path / "file").write_text("x")
    assert run_main(["study", "toy2d", "--out", str(tmp_path / "file"), "--dry-run"]) == 2
    assert "is a file" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        run_main(["study", "toy2d", "--lam", "-1"])
    assert e.value.code == 2
    assert "--lam" in capsys.readouterr().err
    assert out.is_dir()
