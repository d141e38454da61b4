"""The DiT block's residual + LayerNorm + modulation as one Triton kernel (CUDA only).

Owns: `fused_add_norm`, a drop-in for `norms.add_norm` (same arguments, same math: residual add
with an optional gate, float32 LayerNorm with an optional affine, optional shift / scale, cast
to the next linear's input dtype), run as the custom ops `streamdit::add_norm` and
`streamdit::norm` (`torch.library.triton_op`: a compiled block calls the kernel itself, a CUDA
graph captures it like any other). Before an FP8 layer the kernel also quantizes the row
(`fp8.RowQuantized`: the amax is at hand, so the activation is never written in bf16).

Why: inductor splits each of these into two or three kernels that read the float32 residual
stream more than once (a wan-14b block spends ~0.2 ms of its ~0.35 ms of fused kernels in them
on an H200: bench/results/generator_tuning_bf16_h200.json). Here one program owns one row: the
row stays in registers from the residual add to the cast, so x and y are read once and x' and
the normalized row written once, the least traffic the math allows.

Imported only where Triton and a CUDA device exist (`CausalWanDiT.use_fused_norms`); CPU runs,
the tests' oracles and every other device use `norms.add_norm`. Imports torch, triton and
streamdit.model.fp8 only.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import triton_op, wrap_triton

from streamdit.model.fp8 import FP8, RowQuantized
from streamdit.model.fp8 import FP8_MAX as FP8_LIMIT

NUM_WARPS = 8  # a 5120-wide row over 256 threads: 32 values each, no spills
FP8_MAX: tl.constexpr = tl.constexpr(FP8_LIMIT)


@triton.jit
def _add_norm_kernel(
    x_ptr,
    y_ptr,
    gate_ptr,
    weight_ptr,
    bias_ptr,
    shift_ptr,
    scale_ptr,
    x_out_ptr,
    h_out_ptr,
    h_scale_ptr,
    rows_per_batch,
    dim,
    eps,
    HAS_Y: tl.constexpr,
    HAS_GATE: tl.constexpr,
    AFFINE: tl.constexpr,
    MODULATE: tl.constexpr,
    QUANTIZE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0)
    batch = row // rows_per_batch  # gate / shift / scale are per batch element ([B, D])
    cols = tl.arange(0, BLOCK)
    mask = cols < dim
    offs = row.to(tl.int64) * dim + cols
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_Y:
        y = tl.load(y_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if HAS_GATE:
            y = y * tl.load(gate_ptr + batch * dim + cols, mask=mask, other=0.0).to(tl.float32)
        x = x + y
        tl.store(x_out_ptr + offs, x, mask=mask)
    mean = tl.sum(x, axis=0) / dim
    centered = tl.where(mask, x - mean, 0.0)
    var = tl.sum(centered * centered, axis=0) / dim
    h = centered * tl.rsqrt(var + eps)
    if AFFINE:
        w = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        b = tl.load(bias_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        h = h * w + b
    if MODULATE:
        scale = tl.load(scale_ptr + batch * dim + cols, mask=mask, other=0.0).to(tl.float32)
        shift = tl.load(shift_ptr + batch * dim + cols, mask=mask, other=0.0).to(tl.float32)
        h = h * (1.0 + scale) + shift
    if QUANTIZE:
        # fp8.rowwise_quantize of the row in bf16 (ACTIVATION_DTYPE), the scale per row
        h = h.to(tl.bfloat16).to(tl.float32)
        amax = tl.maximum(tl.max(tl.where(mask, tl.abs(h), 0.0), axis=0), 1e-12)
        row_scale = tl.div_rn(amax, FP8_MAX)  # IEEE division, as torch divides
        tl.store(h_scale_ptr + row, row_scale)
        h = tl.clamp(tl.div_rn(h, row_scale), -FP8_MAX, FP8_MAX)
    tl.store(h_out_ptr + offs, h.to(h_out_ptr.dtype.element_ty), mask=mask)


def _launcher() -> object:
    """The kernel as compile and CUDA graphs see it. Under Triton's interpreter (the CPU
    tests) `triton.jit` gives a plain Python callable, which torch 2.11's `wrap_triton`
    refuses and which needs no compile integration."""
    if isinstance(_add_norm_kernel, triton.runtime.jit.JITFunction):
        return wrap_triton(_add_norm_kernel)
    return _add_norm_kernel


def _per_batch(t: Tensor | None, batch: int, dim: int) -> Tensor | None:
    """A `[B, 1, D]` modulation slice (a view into `[B, 6, 1, D]`) as a dense `[B, D]`."""
    return None if t is None else t.reshape(batch, dim).contiguous()


def _fill(t: Tensor | None, dummy: Tensor) -> Tensor:
    return dummy if t is None else t


def _launch(
    x: Tensor,
    y: Tensor | None,
    gate: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    shift: Tensor | None,
    scale: Tensor | None,
    eps: float,
    x_out: Tensor | None,
    h_out: Tensor,
    h_scale: Tensor,
) -> None:
    """One program per row; `h_out` FP8: the rows are quantized, their scales in `h_scale`."""
    batch, rows, dim = x.shape
    dummy = h_out  # never read: its pointer fills the slots a constexpr flag switched off
    quantize = h_out.dtype == FP8  # else `h_scale` is empty (no pointer to hand the kernel)
    _launcher()[(batch * rows,)](
        x,
        _fill(y, dummy),
        _fill(_per_batch(gate, batch, dim), dummy),
        _fill(weight, dummy),
        _fill(bias, dummy),
        _fill(_per_batch(shift, batch, dim), dummy),
        _fill(_per_batch(scale, batch, dim), dummy),
        _fill(x_out, dummy),
        h_out,
        h_scale if quantize else dummy,
        rows,
        dim,
        eps,
        HAS_Y=y is not None,
        HAS_GATE=gate is not None,
        AFFINE=weight is not None,
        MODULATE=scale is not None,
        QUANTIZE=quantize,
        BLOCK=triton.next_power_of_2(dim),
        num_warps=NUM_WARPS,
    )


def _outputs(x: Tensor, out_dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """The normalized rows and their scales (FP8; else an empty placeholder)."""
    h_out = torch.empty(x.shape, device=x.device, dtype=out_dtype)
    rows = x.shape[:-1] + (1,) if out_dtype == FP8 else (0,)
    return h_out, torch.empty(rows, device=x.device, dtype=torch.float32)


@triton_op("streamdit::add_norm", mutates_args=())
def _add_norm_op(
    x: Tensor,
    y: Tensor,
    gate: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    shift: Tensor | None,
    scale: Tensor | None,
    eps: float,
    out_dtype: torch.dtype,
) -> tuple[Tensor, Tensor, Tensor]:
    x_out = torch.empty_like(x)
    h_out, h_scale = _outputs(x, out_dtype)
    _launch(x, y, gate, weight, bias, shift, scale, eps, x_out, h_out, h_scale)
    return x_out, h_out, h_scale


@triton_op("streamdit::norm", mutates_args=())
def _norm_op(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    shift: Tensor | None,
    scale: Tensor | None,
    eps: float,
    out_dtype: torch.dtype,
) -> tuple[Tensor, Tensor]:
    h_out, h_scale = _outputs(x, out_dtype)
    _launch(x, None, None, weight, bias, shift, scale, eps, None, h_out, h_scale)
    return h_out, h_scale


def fused_add_norm(
    x: Tensor,
    y: Tensor | None,
    gate: Tensor | None,
    norm: torch.nn.LayerNorm,
    shift: Tensor | None,
    scale: Tensor | None,
    out_dtype: torch.dtype,
) -> tuple[Tensor, Tensor | RowQuantized]:
    """`norms.add_norm` as one kernel: x `[B, L, D]` float32 contiguous, y `[B, L, D]` (any
    float dtype) or None, gate / shift / scale `[B, 1, D]` or None, `norm` a LayerNorm over D;
    `out_dtype` FP8: rows quantized as `fp8.rowwise_quantize` does from ACTIVATION_DTYPE."""
    if x.dtype != torch.float32:
        raise ValueError(f"fused_add_norm: x must be float32 (the residual stream), got {x.dtype}")
    if (shift is None) != (scale is None):
        raise ValueError("fused_add_norm: shift and scale come together")
    weight, bias = norm.weight, norm.bias
    if (weight is None) != (bias is None):
        raise ValueError("fused_add_norm: an affine norm needs both weight and bias")
    eps = float(norm.eps)
    rows = x.contiguous()  # the first block's x is the patch embedding, transposed
    if y is None:
        h, h_scale = _norm_op(rows, weight, bias, shift, scale, eps, out_dtype)
    else:
        x, h, h_scale = _add_norm_op(rows, y.contiguous(), gate, weight, bias, shift, scale, eps, out_dtype)
    return x, RowQuantized(h, h_scale) if out_dtype == FP8 else h
