"""`python -m fpe_lab.run toy2d` / `eval`: tiny end-to-end runs, resume, NaN guard and bad-input exit codes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import fpe_lab.commands.toy2d as toy2d_cmd
from fpe_lab import run
from fpe_lab.checkpoint import load_checkpoint
from fpe_lab.config import DeviceChoice, Toy2dConfig, toy2d
from fpe_lab.losses import LossTerms

# A tiny preset: small network and evaluation, so a run takes seconds.
TINY = dict(width=16, depth=2, n_freq=2, batch=32, ckpt_every=4, eval_points=20, eval_nll_points=4, eval_samples=16)


@pytest.fixture
def tiny(monkeypatch):
    monkeypatch.setattr(toy2d_cmd, "toy2d", lambda **kw: toy2d(**{**TINY, **kw}))


def _main(*argv: str) -> int:
    return run.main(["toy2d", *argv])


def test_dry_run_prints_resolved_config_and_writes_nothing(tmp_path, capsys):
    assert _main("--dry-run", "--out", str(tmp_path), "--sde", "ve", "--lam", "0.5") == 0
    out = capsys.readouterr().out
    cfg_text, folder = out.rsplit("run folder: ", 1)
    cfg = Toy2dConfig.from_json(cfg_text)
    assert cfg.sde.value == "ve" and cfg.lam == 0.5 and cfg == toy2d(sde=cfg.sde, lam=0.5)
    assert Path(folder.strip()) == tmp_path / "gmm_ve_fpe_lam0.5_steps2000_b256_lr0.002_seed0"
    assert list(tmp_path.iterdir()) == []


def test_tiny_run_end_to_end_then_resume_and_eval(tiny, tmp_path, capsys):
    assert _main("--steps", "6", "--out", str(tmp_path), "--device", "cpu") == 0
    (run_dir,) = tmp_path.iterdir()
    assert run_dir.name == "gmm_vp_fpe_lam0.1_steps6_b32_lr0.002_seed0"
    assert {p.name for p in run_dir.iterdir()} == {"config.json", "checkpoint.pt", "metrics.json", "score.png", "loss.png"}
    cfg = Toy2dConfig.from_json((run_dir / "config.json").read_text())
    assert cfg == toy2d(**TINY, steps=6, device=DeviceChoice.CPU)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert {"times", "per_time", "mean", "nll", "samples", "settings", "training"} <= metrics.keys()
    assert metrics["training"]["steps"] == 6 and metrics["training"]["final_fpe"] > 0
    state = load_checkpoint(run_dir / "checkpoint.pt")
    assert state["step"] == 6 and state["history"].shape == (6, 3)

    # the same settings again: refused without --resume, a no-op (re-evaluation) with it
    assert _main("--steps", "6", "--out", str(tmp_path), "--device", "cpu") == 2
    assert "already exists; pass --resume" in capsys.readouterr().err
    before = load_checkpoint(run_dir / "checkpoint.pt")["model"]
    assert _main("--steps", "6", "--out", str(tmp_path), "--device", "cpu", "--resume") == 0
    after = load_checkpoint(run_dir / "checkpoint.pt")["model"]
    assert all(torch.equal(before[k], after[k]) for k in before)

    # eval re-evaluates deterministically (the evaluation generator is seeded from the run's seed)
    (run_dir / "metrics.json").unlink()
    assert run.main(["eval", str(run_dir)]) == 0
    again = json.loads((run_dir / "metrics.json").read_text())
    assert again["mean"] == metrics["mean"]


def test_resume_on_a_different_config_is_refused(tiny, tmp_path, capsys):
    assert _main("--steps", "4", "--out", str(tmp_path)) == 0
    (run_dir,) = tmp_path.iterdir()
    cfg = json.loads((run_dir / "config.json").read_text())
    cfg["width"] = 64  # a folder written by a different preset (or edited by hand)
    (run_dir / "config.json").write_text(json.dumps(cfg))
    capsys.readouterr()
    assert _main("--steps", "4", "--out", str(tmp_path), "--resume") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "holds a different config (width: saved 64 vs requested 16)" in err


def test_nonfinite_loss_stops_with_one_line(tiny, tmp_path, monkeypatch, capsys):
    def nan_loss(model, x0, g):
        nan = model(x0, torch.full((x0.shape[0],), 0.5)).sum() * float("nan")
        return LossTerms(total=nan, dsm=nan, fpe=nan)

    monkeypatch.setattr(toy2d_cmd, "build_loss", lambda config, sde: nan_loss)
    assert _main("--steps", "4", "--out", str(tmp_path)) == 2
    err = capsys.readouterr().err  # the progress bar, then one error line
    assert err.splitlines()[-1].startswith("error: non-finite loss at step 1 (dsm=nan, fpe=nan); training stopped")
    assert err.count("error:") == 1 and "Traceback" not in err
    (run_dir,) = tmp_path.iterdir()
    assert not (run_dir / "metrics.json").exists() and not (run_dir / "checkpoint.pt").exists()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--data", "nope"], "argument --data: invalid choice: 'nope'"),
        (["--sde", "ou"], "argument --sde: invalid choice: 'ou'"),
        (["--lam", "-0.1"], "argument --lam: must be in [0, inf]; got -0.1"),
        (["--lam", "nan"], "argument --lam: must be in [0, inf]; got nan"),
        (["--steps", "0"], "argument --steps: must be in [1, 1e+09]; got 0"),
        (["--steps", "1.5"], "argument --steps: expected an integer; got '1.5'"),
        (["--batch", "-3"], "argument --batch: must be in [1, 1e+07]"),
        (["--lr", "0"], "argument --lr: must be in (0, 10]; got 0"),
    ],
)
def test_usage_errors_exit_2_with_one_line(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        _main(*argv, "--dry-run")
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "usage:" not in err


def test_out_that_is_a_file_exits_2(tmp_path, capsys):
    f = tmp_path / "file"
    f.write_text("x")
    assert _main("--out", str(f), "--steps", "1") == 2
    assert capsys.readouterr().err == f"error: --out {f} is a file; it must be a folder (it is created if missing)\n"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message for a machine without CUDA")
def test_cuda_without_cuda_exits_2(capsys):
    assert _main("--device", "cuda", "--dry-run") == 2
    assert capsys.readouterr().err == "error: device cuda was requested but CUDA is not available (use --device cpu or auto)\n"


def test_eval_of_a_non_run_folder_exits_2(tmp_path, capsys):
    assert run.main(["eval", str(tmp_path)]) == 2
    assert "is not a toy2d run folder" in capsys.readouterr().err


def test_real_process_exit_code_and_no_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "fpe_lab.run", "toy2d", "--lam", "-1"], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr == "error: python -m fpe_lab.run toy2d: argument --lam: must be in [0, inf]; got -1\n"


_KILLABLE = """
import sys
import fpe_lab.commands.toy2d as m
from fpe_lab import config, run
m.toy2d = lambda **kw: config.toy2d(**{**TINY, **kw})
sys.exit(run.main(["toy2d", "--steps", "STEPS", "--out", sys.argv[1]] + sys.argv[2:]))
"""


@pytest.mark.slow
def test_sigkill_and_resume_equals_uninterrupted(tmp_path):
    """A real kill: SIGKILL the CLI after its first checkpoint, --resume, compare with an uninterrupted run."""
    steps = 400
    code = f"TINY = {dict(TINY, ckpt_every=50)!r}\n" + _KILLABLE.replace("STEPS", str(steps))
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    full, cut = tmp_path / "full", tmp_path / "cut"
    subprocess.run([sys.executable, "-c", code, str(full)], check=True, capture_output=True, timeout=600, env=env)
    proc = subprocess.Popen([sys.executable, "-c", code, str(cut)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=env)
    ckpt = None
    deadline = time.time() + 300
    while time.time() < deadline:
        found = list(cut.glob("*/checkpoint.pt"))
        if found:
            ckpt = found[0]
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert ckpt is not None
    killed_at = load_checkpoint(ckpt)["step"]
    assert killed_at < steps, "the run finished before it could be killed; raise steps"
    subprocess.run([sys.executable, "-c", code, str(cut), "--resume"], check=True, capture_output=True,
                   timeout=600, env=env)
    a = load_checkpoint(next(full.glob("*/checkpoint.pt")))
    b = load_checkpoint(ckpt)
    assert b["step"] == steps
    for key in ("model", "ema"):
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key])  # bitwise equal on CPU


# ---------------------------------------------------------------------- fpe_lab.config
def test_config_json_roundtrip_and_enums():
    from fpe_lab.config import FPEWeighting, Regularizer, SDEKind, ToyData

    cfg = toy2d(data=ToyData.CHECKERBOARD, sde=SDEKind.SUBVP, reg=Regularizer.NONE, fpe_weighting=FPEWeighting.G2,
                fpe_batch=64, grad_clip=1.0)
    d = json.loads(cfg.to_json())
    assert d["data"] == "checkerboard" and d["sde"] == "subvp" and d["fpe_weighting"] == "g2"
    assert Toy2dConfig.from_json(cfg.to_json()) == cfg
    assert Toy2dConfig.from_dict({}) == toy2d()  # missing keys take the preset's defaults


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: toy2d(lam=-1.0), "lam"),
        (lambda: toy2d(steps=0), "steps"),
        (lambda: toy2d(steps=True), "steps"),
        (lambda: toy2d(eps=0.0), "eps"),
        (lambda: toy2d(sde="vp"), "sde must be a SDEKind"),
        (lambda: toy2d(fpe_batch=512), "fpe_batch must be <= batch"),
        (lambda: Toy2dConfig.from_dict({"sde": "ou"}), r"sde must be one of \['ve', 'vp', 'subvp'\]; got 'ou'"),
        (lambda: Toy2dConfig.from_dict({"colour": 1}), r"unknown config keys \['colour'\]"),
        (lambda: Toy2dConfig.from_json("{"), "not valid JSON"),
    ],
)
def test_config_bad_input(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_builders_follow_the_config():
    from fpe_lab.config import ResidualPath, SDEKind, build_loss, build_model, build_sde, residual_function
    from fpe_lab.fpe import score_fpe_residual
    from fpe_lab.sde import SubVPSDE, VESDE, VPSDE

    assert [type(build_sde(k)) for k in SDEKind] == [VESDE, VPSDE, SubVPSDE]
    assert residual_function(ResidualPath.GENERIC) is score_fpe_residual
    jet = pytest.importorskip("fpe_lab.nets.jet")
    assert residual_function(ResidualPath.JET) is jet.jet_score_fpe_residual
    cfg = toy2d(**TINY)
    loss = build_loss(cfg, build_sde(cfg.sde))
    assert loss.regularizer.lam == cfg.lam and loss.eps == cfg.eps
    assert build_loss(cfg.replace(reg=cfg.reg.NONE), build_sde(cfg.sde)).regularizer is None
    # the same seed gives the same initial weights, without touching the global RNG
    state = torch.get_rng_state()
    a, b = build_model(cfg, build_sde(cfg.sde)), build_model(cfg, build_sde(cfg.sde))
    assert torch.equal(state, torch.get_rng_state())
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    c = build_model(cfg.replace(seed=1), build_sde(cfg.sde))
    assert not torch.equal(a.net.out.weight, c.net.out.weight)
