r"""Data-parallel training under ``torchrun`` (torch.distributed + DistributedDataParallel) for a loss that
differentiates the network with respect to its *inputs* inside the loss.

The score-FPE residual R_θ takes ∂_t s_θ (forward-mode JVP), ∇_x(∇·s_θ) (nested reverse passes) and then
∇_θ‖R_θ‖², a third-order derivative. DDP's reducer is built for one plain backward per forward: it does
not support double backward through a DDP-wrapped module, and gradients of gradients are not
synchronised by it. So here:

* every derivative — inner (x, t) and outer (θ) — is taken through the *unwrapped* module
  ``unwrap(model)``, never through ``DDP.forward`` (the DDP reducer stays idle: its hooks only act after
  a DDP forward);
* gradients are averaged over ranks by :func:`average_gradients_in_backward`: a post-accumulate-grad
  hook marks each parameter's gradient final (every order of the backward has added to it); parameters
  are grouped into flat buckets of about ``BUCKET_BYTES`` (one dtype and device each), and each bucket is
  all-reduced with *one* asynchronous call as soon as all its gradients are final, overlapping the rest
  of the backward; at the end of the backward the results are divided by the world size and copied
  back, so the optimizer sees exactly the gradient of the mean loss over the global batch;
* DDP itself is kept for what it does well: broadcasting rank 0's parameters and buffers at
  construction, and the familiar ``.module`` container.

With equal per-rank batches this equals a single process on the concatenated batch (tested on CPU,
gloo, 2 processes). Launch: ``torchrun --nproc_per_node=N -m fpe_lab.run cifar10 ...``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

__all__ = [
    "DistEnv",
    "init_from_env",
    "shutdown",
    "wrap",
    "unwrap",
    "average_gradients_in_backward",
    "BUCKET_BYTES",
    "plan_buckets",
    "flatten",
    "unflatten_into",
    "GradientBuckets",
    "agree_on_nonfinite",
    "rank_seed",
    "quiet_other_ranks",
    "barrier",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits: ``rank`` of ``world_size`` processes, ``local_rank`` on its node."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None  # None: not distributed

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0 writes run folders, metrics and the main checkpoint, and logs."""
        return self.rank == 0

    def device(self) -> torch.device:
        """cuda:LOCAL_RANK when CUDA is available, else cpu."""
        return torch.device(f"cuda:{self.local_rank}") if torch.cuda.is_available() else torch.device("cpu")


def _env_int(name: str, default: int) -> int:
    text = os.environ.get(name)
    if text is None:
        return default
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"environment variable {name} must be an integer; got {text!r}") from None


def init_from_env() -> DistEnv:
    """Read torchrun's WORLD_SIZE, RANK, LOCAL_RANK (and MASTER_ADDR/MASTER_PORT); init the process group.

    Without WORLD_SIZE (or with WORLD_SIZE=1) this is a single process and nothing is initialised.
    Backend: nccl with CUDA, gloo on CPU.
    """
    world = _env_int("WORLD_SIZE", 1)
    rank, local = _env_int("RANK", 0), _env_int("LOCAL_RANK", 0)
    if world < 1 or not 0 <= rank < world or local < 0:
        raise ValueError(f"inconsistent torchrun environment: WORLD_SIZE={world}, RANK={rank}, LOCAL_RANK={local}")
    if world == 1:
        return DistEnv()
    for name in ("MASTER_ADDR", "MASTER_PORT"):
        if name not in os.environ:
            raise ValueError(f"WORLD_SIZE={world} but {name} is not set: launch with torchrun")
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, init_method="env://", rank=rank, world_size=world)
    return DistEnv(rank=rank, world_size=world, local_rank=local, backend=backend)


def shutdown(env: DistEnv) -> None:
    if env.is_distributed and dist.is_initialized():
        dist.destroy_process_group()


def barrier(env: DistEnv) -> None:
    if env.is_distributed:
        dist.barrier()


