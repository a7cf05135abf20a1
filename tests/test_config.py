"""fpe_lab.config: the nested run configuration, its presets, JSON round trip, validation, fingerprint."""

from __future__ import annotations

import json
import shutil

import pytest

from fpe_lab.config import (
    Dataset,
    EvalScale,
    RunConfig,
    SDEKind,
    _hashed,
    cifar10,
    digits,
    leaves,
    toy2d,
)
from fpe_lab.data.images import DataError, cifar10_digest
from fpe_lab.losses import DSMWeighting
from fpe_lab.regularizers.fpe import FPEWeighting
from fpe_lab.sampling import ODEMethod

from .fake_cifar import write_fake_cifar10


@pytest.mark.parametrize("preset", [toy2d, cifar10, digits])
def test_presets_round_trip_through_json(preset):
    c = preset()
    assert RunConfig.from_json(c.to_json()) == c
    assert json.loads(c.to_json()) == c.to_dict()


def test_presets_are_values_of_one_configuration():
    t, c, d = toy2d(), cifar10(), digits()
    assert (t.data.name, c.data.name, d.data.name) == (Dataset.GMM, Dataset.CIFAR10, Dataset.DIGITS)
    assert t.dim == 2 and c.dim == 3072 and d.dim == 64
    assert c.loss.reg.per_dim and not t.loss.reg.per_dim and c.data.hflip and not d.data.hflip


def test_override_sets_leaves_and_validates():
    c = toy2d().override({("loss", "dsm_weighting"): "likelihood", ("loss", "reg", "fpe", "weighting"): FPEWeighting.G2,
                          ("loss", "eps"): 1e-5, ("sde", "kind"): "ve", ("eval", "times"): (0.5, 1.0)})
    assert c.loss.dsm_weighting is DSMWeighting.LIKELIHOOD and c.loss.reg.options.weighting is FPEWeighting.G2
    assert c.sde.kind is SDEKind.VE and c.eval.times == (0.5, 1.0) and c.loss.eps == 1e-5
    with pytest.raises(ValueError, match=r"eps must be a finite number in \(0, 0.5\]; got 0.7"):
        toy2d().override({("loss", "eps"): 0.7})


def test_plain_dsm_has_one_spelling():
    a = toy2d().override({("loss", "reg", "kind"): "none"})
    b = toy2d().override({("loss", "reg", "lam"): 0.0})
    assert a == b and a.loss.reg.lam == 0 and b.loss.reg.kind == "none"
    with pytest.raises(ValueError, match="a regularizer needs lam > 0"):
        a.override({("loss", "reg", "kind"): "fpe"})
    # plain DSM has no regularizer options: setting one is refused, not ignored
    with pytest.raises(ValueError, match="loss.reg.fpe is the section of reg fpe; this configuration's reg is none"):
        a.override({("loss", "reg", "fpe", "weighting"): FPEWeighting.G2})
    # the shared fields of a regularizer are inert under plain DSM: one run, one folder
    c = a.override({("loss", "reg", "probes"): 4})
    assert c != a and c.fingerprint() == a.fingerprint()


def test_fingerprint_ignores_steps_checkpoints_device_and_evaluation_only():
    base = toy2d()
    same = base.override({("optim", "steps"): 99, ("optim", "ckpt_every"): 7, ("optim", "keep"): 1,
                          ("device",): "cpu", ("threads",): 2, ("eval", "points"): 10})
    assert same.fingerprint() == base.fingerprint()
    for path, value in ((("loss", "eps"), 2e-3), (("seed",), 1), (("optim", "lr"), 1e-3), (("model", "width"), 64),
                        (("sde", "beta_max"), 19.0), (("data", "name"), "moons")):
        assert base.override({path: value}).fingerprint() != base.fingerprint(), path



