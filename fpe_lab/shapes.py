"""Broadcasting of per-sample coefficients, the one place where rank is handled.

Data are tensors of shape (b, *dims): (b, D) for toy data, (b, C, H, W) for images. Time and
every time coefficient (alpha(t), sigma(t), g(t), ...) have shape (b,) or are scalars. Code that
multiplies a coefficient into data calls :func:`append_dims` instead of indexing with
``[:, None, None, None]``, so the same line serves points and images.
"""

from __future__ import annotations

import torch

__all__ = ["append_dims", "batch_time", "flat_dim"]


def append_dims(c: torch.Tensor, ndim: int) -> torch.Tensor:
    """View ``c`` of shape (b,) (or ()) with trailing singleton axes up to ``ndim`` axes."""
    missing = ndim - c.ndim
    if missing < 0:
        raise ValueError(f"cannot append dims: coefficient has {c.ndim} axes, target has {ndim}")
    return c.reshape(c.shape + (1,) * missing)


def batch_time(t: torch.Tensor | float, x: torch.Tensor) -> torch.Tensor:
    """Return t as a tensor of shape (b,) with the dtype and device of ``x`` of shape (b, *dims).

    A scalar t is copied to b separate elements (not a stride-0 view), so forward-mode AD can
    attach one tangent per sample.
    """
    t = torch.as_tensor(t, dtype=x.dtype, device=x.device)
    if t.ndim == 0:
        return t.expand(x.shape[0]).contiguous()
    if t.shape != x.shape[:1]:
        raise ValueError(
            f"t has shape {tuple(t.shape)}; expected a scalar or shape ({x.shape[0]},) "
            f"matching the batch of x {tuple(x.shape)}"
        )
    return t


def flat_dim(x: torch.Tensor) -> int:
    """D, the number of coordinates of one sample of x of shape (b, *dims)."""
    d = 1
    for n in x.shape[1:]:
        d *= n
    return d
