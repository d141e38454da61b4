"""The DiT's normalizations: Wan's full-dim RMSNorm, its float32 LayerNorm, and a block's
residual + norm + modulation step.

Owns: `WanRMSNorm` (reduces its sum of squares through a replaceable hook, so TP only slices
weights and sets it), `norm_pair` (q and k normalized with one reduction), `WanLayerNorm`,
`add_norm` (the torch definition of a block's residual + norm + modulation step; the Triton
kernel of model/norm_kernels.py computes the same) and `resolve_norm_kernels` (which of the two
a run uses, decided once). Imports torch, streamdit.errors and streamdit.model.fp8 only.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from streamdit.errors import ConfigError
from streamdit.model.fp8 import ACTIVATION_DTYPE, FP8, RowQuantized, rowwise_quantize

Tensor = torch.Tensor


def _identity(t: Tensor) -> Tensor:
    return t


class WanRMSNorm(nn.Module):
    """RMSNorm over the WHOLE model dim, computed from a possibly head-sharded slice.

    The float32 sum of squares of the local slice goes through `reduce_sum_of_squares`
    (identity on one device; TP sets an all-reduce over the TP group) and is divided by the
    stored `full_dim`, so sharding only slices `weight` and sets the reduction.
    """

    def __init__(self, full_dim: int, eps: float, *, device: torch.device, dtype: torch.dtype) -> None:
        super().__init__()
        self.full_dim = full_dim
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(full_dim, device=device, dtype=dtype))
        self.reduce_sum_of_squares: Callable[[Tensor], Tensor] = _identity

    def forward(self, x: Tensor) -> Tensor:
        return self.scale(x, self.reduce_sum_of_squares(_sum_sq(x)))

    def scale(self, x: Tensor, sum_sq: Tensor) -> Tensor:
        """Normalize `x` by its full-dim (already reduced) float32 sum of squares."""
        return (x.float() * torch.rsqrt(sum_sq / self.full_dim + self.eps)).to(x.dtype) * self.weight


def _sum_sq(x: Tensor) -> Tensor:
    return x.float().pow(2).sum(dim=-1, keepdim=True)


def norm_pair(norm_a: WanRMSNorm, a: Tensor, norm_b: WanRMSNorm, b: Tensor) -> tuple[Tensor, Tensor]:
    """Two RMSNorms over same-length rows with ONE reduction (under TP: one all-reduce, not two)."""
    sums = norm_a.reduce_sum_of_squares(torch.cat([_sum_sq(a), _sum_sq(b)], dim=-1))
    return norm_a.scale(a, sums[..., :1]), norm_b.scale(b, sums[..., 1:])


class WanLayerNorm(nn.LayerNorm):
    """LayerNorm computed in float32 (returns float32), optionally with an affine."""

    def forward(self, x: Tensor) -> Tensor:
        weight = None if self.weight is None else self.weight.float()
        bias = None if self.bias is None else self.bias.float()
        return F.layer_norm(x.float(), self.normalized_shape, weight, bias, self.eps)


def add_norm(
    x: Tensor,
    y: Tensor | None,
    gate: Tensor | None,
    norm: WanLayerNorm,
    shift: Tensor | None,
    scale: Tensor | None,
    dtype: torch.dtype,
) -> tuple[Tensor, Tensor | RowQuantized]:
    """One residual + norm step of a block: x' = x + y·gate (float32; x itself when y is
    None), then h = norm(x')·(1 + scale) + shift cast to `dtype`, the next linear's input
    (`FP8`: quantized per row from `ACTIVATION_DTYPE`, as that FP8 layer would do it).
    `gate`, `shift`, `scale`: `[B, 1, D]` or None (no gate; no modulation)."""
    if y is not None:
        y = y.float()
        x = x + (y if gate is None else y * gate)
    h = norm(x)
    if scale is not None:
        assert shift is not None
        h = h * (1 + scale) + shift
    if dtype == FP8:
        return x, RowQuantized(*rowwise_quantize(h.to(ACTIVATION_DTYPE)))
    return x, h.to(dtype)


AddNorm = Callable[
    [Tensor, Tensor | None, Tensor | None, WanLayerNorm, Tensor | None, Tensor | None, torch.dtype],
    tuple[Tensor, Tensor | RowQuantized],
]


def resolve_norm_kernels(requested: str, device: torch.device) -> str:
    """`auto` → "triton" on CUDA where Triton is installed, else "torch"; "triton" is refused
    where it cannot run (a clear error naming the field, before any model work)."""
    available = device.type == "cuda" and importlib.util.find_spec("triton") is not None
    if requested == "auto":
        return "triton" if available else "torch"
    if requested == "triton" and not available:
        why = "Triton is not installed" if device.type == "cuda" else f"it needs a CUDA device, got {device}"
        raise ConfigError(f"--norm-kernels triton cannot run here: {why} [field=norm_kernels]")
    return requested
