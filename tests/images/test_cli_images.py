"""End to end: ``python -m fpe_lab.run cifar10 --model tiny`` on a tiny fake CIFAR-10 (fpe_lab/commands/images.py)."""

from __future__ import annotations

import json

import pytest
import torch

from fpe_lab import run
from fpe_lab.checkpoint import load_checkpoint, save_checkpoint
from fpe_lab.model import ScoreModel
from fpe_lab.nets.unet import UNet, UNetConfig, UNetSize
from fpe_lab.sde import VPSDE

from .fake_cifar import write_fake_cifar10

TINY_RUN = ["--model", "tiny", "--steps", "2", "--batch", "2", "--ckpt-every", "1", "--eval-points", "1",
            "--eval-rtol", "0.1", "--device", "cpu"]


@pytest.fixture(scope="module")
def cifar(tmp_path_factory):
    return write_fake_cifar10(tmp_path_factory.mktemp("data"), n_per_batch=4)


def _run_dir(out):
    (d,) = [p for p in out.iterdir() if p.is_dir()]
    return d


def test_train_evaluate_resume(cifar, tmp_path, capsys):
    out = tmp_path / "runs"
    assert run.main(["cifar10", "--data-dir", str(cifar.parent), "--out", str(out), *TINY_RUN]) == 0
    run_dir = _run_dir(out)
    assert run_dir.name == "cifar10_tiny_vp_fpe_lam0.1_p1_steps2_b2_seed0"
    metrics = json.loads((run_dir / "metrics.json").read_text())
    lik = metrics["likelihood"]
    # a barely trained tiny net: bits/dim finite and above the 7-bit dequantization offset's floor of 0
    assert torch.isfinite(torch.tensor(lik["bits_per_dim"])) and lik["bits_per_dim"] > 0
    assert lik["solver"]["method"] == "RK45" and lik["solver"]["offset_bits_per_dim"] == 7.0
    assert torch.isfinite(torch.tensor(lik["dsm_bound_bits_per_dim"])) and lik["dsm_bound_bits_per_dim"] > 0
    assert metrics["training"]["steps"] == 2 and metrics["training"]["final_fpe"] > 0
    ckpt = load_checkpoint(run_dir / "checkpoint.pt")
    assert ckpt["step"] == 2 and set(ckpt) >= {"model", "ema", "optimizer", "rng"}
    config = json.loads((run_dir / "config.json").read_text())
    assert config["image_shape"] == [3, 32, 32] and config["probes"] == 1

    # the same folder again without --resume is refused; with --resume it continues (nothing left to do)
    capsys.readouterr()
    assert run.main(["cifar10", "--data-dir", str(cifar), "--out", str(out), *TINY_RUN]) == 2
    assert "already exists; pass --resume" in capsys.readouterr().err
    before = (run_dir / "checkpoint.pt").read_bytes()
    assert run.main(["cifar10", "--data-dir", str(cifar.parent), "--out", str(out), "--resume", *TINY_RUN]) == 0
    assert load_checkpoint(run_dir / "checkpoint.pt")["step"] == 2
    assert (run_dir / "checkpoint.pt").read_bytes() == before  # a finished run is not retrained

    # re-evaluation of the saved EMA weights with another probe/dequantization seed; same seed, same number
    ev = ["images-eval", str(run_dir), "--eval-points", "1", "--eval-rtol", "0.1", "--device", "cpu"]
    assert run.main([*ev, "--eval-seed", "3"]) == 0
    first = json.loads((run_dir / "bpd_seed3_n1_r1.json").read_text())
    assert first["eval_seed"] == 3 and first["bits_per_dim"] > 0
    assert run.main([*ev, "--eval-seed", "3"]) == 0
    assert json.loads((run_dir / "bpd_seed3_n1_r1.json").read_text())["bits_per_dim"] == first["bits_per_dim"]
    assert run.main(["images-eval", str(tmp_path)]) == 2
    assert "is not an image run folder" in capsys.readouterr().err

    # fine-tuning from that run (same architecture) works and starts from its EMA weights
    ft_out = tmp_path / "ft"
    assert run.main(["cifar10", "--data-dir", str(cifar), "--out", str(ft_out), "--init-from", str(run_dir),
                     "--reg", "none", *TINY_RUN]) == 0
    assert _run_dir(ft_out).name.endswith("_ft_steps2_b2_seed0")


def test_init_from_other_architecture_exits_2(cifar, tmp_path, capsys):
    other = ScoreModel(UNet(UNetConfig.preset(UNetSize.TINY, in_channels=1, image_size=8)), VPSDE())
    save_checkpoint(tmp_path / "other.pt", {"ema": other.state_dict(), "step": 0})
    code = run.main(["cifar10", "--data-dir", str(cifar), "--out", str(tmp_path / "r"),
                     "--init-from", str(tmp_path / "other.pt"), *TINY_RUN])
    err = capsys.readouterr().err
    assert code == 2
    assert "checkpoint of another architecture" in err and "shape mismatches" in err and "3×32×32" in err
    assert len(err.strip().splitlines()) == 1


