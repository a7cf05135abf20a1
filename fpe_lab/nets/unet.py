r"""A small U-Net noise predictor n_θ(x, t) for images, in the DDPM++/NCSN++ family (Song et al. 2021,
arXiv 2011.13456, App. H; Ho et al. 2020).

Input x: (b, C, H, W), t: (b,) in [0, 1]; output the same shape as x. The network knows nothing about
the SDE: wrap it in :class:`fpe_lab.model.ScoreModel`, which gives the score s = −n_θ(x, t) / sigma(t).

What the score Fokker-Planck residual needs from a network, and how this one provides it:

* **Samples never interact.** GroupNorm normalises within one sample (no BatchNorm) and attention
  mixes positions of one image only, so derivatives of the batch sum are per-sample derivatives.
* **Smooth.** SiLU activations and a sinusoidal (or Gaussian Fourier) embedding of t, so ∇_x∇·s and
  ∂_t s exist and are nonzero (ReLU would make second derivatives vanish).
* **Higher-order AD.** Attention is written as a plain matmul softmax (the "math kernel"): fused
  flash / memory-efficient kernels have neither double backward nor forward-mode AD. Every layer
  supports reverse-over-reverse and forward-mode (∂_t s by a JVP in t).

Architecture: conv_in → per resolution level (``channel_mult``) ``num_res_blocks`` residual blocks
(+ self-attention at ``attn_resolutions``) and a strided-conv downsample → middle (res, attn, res)
→ the mirror path with skip connections and nearest-neighbour upsampling → GroupNorm, SiLU, conv_out.
Residual connections are rescaled by 1/sqrt(2) (DDPM++ ``skip_rescale``).
"""

from __future__ import annotations

import enum
import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TypedDict, cast

import torch
from torch import nn
from torch.nn import functional as F

from fpe_lab.checks import check_int
from fpe_lab.shapes import append_dims

__all__ = ["UNetSize", "TimeEmbedding", "UNetConfig", "UNet"]


class UNetSize(enum.Enum):
    """Named sizes. TINY trains a few steps on a CPU in seconds; DDPMPP and DDPMPP_DEEP are the Score SDE
    CIFAR-10 networks ("DDPM++ cont." 4 blocks per level, "deep" 8) that the paper fine-tunes."""

    TINY = "tiny"
    SMALL = "small"
    DDPMPP = "ddpmpp"
    DDPMPP_DEEP = "ddpmpp-deep"


class TimeEmbedding(enum.Enum):
    """e(t): SINUSOIDAL = [sin(1000 t ω_k), cos(1000 t ω_k)], ω_k = 10000^(−k/(K−1)) (DDPM++);
    FOURIER = [sin(2π t w_k), cos(2π t w_k)], w_k ~ N(0, scale²) fixed (NCSN++)."""

    SINUSOIDAL = "sinusoidal"
    FOURIER = "fourier"


class _PresetFields(TypedDict):
    """The fields :meth:`UNetConfig.preset` sets for a named size."""

    channels: int
    channel_mult: tuple[int, ...]
    num_res_blocks: int
    attn_resolutions: tuple[int, ...]
    dropout: float
    num_groups: int


