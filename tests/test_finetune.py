"""Fine-tuning that continues training: --init-from with --init-state continue (the default) carries the
source's weights, EMA and Adam state over; the study's pre-trained model is a summary row."""

from __future__ import annotations

import json
import os

import torch

from fpe_lab import runs
from fpe_lab.checkpoint import load_checkpoint
from fpe_lab.config import RunConfig, toy2d
from fpe_lab.study import PRETRAINED, StudyPlan, parse_grid, run_study, summarize
from fpe_lab.train import ema_decay_at

TINY = {("optim", "batch"): 16, ("eval", "points"): 4, ("eval", "nll_points"): 0, ("eval", "samples"): 0,
        ("eval", "times"): (0.5,), ("model", "width"): 16, ("loss", "reg", "kind"): "none"}


def _source(tmp_path, steps=20):
    config = toy2d().override({**TINY, ("optim", "steps"): steps})
    return runs.train(config, tmp_path / "src", progress=False)


def test_continue_carries_the_ema_and_adam_state_over(tmp_path):
    src = _source(tmp_path)
    s = load_checkpoint(src.path / "checkpoint.pt")
    config = toy2d().override({**TINY, ("optim", "steps"): 1, ("optim", "lr"): 1e-12,
                               ("optim", "init_from"): str(src.path)})
    run = runs.train(config, tmp_path / "ft", progress=False)
    c = load_checkpoint(run.path / "checkpoint.pt")
    assert c["ema_offset"] == 20
    adam_steps = {float(v["step"]) for v in c["optimizer"]["state"].values()}
    assert adam_steps == {21.0}  # Adam's moment estimates and bias correction continue
    d = ema_decay_at(20, config.optim.ema_decay)  # the warm-up counts on from the source's step
    for k, e in c["ema"].items():
        if e.is_floating_point():
            want = d * s["ema"][k] + (1 - d) * s["model"][k]  # θ moved by < 1e-11 at lr 1e-12
            torch.testing.assert_close(e, want, rtol=1e-6, atol=1e-9)  # float32 weights
    record = json.loads((run.path / "init_from.json").read_text())
    assert record["state"] == "continue" and record["step"] == 20 and record["weights"] == "model"


def test_fresh_restarts_the_ema_and_is_the_old_meaning_of_init_from(tmp_path):
    src = _source(tmp_path)
    s = load_checkpoint(src.path / "checkpoint.pt")
    fresh = toy2d().override({**TINY, ("optim", "steps"): 1, ("optim", "lr"): 1e-12,
                              ("optim", "init_from"): str(src.path), ("optim", "init_state"): "fresh"})
    c = load_checkpoint(runs.train(fresh, tmp_path / "ft", progress=False).path / "checkpoint.pt")
    adam_steps = {float(v["step"]) for v in c["optimizer"]["state"].values()}
    assert adam_steps == {1.0} and c["ema_offset"] == 0
    k = next(k for k, v in c["ema"].items() if v.is_floating_point())
    # model and EMA both start from the source's EMA weights (fresh EMA: a copy of the model)
    torch.testing.assert_close(c["ema"][k], s["ema"][k], rtol=1e-5, atol=1e-7)
    # a 0.2 config.json with init_from (and no init_state) was a fresh start, and keeps its fingerprint
    d = fresh.to_dict()
    del d["optim"]["init_state"]
    old = RunConfig.from_dict(d)
    assert old == fresh and old.fingerprint() == fresh.fingerprint()


def test_a_continued_source_is_identified_by_its_folder_not_the_path_spelling(tmp_path):
    src = _source(tmp_path, steps=2)
    rel = os.path.relpath(src.path)
    a = toy2d().override({("optim", "init_from"): str(src.path.resolve())})
    b = toy2d().override({("optim", "init_from"): rel})
    c = toy2d().override({("optim", "init_from"): str(src.path.resolve()), ("optim", "init_state"): "fresh"})
    assert a.fingerprint() == b.fingerprint() != c.fingerprint()


def test_the_study_summary_has_the_pretrained_row_and_finetune_lr_applies_to_the_arms_only(tmp_path):
    base = toy2d().override({**TINY, ("optim", "steps"): 5})
    plan = StudyPlan(base=base, arms=tuple(parse_grid(["reg=none,fpe", "lam=0.01"])), seeds=(0, 1),
                     pretrain_steps=10, finetune_lr=1e-4)
    run_study(plan, tmp_path, progress=False)
    pre = runs.load(runs.run_dir(plan.pretrain_config(0), tmp_path / "pretrain"))
    arm = runs.load(runs.run_dir(plan.config(plan.arms[0], 0, tmp_path), tmp_path))
    assert pre.config.optim.lr == base.optim.lr and arm.config.optim.lr == 1e-4
    rows = summarize(plan, tmp_path)
    assert [r["arm"] for r in rows][0] == PRETRAINED and len(rows) == 3
    assert "nll_gap_nats_diff" in rows[0] or any(k.endswith("_diff") for k in rows[0])  # paired with the control
