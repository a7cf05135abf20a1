"""The regularizer door: built-ins listed in one place, a user's module through --plugin, old configurations migrated."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fpe_lab import regularizers
from fpe_lab.config import RunConfig, toy2d
from fpe_lab.regularizers.base import Regularizer
from tests.conftest import ALL_REGULARIZERS

ROOT = Path(__file__).resolve().parents[2]
TINY = ["--steps", "3", "--batch", "16", "--eval-points", "8", "--eval-nll-points", "0", "--eval-samples", "0",
        "--eval-times", "0.5"]


def _cli(args: list[str], pythonpath: Path, tmp_path: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(pythonpath), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "fpe_lab.run", *args], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=600)


def test_builtins_are_listed_in_one_place_and_named_by_their_modules():
    assert [cls.name for cls in regularizers.BUILTINS] == ["fpe", "conservative", "hodsm"]
    for cls in regularizers.BUILTINS:
        assert cls.__module__ == f"fpe_lab.regularizers.{cls.name}"  # the module is the unit
        assert regularizers.get(cls.name) is cls and issubclass(cls, Regularizer)
    with pytest.raises(ValueError, match=r"reg must be one of \['none', 'fpe', 'conservative', 'hodsm'.*--plugin"):
        regularizers.get("nope")


def test_a_copy_of_a_builtin_module_is_a_plugin_with_no_edit(tmp_path):
    """hodsm.py copied outside the package under another name runs as --plugin my_hodsm --reg my_hodsm, and eval
    finds it again from config.json in a fresh process."""
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    shutil.copy(ROOT / "fpe_lab" / "regularizers" / "hodsm.py", plugins / "my_hodsm.py")
    out = tmp_path / "runs"
    r = _cli(["toy2d", "--plugin", "my_hodsm", "--reg", "my_hodsm", "--lam", "0.01", "--my-hodsm-order", "3",
              *TINY, "--out", str(out)], plugins, tmp_path)
    assert r.returncode == 0, r.stderr
    (folder,) = out.iterdir()
    assert folder.name.startswith("gmm_vp_my_hodsm0.01_seed0-")
    saved = json.loads((folder / "config.json").read_text())
    assert saved["plugins"] == ["my_hodsm"] and saved["loss"]["reg"]["my_hodsm"] == {"order": 3}
    r = _cli(["eval", str(folder), "--eval-points", "8"], plugins, tmp_path)
    assert r.returncode == 0, r.stderr
    # without the module on the path, the run folder says what is missing, on one line
    r = _cli(["eval", str(folder)], tmp_path, tmp_path)
    assert r.returncode != 0 and "plugin my_hodsm: cannot import it" in r.stderr and "Traceback" not in r.stderr


def test_the_worked_example_plugin_trains(tmp_path):
    out = tmp_path / "runs"
    r = _cli(["toy2d", "--plugin", "jacobian_norm", "--reg", "jacobian_norm", "--lam", "0.01",
              "--jacobian-norm-weighting", "one", *TINY, "--out", str(out)], ROOT / "examples" / "plugins", tmp_path)
    assert r.returncode == 0, r.stderr
    (folder,) = out.iterdir()
    history = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    assert all(h["reg"] > 0 for h in history)  # the plug-in's penalty really entered the loss


def test_a_plugin_option_on_the_wrong_regularizer_and_bad_modules_are_refused(tmp_path):
    r = _cli(["toy2d", "--plugin", "jacobian_norm", "--jacobian-norm-weighting", "one", "--dry-run"],
             ROOT / "examples" / "plugins", tmp_path)
    assert r.returncode == 2 and "loss.reg.jacobian_norm is the section of reg jacobian_norm" in r.stderr
    r = _cli(["toy2d", "--plugin", "no_such_module", "--dry-run"], tmp_path, tmp_path)
    assert r.returncode == 2 and r.stderr.startswith("error: plugin no_such_module: cannot import it")
    (tmp_path / "empty_plugin.py").write_text("X = 1\n")
    r = _cli(["toy2d", "--plugin", "empty_plugin", "--dry-run"], tmp_path, tmp_path)
    assert r.returncode == 2 and "defines no subclass" in r.stderr
    (tmp_path / "clash.py").write_text(
        "from fpe_lab.regularizers.hodsm import HODSMRegularizer\n\n\nclass Clash(HODSMRegularizer):\n    name = 'fpe'\n")
    r = _cli(["toy2d", "--plugin", "clash", "--dry-run"], tmp_path, tmp_path)
    assert r.returncode == 2 and "regularizer name 'fpe' of Clash is taken by" in r.stderr


# The configurations of 0.2 (flat regularizer fields) and the fingerprints of their run folders.
V02_REG = {"conservative_weighting": "sigma4", "divergence": "exact", "dt": "jvp", "estimator": "squared",
           "fd_step": 0.001, "hodsm_order": 2, "kind": "fpe", "lam": 0.1, "n_points": None, "per_dim": False,
           "points": "perturbed", "probe": "rademacher", "probes": 1, "residual_path": "jet",
           "weighting": "normalized"}


@pytest.mark.parametrize("changes, fingerprint", [
    ({}, "c161bc71b7"),  # README's main job: runs/gmm_vp_fpe0.1_seed0-c161bc71b7
    ({"kind": "none", "lam": 0.0}, "1ecb257c6f"),
    ({"kind": "conservative"}, "4ea45906d6"),
    ({"kind": "hodsm"}, "6f58933db3"),
    ({"weighting": "g2", "lam": 0.15}, "21a675b651"),  # the paper's protocol
])
def test_old_config_json_migrates_and_keeps_its_fingerprint(changes, fingerprint):
    """Fingerprints computed by 0.2.0 for these configurations; a 0.2 config.json loads into the new sections."""
    d = toy2d().to_dict()
    d.pop("plugins")
    d["loss"]["reg"] = {**V02_REG, **changes}
    if "weighting" in changes:
        d["loss"]["dsm_weighting"], d["loss"]["eps"] = "likelihood", 1e-5
    c = RunConfig.from_dict(d)
    assert c.fingerprint() == fingerprint
    if c.loss.reg.kind == "fpe":
        assert c.loss.reg.options.weighting.value == changes.get("weighting", "normalized")
        assert c.loss.reg.options.estimator.value == "squared"  # migrated as written, not the new default
    assert RunConfig.from_dict(json.loads(c.to_json())) == c  # and it is written back in the new form


def test_only_the_active_regularizers_settings_enter_the_fingerprint():
    base = toy2d()
    # inert with the exact divergence: probes, probe, the estimator; fd_step without --fpe-dt fd
    for path, value in ((("loss", "reg", "probes"), 4), (("loss", "reg", "probe"), "gaussian"),
                        (("loss", "reg", "fpe", "estimator"), "squared"), (("loss", "reg", "fpe", "fd_step"), 0.01)):
        assert base.override({path: value}).fingerprint() == base.fingerprint(), path
    # settings of the run's SDE and network only: beta under VE, sigma under VP, dropout and data_dir off images
    assert base.override({("sde", "sigma_max"): 10.0}).fingerprint() == base.fingerprint()
    assert base.override({("model", "dropout"): 0.3}).fingerprint() == base.fingerprint()
    ve = base.override({("sde", "kind"): "ve"})
    assert ve.override({("sde", "beta_max"): 5.0}).fingerprint() == ve.fingerprint()
    # and what acts does count
    hutch = base.override({("loss", "reg", "divergence"): "hutchinson", ("loss", "reg", "fpe", "residual_path"): "generic"})
    for path, value in ((("loss", "reg", "probes"), 4), (("loss", "reg", "fpe", "estimator"), "squared"),
                        (("loss", "reg", "fpe", "weighting"), "g2")):
        assert hutch.override({path: value}).fingerprint() != hutch.fingerprint(), path


@pytest.mark.parametrize("cls", ALL_REGULARIZERS, ids=[c.name for c in ALL_REGULARIZERS])
def test_every_regularizer_builds_from_a_configuration_and_penalizes(cls):
    """The shared contract: from_config gives a Regularizer whose penalty has shape (m,), is finite and
    positive for an untrained network, and is differentiable in the parameters."""
    from fpe_lab import build

    config = toy2d().override({("loss", "reg", "kind"): cls.name})
    sde = build.build_sde(config.sde)
    loss = build.build_loss(config, sde)
    assert isinstance(loss.regularizer, cls)
    model = build.build_model(config, sde, dtype=torch.float64)
    x0 = torch.randn(8, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    terms = loss(model, x0, torch.Generator().manual_seed(1))
    assert terms.is_finite() and terms.reg.item() > 0
    grads = torch.autograd.grad(terms.reg, [p for p in model.parameters() if p.requires_grad], allow_unused=True)
    assert any(g is not None and bool(g.abs().sum() > 0) for g in grads)
