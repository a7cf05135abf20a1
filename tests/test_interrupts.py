"""SIGINT and SIGTERM wherever they land: start-up, training, the evaluation after training, ``eval``, and a
study with worker processes. Each ends with one line ``error: interrupted: …``, exit 128 + the signal
number, no traceback, no half-written file, and no process left behind."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fpe_lab import run as cli
from fpe_lab import runs
from fpe_lab.checkpoint import load_checkpoint

TINY = ["--width", "8", "--depth", "1", "--batch", "16", "--eval-points", "4", "--eval-nll-points", "0",
        "--eval-samples", "0", "--eval-times", "0.5"]
SLOW_EVAL = ["--eval-nll-points", "400", "--eval-rtol", "1e-6"]  # seconds of PF-ODE solves: time to be interrupted
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
TIMEOUT = 240


def _start(*argv) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "fpe_lab.run", *map(str, argv)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, env=ENV)


def _wait_for(what, proc: subprocess.Popen, timeout: float = TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not what():
        assert proc.poll() is None, f"exited {proc.returncode} before the signal: {proc.stderr.read()}"
        assert time.monotonic() < deadline, "timed out waiting for the process"
        time.sleep(0.01)


def _handles_sigterm(pid: int) -> bool:
    """Whether ``pid`` has installed its own SIGTERM handler (the SigCgt mask of /proc/PID/status)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    mask = next(int(line.split()[1], 16) for line in status.splitlines() if line.startswith("SigCgt:"))
    return bool(mask & (1 << (signal.SIGTERM - 1)))


def _lock_pid(folder: Path) -> int | None:
    """The pid written in a run folder's lock file while a process holds it."""
    try:
        return json.loads((folder / runs.LOCK_NAME).read_text())["pid"]
    except (OSError, ValueError, KeyError):
        return None


def _signal_and_check(proc: subprocess.Popen, sig: signal.Signals, out: Path | None = None) -> str:
    """Send ``sig``; the process must end with exit 128 + sig and exactly one line ``error: interrupted: SIG…``
    (its last), no traceback, and no temporary file of an atomic write left under ``out``."""
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=TIMEOUT)
    assert proc.returncode == 128 + sig, err
    lines = err.strip().splitlines()
    assert [line for line in lines if "interrupted" in line] == [lines[-1]], err
    assert lines[-1].startswith(f"error: interrupted: {sig.name}"), err
    assert "Traceback" not in err, err
    if out is not None:
        assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]
    return lines[-1]


def _gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return True
    return state in ("Z", "X")  # reparented to an init that does not reap: a zombie has stopped all the same


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_during_start_up(sig, tmp_path):
    """As soon as the handler is in place, while the command is still importing torch and parsing."""
    proc = _start("toy2d", *TINY, "--steps", "2", "--out", tmp_path / "out")
    _wait_for(lambda: _handles_sigterm(proc.pid), proc, timeout=60)
    _signal_and_check(proc, sig, tmp_path)


def test_during_training(tmp_path):
    proc = _start("toy2d", *TINY, "--steps", "100000", "--ckpt-every", "50", "--out", tmp_path)
    _wait_for(lambda: any(p.stat().st_size for p in tmp_path.glob("*/metrics.jsonl")), proc)
    line = _signal_and_check(proc, signal.SIGTERM, tmp_path)
    assert "at step" in line and "--resume" in line
    (folder,) = tmp_path.iterdir()
    assert 1 <= load_checkpoint(folder / "checkpoint.pt")["step"] < 100000
    assert (folder / runs.LOCK_NAME).read_text() == ""  # released


def test_during_the_evaluation_after_training(tmp_path):
    proc = _start("toy2d", *TINY, *SLOW_EVAL, "--steps", "3", "--out", tmp_path)
    _wait_for(lambda: any(len(p.read_text().splitlines()) == 3 for p in tmp_path.glob("*/metrics.jsonl")), proc)
    _signal_and_check(proc, signal.SIGTERM, tmp_path)
    (folder,) = tmp_path.iterdir()
    assert not (folder / runs.METRICS_NAME).exists() and load_checkpoint(folder / "checkpoint.pt")["step"] == 3
    # the checkpoint is whole: --resume only evaluates it
    assert cli.main(["toy2d", *TINY, "--steps", "3", "--resume", "--out", str(tmp_path)]) == 0
    assert runs.load(folder).is_finished


def test_during_eval(tmp_path):
    assert cli.main(["toy2d", *TINY, "--steps", "2", "--out", str(tmp_path)]) == 0
    (folder,) = tmp_path.iterdir()
    before = (folder / runs.METRICS_NAME).read_bytes()
    proc = _start("eval", folder, *SLOW_EVAL)
    _wait_for(lambda: _lock_pid(folder) == proc.pid, proc)  # it holds the folder: evaluating
    _signal_and_check(proc, signal.SIGINT, tmp_path)
    assert (folder / runs.METRICS_NAME).read_bytes() == before


def test_a_study_stops_with_its_workers(tmp_path):
    proc = _start("study", "toy2d", *TINY, "--steps", "100000", "--ckpt-every", "50", "--grid", "lam=0,0.5",
                  "--seeds", "1", "--jobs", "2", "--out", tmp_path)
    workers: dict[Path, int] = {}

    def both_training() -> bool:
        for log in tmp_path.glob("*/metrics.jsonl"):
            pid = _lock_pid(log.parent)
            if pid is not None and log.stat().st_size:
                workers[log.parent] = pid
        return len(workers) == 2

    _wait_for(both_training, proc)
    assert proc.pid not in workers.values()  # the runs are the workers'
    _signal_and_check(proc, signal.SIGTERM, tmp_path)
    assert all(_gone(pid) for pid in workers.values())
    for folder in workers:  # each worker wrote a checkpoint at the step it reached, and let go of its folder
        assert load_checkpoint(folder / "checkpoint.pt")["step"] >= 1
        assert (folder / runs.LOCK_NAME).read_text() == ""
