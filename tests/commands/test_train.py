"""The training commands (toy2d, cifar10, digits) and eval: flags generated from the configuration,
--config round trips, runs that grow, one metrics schema for points and images, one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fpe_lab import run as cli
from fpe_lab import runs
from fpe_lab.checkpoint import load_checkpoint
from fpe_lab.config import leaves

from ..fake_cifar import write_fake_cifar10

TINY = ["--width", "16", "--depth", "1", "--batch", "32", "--eval-points", "20", "--eval-nll-points", "4",
        "--eval-samples", "0", "--eval-times", "0.1", "0.5", "--ckpt-every", "10"]


def _main(*argv: str) -> int:
    return cli.main([str(a) for a in argv])


def _only_run(out: Path) -> Path:
    (folder,) = [p for p in out.iterdir() if p.is_dir()]
    return folder


def _tensors_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _same_state(a: Path, b: Path) -> None:
    sa, sb = load_checkpoint(a / "checkpoint.pt"), load_checkpoint(b / "checkpoint.pt")
    assert sa["step"] == sb["step"]
    for key in ("model", "ema"):
        assert _tensors_equal(sa[key], sb[key]), key  # bitwise on CPU
    assert torch.equal(sa["history"], sb["history"])
    for k in sa["optimizer"]["state"]:
        assert _tensors_equal(sa["optimizer"]["state"][k], sb["optimizer"]["state"][k])


def _log_without_wall(folder: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "wall_s"} for r in runs.read_history(folder)]


def _report_without_wall(folder: Path) -> dict:
    d = json.loads((folder / "metrics.json").read_text())
    d.pop("wall_s")
    return d


def test_every_field_has_one_distinct_flag():
    flags = [leaf.flag for leaf in leaves()]
    assert len(flags) == len(set(flags))
    required = {"eps", "width", "depth", "dsm-weighting", "fpe-weighting", "fpe-points", "ema-decay", "steps", "seed",
                "lam", "reg"}
    assert required <= set(flags)


def test_paper_protocol_flags_are_recorded_and_config_reproduces_the_run_bitwise(tmp_path):
    flags = ["--dsm-weighting", "likelihood", "--fpe-weighting", "g2", "--eps", "1e-5", "--lam", "0.15", "--steps", "12"]
    assert _main("toy2d", *TINY, *flags, "--out", tmp_path / "a") == 0
    first = _only_run(tmp_path / "a")
    saved = json.loads((first / "config.json").read_text())
    assert saved["loss"]["dsm_weighting"] == "likelihood" and saved["loss"]["eps"] == 1e-5
    assert saved["loss"]["reg"] == {**saved["loss"]["reg"], "kind": "fpe", "lam": 0.15}
    assert saved["loss"]["reg"]["fpe"]["weighting"] == "g2"
    assert _main("toy2d", "--config", first / "config.json", "--out", tmp_path / "b") == 0
    second = _only_run(tmp_path / "b")
    assert second.name == first.name
    _same_state(first, second)
    assert _log_without_wall(first) == _log_without_wall(second)
    assert _report_without_wall(first) == _report_without_wall(second)
    # a flag after --config overrides it: another run folder
    assert _main("toy2d", "--config", first / "config.json", "--seed", "1", "--dry-run", "--out", tmp_path / "b") == 0


def test_a_run_grows_to_equal_an_uninterrupted_one(tmp_path, capsys):
    assert _main("toy2d", *TINY, "--steps", "40", "--out", tmp_path / "grown") == 0
    grown = _only_run(tmp_path / "grown")
    assert runs.load(grown).report.step == 40
    assert _main("toy2d", *TINY, "--steps", "80", "--out", tmp_path / "grown") == 2  # exists: needs --resume
    assert "--resume" in capsys.readouterr().err
    assert _main("toy2d", *TINY, "--steps", "80", "--resume", "--out", tmp_path / "grown") == 0
    assert _main("toy2d", *TINY, "--steps", "80", "--out", tmp_path / "straight") == 0
    straight = _only_run(tmp_path / "straight")
    assert grown.name == straight.name  # the step count is not part of the name
    _same_state(grown, straight)
    assert _log_without_wall(grown) == _log_without_wall(straight)
    assert _report_without_wall(grown) == _report_without_wall(straight)
    assert [r["step"] for r in runs.read_history(grown)] == list(range(1, 81))
    # snapshots every 10 steps, the newest 3 kept (default --keep)
    assert sorted(p.name for p in (grown / "snapshots").iterdir()) == [f"step_{k:09d}.pt" for k in (60, 70, 80)]
    run = runs.load(grown)
    assert run.is_finished and run.steps_done == 80
    # shrinking is refused
    assert _main("toy2d", *TINY, "--steps", "20", "--resume", "--out", tmp_path / "grown") == 2
    assert "shrink" in capsys.readouterr().err


def test_metrics_jsonl_has_every_term_per_step(tmp_path):
    assert _main("toy2d", *TINY, "--steps", "5", "--out", tmp_path) == 0
    hist = runs.read_history(_only_run(tmp_path))
    assert [r["step"] for r in hist] == [1, 2, 3, 4, 5]
    assert set(hist[0]) == {"step", "loss", "dsm", "reg", "lr", "grad_norm", "wall_s"}
    assert all(abs(r["loss"] - (r["dsm"] + 0.1 * r["reg"])) <= 1e-6 * abs(r["loss"]) for r in hist)  # float32 sum


def test_reg_none_and_lam_zero_are_one_setting(tmp_path, capsys):
    assert _main("toy2d", "--reg", "none", "--print-config") == 0
    a = json.loads(capsys.readouterr().out)
    assert _main("toy2d", "--lam", "0", "--print-config") == 0
    b = json.loads(capsys.readouterr().out)
    assert a == b and a["loss"]["reg"]["kind"] == "none" and a["loss"]["reg"]["lam"] == 0


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--eps", "0"], "eps must be a finite number in (0, 0.5]; got 0.0"),
        (["--width", "0"], "width must be an integer in [1, 65536]; got 0"),
        (["--lam", "-1"], "lam must be a finite number in [0, inf]; got -1.0"),
        (["--fpe-weighting", "bad"], "argument --fpe-weighting: invalid choice: 'bad'"),
        (["--steps", "x"], "argument --steps: invalid int value: 'x'"),
        (["--reg", "fpe", "--lam", "0"], "a regularizer needs lam > 0"),
        (["--eval-times", "0.0001"], "eval times must lie in [eps, 1]"),
        (["--unknown-flag"], "unrecognized arguments: --unknown-flag"),
        (["--data", "cifar10", "--fpe-residual-path", "jet", "--data-dir", "x"], "residual_path jet needs the MLP"),
    ],
)
def test_bad_values_are_one_error_line_with_exit_2(argv, message, capsys, tmp_path):
    assert _main("toy2d", *argv, "--out", tmp_path) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err
    assert not any(tmp_path.iterdir())  # nothing written


def test_config_file_errors_name_the_key(tmp_path, capsys):
    bad = tmp_path / "c.json"
    bad.write_text(json.dumps({"loss": {"epsilon": 1e-3}}))
    assert _main("toy2d", "--config", bad, "--dry-run") == 2
    err = capsys.readouterr().err
    assert "'loss.epsilon'" in err and err.count("\n") == 1
    assert _main("toy2d", "--config", tmp_path / "missing.json", "--dry-run") == 2
    assert "cannot read" in capsys.readouterr().err


def test_resume_of_another_configuration_is_refused(tmp_path, capsys):
    assert _main("toy2d", *TINY, "--steps", "4", "--out", tmp_path) == 0
    folder = _only_run(tmp_path)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["loss"]["eps"] = 0.002  # hand-edited: another run in this folder
    (folder / "config.json").write_text(json.dumps(cfg))
    assert _main("toy2d", *TINY, "--steps", "8", "--resume", "--out", tmp_path) == 2
    assert "holds a different run" in capsys.readouterr().err


def test_eval_rewrites_metrics_with_new_settings(tmp_path, capsys):
    assert _main("toy2d", *TINY, "--steps", "4", "--out", tmp_path) == 0
    folder = _only_run(tmp_path)
    assert _main("eval", folder, "--eval-times", "0.2", "--eval-nll-points", "0") == 0
    report = runs.load(folder).report
    assert report.times == (0.2,) and report.nll is None and report.step == 4
    assert _main("eval", tmp_path / "nope") == 2
    assert "not a run folder" in capsys.readouterr().err


def test_one_metrics_schema_for_points_and_images(tmp_path):
    data = write_fake_cifar10(tmp_path / "data", n_per_batch=4)
    img = ["--width", "8", "--batch", "4", "--eval-points", "4", "--eval-nll-points", "2", "--eval-batch", "4",
           "--eval-times", "0.1", "0.5", "--eval-rtol", "1e-3"]
    assert _main("cifar10", "--data-dir", data, *img, "--steps", "2", "--out", tmp_path / "img") == 0
    assert _main("toy2d", *TINY, "--steps", "2", "--out", tmp_path / "pts") == 0
    img_report = json.loads((_only_run(tmp_path / "img") / "metrics.json").read_text())
    pts_report = json.loads((_only_run(tmp_path / "pts") / "metrics.json").read_text())
    assert img_report.keys() == pts_report.keys()
    for key in ("fpe_residual", "fpe_residual_se", "fpe_residual_rel", "jacobian_asymmetry_rel",
                "jacobian_asymmetry_rel_se", "dsm"):
        assert len(img_report["per_time"][key]) == 2 and len(pts_report["per_time"][key]) == 2
    assert img_report["per_time"]["score_error"] is None  # no truth for images
    assert img_report["settings"]["divergence"] == "hutchinson(2)" and pts_report["settings"]["divergence"] == "exact"
    assert img_report["nll"]["dsm_bound_bits_per_dim"] is not None and img_report["dim"] == 3072


def test_digits_runs_with_the_same_flags(tmp_path):
    pytest.importorskip("sklearn")
    img = ["--width", "8", "--batch", "4", "--eval-points", "4", "--eval-nll-points", "0", "--eval-batch", "4",
           "--eval-times", "0.5", "--eps", "1e-3", "--dsm-weighting", "likelihood", "--fpe-weighting", "g2",
           "--ema-decay", "0.99", "--depth", "1", "--seed", "3", "--lam", "0.2", "--reg", "fpe", "--fpe-points",
           "resampled", "--steps", "2"]
    assert _main("digits", *img, "--out", tmp_path) == 0
    run = runs.load(_only_run(tmp_path))
    assert run.config.model.width == 8 and run.config.seed == 3 and run.report.dim == 64


def test_real_process_has_no_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "fpe_lab.run", "toy2d", "--eps", "2", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1


def test_eval_never_writes_config_json_and_checks_its_device_first(tmp_path, capsys, monkeypatch):
    assert _main("toy2d", *TINY, "--steps", "4", "--out", tmp_path) == 0
    folder = _only_run(tmp_path)
    config, metrics = (folder / "config.json").read_bytes(), (folder / "metrics.json").read_bytes()
    if not torch.cuda.is_available():
        assert _main("eval", folder, "--device", "cuda") == 2
        assert "CUDA is not available" in capsys.readouterr().err
    assert _main("eval", folder, "--eval-rtol", "1") == 2  # refused before evaluating, not after
    assert "eval_rtol must be a finite number in (0, 1)" in capsys.readouterr().err

    def out_of_memory(*args, **kwargs):
        raise MemoryError("out of memory")

    monkeypatch.setattr(runs, "evaluate_score", out_of_memory)
    assert _main("eval", folder, "--eval-points", "8") == 1  # fails midway: an environment failure
    monkeypatch.undo()
    assert (folder / "config.json").read_bytes() == config and (folder / "metrics.json").read_bytes() == metrics
    # the settings of an evaluation are recorded beside its numbers; config.json keeps the run's
    assert _main("eval", folder, "--eval-times", "0.2", "--eval-points", "8", "--device", "cpu") == 0
    assert (folder / "config.json").read_bytes() == config
    settings = json.loads((folder / "metrics.json").read_text())["settings"]
    assert settings["eval"]["times"] == [0.2] and settings["eval"]["points"] == 8 and settings["device"] == "cpu"
    assert settings["eval_seed"] == runs.load(folder).config.eval_seed
    assert _main("eval", folder) == 0  # without flags: the run's own settings again
    assert json.loads((folder / "metrics.json").read_text())["settings"]["eval"]["times"] == [0.1, 0.5]


def _fd_step_flag() -> str:
    return "--" + next(leaf.flag for leaf in leaves() if leaf.path[-1] == "fd_step")


@pytest.mark.parametrize("argv, message", [
    (["--steps", "100000000000000000000"], "steps must be an integer in [1, 1000000000]; got 100000000000000000000"),
    (["--steps", "1e20"], "argument --steps: invalid int value: '1e20'"),
    (["--eval-rtol", "1"], "eval_rtol must be a finite number in (0, 1); got 1.0"),
    (["--eval-seed", "100000000000000000000000"], "eval_seed must be an integer in [0, 4611686018427387904]"),
    ([None, "0.5"], "fd_step must be"),
], ids=["steps-huge", "steps-float", "eval-rtol-one", "eval-seed-huge", "fd-step-half"])
def test_values_refused_only_after_training_are_refused_first(argv, message, capsys, tmp_path):
    argv = [_fd_step_flag() if a is None else a for a in argv]
    assert _main("toy2d", *TINY, "--steps", "2", *argv, "--out", tmp_path) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err
    assert "Traceback" not in err and "unexpected" not in err
    assert not any(tmp_path.iterdir())  # nothing written: refused before the run folder