def wrap(model: nn.Module, env: DistEnv) -> nn.Module:
    """DDP(model) when distributed (broadcasts rank 0's parameters and buffers), else the model itself."""
    if not env.is_distributed:
        return model
    device_ids = [env.local_rank] if torch.cuda.is_available() else None
    return DistributedDataParallel(model, device_ids=device_ids, broadcast_buffers=False)


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DDP wrapper (the one to differentiate through), else the model itself."""
    return model.module if isinstance(model, DistributedDataParallel) else model


# Gradients per all-reduce call: large enough that the per-call latency is paid a few times per step,
# small enough that the first buckets are reduced while the backward still runs (DDP's default is 25 MiB).
BUCKET_BYTES = 25 * 2**20


def plan_buckets(tensors: Sequence[torch.Tensor], cap_bytes: int = BUCKET_BYTES) -> list[list[int]]:
    """Split tensor indices into buckets of one dtype and device, each at most ``cap_bytes`` (a single tensor
    larger than the cap gets a bucket of its own).

    Tensors are taken in reverse order, the order in which a backward pass usually finishes their
    gradients, so that the first bucket is complete early. Within a bucket indices are in that order.
    """
    if cap_bytes < 1:
        raise ValueError(f"cap_bytes must be >= 1; got {cap_bytes}")
    buckets: list[list[int]] = []
    open_bucket: dict[tuple, tuple[list[int], int]] = {}  # (dtype, device) -> (indices, bytes)
    for i in reversed(range(len(tensors))):
        t = tensors[i]
        key, size = (t.dtype, t.device), t.numel() * t.element_size()
        idx, used = open_bucket.get(key, (None, 0))
        if idx is None or used + size > cap_bytes:
            idx, used = [], 0
            buckets.append(idx)
        idx.append(i)
        open_bucket[key] = (idx, used + size)
    return buckets


def flatten(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """One new contiguous 1-D tensor holding ``tensors`` (same dtype and device) one after another."""
    return torch.cat([t.reshape(-1) for t in tensors])


def unflatten_into(flat: torch.Tensor, tensors: Sequence[torch.Tensor]) -> None:
    """Copy consecutive slices of ``flat`` back into ``tensors`` in place (the inverse of :func:`flatten`)."""
    total = sum(t.numel() for t in tensors)
    if flat.dim() != 1 or flat.numel() != total:
        raise ValueError(f"flat must be 1-D with {total} elements (the tensors' total); got shape {tuple(flat.shape)}")
    offset = 0
    for t in tensors:
        n = t.numel()
        t.copy_(flat[offset:offset + n].view_as(t))
        offset += n


class _Work(Protocol):
    """What an asynchronous all-reduce returns (``torch.distributed.Work`` or a test's stand-in)."""

    def wait(self) -> object: ...


class GradientBuckets:
    """Average the gradients of ``params`` over ranks, one all-reduce per bucket (see the module docstring).

    ``all_reduce(tensor, op=..., async_op=True)`` returns a work object with ``wait()``; the default is
    ``torch.distributed.all_reduce`` on the default group (a stand-in lets the tests count the calls).
    Buckets are launched strictly in bucket order, so every rank issues the same sequence of collectives
    as long as all ranks run the same graph. Parameters whose gradient was not touched by a backward are
    left alone in it (no hook fires for them, on any rank).
    """

    def __init__(self, params: Sequence[torch.Tensor], world_size: int, cap_bytes: int = BUCKET_BYTES,
                 all_reduce: Callable | None = None):
        if world_size < 1:
            raise ValueError(f"world_size must be >= 1; got {world_size}")
        self.params = list(params)
        self.world_size = world_size
        self.buckets = plan_buckets(self.params, cap_bytes)
        self._bucket_of = {i: k for k, idx in enumerate(self.buckets) for i in idx}
        self._all_reduce = all_reduce if all_reduce is not None else dist.all_reduce
        self.calls = 0  # all-reduce calls issued so far (for tests and logs)
        self._reset()

    def _reset(self) -> None:
        self._ready: list[list[int]] = [[] for _ in self.buckets]
        self._next = 0  # the next bucket to launch
        self._inflight: list[tuple[_Work, torch.Tensor, list[torch.Tensor]]] = []
        self._finish_queued = False

    def register(self) -> list:
        """Hook every parameter; returns the handles (``.remove()`` to undo)."""
        return [p.register_post_accumulate_grad_hook(self._hook_for(i)) for i, p in enumerate(self.params)]

    def _hook_for(self, i: int):
        def hook(p: torch.Tensor) -> None:
            self.mark_ready(i)

        return hook

    def mark_ready(self, i: int) -> None:
        """Parameter ``i``'s gradient is final for this backward; launch every bucket that is now complete."""
        if i in self._ready[self._bucket_of[i]]:
            # ready twice without a finish: an earlier backward was aborted by an exception mid-way
            log.warning("gradient buckets: discarding the state of an aborted backward")
            self._reset()
        if not self._finish_queued:
            # the autograd engine's end-of-backward callback (what DDP and FSDP use; there is no public
            # equivalent): reduce what is left, wait, copy back before backward() returns
            torch.autograd.Variable._execution_engine.queue_callback(self.finish)
            self._finish_queued = True
        grad = self.params[i].grad
        if grad is None or grad.is_sparse:
            raise ValueError(f"parameter {i}: gradient averaging needs a dense .grad; got "
                             f"{'None' if grad is None else 'a sparse gradient'}")
        self._ready[self._bucket_of[i]].append(i)
        while self._next < len(self.buckets) and len(self._ready[self._next]) == len(self.buckets[self._next]):
            self._launch(self._next)
            self._next += 1

    def _launch(self, k: int) -> None:
        ready = set(self._ready[k])
        # every ready parameter has a dense .grad (checked by the hook that marked it ready)
        grads = [g for i in self.buckets[k] if i in ready and (g := self.params[i].grad) is not None]
        if not grads:
            return
        flat = flatten(grads)
        work = self._all_reduce(flat, op=dist.ReduceOp.SUM, async_op=True)
        self.calls += 1
        self._inflight.append((work, flat, grads))

    def finish(self) -> None:
        """Launch the buckets not yet launched (only partly used ones), wait for all, average and copy back."""
        try:
            for k in range(self._next, len(self.buckets)):
                self._launch(k)
            for work, flat, grads in self._inflight:
                work.wait()
                flat.div_(self.world_size)
                unflatten_into(flat, grads)
        finally:
            self._reset()


def average_gradients_in_backward(module: nn.Module, env: DistEnv, cap_bytes: int = BUCKET_BYTES) -> list:
    """Register hooks so that after each backward every parameter's gradient is its mean over ranks.

    A parameter's hook fires once per backward, after all contributions (DSM and every order of the FPE
    term) have been accumulated; gradients are then all-reduced in flat buckets of about ``cap_bytes``
    (:class:`GradientBuckets`), one call per bucket, and copied back before ``backward()`` returns. All
    ranks run the same graph, so the all-reduces are issued in the same order everywhere. Returns the
    hook handles (``.remove()`` to undo). No-op when not distributed.
    """
    if not env.is_distributed:
        return []
    params = [p for p in module.parameters() if p.requires_grad]
    buckets = GradientBuckets(params, env.world_size, cap_bytes)
    log.debug("gradient averaging: %d parameters in %d buckets", len(params), len(buckets.buckets))
    return buckets.register()


def agree_on_nonfinite(loss_fn: Callable, env: DistEnv) -> Callable:
    """Wrap ``loss_fn(model, x0, generator) -> LossTerms`` so every rank sees a non-finite loss if any does.

    Otherwise the NaN guard would stop one rank before its backward while the others wait forever in
    the gradient all-reduce.
    """
    if not env.is_distributed:
        return loss_fn

    def wrapped(model, x0, generator):
        terms = loss_fn(model, x0, generator)
        bad = torch.tensor([0.0 if terms.is_finite() else 1.0], device=terms.total.device)
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        if bad.item() > 0 and terms.is_finite():
            nan = torch.full_like(terms.total, float("nan"))
            return type(terms)(total=terms.total + nan, dsm=terms.dsm, reg=terms.reg)
        return terms

    return wrapped


def rank_seed(seed: int, env: DistEnv) -> int:
    """Seed of this rank's data and noise generators: ranks draw different batches."""
    return seed + 1_000_000_007 * env.rank


class _WarningsOnly(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING


def quiet_other_ranks(env: DistEnv) -> None:
    """On ranks other than 0, root-logger handlers keep only warnings and errors (prefixed by the rank)."""
    if env.is_main:
        return
    root = logging.getLogger()
    for handler in root.handlers:
        handler.addFilter(_WarningsOnly())
        handler.setFormatter(logging.Formatter(f"[rank {env.rank}] %(message)s"))
