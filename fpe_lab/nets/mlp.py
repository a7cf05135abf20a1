"""Time-conditioned MLP for 2-D (low-dimensional) data."""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["TimeMLP"]


class TimeMLP(nn.Module):
    r"""n(x, t) = W_L σ(... σ(W_1 [x, e(t)] + b_1) ...) + b_L with σ = SiLU.

    e(t) = [sin(2π ω_j t), cos(2π ω_j t)]_{j < n_freq}, ω_j = 2^j / 2 (fixed): smooth in t, so ∂_t n
    exists. SiLU (not ReLU) keeps second derivatives in x nonzero, which the score FPE needs.
    Input x: (b, D), t: (b,); output (b, D). Samples never interact (no normalisation layers), so
    derivatives over the batch sum are per-sample derivatives.
    """

    freqs: torch.Tensor  # a buffer: 2π ω_j, shape (n_freq,)

    def __init__(self, dim: int = 2, width: int = 128, depth: int = 3, n_freq: int = 8) -> None:
        super().__init__()
        for name, v, lo in (("dim", dim, 1), ("width", width, 1), ("depth", depth, 1), ("n_freq", n_freq, 0)):
            if not isinstance(v, int) or v < lo:
                raise ValueError(f"{name} must be an int >= {lo}; got {v!r}")
        self.dim, self.width, self.depth, self.n_freq = dim, width, depth, n_freq
        self.register_buffer("freqs", 2 * math.pi * 2.0 ** torch.arange(n_freq) / 2, persistent=False)
        sizes = [dim + 2 * n_freq] + [width] * depth
        self.hidden = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:]))
        self.out = nn.Linear(width, dim)
        self.act = nn.SiLU()

    def time_features(self, t: torch.Tensor) -> torch.Tensor:
        """e(t), shape (b, 2 n_freq)."""
        arg = t[:, None] * self.freqs.to(t)
        return torch.cat([torch.sin(arg), torch.cos(arg)], dim=-1)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        h = torch.cat([x, self.time_features(t)], dim=-1)
        for layer in self.hidden:
            h = self.act(layer(h))
        return self.out(h)
