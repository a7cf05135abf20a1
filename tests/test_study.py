"""fpe_lab.study and the study command: grids over any field, paired arms, intervals, resuming."""

from __future__ import annotations

import gc
import json
import math
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from fpe_lab import config as cfg
from fpe_lab import run as cli
from fpe_lab import runs
from fpe_lab.checkpoint import load_checkpoint
from fpe_lab.regularizers.fpe import FPEWeighting
from fpe_lab.study import (
    MAX_RUNS,
    Arm,
    StudyPlan,
    parse_arm,
    parse_grid,
    run_study,
    submitit_submit,
    summarize,
    write_summary,
)

TINY = ["--width", "8", "--depth", "1", "--batch", "16", "--steps", "6", "--eval-points", "8",
        "--eval-nll-points", "3", "--eval-samples", "0", "--eval-times", "0.1", "0.5", "--eval-rtol", "1e-3"]


def _base() -> cfg.RunConfig:
    return cfg.toy2d().override({("model", "width"): 8, ("model", "depth"): 1, ("optim", "batch"): 16,
                                 ("optim", "steps"): 6, ("eval", "points"): 8, ("eval", "nll_points"): 3,
                                 ("eval", "samples"): 0, ("eval", "times"): (0.1, 0.5), ("eval", "rtol"): 1e-3})


def test_grid_is_the_cartesian_product_and_merges_equal_arms():
    arms = parse_grid(["reg=none,fpe", "lam=0.01,0.1", "fpe_weighting=g2,normalized"])
    assert len(arms) == 8 and arms[0].name == "reg=none lam=0.01 fpe_weighting=g2"
    plan = StudyPlan(_base(), tuple(arms), seeds=(0, 1))
    # reg=none with any lam or weighting is the one plain-DSM arm; 1 + 2 × 2 fpe arms remain
    assert len(plan.arms) == 5 and plan.arms[0].apply(plan.base).loss.reg.kind == "none"
    c = plan.arms[-1].apply(plan.base)
    assert c.loss.reg.lam == 0.1 and c.loss.reg.options.weighting is FPEWeighting.NORMALIZED


@pytest.mark.parametrize("items, match", [
    (["nope=1,2"], "'nope' is not a configuration field"),
    (["lam=0.1,x"], "'x' is not a number"),
    (["reg=fpe,bad"], "reg must be one of"),
    (["lam"], "expected FIELD=V1,V2"),
    (["lam=0.1", "lam=0.2"], "twice"),
    (["lam=-1"], "lam must be a finite number"),
])
def test_bad_grids_are_refused(items, match):
    with pytest.raises(ValueError, match=match):
        StudyPlan(_base(), tuple(parse_grid(items)), seeds=(0,))


def test_arms_of_one_seed_share_their_randomness(tmp_path):
    plan = StudyPlan(_base(), tuple(parse_grid(["lam=0,0.5"])), seeds=(0, 1))
    folders = run_study(plan, tmp_path, progress=False)
    dsm0, fpe0, dsm1, fpe1 = (load_checkpoint(runs.run_dir(plan.config(a, s, tmp_path), tmp_path) / "checkpoint.pt")
                              for a in plan.arms for s in plan.seeds)
    # same seed: equal initial data/noise generator seeds, hence equal first DSM loss values (the first step's
    # DSM term depends only on the shared initialisation and draws); different seeds differ
    h = [runs.read_history(f) for f in folders]
    assert h[0][0]["dsm"] == h[2][0]["dsm"] and h[1][0]["dsm"] == h[3][0]["dsm"]
    assert h[0][0]["dsm"] != h[1][0]["dsm"]
    assert dsm0["step"] == fpe0["step"] == dsm1["step"] == fpe1["step"] == 6


def test_paired_interval_against_a_hand_computation(tmp_path):
    plan = StudyPlan(_base(), tuple(parse_grid(["lam=0,1"])), seeds=(0, 1, 2))
    run_study(plan, tmp_path, progress=False)
    rows = summarize(plan, tmp_path)
    vals = {a.name: [runs.load(runs.run_dir(plan.config(a, s, tmp_path), tmp_path)).report.mean["fpe_residual_rel"]
                     for s in plan.seeds] for a in plan.arms}
    d = [b - a for a, b in zip(vals["lam=0"], vals["lam=1"])]
    mean = sum(d) / 3
    half = 4.302652729911275 * math.sqrt(sum((x - mean) ** 2 for x in d) / 2) / math.sqrt(3)  # t_{0.975, 2}
    row = rows[1]
    assert row["arm"] == "lam=1"
    assert row["fpe_residual_rel_diff"] == pytest.approx(mean, rel=1e-12)  # float64 round-off
    assert row["fpe_residual_rel_hi"] - row["fpe_residual_rel_lo"] == pytest.approx(2 * half, rel=1e-9)
    assert row["fpe_residual_rel_sig"] == (mean - half > 0 or mean + half < 0)
    csv_path, md_path = write_summary(rows, tmp_path)
    assert "lam=1" in md_path.read_text() and "Δ" in md_path.read_text()


