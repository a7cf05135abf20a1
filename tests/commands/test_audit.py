"""``python -m fpe_lab.run audit``: a tiny diffusers UNet2DModel audited on digits from Python and from the
command line (same numbers), the model's own samples, a run folder, and every bad input as one error line."""

from __future__ import annotations

import json
import logging
import math
import pickle
import sys
from pathlib import Path

import pytest
import torch

from fpe_lab import run as cli
from fpe_lab.audit import AuditReport, audit
from fpe_lab.commands.audit import read_audit
from fpe_lab.data.images import ImageSplit, load_digits

from ..fake_cifar import write_fake_cifar10

pytest.importorskip("sklearn")  # the digits data set


def _main(*argv) -> int:
    return cli.main([str(a) for a in argv])


def _tiny_unet_folder(folder: Path, in_channels: int = 1, sample_size: int = 8) -> Path:
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(
        sample_size=sample_size, in_channels=in_channels, out_channels=in_channels, block_out_channels=(8, 16),
        layers_per_block=1, norm_num_groups=4, attention_head_dim=8,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"))
    unet.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def unet_dir(tmp_path_factory):
    return _tiny_unet_folder(tmp_path_factory.mktemp("unet"))


def test_cli_audit_of_a_diffusers_model_equals_the_python_call(unet_dir, tmp_path, capsys, caplog):
    from fpe_lab.nets.diffusers_model import load_diffusers_score

    caplog.set_level(logging.INFO)
    out = tmp_path / "audit"
    argv = ["audit", unet_dir, "--data", "digits", "--points", "4", "--times", "0.1", "0.6", "--probes", "1",
            "--batch", "3", "--seed", "3", "--device", "cpu", "--out", out]
    assert _main(*argv) == 0
    report, record = read_audit(out / "audit.json")
    assert record["data"] == "digits" and record["seed"] == 3 and record["dtype"] == "float32"
    assert (out / "audit.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert report.times == (0.1, 0.6) and report.points == 4 and report.dim == 64 and report.probes == 1
    assert all(math.isfinite(v) for v in report.residual + report.asymmetry + report.dsm)
    assert all(v > 0 for v in report.dsm)  # an untrained network: the DSM loss is O(D)
    # the same audit from Python: same data subset, noise and probes
    gen = torch.Generator().manual_seed(3)
    ds = load_digits(ImageSplit.TEST)
    x0 = ds.scale(ds.pixels[torch.randperm(len(ds), generator=gen)[:4]])
    model = load_diffusers_score(unet_dir)
    direct = audit(model, model.sde, x0, [0.1, 0.6], probes=1, batch_size=3, generator=gen)
    assert direct == report  # bitwise: the same float32 operations in the same order
    assert "score-FPE audit: D = 64" in caplog.text
    # refuses to overwrite, then does with --overwrite
    assert _main(*argv) == 2
    assert "audit.json exists; pass --overwrite" in capsys.readouterr().err
    assert _main(*argv, "--overwrite", "--times", "0.5", "--points", "1") == 0
    assert read_audit(out / "audit.json")[0].times == (0.5,)


def test_cli_audit_on_the_models_own_samples(unet_dir, tmp_path):
    out = tmp_path / "own"
    assert _main("audit", unet_dir, "--data", "model", "--sample-steps", "3", "--points", "3", "--times", "0.5",
                 "--probes", "1", "--device", "cpu", "--out", out) == 0
    report, record = read_audit(out / "audit.json")
    assert record["sample_steps"] == 3 and report.points == 3


def test_cli_audit_of_a_run_folder(tmp_path):
    from fpe_lab import runs

    assert _main("toy2d", "--steps", "5", "--width", "16", "--depth", "1", "--batch", "16", "--eval-points", "8",
                 "--eval-nll-points", "2", "--eval-samples", "0", "--eval-times", "0.5", "--out", tmp_path / "runs") == 0
    (folder,) = [p for p in (tmp_path / "runs").iterdir() if p.is_dir()]
    assert _main("audit", folder, "--data", "gmm", "--points", "8", "--times", "0.1", "1", "--device", "cpu",
                 "--out", tmp_path / "a") == 0
    report, _ = read_audit(tmp_path / "a" / "audit.json")
    assert report.probes is None and report.dim == 2  # D = 2: exact divergence and Jacobian
    run = runs.load(folder)
    assert report.sde == str(run.sde)


def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_bad_inputs_are_one_error_line_with_exit_2(unet_dir, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    common = ["--points", "2", "--times", "0.5", "--device", "cpu", "--out", out]
    # a folder that is neither kind
    (tmp_path / "empty").mkdir()
    assert _main("audit", tmp_path / "empty", "--data", "digits", *common) == 2
    assert "is neither an fpe_lab run folder" in _error_line(capsys)
    # size/channel mismatch: a 3×8×8 model on 1×8×8 digits, and the 1×8×8 model on 2-D points
    rgb = _tiny_unet_folder(tmp_path / "rgb", in_channels=3)
    assert _main("audit", rgb, "--data", "digits", *common) == 2
    assert "takes samples of shape (3, 8, 8) but --data digits has 1×8×8 images" in _error_line(capsys)
    cifar = write_fake_cifar10(tmp_path / "cifar", n_per_batch=2)
    assert _main("audit", unet_dir, "--data", "cifar10", "--data-dir", cifar, *common) == 2
    assert "takes samples of shape (1, 8, 8) but --data cifar10 has 3×32×32 images" in _error_line(capsys)
    assert _main("audit", unet_dir, "--data", "gmm", *common) == 2
    assert "takes samples of shape (1, 8, 8) but --data gmm is 2-D points" in _error_line(capsys)
    # a VE (Fourier-time) model cannot use the DDPM mapping
    ve = tmp_path / "ve"
    ve.mkdir()
    cfg = json.loads((unet_dir / "config.json").read_text())
    cfg["time_embedding_type"] = "fourier"
    (ve / "config.json").write_text(json.dumps(cfg))
    (ve / "diffusion_pytorch_model.safetensors").write_bytes((unet_dir / "diffusion_pytorch_model.safetensors").read_bytes())
    assert _main("audit", ve, "--data", "digits", *common) == 2
    assert "time_embedding_type 'fourier'" in _error_line(capsys)
    # a pickle that would run code
    evil = tmp_path / "evil"
    evil.mkdir()
    (evil / "config.json").write_text((unet_dir / "config.json").read_text())
    marker = tmp_path / "marker"
    (evil / "diffusion_pytorch_model.bin").write_bytes(pickle.dumps({"w": _Marker(marker)}))
    assert _main("audit", evil, "--data", "digits", *common) == 2
    assert "refusing to load" in _error_line(capsys) and not marker.exists()
    # times below eps, cifar10 without --data-dir, too many points
    assert _main("audit", unet_dir, "--data", "digits", "--times", "1e-4", "--out", out) == 2
    assert "--times must lie in [eps, 1] = [0.001, 1]" in _error_line(capsys)
    assert _main("audit", unet_dir, "--data", "cifar10", *common) == 2
    assert "--data cifar10 needs --data-dir" in _error_line(capsys)
    assert _main("audit", unet_dir, "--data", "digits", "--points", "1000", "--times", "0.5", "--out", out) == 2
    assert "--points 1000 exceeds the 297 images" in _error_line(capsys)
    # usage errors: one line too
    assert _main("audit", unet_dir, "--data", "imagenet", "--out", out) == 2
    assert "invalid choice: 'imagenet'" in _error_line(capsys)
    # diffusers missing: the error names the extra
    monkeypatch.setitem(sys.modules, "diffusers", None)
    assert _main("audit", unet_dir, "--data", "digits", *common) == 2
    assert 'pip install -e ".[audit]"' in _error_line(capsys)
    assert not out.exists()  # nothing was written by any failure


class _Marker:
    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return (Path.write_text, (self.path, "ran"))


def test_audit_json_round_trips_through_from_dict(unet_dir, tmp_path):
    out = tmp_path / "rt"
    assert _main("audit", unet_dir, "--data", "digits", "--points", "2", "--times", "0.5", "--device", "cpu",
                 "--out", out) == 0
    record = json.loads((out / "audit.json").read_text())
    assert AuditReport.from_dict(record["report"]).to_dict() == record["report"]


def test_cli_audit_of_a_cosine_v_prediction_pipeline(unet_dir, tmp_path):
    """A pipeline folder with a squaredcos_cap_v2 scheduler and v-prediction (refused before) is audited under
    its tabulated VP SDE."""
    pipe = tmp_path / "pipe"
    (pipe / "unet").mkdir(parents=True)
    (pipe / "scheduler").mkdir()
    for name in ("config.json", "diffusion_pytorch_model.safetensors"):
        (pipe / "unet" / name).write_bytes((unet_dir / name).read_bytes())
    (pipe / "scheduler" / "scheduler_config.json").write_text(json.dumps(
        {"_class_name": "DDPMScheduler", "beta_schedule": "squaredcos_cap_v2", "prediction_type": "v_prediction"}))
    out = tmp_path / "audit"
    assert _main("audit", pipe, "--data", "digits", "--points", "2", "--times", "0.1", "0.6", "--probes", "1",
                 "--device", "cpu", "--out", out) == 0
    report, record = read_audit(out / "audit.json")
    assert report.sde.startswith("tabulated VP SDE (squaredcos_cap_v2, N = 1000)")
    assert "v_prediction prediction" in record["model_description"]
    assert all(math.isfinite(v) for v in report.residual + report.dsm)


def test_cli_audit_refuses_abbreviated_flags(unet_dir, tmp_path, capsys):
    """--overwr is not --overwrite: exit 2, one error line, nothing written."""
    out = tmp_path / "out"
    assert _main("audit", unet_dir, "--data", "digits", "--points", "2", "--times", "0.5", "--out", out,
                 "--overwr") == 2
    assert "--overwr" in _error_line(capsys)
    assert not out.exists()
