r"""The one place where network output becomes a score.

A network predicts the noise eps of x_t = alpha x_0 + sigma eps; the DSM-optimal prediction is
E[eps | x_t] = −sigma ∇ log p_t(x_t), so the score is

    s_θ(x, t) = −n_θ(x, t) / sigma(t).

This keeps the network's output O(1) at every t while the score grows like 1/sigma near t = 0.
"""

from __future__ import annotations

import torch
from torch import nn

from fpe_lab.sde import LinearSDE
from fpe_lab.shapes import append_dims

__all__ = ["ScoreModel"]


class ScoreModel(nn.Module):
    """score_fn(x, t) = −net(x, t) / sigma(t) for x of shape (b, *dims), t of shape (b,)."""

    def __init__(self, net: nn.Module, sde: LinearSDE) -> None:
        super().__init__()
        self.net = net
        self.sde = sde

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """s_θ(x, t); t = 0 is a ValueError: sigma(0) = 0, and −n/sigma has no limit for a network n."""
        _, sigma = self.sde.marginal(t)
        if not bool((sigma > 0).all()):
            raise ValueError("ScoreModel: t = 0 gives sigma(0) = 0, where the network score −n/sigma is undefined; "
                             "evaluate at t >= eps")
        return -self.net(x, t) / append_dims(sigma, x.ndim)
