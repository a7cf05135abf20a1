"""benchmarks/gpu_check.sh without a GPU: syntax, and a run with fake ``python`` and ``nvidia-smi`` on PATH that
record their calls (every step invoked, failures recorded and survived, summary written, exit codes)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"
SEP = "\x1f"

# every step's command after the program name, in order (the cuda step's code is matched by its start)
EXPECTED = [
    ["nvidia-smi"],
    ["python", "-c", "import torch; assert torch.cuda.is_available()"],
    ["python", "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", "tests"],
    ["python", "benchmarks/bench_images.py", "--device", "cuda", "--model", "ddpmpp", "--batch", "48",
     "--reg-batch", "8", "--variants", "dsm", "fpe-p1", "--repeats", "3"],
    ["python", "benchmarks/bench_train_step.py", "--device", "cuda"],
    ["python", "benchmarks/bench_residual.py", "--quick"],
    ["python", "benchmarks/bench_likelihood.py", "--quick"],
]
STEPS = ["nvidia-smi", "cuda", "pytest-gpu", "bench-images", "bench-train-step", "bench-residual", "bench-likelihood"]

pytestmark = pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None,
                                reason="needs bash and coreutils timeout")


def _fake_bin(tmp_path: Path, fail_on: str | None = None, code: int = 7) -> tuple[Path, Path]:
    """A folder with ``python`` and ``nvidia-smi`` that append their argv (and cwd) to calls.log; the call
    whose arguments contain ``fail_on`` prints a message and exits ``code``."""
    bin_dir, calls = tmp_path / "bin", tmp_path / "calls.log"
    bin_dir.mkdir()
    for name in ("python", "nvidia-smi"):
        fail = f'case "$*" in *{fail_on}*) echo "fake {name} fails"; exit {code};; esac' if fail_on else ""
        (bin_dir / name).write_text(
            "#!/usr/bin/env bash\n"
            f'printf "%s{SEP}" "$PWD" "{name}" "$@" >> "{calls}"; printf "\\n" >> "{calls}"\n'
            f'echo "fake {name} ran"\n{fail}\nexit 0\n'
        )
        (bin_dir / name).chmod(0o755)
    return bin_dir, calls


def _run(out: Path, bin_dir: Path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHON"}
    env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=60, env=env,
                          cwd=out.parent)


def _calls(calls: Path) -> list[list[str]]:
    return [line.split(SEP)[:-1] for line in calls.read_text().splitlines()]


def _summary(out: Path) -> list[list[str]]:
    return [row.split("\t") for row in (out / "summary.tsv").read_text().splitlines()]


def test_script_syntax_and_the_check_can_fail(tmp_path):
    assert subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True).returncode == 0
    broken = tmp_path / "broken.sh"
    broken.write_text(SCRIPT.read_text().replace("fi\n", "", 1))  # an unclosed `if`
    assert subprocess.run(["bash", "-n", str(broken)], capture_output=True).returncode != 0
    text = SCRIPT.read_text()
    assert "set -u" in text and os.access(SCRIPT, os.X_OK)


def test_every_step_runs_from_the_repo_root_and_the_summary_is_written(tmp_path):
    bin_dir, calls = _fake_bin(tmp_path)
    out = tmp_path / "out"  # relative on the command line: resolved before the script changes folder
    proc = _run(out, bin_dir, "out")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    got = _calls(calls)
    assert len(got) == len(EXPECTED)
    for (cwd, *argv), want in zip(got, EXPECTED):
        assert Path(cwd) == ROOT
        if want[1:2] == ["-c"]:
            assert argv[:2] == want[:2] and argv[2].startswith(want[2]), argv
        else:
            assert argv == want
    assert _summary(out)[0] == ["step", "exit", "seconds", "log"]
    assert [row[:2] for row in _summary(out)[1:]] == [[s, "0"] for s in STEPS]
    for s in STEPS:
        assert "ran" in (out / f"{s}.log").read_text()  # each step's output teed to its log
    assert sorted(p.name for p in out.iterdir()) == sorted([f"{s}.log" for s in STEPS] + ["summary.tsv"])
    first = proc.stdout.splitlines()[0]
    assert "UTC" in first  # the date comes first, then nvidia-smi
    assert proc.stdout.index("fake nvidia-smi ran") < proc.stdout.index("fake python ran")


def test_a_failing_step_is_recorded_and_the_rest_still_run(tmp_path):
    bin_dir, calls = _fake_bin(tmp_path, fail_on="bench_images.py")
    out = tmp_path / "out"
    proc = _run(out, bin_dir, str(out))
    assert proc.returncode == 1
    assert len(_calls(calls)) == len(EXPECTED)  # steps after the failure were still invoked
    codes = {row[0]: row[1] for row in _summary(out)[1:]}
    assert codes == {s: ("7" if s == "bench-images" else "0") for s in STEPS}
    assert "fake python fails" in (out / "bench-images.log").read_text()
    assert "=== bench-images: FAILED (exit 7)" in proc.stdout


def test_a_step_past_its_time_limit_is_recorded_as_124(tmp_path):
    bin_dir, _ = _fake_bin(tmp_path)
    (bin_dir / "nvidia-smi").write_text("#!/usr/bin/env bash\nsleep 30\n")
    out = tmp_path / "out"
    script = tmp_path / "benchmarks" / "gpu_check.sh"  # a copy with a 1 s limit, run from a copy of the tree
    script.parent.mkdir()
    script.write_text(SCRIPT.read_text().replace("step nvidia-smi 20 ", "step nvidia-smi 1 "))
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.pop("PYTHON", None)
    proc = subprocess.run(["bash", str(script), str(out)], capture_output=True, text=True, timeout=60, env=env)
    assert proc.returncode == 1
    assert _summary(out)[1][:2] == ["nvidia-smi", "124"]


def test_bad_usage_and_unwritable_out(tmp_path):
    bin_dir, calls = _fake_bin(tmp_path)
    proc = _run(tmp_path / "x", bin_dir)
    assert proc.returncode == 2 and proc.stderr.startswith("error: usage: benchmarks/gpu_check.sh OUT_DIR")
    blocker = tmp_path / "afile"
    blocker.write_text("")
    proc = _run(tmp_path / "x", bin_dir, str(blocker / "out"))
    assert proc.returncode == 1
    assert proc.stderr.splitlines() == [
        f"error: cannot create or write the folder {blocker / 'out'}; choose a writable OUT_DIR"
    ]
    assert not calls.exists()  # nothing ran