def test_a_killed_study_resumes_to_the_same_summary(tmp_path):
    plan = StudyPlan(_base(), tuple(parse_grid(["lam=0,0.5"])), seeds=(0, 1))
    run_study(plan, tmp_path / "full", progress=False)
    ref = summarize(plan, tmp_path / "full")
    # the "killed" study: one run finished, one interrupted (checkpoint, no metrics), two not started
    cut = tmp_path / "cut"
    first = plan.config(plan.arms[0], 0, cut)
    runs.train(first, cut, progress=False)
    half = first.override({("seed",): 1, ("optim", "steps"): 3})
    runs.train(half, cut, progress=False, evaluate_after=False)
    # the half run's folder is the full run's folder (steps are not in the name): it grows on resume
    assert runs.run_dir(half, cut) == runs.run_dir(plan.config(plan.arms[0], 1, cut), cut)
    with pytest.raises(ValueError, match="holds another study"):
        run_study(StudyPlan(_base(), tuple(parse_grid(["lam=0,0.7"])), seeds=(0, 1)), tmp_path / "full", progress=False)
    with pytest.raises(ValueError, match=r"holds another study \(differs in \['seeds'\]\)"):
        run_study(StudyPlan(_base(), plan.arms, seeds=(0,)), tmp_path / "full", progress=False)  # fewer: refused
    run_study(plan, cut, progress=False)
    got = summarize(plan, cut)
    strip = lambda rows: [{k: v for k, v in r.items() if not k.startswith("step_time")} for r in rows]  # noqa: E731
    assert strip(got) == strip(ref)


def test_summary_names_an_unreadable_run(tmp_path):
    plan = StudyPlan(_base(), tuple(parse_grid(["lam=0"])), seeds=(0,))
    (folder,) = run_study(plan, tmp_path, progress=False)
    (folder / "metrics.json").write_text("{garbage")
    with pytest.raises(ValueError, match=f"{folder.name}.*metrics.json cannot be read"):
        summarize(plan, tmp_path)


def test_pretraining_stage_and_fine_tuning(tmp_path):
    plan = StudyPlan(_base(), tuple(parse_grid(["lam=0,0.5"])), seeds=(0,), pretrain_steps=4)
    folders = run_study(plan, tmp_path, progress=False)
    pre = runs.run_dir(plan.pretrain_config(0), tmp_path / "pretrain")
    assert runs.load(pre).is_finished and runs.load(pre).config.loss.reg.kind == "none"
    for f in folders:
        c = runs.load(f).config
        assert c.optim.init_from == str(pre)
    # both arms start from the pre-trained EMA weights: their first step's DSM term is equal
    h = [runs.read_history(f) for f in folders]
    assert h[0][0]["dsm"] == h[1][0]["dsm"]


@pytest.mark.parametrize("kind", [
    pytest.param("debug", marks=pytest.mark.filterwarnings("ignore::ResourceWarning")),  # submitit's open job logs
    pytest.param("local", marks=pytest.mark.slow)])
def test_submitit_executors_run_the_same_study(kind, tmp_path):
    """DebugExecutor runs the submitted jobs in this process; LocalExecutor in subprocesses, as on a cluster
    (slow: measured ~5 min for two tiny runs on a loaded 2-core machine, mostly job start-up and polling)."""
    submitit = pytest.importorskip("submitit")
    plan = StudyPlan(_base(), tuple(parse_grid(["lam=0,0.5"])), seeds=(0,))
    make = submitit.DebugExecutor if kind == "debug" else submitit.LocalExecutor
    executor = make(folder=tmp_path / "jobs")
    if kind == "local":
        executor.update_parameters(timeout_min=10)
    folders = run_study(plan, tmp_path / "s", progress=False, submit=submitit_submit(executor))
    ref = run_study(plan, tmp_path / "r", progress=False)
    for a, b in zip(folders, ref):
        sa, sb = load_checkpoint(a / "checkpoint.pt"), load_checkpoint(b / "checkpoint.pt")
        assert all(torch.equal(sa["ema"][k], sb["ema"][k]) for k in sa["ema"])  # same run, another process
    del executor  # submitit's DebugExecutor leaves its jobs' log files open: let them go here, quietly
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        gc.collect()


