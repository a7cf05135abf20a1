"""fpe_lab.train and fpe_lab.checkpoint: determinism, kill + resume, NaN guard, atomic safe checkpoints."""

from __future__ import annotations

import pickle

import pytest
import torch
from torch import nn

from fpe_lab.checkpoint import (
    CHECKPOINT_NAME,
    load_checkpoint,
    save_checkpoint,
)
from fpe_lab.fpe import Hutchinson
from fpe_lab.gmm import GaussianMixture
from fpe_lab.losses import LossTerms, ScoreFPELoss
from fpe_lab.model import ScoreModel
from fpe_lab.nets.mlp import TimeMLP
from fpe_lab.regularizers import FPERegularizer
from fpe_lab.sde import VESDE, VPSDE
from fpe_lab.train import NonFiniteLossError, TrainOptions, ema_decay_at, ema_update, train


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # tiny MLP batches: intra-op threads only add contention on the shared 2-core machine
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


GM = GaussianMixture([0.5, 0.5], [[1.0, 0.0], [-1.0, 0.5]], [[[0.1, 0.0], [0.0, 0.2]]] * 2, dtype=torch.float64)


def _sampler(g: torch.Generator) -> torch.Tensor:
    return GM.sample(32, g)


def _model(seed: int = 0, sde=VPSDE()) -> ScoreModel:
    torch.manual_seed(seed)
    return ScoreModel(TimeMLP(dim=2, width=16, depth=2, n_freq=2), sde)


def _loss(sde=VPSDE(), lam: float = 0.1) -> ScoreFPELoss:
    return ScoreFPELoss(sde=sde, eps=1e-3, regularizer=FPERegularizer(lam=lam, n_points=8))


def _opts(**kw) -> TrainOptions:
    return TrainOptions(**{"steps": 12, "lr": 1e-2, "ema_decay": 0.9, "seed": 3, "ckpt_every": 4, "progress": False, **kw})


def _state(result) -> dict[str, torch.Tensor]:
    return {**{f"m.{k}": v for k, v in result.model.state_dict().items()},
            **{f"e.{k}": v for k, v in result.ema.state_dict().items()}}


def _assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k  # bitwise: same arithmetic in the same order on CPU


def test_deterministic_at_fixed_seed_and_seed_matters():
    a = train(_model(), _loss(), _sampler, _opts())
    b = train(_model(), _loss(), _sampler, _opts())
    _assert_same(_state(a), _state(b))
    assert torch.equal(a.history, b.history) and a.history.shape == (12, 3)
    assert torch.all(a.history[:, 2] > 0)  # the FPE term was computed at every step
    c = train(_model(), _loss(), _sampler, _opts(seed=4))
    assert not torch.equal(a.model.net.out.weight, c.model.net.out.weight)


def test_training_reduces_the_loss():
    res = train(_model(), _loss(lam=0.0), _sampler, _opts(steps=150, lr=5e-3))
    first, last = res.history[:20, 0].mean(), res.history[-20:, 0].mean()
    assert last < 0.7 * first  # DSM of a random init is O(1) larger than after 150 Adam steps


def test_kill_and_resume_equals_uninterrupted(tmp_path):
    full_dir, cut_dir = tmp_path / "full", tmp_path / "cut"
    full_dir.mkdir(), cut_dir.mkdir()
    full = train(_model(), _loss(), _sampler, _opts(), run_dir=full_dir)

    class Killed(Exception):
        pass

    def kill_at_10(record):
        if record["step"] == 10:  # after the checkpoint at step 8: steps 9-10 are lost, as in a real kill
            raise Killed

    with pytest.raises(Killed):
        train(_model(), _loss(), _sampler, _opts(), run_dir=cut_dir, on_step=kill_at_10)
    assert load_checkpoint(cut_dir / CHECKPOINT_NAME)["step"] == 8
    # resume into a *differently initialised* model: everything must come from the checkpoint
    resumed = train(_model(seed=99), _loss(), _sampler, _opts(), run_dir=cut_dir, resume=True)
    assert resumed.resumed_from == 8 and resumed.step == 12
    _assert_same(_state(full), _state(resumed))
    assert torch.equal(full.history, resumed.history)
    opt_full = load_checkpoint(full_dir / CHECKPOINT_NAME)["optimizer"]["state"]
    opt_res = load_checkpoint(cut_dir / CHECKPOINT_NAME)["optimizer"]["state"]
    for k in opt_full:
        _assert_same(opt_full[k], opt_res[k])


