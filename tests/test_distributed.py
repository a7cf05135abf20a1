"""DDP: gradients of DSM + FPE over 2 CPU processes (gloo, launched by torchrun) equal one process on the
concatenated batch (fpe_lab/distributed.py)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fpe_lab import distributed

from . import ddp_worker

WORKER = Path(__file__).with_name("ddp_worker.py")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ddp_grads(tmp_path_factory) -> dict:
    """Launch the 2-process gloo worker once (~40 s on a loaded 2-core machine)."""
    out = tmp_path_factory.mktemp("ddp") / "grads.pt"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={_free_port()}", str(WORKER), str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return torch.load(out, weights_only=True)


def _reference() -> dict[str, torch.Tensor]:
    module = ddp_worker.make_model(seed=0)
    ddp_worker.batch_loss(module, *ddp_worker.global_batch()).backward()
    return {name: p.grad for name, p in module.named_parameters()}


def _max_rel_diff(a: dict, b: dict) -> float:
    scale = max(v.abs().max().item() for v in b.values())
    return max((a[k] - b[k]).abs().max().item() for k in b) / scale


@pytest.mark.slow
def test_ddp_gradients_equal_single_process(ddp_grads):
    got, ref = ddp_grads["synced"], _reference()
    assert set(got["rank0"]) == set(ref)
    # float64 round-off: the two halves are summed in a different order than the full batch
    assert _max_rel_diff(got["rank0"], ref) < 1e-10
    assert _max_rel_diff(got["rank1"], ref) < 1e-10


@pytest.mark.slow
def test_without_gradient_averaging_ranks_disagree(ddp_grads):
    """Negative control: the DDP reducer alone (forward not called through DDP) syncs nothing, so the
    equality above is the hooks' doing and the comparison can fail."""
    got, ref = ddp_grads["unsynced"], _reference()
    assert _max_rel_diff(got["rank0"], ref) > 1e-3
    assert _max_rel_diff(got["rank0"], got["rank1"]) > 1e-3


def test_single_process_env(monkeypatch):
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    env = distributed.init_from_env()
    assert not env.is_distributed and env.is_main
    net = torch.nn.Linear(2, 2)
    assert distributed.wrap(net, env) is net and distributed.unwrap(net) is net
    assert distributed.average_gradients_in_backward(net, env) == []
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "2")
    with pytest.raises(ValueError, match="inconsistent torchrun environment"):
        distributed.init_from_env()
    monkeypatch.setenv("RANK", "x")
    with pytest.raises(ValueError, match="RANK must be an integer"):
        distributed.init_from_env()


@pytest.mark.slow
def test_torchrun_cifar10_command(tmp_path):
    """`torchrun --nproc_per_node=2 -m fpe_lab.run cifar10 ...` trains, rank 0 writes the checkpoint and
    metrics, rank 1 keeps only its step and RNG state, and the run resumes (grows) under torchrun."""
    from .fake_cifar import write_fake_cifar10

    data = write_fake_cifar10(tmp_path, n_per_batch=4)
    out = tmp_path / "runs"

    def torchrun(*extra: str) -> None:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
               f"--master_port={_free_port()}", "-m", "fpe_lab.run", "cifar10", "--data-dir", str(data),
               "--model", "tiny", "--batch", "4", "--eval-points", "2", "--eval-nll-points", "1", "--eval-rtol", "0.1",
               "--eval-times", "0.5", "--ckpt-every", "2", "--device", "cpu", "--out", str(out), *extra]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert proc.returncode == 0, proc.stderr[-3000:]

    torchrun("--steps", "2")
    (run_dir,) = list(out.iterdir())
    assert (run_dir / "metrics.json").is_file()
    from fpe_lab.checkpoint import load_checkpoint

    r0 = load_checkpoint(run_dir / "checkpoint.pt")
    r1 = load_checkpoint(run_dir / "ranks" / "rank1" / "checkpoint.pt")
    assert r0["step"] == r1["step"] == 2
    assert set(r1) == {"step", "rng", "fingerprint"}  # no duplicate of the weights
    assert not torch.equal(r0["rng"]["data"], r1["rng"]["data"])  # different data streams per rank
    torchrun("--steps", "4", "--resume")
    assert load_checkpoint(run_dir / "checkpoint.pt")["step"] == 4
    assert load_checkpoint(run_dir / "ranks" / "rank1" / "checkpoint.pt")["step"] == 4
