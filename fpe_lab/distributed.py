r"""Data-parallel training under ``torchrun`` (torch.distributed + DistributedDataParallel) for a loss that
differentiates the network with respect to its *inputs* inside the loss.

The score-FPE residual R_θ takes ∂_t s_θ (forward-mode JVP), ∇_x(∇·s_θ) (nested reverse passes) and then
∇_θ‖R_θ‖², a third-order derivative. DDP's reducer is built for one plain backward per forward; double
backward through a DDP-wrapped module is not supported and grads of grads are not synchronised
(pytorch#47562, #63812; REFERENCE.md §4). So here:

* every derivative — inner (x, t) and outer (θ) — is taken through the *unwrapped* module
  ``unwrap(model)``, never through ``DDP.forward`` (the DDP reducer stays idle: its hooks only act after
  a DDP forward);
* each parameter's gradient is averaged over ranks by a post-accumulate-grad hook
  (:func:`average_gradients_in_backward`) once it is final, i.e. after every order of the backward has
  added to it, so the optimizer sees exactly the gradient of the mean loss over the global batch;
* DDP itself is kept for what it does well: broadcasting rank 0's parameters and buffers at
  construction, and the familiar ``.module`` container.

With equal per-rank batches this equals a single process on the concatenated batch (tested on CPU,
gloo, 2 processes). Launch: ``torchrun --nproc_per_node=N -m fpe_lab.run cifar10 ...``.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Callable

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


def average_gradients_in_backward(module: nn.Module, env: DistEnv) -> list:
    """Register hooks so that each parameter's final gradient is replaced by its mean over ranks.

    The hook fires once per backward per parameter, after all contributions (DSM and every order of
    the FPE term) have been accumulated. All ranks run the same graph, so the all-reduces are issued in
    the same order everywhere. Returns the hook handles (``.remove()`` to undo). No-op when not
    distributed.
    """
    if not env.is_distributed:
        return []

    def hook(p: torch.Tensor) -> None:
        dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
        p.grad.div_(env.world_size)

    return [p.register_post_accumulate_grad_hook(hook) for p in module.parameters() if p.requires_grad]


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
            return type(terms)(total=terms.total + nan, dsm=terms.dsm, fpe=terms.fpe)
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