def test_cifar10_data_enter_the_fingerprint_by_content_not_by_path(tmp_path, monkeypatch):
    folder = write_fake_cifar10(tmp_path / "data", n_per_batch=2)
    base = cifar10(data_dir=str(folder))
    copy = shutil.copytree(folder, tmp_path / "moved" / "cifar")
    (tmp_path / "link").symlink_to(folder, target_is_directory=True)
    monkeypatch.chdir(tmp_path)
    for spelling in (folder.parent, "data", "data/cifar-10-batches-py", "./data/", "link", copy, "moved/cifar"):
        assert cifar10(data_dir=str(spelling)).fingerprint() == base.fingerprint(), spelling
    # what enters: "sha256:" and the digest of the training batches, where the path string entered before
    assert json.dumps(_hashed(base)).count('"data_dir": "sha256:' + cifar10_digest(folder) + '"') == 1
    data = bytearray((copy / "data_batch_1").read_bytes())
    data[-30] ^= 1  # one byte of one training batch
    (copy / "data_batch_1").write_bytes(bytes(data))
    assert cifar10(data_dir=str(copy)).fingerprint() != base.fingerprint()
    with pytest.raises(DataError, match="'nothing' is not a directory"):
        cifar10(data_dir="nothing").fingerprint()


def test_legacy_fingerprints_are_the_path_string_rule_of_cifar10_only(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no data here: the legacy fingerprints read no files
    # the fingerprints 0.3.0 gave (data_dir by its path string): run folders named by them stay findable
    assert cifar10().legacy_fingerprints() == ("bc1889271b",)
    assert cifar10(data_dir="/data/cifar").legacy_fingerprints() == ("e9c4953017",)
    assert toy2d().legacy_fingerprints() == () and digits().legacy_fingerprints() == ()
    assert _mixture(8).legacy_fingerprints() == ()
    with pytest.raises(DataError, match="CIFAR-10 not found"):
        cifar10().fingerprint()


@pytest.mark.parametrize("d, match", [
    ({"loss": {"epsilon": 1}}, r"unknown key\(s\) 'loss.epsilon'"),
    ({"sde": {"kind": "vv"}}, r"sde.kind must be one of \['ve', 'vp', 'subvp'\]; got 'vv'"),
    ({"optim": {"steps": 0}}, r"steps must be an integer in \[1, 1000000000\]; got 0"),
    ({"optim": {"ema_decay": 1.0}}, "ema_decay"),
    ({"model": {"width": 0}}, "width"),
    ({"data": {"hflip": True}}, "hflip applies to real images only"),
    ({"eval": {"times": []}}, "eval times"),
    ({"loss": {"reg": {"kind": "hodsm", "hodsm": {"order": 4}}}}, "hodsm order must be 2 or 3"),
    ({"loss": {"reg": {"hodsm": {"order": 3}}}}, "loss.reg.hodsm is the section of reg hodsm; this configuration's reg is fpe"),
    ({"loss": {"reg": {"kind": "nope"}}}, r"reg must be one of \['none', 'fpe', 'conservative', 'hodsm'\]"),
    ({"loss": {"reg": {"per_dim": "false"}}}, r"loss.reg.per_dim must be true or false; got 'false'"),
    ({"optim": {"bf16": "no"}}, r"optim.bf16 must be true or false; got 'no'"),
    ({"optim": {"steps": 1e20}}, r"optim.steps must be an integer; got 1e\+20"),
    ({"data": {"name": "cifar10"}, "loss": {"reg": {"fpe": {"residual_path": "jet"}}}}, "residual_path jet needs the MLP"),
    ({"loss": {"reg": {"divergence": "hutchinson"}}}, "use --fpe-residual-path generic"),
    ({"optim": {"batch": 4}, "loss": {"reg": {"n_points": 8}}}, r"reg_batch must be <= batch \(4\)"),
    ([1, 2], "config must be a JSON object"),
])
def test_bad_configurations_name_the_field(d, match):
    with pytest.raises(ValueError, match=match):
        RunConfig.from_dict(d)


def test_every_leaf_has_help_and_a_unique_flag():
    ls = list(leaves())
    assert all(leaf.help for leaf in ls)
    assert len({leaf.flag for leaf in ls}) == len(ls)
    assert len({leaf.path for leaf in ls}) == len(ls)


# ---------------------------------------------------------------------- the D-dimensional mixture data set
def _mixture(dim: int = 32, changes: dict | None = None) -> RunConfig:
    return toy2d().override({("data", "name"): "mixture", ("data", "dim"): dim,
                             ("loss", "reg", "fpe", "residual_path"): "generic", **(changes or {})})


def test_mixture_config_round_trips_and_sets_the_dimension():
    c = _mixture(128, {("data", "components"): 7})
    assert c.data.name is Dataset.MIXTURE and c.dim == 128 and c.data.shape == (128,)
    assert RunConfig.from_json(c.to_json()) == c
    assert RunConfig.from_dict(json.loads(json.dumps(c.to_dict()))) == c
    assert c.fingerprint() != _mixture(64, {("data", "components"): 7}).fingerprint()
    assert c.fingerprint() != _mixture(128).fingerprint()
    # the other data sets keep their shapes, and their fingerprints ignore the mixture's fields
    assert (toy2d().dim, digits().data.shape, cifar10().dim) == (2, (1, 8, 8), 3 * 32 * 32)
    assert toy2d().fingerprint() == "c161bc71b7"  # the README's main-job run folder
    flags = {leaf.flag: leaf.path for leaf in leaves()}
    assert flags["data-dim"] == ("data", "dim") and flags["components"] == ("data", "components")


@pytest.mark.parametrize("d, match", [
    ({"data": {"name": "mixture", "dim": 0}}, r"data_dim must be an integer in \[1, 4096\]; got 0"),
    ({"data": {"name": "mixture", "dim": 4097}}, r"data_dim must be an integer in \[1, 4096\]; got 4097"),
    ({"data": {"name": "mixture", "dim": 2.5}}, r"data.dim must be an integer; got 2.5"),
    ({"data": {"name": "mixture", "components": 0}}, r"components must be an integer in \[1, 64\]; got 0"),
    ({"data": {"name": "mixture", "components": 65}}, r"components must be an integer in \[1, 64\]; got 65"),
    ({"data": {"name": "gmm", "dim": 3}}, "data_dim, components, data_shape and mixture_rank apply to data mixture only"),
    ({"data": {"name": "mixture", "dim": 16}}, r"residual_path jet supports data_dim <= 8 .* got data_dim 16"),
])
def test_bad_mixture_configurations_name_the_field(d, match):
    with pytest.raises(ValueError, match=match):
        RunConfig.from_dict(d)


def test_mixture_jet_limit_and_shape_questions():
    assert RunConfig.from_dict({"data": {"name": "mixture", "dim": 8}}).loss.reg.options.residual_path.value == "jet"
    dsm = toy2d().override({("data", "name"): "mixture", ("data", "dim"): 16, ("loss", "reg", "kind"): "none"})
    assert dsm.dim == 16  # plain DSM has no residual path
    with pytest.raises(ValueError, match="use DataConfig.shape"):
        Dataset.MIXTURE.shape  # noqa: B018 — (2,) would be wrong for D != 2


@pytest.mark.parametrize("device", ["cpu", "cuda"])
@pytest.mark.parametrize("scale", list(EvalScale))
def test_every_image_evaluation_fill_resolves(device, scale):
    # each row of the table must name a real solver and times in [eps, 1] of the image presets
    for preset in (digits, lambda: cifar10(data_dir="d")):
        config = preset().override({("eval", "scale"): scale.value})
        ev = config.eval.resolve(device)
        assert isinstance(ev.ode, ODEMethod) and None not in (ev.times, ev.points, ev.nll_points, ev.rtol)
        assert ev.ode is (ODEMethod.RK45 if scale is EvalScale.PAPER else ODEMethod.DOPRI5)
        assert min(ev.times) >= config.loss.eps


def test_open_eval_times_below_eps_are_refused_before_training():
    with pytest.raises(ValueError, match=r"eval times must lie in \[eps, 1\].*set --eval-times"):
        digits().override({("loss", "eps"): 0.1})
    ok = digits().override({("loss", "eps"): 0.1, ("eval", "times"): [0.1, 1.0]})
    assert ok.eval.times == (0.1, 1.0)
