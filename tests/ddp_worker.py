"""Worker for the DDP gradient test: ``torchrun --nproc_per_node=2 ddp_worker.py OUT``.

Each rank computes DSM + lam·FPE (Hutchinson residual, probe fixed in advance) on its half of a fixed
global batch through the unwrapped module and runs backward twice: without and with the gradient
averaging hooks. Rank 0 saves both ranks' gradients of both passes to OUT. The
reference (a single process on the whole batch) uses :func:`batch_loss` on the full batch.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch

from fpe_lab import distributed
from fpe_lab.fpe import Hutchinson
from fpe_lab.losses import dsm_loss
from fpe_lab.model import ScoreModel
from fpe_lab.nets.unet import UNet, UNetConfig
from fpe_lab.regularizers.fpe import FPERegularizer
from fpe_lab.sde import VPSDE

GLOBAL_BATCH = 4
LAM = 0.1


@dataclass(eq=False)
class GivenProbe(Hutchinson):
    """Hutchinson with one probe given in advance (b, *dims), so ranks and the reference use the same v."""

    given: torch.Tensor | None = None

    def sample_probe(self, like: torch.Tensor) -> torch.Tensor:
        return self.given.to(like)


def make_model(seed: int) -> ScoreModel:
    torch.manual_seed(seed)
    cfg = UNetConfig(in_channels=1, image_size=8, channels=4, channel_mult=(1, 2), num_res_blocks=1,
                     attn_resolutions=(4,), dropout=0.0, num_groups=2)
    return ScoreModel(UNet(cfg).double(), VPSDE())


def global_batch() -> tuple[torch.Tensor, ...]:
    """x0, t, z of the global batch and a Rademacher probe (b, 1, 8, 8): the same on every rank."""
    g = torch.Generator().manual_seed(123)
    x0 = torch.rand(GLOBAL_BATCH, 1, 8, 8, generator=g, dtype=torch.float64) * 2 - 1
    t = 0.05 + 0.9 * torch.rand(GLOBAL_BATCH, generator=g, dtype=torch.float64)
    z = torch.randn(GLOBAL_BATCH, 1, 8, 8, generator=g, dtype=torch.float64)
    probe = torch.randn(GLOBAL_BATCH, 1, 8, 8, generator=g, dtype=torch.float64).sign()
    return x0, t, z, probe


def batch_loss(module: ScoreModel, x0, t, z, probe) -> torch.Tensor:
    """Mean over the batch of DSM + LAM · w(t)‖R‖² (R with the given Hutchinson probe)."""
    sde = module.sde
    reg = FPERegularizer(lam=LAM, divergence=GivenProbe(given=probe))
    dsm = dsm_loss(module, sde, x0, t, z)
    fpe = reg.penalty_at(module, sde, sde.perturb(x0, t, z), t)
    return (dsm + LAM * fpe).mean()


def main(out: str) -> None:
    torch.set_num_threads(1)
    env = distributed.init_from_env()
    assert env.world_size == 2, env
    # different initial weights per rank: DDP's broadcast must make them rank 0's
    model = distributed.wrap(make_model(seed=env.rank), env)
    module = distributed.unwrap(model)
    x0, t, z, probe = global_batch()
    half = slice(env.rank * GLOBAL_BATCH // 2, (env.rank + 1) * GLOBAL_BATCH // 2)
    result = {}
    for label in ("unsynced", "synced"):  # the first pass is the negative control: no averaging hooks
        handles = distributed.average_gradients_in_backward(module, env) if label == "synced" else []
        module.zero_grad(set_to_none=True)
        batch_loss(module, x0[half], t[half], z[half], probe[half]).backward()
        grads = {name: p.grad.detach().clone() for name, p in module.named_parameters()}
        gathered = [None, None]
        torch.distributed.all_gather_object(gathered, grads)
        result[label] = {"rank0": gathered[0], "rank1": gathered[1]}
        for h in handles:
            h.remove()
    if env.is_main:
        torch.save(result, out)
    distributed.shutdown(env)


if __name__ == "__main__":
    main(sys.argv[1])