def test_study_command_end_to_end(tmp_path, capsys):
    out = tmp_path / "study"
    assert cli.main(["study", "toy2d", *TINY, "--grid", "reg=none,fpe", "--seeds", "2", "--out", str(out)]) == 0
    md = (out / "summary.md").read_text()
    assert "reg=none" in md and "reg=fpe" in md
    assert json.loads((out / "study.json").read_text())["seeds"] == [0, 1]
    assert cli.main(["study", "toy2d", *TINY, "--grid", "reg=none,fpe", "--seeds", "2", "--dry-run",
                     "--out", str(out)]) == 0
    assert capsys.readouterr().out.count("done") == 4
    assert cli.main(["study", "toy2d", *TINY, "--grid", "nope=1", "--out", str(out)]) == 2
    assert "'nope' is not a configuration field" in capsys.readouterr().err
    assert cli.main(["study", "toy2d", *TINY, "--grid", "lam=0,0.3", "--seeds", "2", "--out", str(out)]) == 2
    assert "holds another study" in capsys.readouterr().err


def test_local_workers_give_the_same_runs(tmp_path):
    plan = StudyPlan(_base(), tuple(parse_grid(["lam=0,0.5"])), seeds=(0,))
    two = run_study(plan, tmp_path / "two", jobs=2, progress=False)
    one = run_study(plan, tmp_path / "one", jobs=1, progress=False)
    for a, b in zip(two, one):
        sa, sb = load_checkpoint(a / "checkpoint.pt"), load_checkpoint(b / "checkpoint.pt")
        assert all(torch.equal(sa["ema"][k], sb["ema"][k]) for k in sa["ema"])  # same run in a worker process


@pytest.mark.parametrize("item, match", [
    ("seed=1,2", "the seed is not an arm field"),
    ("steps=10,20", "steps is not an arm field"),
    ("ckpt_every=1,2", "ckpt_every is not an arm field"),
    ("keep=1,2", "keep is not an arm field"),
    ("threads=1,2", "threads is not an arm field"),
    ("device=cpu,auto", "device is not an arm field"),
    ("eval_points=8,16", "evaluation settings are not arm fields"),
    ("eval_seed=1,2", "evaluation settings are not arm fields"),
])
def test_fields_that_do_not_change_the_weights_are_not_arms(item, match):
    """Such arms were one run folder: --grid steps=10,20 trained only steps=10, seed=1,2 the seed-0 run twice."""
    with pytest.raises(ValueError, match=match):
        parse_grid([item])
    with pytest.raises(ValueError, match=match):
        parse_arm(item.split(",")[0])
    # a plan given such an arm directly (e.g. read from a study.json) refuses it too
    name = item.partition("=")[0]
    (leaf,) = [leaf for leaf in cfg.leaves() if leaf.flag.replace("-", "_") == name]
    with pytest.raises(ValueError, match=match):
        StudyPlan(_base(), (Arm(name, ((leaf.path, leaf.get(_base())),)),), seeds=(0,))


