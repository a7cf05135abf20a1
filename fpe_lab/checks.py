"""Argument checks shared by the math objects: each raises ``ValueError`` naming the argument,
the offending value and what is allowed."""

from __future__ import annotations

import math
from typing import Any

import torch

__all__ = ["check_time", "check_finite", "check_positive", "check_batch", "check_int", "check_float"]


def _describe(v: torch.Tensor) -> str:
    if v.numel() == 1:
        return repr(v.item())
    nonfinite = v[~torch.isfinite(v)]
    if nonfinite.numel():
        return repr(nonfinite[0].item())
    return f"values in [{v.min().item()!r}, {v.max().item()!r}]"


def check_time(t: torch.Tensor | float, name: str = "t") -> torch.Tensor:
    """t must be finite and inside [0, 1] (the SDE's time window); returns t as a tensor.

    Inside ``torch.func.vmap`` values cannot be inspected (no data-dependent control flow), so the
    check is skipped there; callers validate t before entering the transform.
    """
    tt = torch.as_tensor(t)
    try:
        finite = bool(torch.isfinite(tt).all())
        inside = not tt.numel() or bool((tt.min() >= 0) & (tt.max() <= 1))
    except RuntimeError:  # a vmap-batched tensor: no data-dependent control flow is allowed
        return tt
    if not finite:
        raise ValueError(f"{name} must be finite and in [0, 1]; got non-finite value {_describe(tt)}")
    if not inside:
        raise ValueError(f"{name} must lie in [0, 1]; got {_describe(tt)}")
    return tt


def check_finite(v: torch.Tensor, name: str) -> None:
    """Every entry of v must be finite (skipped inside ``torch.func.vmap``, see :func:`check_time`)."""
    try:
        finite = bool(torch.isfinite(v).all())
    except RuntimeError:  # a vmap-batched tensor
        return
    if not finite:
        raise ValueError(f"{name} must be finite; got non-finite value {_describe(v)}")


def check_positive(value: float, name: str) -> float:
    if isinstance(value, bool) or not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite positive number; got {value!r}")
    return float(value)


def check_batch(x: torch.Tensor, name: str = "x") -> torch.Tensor:
    """x must be a tensor of shape (b, ...) with b >= 1: an empty batch is a ValueError naming the shape.

    A batch of zero samples has no per-sample result to return, and reductions over it (means,
    maxima, RMS error norms) are undefined, so the math functions refuse it up front instead of
    returning empty tensors or NaN. Shapes are static, so this also works inside ``torch.func`` transforms.
    """
    if isinstance(x, torch.Tensor) and x.ndim >= 1 and x.shape[0] == 0:
        raise ValueError(f"{name} is an empty batch: shape {tuple(x.shape)}; need b >= 1 samples along the first axis")
    return x


def check_int(name: str, v: Any, lo: int, hi: int | None = None) -> int:
    """v must be an integer (not a bool) in [lo, hi] (hi None: no upper bound); returns v."""
    ok = isinstance(v, int) and not isinstance(v, bool) and v >= lo and (hi is None or v <= hi)
    if not ok:
        rng = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise ValueError(f"{name} must be an integer {rng}; got {v!r}")
    return v


def check_float(name: str, v: Any, lo: float, hi: float = math.inf, lo_open: bool = False,
                hi_open: bool = False) -> float:
    """v must be a finite number (not a bool) in the interval from lo to hi, each end open or closed."""
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    ok = ok and (v > lo if lo_open else v >= lo) and (v < hi if hi_open else v <= hi)
    if not ok:
        lb, rb = "(" if lo_open else "[", ")" if hi_open else "]"
        raise ValueError(f"{name} must be a finite number in {lb}{lo:g}, {hi:g}{rb}; got {v!r}")
    return float(v)