@pytest.mark.parametrize(
    "argv, match",
    [
        (["cifar10", "--data-dir", "{missing}"], "CIFAR-10 not found"),
        (["cifar10", "--data-dir", "{data}", "--bf16", "--device", "cpu"], "--bf16 needs CUDA"),
        (["cifar10", "--data-dir", "{data}", "--batch", "0"], "must be in"),
        (["cifar10", "--data-dir", "{data}", "--model", "huge"], "invalid choice"),
        (["cifar10", "--data-dir", "{data}", "--init-from", "{missing}"], "no checkpoint there"),
    ],
    ids=["missing-data", "bf16-cpu", "batch", "model", "init-missing"],
)
def test_bad_input_exits_2(cifar, tmp_path, capsys, argv, match):
    argv = [a.format(missing=tmp_path / "nope", data=cifar) for a in argv] + ["--out", str(tmp_path / "r"), "--steps", "1"]
    try:
        code = run.main(argv)
    except SystemExit as e:  # argparse usage errors
        code = e.code
    err = capsys.readouterr().err
    assert code == 2 and match in err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "r").exists() or not any((tmp_path / "r").rglob("checkpoint.pt"))


def test_corrupt_data_exits_2(tmp_path, capsys):
    folder = write_fake_cifar10(tmp_path, n_per_batch=2)
    (folder / "data_batch_5").write_bytes(b"\x80\x02garbage")
    assert run.main(["cifar10", "--data-dir", str(folder), "--out", str(tmp_path / "r"), *TINY_RUN]) == 2
    assert "corrupt CIFAR-10 file" in capsys.readouterr().err


def test_dry_run_and_digits(cifar, tmp_path, capsys):
    assert run.main(["cifar10", "--data-dir", str(cifar), "--dry-run", "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert '"model": "tiny"' in printed and "run folder:" in printed and not any(tmp_path.iterdir())
    try:
        import sklearn  # noqa: F401
    except ImportError:
        assert run.main(["digits", "--dry-run"]) == 2
        assert "pip install scikit-learn" in capsys.readouterr().err
    else:
        assert run.main(["digits", "--dry-run"]) == 0


@pytest.mark.gpu
def test_gpu_bf16_smoke(cifar, tmp_path):
    """On CUDA: bf16 autocast for the DSM pass, fp32 residual, two steps and bits/dim."""
    argv = ["cifar10", "--data-dir", str(cifar), "--out", str(tmp_path), "--bf16", "--model", "tiny", "--steps", "2",
            "--batch", "4", "--eval-points", "2", "--eval-rtol", "1e-3", "--device", "cuda"]
    assert run.main(argv) == 0
    metrics = json.loads((_run_dir(tmp_path) / "metrics.json").read_text())
    assert torch.isfinite(torch.tensor(metrics["likelihood"]["bits_per_dim"]))


def test_nan_loss_exits_2_and_keeps_last_good_checkpoint(cifar, tmp_path, capsys, monkeypatch):
    """A non-finite loss at step 2 stops the run with one line and exit 2; checkpoint.pt stays at step 1."""
    from fpe_lab.commands import images
    from fpe_lab.losses import LossTerms

    real = images.build_image_loss

    def poisoned(config, sde):
        loss, calls = real(config, sde), []

        def fn(model, x0, generator):
            calls.append(1)
            terms = loss(model, x0, generator)
            if len(calls) < 2:
                return terms
            nan = terms.total * float("nan")
            return LossTerms(total=nan, dsm=nan, fpe=terms.fpe)

        return fn

    monkeypatch.setattr(images, "build_image_loss", poisoned)
    argv = ["cifar10", "--data-dir", str(cifar), "--out", str(tmp_path), "--reg", "none", "--steps", "3",
            "--batch", "2", "--ckpt-every", "1", "--eval-points", "0", "--device", "cpu"]
    assert run.main(argv) == 2
    err = capsys.readouterr().err
    assert "non-finite loss at step 2" in err and "last good checkpoint: step 1" in err
    assert [line for line in err.splitlines() if "Traceback" in line or line.startswith("error:")] == [
        err.strip().splitlines()[-1]]  # one error line (after the progress bar), no traceback
    state = load_checkpoint(_run_dir(tmp_path) / "checkpoint.pt")
    assert state["step"] == 1 and all(torch.isfinite(v).all() for v in state["model"].values())


@pytest.mark.parametrize("dt", ["jvp", "fd"])
@pytest.mark.parametrize("sde", ["ve", "vp", "subvp"])
def test_image_loss_all_sdes_finite_near_eps(sde, dt):
    """The cifar10 command's loss (DSM + Hutchinson FPE) is finite, with finite gradients, for every SDE at
    t = eps (the paper's code crashes for VE/sub-VP and gives NaN below t = 1e-3), with ∂_t s by JVP and by
    the clipped finite difference (--dt fd)."""
    from fpe_lab.commands.images import build_image_loss, build_image_model
    from fpe_lab.config import ImageConfig, SDEKind, TimeDerivativeKind, build_sde
    from fpe_lab.losses import dsm_loss

    config = ImageConfig(image_shape=(1, 8, 8), sde=SDEKind(sde), eps=1e-5, probes=2, dt=TimeDerivativeKind(dt))
    sde_obj = build_sde(config.sde)
    model = build_image_model(config, sde_obj)
    loss = build_image_loss(config, sde_obj)
    x0 = torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1

    t = torch.tensor([config.eps, 0.5])
    z = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    dsm = dsm_loss(model, sde_obj, x0, t, z).mean()
    fpe = loss.regularizer(model, sde_obj, x0 + 0.1 * z, t).mean()
    total = dsm + loss.regularizer.lam * fpe
    total.backward()
    assert torch.isfinite(dsm) and torch.isfinite(fpe) and fpe > 0
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    terms = loss(model, x0, torch.Generator().manual_seed(2))  # the full loss object as the loop calls it
    assert terms.is_finite() and float(terms.fpe) > 0
