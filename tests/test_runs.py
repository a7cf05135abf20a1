"""fpe_lab.runs: reproducible image runs, interrupts that save, runs that refuse what they are not."""

from __future__ import annotations

import json
import os
import shutil
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
from fpe_lab.checkpoint import load_checkpoint, save_checkpoint, weights_sha256

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


UNETS = {"small": ["--model", "small", "--width", "16"],  # the preset's 16 groups need width 16k
         "ddpmpp": ["--model", "ddpmpp", "--width", "32"]}


def _same_checkpoint(a: dict, b: dict) -> None:
    """Weights, EMA, optimizer moments, step, history and every RNG state bitwise equal."""
    assert a.keys() == b.keys() and a["step"] == b["step"] and a["fingerprint"] == b["fingerprint"]
    for key in ("model", "ema", "rng"):
        assert a[key].keys() == b[key].keys(), key
        assert all(torch.equal(a[key][n], b[key][n]) for n in a[key]), key
    for k, st in a["optimizer"]["state"].items():
        assert all(torch.equal(v, b["optimizer"]["state"][k][n]) for n, v in st.items())
    assert torch.equal(a["history"], b["history"])


@pytest.mark.parametrize("size", list(UNETS))
def test_dropout_runs_are_reproducible_and_resume_bitwise(size, tmp_path):
    """U-Net dropout draws from the global RNG, which each run seeds and each checkpoint carries."""
    pytest.importorskip("sklearn")
    args = ["digits", *UNETS[size], "--depth", "1", "--dropout", "0.3", "--reg", "none", "--batch", "4",
            "--ckpt-every", "2", "--eval-points", "4", "--eval-nll-points", "0", "--eval-batch", "4",
            "--eval-times", "0.5"]
    torch.manual_seed(123)
    assert _main(*args, "--steps", "4", "--out", tmp_path / "a") == 0
    torch.manual_seed(456)
    assert _main(*args, "--steps", "4", "--out", tmp_path / "b") == 0
    # stopped after its step-2 checkpoint (not evaluated: a 2-step U-Net is no score), then resumed
    half = runs.load(next((tmp_path / "a").iterdir())).config.override({("optim", "steps"): 2})
    runs.train(half, tmp_path / "c", progress=False, evaluate_after=False)
    assert _main(*args, "--steps", "4", "--resume", "--out", tmp_path / "c") == 0
    a, b, c = _state(tmp_path / "a"), _state(tmp_path / "b"), _state(tmp_path / "c")
    assert "torch" in a["rng"]
    _same_checkpoint(a, b)
    _same_checkpoint(a, c)


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


TINY = ["--width", "8", "--depth", "1", "--batch", "16", "--eval-points", "4", "--eval-nll-points", "0",
        "--eval-samples", "0", "--eval-times", "0.5"]


def _only(out: Path) -> Path:
    (folder,) = [p for p in out.iterdir() if p.is_dir()]
    return folder


