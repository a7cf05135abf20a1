"""fpe_lab.runs: reproducible image runs, interrupts that save, runs that refuse what they are not."""

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

from fpe_lab import config as cfg
from fpe_lab import run as cli
from fpe_lab import runs
from fpe_lab.checkpoint import load_checkpoint

from .fake_cifar import write_fake_cifar10

IMG = ["--width", "8", "--batch", "4", "--eval-points", "4", "--eval-nll-points", "0", "--eval-batch", "4",
       "--eval-times", "0.5", "--ckpt-every", "2", "--reg", "fpe", "--lam", "0.5"]


def _main(*argv) -> int:
    return cli.main([str(a) for a in argv])


def _state(out: Path) -> dict:
    (folder,) = [p for p in out.iterdir() if p.is_dir()]
    return load_checkpoint(folder / "checkpoint.pt")


def _equal(a: dict, b: dict) -> bool:
    return all(torch.equal(a[k][n], b[k][n]) for k in ("model", "ema") for n in a[k]) and a["step"] == b["step"]


@pytest.mark.parametrize("preset", ["digits", "cifar10"])
def test_image_runs_with_hutchinson_probes_are_bitwise_reproducible(preset, tmp_path):
    """Probes, dequantization, data order and flips all come from the run's generators."""
    if preset == "digits":
        pytest.importorskip("sklearn")
        data = []
    else:
        data = ["--data-dir", write_fake_cifar10(tmp_path / "data", n_per_batch=4)]
    torch.manual_seed(123)  # the global RNG must not matter
    assert _main(preset, *data, *IMG, "--steps", "4", "--out", tmp_path / "a") == 0
    torch.manual_seed(456)
    assert _main(preset, *data, *IMG, "--steps", "4", "--out", tmp_path / "b") == 0
    assert _main(preset, *data, *IMG, "--steps", "2", "--out", tmp_path / "c") == 0
    assert _main(preset, *data, *IMG, "--steps", "4", "--resume", "--out", tmp_path / "c") == 0
    a, b, c = _state(tmp_path / "a"), _state(tmp_path / "b"), _state(tmp_path / "c")
    assert _equal(a, b) and _equal(a, c)
    assert not torch.equal(a["rng"]["noise"], load_checkpoint(next((tmp_path / "c").iterdir()) / "snapshots" /
                                                              "step_000000002.pt")["rng"]["noise"])


_SCRIPT = """
import sys
from fpe_lab import run
sys.exit(run.main(sys.argv[1:]))
"""


def test_sigint_saves_a_checkpoint_and_the_resumed_run_equals_an_uninterrupted_one(tmp_path):
    args = ["toy2d", "--width", "16", "--depth", "1", "--batch", "16", "--steps", "600", "--ckpt-every", "50",
            "--eval-points", "4", "--eval-nll-points", "0", "--eval-samples", "0", "--eval-times", "0.5"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", _SCRIPT, *args, "--out", str(tmp_path / "cut")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.time() + 120
    while time.time() < deadline and not list((tmp_path / "cut").glob("*/checkpoint.pt")):
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: interrupted: SIGINT at step") and "--resume" in last
    step = _state(tmp_path / "cut")["step"]
    assert 50 <= step < 600  # the checkpoint at the step reached when the signal came
    subprocess.run([sys.executable, "-c", _SCRIPT, *args, "--resume", "--out", str(tmp_path / "cut")], check=True,
                   capture_output=True, env=env, timeout=300)
    subprocess.run([sys.executable, "-c", _SCRIPT, *args, "--out", str(tmp_path / "full")], check=True,
                   capture_output=True, env=env, timeout=300)
    assert _equal(_state(tmp_path / "cut"), _state(tmp_path / "full"))


def test_unfinished_or_edited_runs_are_refused(tmp_path, capsys):
    config = cfg.toy2d().override({("model", "width"): 8, ("optim", "steps"): 4, ("eval", "points"): 4,
                                   ("eval", "nll_points"): 0, ("eval", "samples"): 0, ("eval", "times"): (0.5,)})
    run = runs.train(config, tmp_path, progress=False)
    assert run.is_finished
    # an unfinished run: planned steps beyond the checkpoint
    saved = json.loads((run.path / "config.json").read_text())
    saved["optim"]["steps"] = 10
    (run.path / "config.json").write_text(json.dumps(saved))
    assert _main("eval", run.path) == 2
    assert "unfinished: 4 of 10 steps done" in capsys.readouterr().err
    assert _main("eval", run.path, "--allow-partial") == 0
    assert runs.load(run.path).report.step == 4
    # a hand-edited config.json (another SDE) does not fit the checkpoint
    saved["optim"]["steps"] = 4
    saved["sde"]["kind"] = "ve"
    (run.path / "config.json").write_text(json.dumps(saved))
    before = (run.path / "metrics.json").read_bytes()
    assert _main("eval", run.path) == 2
    assert "is not the configuration its checkpoint was trained with" in capsys.readouterr().err
    assert (run.path / "metrics.json").read_bytes() == before


def test_failures_before_training_leave_no_folder(tmp_path, capsys):
    assert _main("toy2d", "--init-from", tmp_path / "missing", "--steps", "2", "--out", tmp_path / "out") == 2
    assert "--init-from" in capsys.readouterr().err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_init_from_another_architecture_is_refused(tmp_path, capsys):
    tiny = ["--depth", "1", "--steps", "2", "--eval-points", "4", "--eval-nll-points", "0", "--eval-samples", "0",
            "--eval-times", "0.5"]
    assert _main("toy2d", "--width", "8", *tiny, "--out", tmp_path / "a") == 0
    (src,) = list((tmp_path / "a").iterdir())
    assert _main("toy2d", "--width", "16", *tiny, "--init-from", src, "--out", tmp_path / "b") == 2
    assert "another architecture" in capsys.readouterr().err
    assert _main("toy2d", "--width", "8", *tiny, "--init-from", src, "--reg", "none", "--out", tmp_path / "b") == 0
    b = runs.load(next((tmp_path / "b").iterdir()))
    assert b.config.optim.init_from == str(src)