@dataclass(frozen=True)
class UNetConfig:
    """Shape of a :class:`UNet`. Use :meth:`preset` for the named sizes.

    ``num_groups`` must divide ``channels * m`` for every m in ``channel_mult``; ``image_size`` must be
    divisible by 2^(len(channel_mult) − 1); ``attn_resolutions`` are feature-map sizes (e.g. 16).
    """

    in_channels: int = 3
    image_size: int = 32
    channels: int = 128
    channel_mult: tuple[int, ...] = (1, 2, 2, 2)
    num_res_blocks: int = 4
    attn_resolutions: tuple[int, ...] = (16,)
    dropout: float = 0.1
    num_groups: int = 32
    time_embedding: TimeEmbedding = TimeEmbedding.SINUSOIDAL
    fourier_scale: float = 16.0

    def __post_init__(self) -> None:
        check_int("in_channels", self.in_channels, 1)
        check_int("image_size", self.image_size, 1)
        check_int("channels", self.channels, 1)
        check_int("num_res_blocks", self.num_res_blocks, 1)
        check_int("num_groups", self.num_groups, 1)
        if not isinstance(self.channel_mult, tuple) or not self.channel_mult:
            raise ValueError(f"channel_mult must be a non-empty tuple of ints >= 1; got {self.channel_mult!r}")
        for m in self.channel_mult:
            check_int("channel_mult entry", m, 1)
            if (self.channels * m) % self.num_groups:
                raise ValueError(
                    f"num_groups={self.num_groups} must divide every level width channels*mult; "
                    f"got channels={self.channels}, channel_mult={self.channel_mult}"
                )
        if self.channels % 2:
            raise ValueError(f"channels must be even (time embedding has sin and cos halves); got {self.channels}")
        factor = 2 ** (len(self.channel_mult) - 1)
        if self.image_size % factor:
            raise ValueError(
                f"image_size must be divisible by 2^(len(channel_mult)-1) = {factor}; got image_size={self.image_size}"
            )
        if not isinstance(self.attn_resolutions, tuple):
            raise ValueError(f"attn_resolutions must be a tuple of ints; got {self.attn_resolutions!r}")
        if not (isinstance(self.dropout, (int, float)) and 0.0 <= self.dropout < 1.0):
            raise ValueError(f"dropout must be in [0, 1); got {self.dropout!r}")
        if not isinstance(self.time_embedding, TimeEmbedding):
            raise ValueError(
                f"time_embedding must be a TimeEmbedding ({list(TimeEmbedding)}); got {self.time_embedding!r}"
            )
        if not (math.isfinite(self.fourier_scale) and self.fourier_scale > 0):
            raise ValueError(f"fourier_scale must be finite and > 0; got {self.fourier_scale!r}")

    @classmethod
    def preset(
        cls, size: UNetSize, in_channels: int = 3, image_size: int = 32, dropout: float | None = None
    ) -> UNetConfig:
        """The named sizes; attention sits at half the input resolution (16 for 32×32 images)."""
        attn = (max(image_size // 2, 1),)
        match size:
            case UNetSize.TINY:
                cfg = _PresetFields(channels=16, channel_mult=(1, 2), num_res_blocks=1, attn_resolutions=attn,
                                    dropout=0.0, num_groups=4)
            case UNetSize.SMALL:
                cfg = _PresetFields(channels=64, channel_mult=(1, 2, 2), num_res_blocks=2, attn_resolutions=attn,
                                    dropout=0.1, num_groups=16)
            case UNetSize.DDPMPP:
                cfg = _PresetFields(channels=128, channel_mult=(1, 2, 2, 2), num_res_blocks=4, attn_resolutions=attn,
                                    dropout=0.1, num_groups=32)
            case UNetSize.DDPMPP_DEEP:
                cfg = _PresetFields(channels=128, channel_mult=(1, 2, 2, 2), num_res_blocks=8, attn_resolutions=attn,
                                    dropout=0.1, num_groups=32)
            case _:
                raise ValueError(f"size must be a UNetSize ({[s.value for s in UNetSize]}); got {size!r}")
        if dropout is not None:
            cfg["dropout"] = dropout
        return cls(in_channels=in_channels, image_size=image_size, **cfg)


class _TimeEmbed(nn.Module):
    """t: (b,) → e(t): (b, channels); see :class:`TimeEmbedding`."""

    freqs: torch.Tensor  # a buffer (register_buffer in __init__)

    def __init__(self, channels: int, kind: TimeEmbedding, fourier_scale: float) -> None:
        super().__init__()
        half = channels // 2
        match kind:
            case TimeEmbedding.SINUSOIDAL:
                k = torch.arange(half, dtype=torch.float32) / max(half - 1, 1)
                freqs = 1000.0 * torch.exp(-math.log(10000.0) * k)
            case TimeEmbedding.FOURIER:
                gen = torch.Generator().manual_seed(0)
                freqs = 2 * math.pi * fourier_scale * torch.randn(half, generator=gen)
        # Persistent: the Fourier frequencies are part of the trained function.
        self.register_buffer("freqs", freqs)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        arg = t[:, None] * self.freqs.to(t.dtype)[None, :]
        return torch.cat([torch.sin(arg), torch.cos(arg)], dim=-1)


class ResBlock(nn.Module):
    """h = conv(drop(σ(GN(conv(σ(GN(x)))) + W e))),  out = (skip(x) + h)/sqrt(2),  σ = SiLU."""

    def __init__(self, c_in: int, c_out: int, emb_dim: int, groups: int, dropout: float) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.emb = nn.Linear(emb_dim, c_out)
        self.norm2 = nn.GroupNorm(groups, c_out)
        self.drop = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + append_dims(self.emb(F.silu(emb)), h.ndim)
        h = self.conv2(self.drop(F.silu(self.norm2(h))))
        return (self.skip(x) + h) / math.sqrt(2.0)


class Attention(nn.Module):
    """Single-head self-attention over the H·W positions of each image, by plain matmul softmax.

    A = softmax(qᵀk / sqrt(C)) per sample, out = (x + W_o (v Aᵀ)) / sqrt(2). Written without
    ``scaled_dot_product_attention`` on purpose: its fused kernels lack double backward and forward AD.
    """

    def __init__(self, channels: int, groups: int) -> None:
        super().__init__()
        self.norm = nn.GroupNorm(groups, channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, c, h * w).unbind(1)
        attn = torch.softmax(torch.einsum("bcn,bcm->bnm", q, k) / math.sqrt(c), dim=-1)
        out = torch.einsum("bnm,bcm->bcn", attn, v).reshape(b, c, h, w)
        return (x + self.proj(out)) / math.sqrt(2.0)


class _Level(nn.Module):
    """Residual blocks (each optionally followed by attention) at one resolution."""

    def __init__(self, blocks: list[ResBlock], attns: list[nn.Module]) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.attns = nn.ModuleList(attns)


class UNet(nn.Module):
    """n_θ(x, t) for x: (b, C, H, W), t: (b,); returns (b, C, H, W). See the module docstring."""

    def __init__(self, config: UNetConfig) -> None:
        super().__init__()
        if not isinstance(config, UNetConfig):
            raise ValueError(f"config must be a UNetConfig; got {config!r}")
        self.config = cfg = config
        ch, emb_dim, g = cfg.channels, 4 * cfg.channels, cfg.num_groups
        self.time_embed = _TimeEmbed(ch, cfg.time_embedding, cfg.fourier_scale)
        self.emb_mlp = nn.Sequential(nn.Linear(ch, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.conv_in = nn.Conv2d(cfg.in_channels, ch, 3, padding=1)

        def attn_or_id(c: int, res: int) -> nn.Module:
            return Attention(c, g) if res in cfg.attn_resolutions else nn.Identity()

        skips, c, res = [ch], ch, cfg.image_size
        self.down = nn.ModuleList()
        self.downsample = nn.ModuleList()
        for i, mult in enumerate(cfg.channel_mult):
            blocks, attns = [], []
            for _ in range(cfg.num_res_blocks):
                blocks.append(ResBlock(c, ch * mult, emb_dim, g, cfg.dropout))
                c = ch * mult
                attns.append(attn_or_id(c, res))
                skips.append(c)
            self.down.append(_Level(blocks, attns))
            last = i == len(cfg.channel_mult) - 1
            self.downsample.append(nn.Identity() if last else nn.Conv2d(c, c, 3, stride=2, padding=1))
            if not last:
                skips.append(c)
                res //= 2

        self.mid1 = ResBlock(c, c, emb_dim, g, cfg.dropout)
        self.mid_attn = Attention(c, g)
        self.mid2 = ResBlock(c, c, emb_dim, g, cfg.dropout)

        self.up = nn.ModuleList()
        self.upsample = nn.ModuleList()
        for i, mult in reversed(list(enumerate(cfg.channel_mult))):
            blocks, attns = [], []
            for _ in range(cfg.num_res_blocks + 1):
                blocks.append(ResBlock(c + skips.pop(), ch * mult, emb_dim, g, cfg.dropout))
                c = ch * mult
                attns.append(attn_or_id(c, res))
            self.up.append(_Level(blocks, attns))
            self.upsample.append(nn.Conv2d(c, c, 3, padding=1) if i > 0 else nn.Identity())
            if i > 0:
                res *= 2
        assert not skips, "skip bookkeeping"
        self.norm_out = nn.GroupNorm(g, c)
        self.conv_out = nn.Conv2d(c, cfg.in_channels, 3, padding=1)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        expected = (cfg.in_channels, cfg.image_size, cfg.image_size)
        if x.ndim != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(
                f"x must have shape (b, {', '.join(map(str, expected))}) for this UNet; got {tuple(x.shape)}"
            )
        if t.shape != x.shape[:1]:
            raise ValueError(f"t must have shape ({x.shape[0]},); got {tuple(t.shape)}")
        emb = self.emb_mlp(self.time_embed(t).to(x.dtype))
        h = self.conv_in(x)
        hs = [h]
        for level, down in zip(cast(Iterable[_Level], self.down), self.downsample):
            for block, attn in zip(level.blocks, level.attns):
                h = attn(block(h, emb))
                hs.append(h)
            if not isinstance(down, nn.Identity):
                h = down(h)
                hs.append(h)
        h = self.mid2(self.mid_attn(self.mid1(h, emb)), emb)
        for level, up in zip(cast(Iterable[_Level], self.up), self.upsample):
            for block, attn in zip(level.blocks, level.attns):
                h = attn(block(torch.cat([h, hs.pop()], dim=1), emb))
            if not isinstance(up, nn.Identity):
                h = up(F.interpolate(h, scale_factor=2.0, mode="nearest"))
        return self.conv_out(F.silu(self.norm_out(h)))