def test_a_study_has_at_most_max_runs():
    lams = ",".join(f"{k / 1000:g}" for k in range(1, MAX_RUNS + 2))
    with pytest.raises(ValueError, match=f"gives {MAX_RUNS + 1} arms .* at most {MAX_RUNS} runs"):
        parse_grid([f"lam={lams}"])
    arms = tuple(parse_grid(["lam=0.1,0.2"]))
    StudyPlan(_base(), arms, seeds=tuple(range(MAX_RUNS // 2)))
    with pytest.raises(ValueError, match=f"2 arms × {MAX_RUNS // 2 + 1} seeds .* at most {MAX_RUNS} runs"):
        StudyPlan(_base(), arms, seeds=tuple(range(MAX_RUNS // 2 + 1)))


def test_init_from_and_pretraining_exclude_each_other(tmp_path):
    arms = tuple(parse_grid(["lam=0,0.5"]))
    with pytest.raises(ValueError, match="--init-from and --pretrain-steps exclude each other"):
        StudyPlan(_base().override({("optim", "init_from"): str(tmp_path)}), arms, seeds=(0,), pretrain_steps=2)
    with pytest.raises(ValueError, match="--init-from and --pretrain-steps exclude each other"):
        StudyPlan(_base(), tuple(parse_grid([f"init_from={tmp_path}"])), seeds=(0,), pretrain_steps=2)


def test_the_star_marks_intervals_that_exclude_zero_below_and_above(tmp_path, monkeypatch):
    """Every metric is lower-is-better: a significantly negative difference (better) is starred as much as a
    significantly positive one (worse); an interval containing zero is not."""
    plan = StudyPlan(_base(), tuple(parse_grid(["lam=0,0.1,0.2,0.3"])), seeds=(0, 1, 2))
    control = [1.0, 2.0, 3.0]
    offsets = {"lam=0": [0.0, 0.0, 0.0], "lam=0.1": [-1.0, -1.1, -0.9], "lam=0.2": [1.0, 1.1, 0.9],
               "lam=0.3": [-1.0, 1.0, 0.1]}
    value = {runs.run_dir(plan.config(a, s, tmp_path), tmp_path): c + offsets[a.name][i]
             for a in plan.arms for i, (s, c) in enumerate(zip(plan.seeds, control))}

    def fake_load(folder):
        v = value[Path(folder)]
        report = SimpleNamespace(mean={"fpe_residual_rel": v, "jacobian_asymmetry_rel": v, "dsm": v}, times=(0.5,),
                                 per_time=SimpleNamespace(fpe_residual=(v,), score_error=None), nll=None, samples=None,
                                 gap=None)
        return SimpleNamespace(report=report, is_finished=True)

    monkeypatch.setattr(runs, "load", fake_load)
    monkeypatch.setattr(runs, "read_history", lambda folder: [])
    rows = {r["arm"]: r for r in summarize(plan, tmp_path)}
    better, worse, unclear = rows["lam=0.1"], rows["lam=0.2"], rows["lam=0.3"]
    assert better["dsm_hi"] < 0 and better["dsm_sig"] is True
    assert worse["dsm_lo"] > 0 and worse["dsm_sig"] is True
    assert unclear["dsm_lo"] < 0 < unclear["dsm_hi"] and unclear["dsm_sig"] is False
    _, md = write_summary(list(rows.values()), tmp_path)
    dsm_table = md.read_text().split("### dsm\n", 1)[1].split("###", 1)[0]
    cells = {line.split("|")[1].strip(): line.split("|")[3] for line in dsm_table.splitlines()
             if line.startswith("| lam=")}  # the Δ column of the dsm table
    assert cells["lam=0.1"].strip().endswith("*") and cells["lam=0.2"].strip().endswith("*")
    assert "*" not in cells["lam=0.3"] and "[" in cells["lam=0.3"] and cells["lam=0"].strip() == "—"


def test_a_finished_study_grows_by_seeds_in_place(tmp_path):
    small = StudyPlan(_base(), tuple(parse_grid(["lam=0,0.5"])), seeds=(0,))
    run_study(small, tmp_path, progress=False)
    first = runs.run_dir(small.config(small.arms[1], 0, tmp_path), tmp_path)
    stamp = (first / "metrics.json").stat().st_mtime_ns
    big = StudyPlan(_base(), small.arms, seeds=(0, 1))
    run_study(big, tmp_path, progress=False)
    assert (first / "metrics.json").stat().st_mtime_ns == stamp  # the seed-0 runs were not trained again
    assert StudyPlan.load(tmp_path).seeds == (0, 1) and len(summarize(big, tmp_path)) == 2
    assert all(r["n_seeds"] == 2 for r in summarize(big, tmp_path))


def test_studies_under_finds_each_study_folder_by_name(tmp_path, monkeypatch):
    from fpe_lab.study import _check_plan, studies_under

    plan = StudyPlan(_base(), tuple(parse_grid(["lam=0,0.5"])), seeds=(0,))
    for name in ("b", "a"):
        _check_plan(plan, tmp_path / "root" / name)  # writes study.json, trains nothing
    (tmp_path / "root" / "not_a_study").mkdir()
    monkeypatch.chdir(tmp_path)
    found = studies_under("root")  # a relative root
    assert list(found) == ["a", "b"] and found["a"][1] == (tmp_path / "root" / "a").resolve()
    assert found["b"][0].to_dict() == plan.to_dict()
    with pytest.raises(ValueError, match="no study folder"):
        studies_under(tmp_path / "root" / "not_a_study")