def test_resume_without_checkpoint_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint.pt"):
        train(_model(), _loss(), _sampler, _opts(), run_dir=tmp_path, resume=True)


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    base = _loss()

    def broken(model, x0, g):
        terms = base(model, x0, g)
        if broken.calls == 6:  # the 7th step's loss is NaN
            terms = LossTerms(total=terms.total * float("nan"), dsm=terms.dsm * float("nan"), reg=terms.reg)
        broken.calls += 1
        return terms

    broken.calls = 0
    model = _model()
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss at step 7 .*last good checkpoint: step 4"):
        train(model, broken, _sampler, _opts(), run_dir=tmp_path)
    state = load_checkpoint(tmp_path / CHECKPOINT_NAME)
    assert state["step"] == 4
    assert all(torch.isfinite(v).all() for v in state["model"].values())
    assert all(torch.isfinite(p).all() for p in model.parameters())  # no update from the bad step
    # the kept checkpoint equals an uninterrupted run's state at step 4
    ref_dir = tmp_path / "ref"
    ref_dir.mkdir()
    train(_model(), _loss(), _sampler, _opts(steps=4), run_dir=ref_dir)
    _assert_same(state["model"], load_checkpoint(ref_dir / CHECKPOINT_NAME)["model"])


def test_nonfinite_gradient_with_finite_loss_is_caught(tmp_path):
    base = _loss(lam=0.0)

    def sqrt_at_zero(model, x0, g):
        terms = base(model, x0, g)
        p = next(model.parameters())
        kink = torch.sqrt((p - p.detach()).pow(2).sum())  # value 0, gradient 0/0 = NaN
        return LossTerms(total=terms.total + kink, dsm=terms.dsm, reg=terms.reg)

    model = _model()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(NonFiniteLossError, match="non-finite gradient at step 1 .*no checkpoint written"):
        train(model, sqrt_at_zero, _sampler, _opts(), run_dir=tmp_path)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_huge_learning_rate_is_stopped_not_saved(tmp_path):
    """A deliberately broken lr: VE at small t has |s| ~ 1/sigma ~ 1e2..1e4, and lr = 1e12 blows the weights up."""
    with pytest.raises(NonFiniteLossError, match="non-finite"):
        train(_model(sde=VESDE()), _loss(sde=VESDE()), _sampler, _opts(lr=1e12, steps=50, ckpt_every=1), run_dir=tmp_path)
    state = load_checkpoint(tmp_path / CHECKPOINT_NAME)
    assert all(torch.isfinite(v).all() for v in state["model"].values())


