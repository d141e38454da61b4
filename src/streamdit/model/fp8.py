"""FP8 linear layers for the DiT blocks (`--fp8`): rowwise-scaled `torch._scaled_mm`.

Owns: `Fp8Linear` (an `nn.Linear` stand-in: float8_e4m3fn weight with one float32 scale per
output row, activations quantized per row at run time), `quantize_blocks` (swap the blocks'
linear layers in place, after the checkpoint is loaded and before TP shards or compile runs)
and `fp8_supported` (the device check behind `--fp8`'s refusal).

Why rowwise, per-token: one scale per output channel of W and per token of x keeps the error of
both at e4m3's 3-bit mantissa, with no calibration; `_scaled_mm` applies both scales in its
epilogue. The activation's amax and cast are plain tensor ops, so inductor fuses them into the
kernel that produced x (a regional compile of each block sees them as one graph).

Sharding keeps the weights exact: a rowwise scale belongs to an output row, so a
column-parallel shard keeps its rows' scales and a row-parallel shard (input columns) keeps
every scale unchanged: the shards dequantize to slices of the very same quantized weight (so
quantize before sharding). A row-parallel shard quantizes its slice of each activation row with
that slice's own scale, so TP output is not bit-for-bit one GPU's FP8, but within FP8's error.
`weight` keeps nn.Linear's
`[out, in]` shape, so the TP plan, its shape checks and the head count read from `q.weight`
are unchanged; `input_dtype` is what a caller casts activations to.
Imports torch and streamdit.errors only.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from streamdit.errors import ConfigError

Tensor = torch.Tensor
FP8 = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8).max)  # 448
FP8_MIN_CAPABILITY = (8, 9)  # Ada / Hopper: the first GPUs with FP8 tensor cores
QUANTIZED_LINEARS = (
    "self_attn.q",
    "self_attn.k",
    "self_attn.v",
    "self_attn.o",
    "cross_attn.q",
    "cross_attn.k",
    "cross_attn.v",
    "cross_attn.o",
    "ffn.0",
    "ffn.2",
)
"""The linear layers of each block that `quantize_blocks` swaps (every one: >99% of the FLOPs).
Embeddings, the time MLPs and the head stay in the model dtype (small, and closest to the
output)."""


ROW_TENSORS = ("weight", "bias", "weight_scale")
"""A linear layer's tensors indexed by output row (an FP8 layer's row scales included): what a
column-parallel shard slices and what `fuse_qkv` stacks."""


ACTIVATION_DTYPE = torch.bfloat16
"""What FP8 layers take and return (the run refuses --fp8 with another dtype)."""


class RowQuantized(NamedTuple):
    """An activation quantized per row before it reaches its FP8 layer (a fused norm kernel's
    output): e4m3 `data [..., K]` and float32 `scale [..., 1]`, as `rowwise_quantize` makes them
    from the activation in `ACTIVATION_DTYPE`."""

    data: Tensor
    scale: Tensor

    @property
    def shape(self) -> torch.Size:
        return self.data.shape


def rowwise_quantize(x: Tensor) -> tuple[Tensor, Tensor]:
    """`x [M, K]` -> (fp8 `[M, K]`, float32 scale `[M, 1]`) with x ≈ q * scale per row."""
    amax = x.abs().amax(dim=-1, keepdim=True).float().clamp(min=1e-12)
    scale = amax / FP8_MAX
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


class Fp8Linear(nn.Module):
    """y = x W^T + b with W in e4m3 (a scale per output row) and x quantized per row."""

    def __init__(
        self, weight: Tensor, weight_scale: Tensor, bias: Tensor | None, input_dtype: torch.dtype
    ) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.weight_scale = nn.Parameter(weight_scale, requires_grad=False)  # [out] float32
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.input_dtype = input_dtype

    @classmethod
    def from_linear(cls, layer: nn.Linear) -> Fp8Linear:
        weight = layer.weight.detach()
        q, scale = rowwise_quantize(weight)
        bias = None if layer.bias is None else layer.bias.detach().clone()
        return cls(q, scale.view(-1), bias, weight.dtype)

    @property
    def in_features(self) -> int:
        return self.weight.shape[1]

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    def forward(self, x: Tensor | RowQuantized) -> Tensor:
        return fp8_linear(x, self.weight, self.weight_scale, self.bias, self.input_dtype)

    def dequantized(self) -> Tensor:
        """The weight this layer multiplies by, in float32 (tests, error reports)."""
        return self.weight.float() * self.weight_scale.view(-1, 1)


def fp8_linear(
    x: Tensor | RowQuantized,
    weight: Tensor,
    weight_scale: Tensor,
    bias: Tensor | None,
    out_dtype: torch.dtype,
) -> Tensor:
    """`x [..., in]` (or already quantized) times the e4m3 `weight [out, in]` (row scales
    `[out]`), plus `bias`."""
    if isinstance(x, RowQuantized):
        lead = x.data.shape[:-1]
        xq, x_scale = x.data.reshape(-1, x.data.shape[-1]), x.scale.reshape(-1, 1)
    else:
        lead = x.shape[:-1]
        xq, x_scale = rowwise_quantize(x.reshape(-1, x.shape[-1]))
    out = torch._scaled_mm(
        xq,
        weight.t(),  # [in, out] column-major: the layout cuBLASLt / CUTLASS want for B
        scale_a=x_scale,
        scale_b=weight_scale.view(1, -1),
        bias=bias,
        out_dtype=out_dtype,
    )
    return out.view(*lead, weight.shape[0])


def fp8_supported(device: torch.device) -> str | None:
    """None when `--fp8` can run on `device`, else the reason it cannot (for a clear refusal)."""
    device = torch.device(device)
    if device.type != "cuda":
        return f"FP8 matmuls need a CUDA GPU, got device {device}"
    if not torch.cuda.is_available():
        return "CUDA is not available"
    capability = torch.cuda.get_device_capability(device)
    if capability < FP8_MIN_CAPABILITY:
        want = ".".join(map(str, FP8_MIN_CAPABILITY))
        return f"FP8 matmuls need compute capability >= {want} (Ada/Hopper), this GPU has {capability}"
    return None


def quantize_blocks(blocks: nn.ModuleList) -> int:
    """Swap every block's `QUANTIZED_LINEARS` for `Fp8Linear`, in place; returns how many.

    Call after the weights are loaded and before sharding or compiling. Refuses a layer whose
    dims `_scaled_mm` cannot take (multiples of 16), before any layer is replaced.
    """
    targets = [(block, path) for block in blocks for path in QUANTIZED_LINEARS]
    for block, path in targets:
        layer = block.get_submodule(path)
        if not isinstance(layer, nn.Linear):
            raise ConfigError(f"--fp8: {path} is a {type(layer).__name__}, not a Linear [field=fp8]")
        if layer.in_features % 16 or layer.out_features % 16:
            raise ConfigError(
                f"--fp8: {path} is {layer.out_features}x{layer.in_features}; FP8 matmuls need both "
                "dims to be multiples of 16 [field=fp8]"
            )
    for block, path in targets:
        parent, _, leaf = path.rpartition(".")
        owner = block.get_submodule(parent)
        fp8 = Fp8Linear.from_linear(getattr(owner, leaf))
        if isinstance(owner, nn.Sequential):
            owner[int(leaf)] = fp8
        else:
            setattr(owner, leaf, fp8)
    return len(targets)