def _files(folder: Path) -> dict[str, bytes]:
    """Every file of a run folder but its lock, with its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != runs.LOCK_NAME}


def test_a_checkpoint_of_another_run_is_refused_by_resume_and_eval(tmp_path, capsys):
    assert _main("toy2d", *TINY, "--steps", "2", "--out", tmp_path / "a") == 0
    assert _main("toy2d", *TINY, "--steps", "2", "--seed", "1", "--out", tmp_path / "b") == 0
    a, b = _only(tmp_path / "a"), _only(tmp_path / "b")
    fp_a, fp_b = runs.load(a).config.fingerprint(), runs.load(b).config.fingerprint()
    shutil.copy(b / "checkpoint.pt", a / "checkpoint.pt")  # swapped in from another run
    swapped = load_checkpoint(b / "checkpoint.pt")
    unstamped = {k: v for k, v in swapped.items() if k != "fingerprint"}
    for state, named in ((swapped, fp_b), (unstamped, "none")):
        save_checkpoint(a / "checkpoint.pt", state)
        before = _files(a)
        for argv in (["toy2d", *TINY, "--steps", "4", "--resume", "--out", tmp_path / "a"], ["eval", a]):
            capsys.readouterr()
            assert _main(*argv) == 2
            err = capsys.readouterr().err
            assert err.startswith("error: ") and err.count("\n") == 1, err
            assert f"{a / 'checkpoint.pt'} was trained with fingerprint {named}" in err, err
            assert f"has fingerprint {fp_a}" in err, err
            assert _files(a) == before  # refused before anything was written or re-stamped


def test_cifar10_run_folders_follow_the_data_not_the_path_spelling(tmp_path, monkeypatch):
    """The same CIFAR-10 under another spelling, from another directory, is the same run folder (resumed)."""
    monkeypatch.chdir(tmp_path)
    write_fake_cifar10(tmp_path / "data", n_per_batch=4)
    out = tmp_path / "runs"
    assert _main("cifar10", "--data-dir", "data", *IMG, "--steps", "2", "--out", out) == 0
    folder = _only(out)
    shutil.copytree(tmp_path / "data" / "cifar-10-batches-py", tmp_path / "moved" / "cifar")
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")  # where config.json's relative "data" names nothing
    assert _main("cifar10", "--data-dir", "../moved/cifar", *IMG, "--steps", "4", "--resume", "--out", out) == 0
    assert _only(out) == folder and runs.load(folder).steps_done == 4


def _legacy_cifar10_folder(tmp_path: Path) -> tuple[Path, Path]:
    """A cifar10 run folder as made before the data entered by content: named by, and its checkpoint
    stamped with, the fingerprint of the data_dir path string. Returns (out, folder)."""
    data = write_fake_cifar10(tmp_path / "data", n_per_batch=4)
    out = tmp_path / "runs"
    assert _main("cifar10", "--data-dir", data, *IMG, "--steps", "2", "--out", out) == 0
    new = _only(out)
    config = runs.load(new).config
    (legacy_fp,) = config.legacy_fingerprints()
    assert legacy_fp != config.fingerprint()
    folder = new.rename(out / f"{config.label()}-{legacy_fp}")
    for ckpt in [folder / "checkpoint.pt", *sorted((folder / "snapshots").iterdir())]:
        save_checkpoint(ckpt, {**load_checkpoint(ckpt), "fingerprint": legacy_fp})
    return out, folder


def test_an_old_cifar10_run_folder_is_resumed_and_evaluated_in_place(tmp_path, capsys):
    out, folder = _legacy_cifar10_folder(tmp_path)
    legacy_fp = load_checkpoint(folder / "checkpoint.pt")["fingerprint"]
    assert runs.run_dir(runs.load(folder).config, out) == folder
    assert _main("eval", folder) == 0
    assert _main("cifar10", "--config", folder / "config.json", "--steps", "4", "--dry-run", "--out", out) == 0
    assert f"run folder: {folder}\n" in capsys.readouterr().out
    assert _main("cifar10", "--config", folder / "config.json", "--steps", "4", "--resume", "--out", out) == 0
    assert _only(out) == folder  # no new folder
    state = load_checkpoint(folder / "checkpoint.pt")
    assert state["step"] == 4 and state["fingerprint"] == legacy_fp  # the folder keeps its name and stamp
    assert runs.load(folder).is_finished and _main("eval", folder) == 0
    # a stamp that is neither the current nor a legacy fingerprint of this config is still refused
    save_checkpoint(folder / "checkpoint.pt", {**state, "fingerprint": "0123456789"})
    capsys.readouterr()
    assert _main("eval", folder) == 2
    assert "was trained with fingerprint 0123456789" in capsys.readouterr().err


_HOLD = """
import sys
from fpe_lab import runs
with runs.lock_run(sys.argv[1], "holding it for a test"):
    print("held", flush=True)
    sys.stdin.read()
"""


def test_a_run_folder_in_use_is_refused_with_the_holder_named(tmp_path, capsys):
    assert _main("toy2d", *TINY, "--steps", "2", "--out", tmp_path) == 0
    folder = _only(tmp_path)
    with subprocess.Popen([sys.executable, "-c", _HOLD, str(folder)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                          text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}) as holder:
        try:
            assert holder.stdout.readline().strip() == "held"
            before = _files(folder)
            for argv in (["toy2d", *TINY, "--steps", "4", "--resume", "--out", tmp_path], ["eval", folder]):
                capsys.readouterr()
                assert _main(*argv) == 1  # an environment failure, not bad input
                err = capsys.readouterr().err
                assert err.startswith("error: ") and err.count("\n") == 1, err
                assert f"{folder} is in use by another process (pid {holder.pid}, holding it for a test" in err
            assert _files(folder) == before
        finally:
            holder.kill()  # SIGKILL: no clean-up runs, the operating system releases the lock
    assert _main("toy2d", *TINY, "--steps", "4", "--resume", "--out", tmp_path) == 0
    assert runs.load(folder).is_finished and runs.load(folder).steps_done == 4
    assert (folder / runs.LOCK_NAME).read_text() == ""  # released and emptied


def test_init_from_records_its_source_and_leaves_other_runs_alone(tmp_path):
    assert _main("toy2d", *TINY, "--steps", "2", "--out", tmp_path / "src") == 0
    src = _only(tmp_path / "src")
    src_state = load_checkpoint(src / "checkpoint.pt")
    assert "init_from" not in src_state and not (src / runs.INIT_FROM_NAME).exists()  # a run without --init-from
    assert _main("toy2d", *TINY, "--steps", "2", "--init-from", src, "--reg", "none", "--out", tmp_path / "b") == 0
    b = _only(tmp_path / "b")
    record = json.loads((b / runs.INIT_FROM_NAME).read_text())
    assert record == {"path": str(src / "checkpoint.pt"), "fingerprint": runs.load(src).config.fingerprint(),
                      "step": 2, "weights": "model", "sha256": weights_sha256(src_state["model"]),
                      "state": "continue"}  # the default --init-state continues the source's raw weights
    assert load_checkpoint(b / "checkpoint.pt")["init_from"] == record
    # the record stays what the run started from when it grows, even if the source has changed since
    assert _main("toy2d", *TINY, "--steps", "4", "--resume", "--out", tmp_path / "src") == 0
    assert _main("toy2d", *TINY, "--steps", "4", "--init-from", src, "--reg", "none", "--resume",
                 "--out", tmp_path / "b") == 0
    assert load_checkpoint(b / "checkpoint.pt")["init_from"] == record
    assert json.loads((b / runs.INIT_FROM_NAME).read_text()) == record