def test_image_shaped_data_uses_the_same_loop():
    """x of shape (b, C, H, W) with a Hutchinson divergence: no rank-specific code anywhere."""

    class TinyConv(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(2, 4, 3, padding=1)
            self.conv2 = nn.Conv2d(4, 1, 3, padding=1)

        def forward(self, x, t):
            tt = t[:, None, None, None].expand(-1, 1, *x.shape[2:])
            return self.conv2(nn.functional.silu(self.conv1(torch.cat([x, tt], 1))))

    torch.manual_seed(0)
    model = ScoreModel(TinyConv(), VPSDE())
    hutch = Hutchinson(n_probes=1, generator=torch.Generator().manual_seed(1))
    loss = ScoreFPELoss(sde=VPSDE(), eps=1e-3, regularizer=FPERegularizer(lam=0.1, divergence=hutch))
    res = train(model, loss, lambda g: torch.rand(8, 1, 4, 4, generator=g) * 2 - 1, _opts(steps=3))
    assert res.step == 3 and torch.isfinite(res.history).all() and (res.history[:, 2] > 0).all()


def test_ema_update_formula_and_warmup():
    a, b = nn.Linear(2, 2), nn.Linear(2, 2)
    ea = [p.detach().clone() for p in a.parameters()]
    ema_update(a, b, 0.75)
    for e, pa, pb in zip(ea, a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, 0.75 * e + 0.25 * pb, rtol=1e-6, atol=1e-7)  # float32 lerp round-off
    assert ema_decay_at(0, 0.999) == pytest.approx(0.1) and ema_decay_at(10**6, 0.999) == 0.999


def test_checkpoint_roundtrip_is_atomic_and_safe(tmp_path):
    path = tmp_path / "c.pt"
    state = {"model": nn.Linear(2, 3).state_dict(), "step": 7, "rng": {"data": torch.Generator().get_state()}}
    save_checkpoint(path, state)
    back = load_checkpoint(path)
    assert back["step"] == 7 and torch.equal(back["model"]["weight"], state["model"]["weight"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.pt"]  # no temporary file left behind

    # a failing write leaves the old file intact and no temporary file
    class Unpicklable:
        def __reduce__(self):
            raise pickle.PicklingError("nope")

    with pytest.raises(pickle.PicklingError):
        save_checkpoint(path, {"bad": Unpicklable()})
    assert load_checkpoint(path)["step"] == 7
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.pt"]

    # a pickled class is refused on load (weights_only=True)
    torch.save({"module": nn.Linear(2, 2)}, tmp_path / "unsafe.pt")
    with pytest.raises(ValueError, match="cannot read checkpoint"):
        load_checkpoint(tmp_path / "unsafe.pt")
    with pytest.raises(ValueError, match="state must be a dict"):
        save_checkpoint(path, [1, 2])


@pytest.mark.parametrize(
    "kw, match",
    [({"steps": 0}, "steps"), ({"steps": 10, "lr": -1.0}, "lr"), ({"steps": 10, "ema_decay": 1.0}, "ema_decay"),
     ({"steps": 10, "seed": -1}, "seed"), ({"steps": 10, "ckpt_every": 0}, "ckpt_every"),
     ({"steps": 10, "grad_clip": 0.0}, "grad_clip")],
)
def test_bad_options(kw, match):
    with pytest.raises(ValueError, match=match):
        TrainOptions(**kw)


@pytest.mark.gpu
def test_cuda_training_checkpoints_and_resumes(tmp_path):
    """On CUDA: the noise generator lives on the device, RNG states round-trip through the checkpoint."""
    opts = _opts(steps=6, ckpt_every=3)
    full = train(_model(), _loss(), _sampler, opts, device="cuda", run_dir=tmp_path)
    assert next(full.model.parameters()).is_cuda and torch.isfinite(full.history).all()
    state = load_checkpoint(tmp_path / CHECKPOINT_NAME)
    assert state["step"] == 6 and state["rng"]["noise"].device.type == "cpu"
    resumed = train(_model(seed=5), _loss(), _sampler, opts, device="cuda", run_dir=tmp_path, resume=True)
    assert resumed.step == 6 and resumed.resumed_from == 6



class _DropoutNet(nn.Module):
    """A small point network with dropout: its masks come from the global torch RNG."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(3, 32)
        self.drop = nn.Dropout(0.3)
        self.out = nn.Linear(32, 2)

    def forward(self, x, t):
        return self.out(self.drop(torch.tanh(self.inp(torch.cat([x, t[:, None]], -1)))))


def _dropout_model() -> ScoreModel:
    torch.manual_seed(0)
    return ScoreModel(_DropoutNet().double(), VPSDE())


def test_dropout_is_seeded_by_the_run_and_resumes_bitwise(tmp_path):
    """Dropout draws from the global RNG: the run seeds it (the caller's state neither matters nor changes),
    and the checkpoint carries it, so identical runs and a resumed run equal an uninterrupted one."""
    opts, loss = _opts(), _loss(lam=0.0)
    for name in ("a", "b", "cut"):
        (tmp_path / name).mkdir()
    model = _dropout_model()
    torch.manual_seed(123)
    caller = torch.get_rng_state()
    a = train(model, loss, _sampler, opts, run_dir=tmp_path / "a")
    assert torch.equal(torch.get_rng_state(), caller)  # training leaves the caller's global RNG as it was
    model = _dropout_model()
    torch.manual_seed(456)  # another global state before the run: it must not matter
    b = train(model, loss, _sampler, opts, run_dir=tmp_path / "b")
    _assert_same(_state(a), _state(b))
    sa, sb = load_checkpoint(tmp_path / "a" / CHECKPOINT_NAME), load_checkpoint(tmp_path / "b" / CHECKPOINT_NAME)
    assert "torch" in sa["rng"]
    _assert_same(sa["rng"], sb["rng"])  # the whole checkpoint, RNG states included

    class Killed(Exception):
        pass

    def kill_at_6(record):
        if record["step"] == 6:  # after the checkpoint at step 4
            raise Killed

    with pytest.raises(Killed):
        train(_dropout_model(), loss, _sampler, opts, run_dir=tmp_path / "cut", on_step=kill_at_6)
    model = _dropout_model()
    torch.manual_seed(789)
    resumed = train(model, loss, _sampler, opts, run_dir=tmp_path / "cut", resume=True)
    assert resumed.resumed_from == 4
    _assert_same(_state(a), _state(resumed))
    _assert_same(sa["rng"], load_checkpoint(tmp_path / "cut" / CHECKPOINT_NAME)["rng"])
