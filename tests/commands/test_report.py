"""`report STUDY_DIR`: the tables of any study folder, from relative or absolute paths, written only where asked."""

from __future__ import annotations

import os

from fpe_lab import run as cli
from fpe_lab.config import toy2d
from fpe_lab.study import StudyPlan, parse_grid, run_study

TINY = {("optim", "batch"): 16, ("optim", "steps"): 4, ("eval", "points"): 4, ("eval", "nll_points"): 0,
        ("eval", "samples"): 0, ("eval", "times"): (0.5,), ("model", "width"): 16}


def test_report_writes_one_table_per_metric_from_any_path(tmp_path, capsys):
    study = tmp_path / "study"
    plan = StudyPlan(base=toy2d().override(TINY), arms=tuple(parse_grid(["reg=none,fpe", "lam=0.01"])), seeds=(0, 1),
                     pretrain_steps=4)
    run_study(plan, study, progress=False)
    assert not (study / "summary.md").exists()  # run_study itself writes no summary
    elsewhere = tmp_path / "tables"
    assert cli.main(["report", str(study.resolve()), "--out", str(elsewhere)]) == 0
    md = (elsewhere / "summary.md").read_text()
    assert "### fpe_residual_rel" in md and "| pretrained |" in md and "control arm `reg=none`" in md
    assert "| reg=fpe lam=0.01 |" in md and not (study / "summary.md").exists()
    cwd = os.getcwd()
    try:
        os.chdir(tmp_path)
        assert cli.main(["report", "study"]) == 0  # relative path, default --out: the study folder
    finally:
        os.chdir(cwd)
    assert (study / "summary.md").read_text() == md


def test_report_of_a_folder_without_a_plan_is_one_error_line(tmp_path, capsys):
    assert cli.main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "study.json" in err[0]
