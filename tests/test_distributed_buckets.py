"""Bucketed gradient averaging (fpe_lab/distributed.py): planning, flatten/unflatten, one all-reduce per bucket,
in-process (a stand-in all-reduce, and a real gloo group of one process)."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch import nn

from fpe_lab import distributed
from fpe_lab.distributed import GradientBuckets, flatten, plan_buckets, unflatten_into


def _mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 2)).double()


def _loss(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Output plus an input-gradient term (create_graph): the backward is a double backward, as with the FPE term."""
    x = x.clone().requires_grad_(True)
    y = model(x)
    (gx,) = torch.autograd.grad(y.sum(), x, create_graph=True)
    return y.pow(2).mean() + gx.pow(2).mean()


def _reference_grads(x: torch.Tensor) -> list[torch.Tensor]:
    model = _mlp()
    _loss(model, x).backward()
    return [p.grad.clone() for p in model.parameters()]


class FakeAllReduce:
    """Stands in for torch.distributed.all_reduce over ``world`` ranks: the other ranks contribute
    ``other(flat)``; records the sizes of the calls."""

    def __init__(self, other):
        self.other, self.sizes = other, []

    def __call__(self, tensor, op=None, async_op=False):
        assert op == dist.ReduceOp.SUM and async_op
        self.sizes.append(tensor.numel())
        tensor.add_(self.other(tensor))

        class Done:
            def wait(self):
                return True

        return Done()


def test_plan_buckets_respects_cap_dtype_and_order():
    ts = [torch.zeros(10), torch.zeros(30), torch.zeros(5, dtype=torch.float64), torch.zeros(20), torch.zeros(100)]
    buckets = plan_buckets(ts, cap_bytes=50 * 4)
    assert sorted(i for b in buckets for i in b) == list(range(len(ts)))  # each tensor exactly once
    assert buckets[0] == [4]  # 400 bytes > cap: alone, and the last tensor comes first
    for b in buckets:
        assert len({(ts[i].dtype, ts[i].device) for i in b}) == 1
        assert len(b) == 1 or sum(ts[i].numel() * ts[i].element_size() for i in b) <= 50 * 4
        assert b == sorted(b, reverse=True)
    assert [3, 1] in buckets and [0] in buckets and [2] in buckets  # 20 + 30 fit; 10 more would not
    assert plan_buckets(ts, cap_bytes=10**9) == [[4, 3, 1, 0], [2]]  # one bucket per dtype
    with pytest.raises(ValueError, match="cap_bytes must be >= 1"):
        plan_buckets(ts, cap_bytes=0)


def test_flatten_unflatten_round_trip_is_bitwise():
    g = torch.Generator().manual_seed(0)
    ts = [torch.randn(3, 4, generator=g), torch.randn((), generator=g), torch.randn(0, generator=g),
          torch.randn(2, 1, 5, generator=g).transpose(0, 2)]  # a non-contiguous one
    flat = flatten(ts)
    assert flat.shape == (3 * 4 + 1 + 0 + 10,)
    out = [torch.full_like(t, float("nan")) for t in ts]
    unflatten_into(flat, out)
    for a, b in zip(ts, out):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="must be 1-D with 23 elements"):
        unflatten_into(flat[:-1], out)


@pytest.mark.parametrize("cap_bytes, expect_calls", [(distributed.BUCKET_BYTES, 1), (1, 6)])
def test_buckets_average_over_simulated_ranks_with_one_call_per_bucket(cap_bytes, expect_calls):
    x = torch.randn(8, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    ref = _reference_grads(x)
    model = _mlp()
    # a second rank whose gradients are 3 g + 1: the mean over the two ranks is (4 g + 1) / 2
    fake = FakeAllReduce(lambda flat: 3 * flat + 1)
    buckets = GradientBuckets(list(model.parameters()), world_size=2, cap_bytes=cap_bytes, all_reduce=fake)
    handles = buckets.register()
    _loss(model, x).backward()
    assert len(fake.sizes) == buckets.calls == expect_calls == len(buckets.buckets)  # 6 parameters, 1 or 6 buckets
    assert sum(fake.sizes) == sum(p.numel() for p in model.parameters())  # every element reduced once
    for p, g in zip(model.parameters(), ref):
        # float64: (4 g + 1)/2 is computed in a different order than the hooks; a few ulp
        torch.testing.assert_close(p.grad, (4 * g + 1) / 2, rtol=1e-14, atol=1e-15)
    # a second step reduces again (state is reset after each backward)
    model.zero_grad(set_to_none=True)
    _loss(model, x).backward()
    assert buckets.calls == 2 * expect_calls
    for h in handles:
        h.remove()
    model.zero_grad(set_to_none=True)
    _loss(model, x).backward()
    assert buckets.calls == 2 * expect_calls  # hooks removed: nothing reduced
    for p, g in zip(model.parameters(), ref):
        assert torch.equal(p.grad, g)


def test_unused_parameter_leaves_its_bucket_partial_and_is_not_touched():
    x = torch.randn(4, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    model = _mlp()
    extra = nn.Parameter(torch.ones(4, dtype=torch.float64))  # never used by the loss
    params = list(model.parameters()) + [extra]
    fake = FakeAllReduce(lambda flat: flat)  # two identical ranks: the mean is g itself
    buckets = GradientBuckets(params, world_size=2, all_reduce=fake)
    buckets.register()
    _loss(model, x).backward()
    assert extra.grad is None
    assert buckets.calls == 1 and fake.sizes == [sum(p.numel() for p in model.parameters())]
    for p, g in zip(model.parameters(), _reference_grads(x)):
        assert torch.equal(p.grad, g)  # 2 g / 2 is exact


def test_buckets_negative_control_without_averaging_grads_differ():
    """The comparison above can fail: with no division by the world size the gradients are doubled."""
    x = torch.randn(4, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    model = _mlp()
    buckets = GradientBuckets(list(model.parameters()), world_size=1, all_reduce=FakeAllReduce(lambda flat: flat))
    buckets.register()
    _loss(model, x).backward()
    for p, g in zip(model.parameters(), _reference_grads(x)):
        assert torch.equal(p.grad, 2 * g)


def test_buckets_with_a_real_gloo_group_of_one():
    """torch.distributed.all_reduce itself (gloo, async) on a one-process group: averages are the gradients."""
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        x = torch.randn(8, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
        model = _mlp()
        buckets = GradientBuckets(list(model.parameters()), world_size=1, cap_bytes=16 * 16 * 8)
        buckets.register()
        _loss(model, x).backward()
        assert buckets.calls == len(buckets.buckets) == 3  # 16×16 float64 weight fills a bucket of its own
        for p, g in zip(model.parameters(), _reference_grads(x)):
            assert torch.equal(p.grad, g)
    finally:
        dist.destroy_process_group()


def test_dense_gradients_only():
    emb = nn.Embedding(4, 2, sparse=True)
    buckets = GradientBuckets(list(emb.parameters()), world_size=2, all_reduce=FakeAllReduce(lambda f: f))
    buckets.register()
    with pytest.raises(ValueError, match="needs a dense .grad; got a sparse gradient"):
        emb(torch.tensor([0, 1])).sum().backward()
