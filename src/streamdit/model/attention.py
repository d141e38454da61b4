"""The attention backend setting and the one attention call site of the generator.

Owns: the backend names (`auto | flash | efficient | cudnn | math`), their resolution to an
effective backend ONCE at startup (`resolve_attention_backend`: `auto` is cuDNN's fused kernel
on Hopper or newer when it runs there, else flash), `KeyBias` (a KV bias: one span of keys whose
attention weight is multiplied by a constant) and `sdpa`, which runs attention pinned to exactly
the resolved backend. Pinning (rather than letting PyTorch pick per call) keeps every TP rank on
the same kernel and makes the effective backend a value the startup parity check compares.

A biased call stays on the fast kernel: attention over keys split into spans is the
log-sum-exp-weighted mix of attention over each span, so the biased span is attended on its own
and its log-sum-exp raised by `log(bias)` before the mix (exact; the one extra rounding is of
each span's output to the input dtype). `math` keeps the single call with an additive mask: it
is the reference the split path is tested against.
Imports torch and `streamdit.errors` only.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from streamdit.errors import ConfigError

Tensor = torch.Tensor
log = logging.getLogger(__name__)

ATTENTION_BACKENDS: tuple[str, ...] = ("auto", "flash", "efficient", "cudnn", "math")
"""Names accepted by `resolve_attention_backend`."""

_KERNELS: Mapping[str, SDPBackend] = MappingProxyType(
    {
        "flash": SDPBackend.FLASH_ATTENTION,
        "efficient": SDPBackend.EFFICIENT_ATTENTION,
        "cudnn": SDPBackend.CUDNN_ATTENTION,
        "math": SDPBackend.MATH,
    }
)

_HALF_DTYPES = (torch.float16, torch.bfloat16)
CUDNN_MIN_CAPABILITY = (9, 0)  # Hopper: where cuDNN's fused attention beats flash (issue 17: 1.65x)


@dataclass(frozen=True, slots=True)
class KeyBias:
    """Keys `[start, end)` attend with weight `exp(log_weight)`; every other key with weight 1.

    `log_weight` is a 0-d float32 tensor (not a Python float), so a compiled graph takes the
    bias as an input instead of recompiling for each value; the bounds are Python ints.
    """

    start: int
    end: int
    log_weight: Tensor

    def mask(self, keys: int, dtype: torch.dtype) -> Tensor:
        """The same bias as an additive `[1, 1, 1, keys]` mask (the `math` reference path)."""
        inside = torch.zeros(keys, dtype=torch.bool, device=self.log_weight.device)
        inside[self.start : self.end] = True
        mask = torch.where(inside, self.log_weight, torch.zeros_like(self.log_weight))
        return mask.to(dtype).view(1, 1, 1, keys)

    def spans(self, keys: int) -> list[tuple[int, int, bool]]:
        """`(start, end, biased)` for each non-empty span of `[0, keys)`, in order."""
        cuts = [(0, self.start, False), (self.start, self.end, True), (self.end, keys, False)]
        return [(a, b, biased) for a, b, biased in cuts if b > a]


def cudnn_attention_runs(device: torch.device, dtype: torch.dtype, head_dim: int) -> bool:
    """True when cuDNN's fused attention is the right default here: a Hopper-or-newer GPU,
    a half dtype, and one probe call (with the model's head dim) that runs."""
    device = torch.device(device)
    if device.type != "cuda" or dtype not in _HALF_DTYPES or not torch.cuda.is_available():
        return False
    if torch.cuda.get_device_capability(device) < CUDNN_MIN_CAPABILITY:
        return False
    try:
        q = torch.zeros(1, 2, 64, head_dim, device=device, dtype=dtype)
        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
            F.scaled_dot_product_attention(q, q, q)
        _lse_attention(q, q, q, "cudnn")
        torch.cuda.synchronize(device)
    except RuntimeError as exc:  # a cuDNN without the fused kernel, or one refusing the shape
        log.info("cuDNN attention is not usable here (%s); auto picks flash", exc)
        return False
    return True


def resolve_attention_backend(
    requested: str,
    device: torch.device,
    dtype: torch.dtype,
    *,
    cudnn_ok: bool | None = None,
    head_dim: int = 128,
) -> str:
    """Turn the configured backend name into the effective one; call once at startup.

    `auto` -> `cudnn` on CUDA with fp16/bf16 where `cudnn_ok` (default: `cudnn_attention_runs`
    probes the device), `flash` on other CUDA, otherwise `math`. Explicit names are checked
    against the device and dtype here, so an impossible choice fails at startup instead of
    raising "no available kernel" in the first generator call.
    """
    if requested not in ATTENTION_BACKENDS:
        valid = ", ".join(ATTENTION_BACKENDS)
        raise ConfigError(f"attention_backend: unknown backend {requested!r}; valid: {valid}")
    on_cuda = torch.device(device).type == "cuda"
    if requested == "auto":
        if not on_cuda or dtype not in _HALF_DTYPES:
            return "math"
        if cudnn_ok is None:
            cudnn_ok = cudnn_attention_runs(device, dtype, head_dim)
        return "cudnn" if cudnn_ok else "flash"
    if requested != "math" and not on_cuda:
        raise ConfigError(f"attention_backend: {requested!r} needs a CUDA device, got {torch.device(device)}")
    if requested in ("flash", "cudnn") and dtype not in _HALF_DTYPES:
        raise ConfigError(f"attention_backend: {requested!r} needs fp16/bf16, got {dtype}")
    return requested


def check_resolved(backend: str) -> None:
    """Reject names that are not an effective backend (such as an unresolved `auto`)."""
    if backend not in _KERNELS:
        raise ConfigError(f"attention_backend: {backend!r} is not a resolved backend name")


def sdpa(q: Tensor, k: Tensor, v: Tensor, *, backend: str, key_bias: KeyBias | None = None) -> Tensor:
    """Scaled dot-product attention on `[B, H, L, D]` tensors, pinned to one backend.

    `key_bias` (optional) multiplies the attention weight of one span of keys. On every backend
    but `math` a biased call runs the same fused kernel once per span and mixes the spans by
    their log-sum-exp. Compile-friendly: the kernel choice and the span bounds are Python
    constants per call site.
    """
    check_resolved(backend)
    if key_bias is None:
        with sdpa_kernel([_KERNELS[backend]]):
            return F.scaled_dot_product_attention(q, k, v)
    if backend == "math":
        mask = key_bias.mask(k.shape[2], q.dtype)
        with sdpa_kernel([SDPBackend.MATH]):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return biased_attention(q, k, v, key_bias, kernel=backend)


def biased_attention(q: Tensor, k: Tensor, v: Tensor, key_bias: KeyBias, *, kernel: str) -> Tensor:
    """Attention with `key_bias` as a log-sum-exp mix of one fused call per key span.

    softmax over all keys = Σ_s w_s · softmax over span s, with w_s ∝ exp(lse_s) (times the
    span's weight): the identity flash attention's own tiling rests on. `kernel`: `flash`,
    `efficient` or `cudnn` on CUDA; on CPU PyTorch's flash kernel for CPU runs (tests).
    """
    outs, lses = [], []
    for start, end, biased in key_bias.spans(k.shape[2]):
        out, lse = _lse_attention(q, k[:, :, start:end], v[:, :, start:end], kernel)
        outs.append(out)
        lses.append(lse + key_bias.log_weight if biased else lse)
    weights = torch.softmax(torch.stack(lses), dim=0).unsqueeze(-1)  # [spans, B, H, Lq, 1]
    mixed = sum(w * o.float() for w, o in zip(weights.unbind(0), outs, strict=True))
    return mixed.to(q.dtype)


def _lse_attention(q: Tensor, k: Tensor, v: Tensor, kernel: str) -> tuple[Tensor, Tensor]:
    """One fused attention call returning (out `[B, H, Lq, D]`, float32 lse `[B, H, Lq]`)."""
    b, h, lq, _ = q.shape
    aten = torch.ops.aten
    if q.device.type == "cpu":
        out, lse = aten._scaled_dot_product_flash_attention_for_cpu(q, k, v)
    elif kernel == "flash":
        out, lse = aten._scaled_dot_product_flash_attention(q, k, v)[:2]
    elif kernel == "cudnn":
        out, lse = aten._scaled_dot_product_cudnn_attention(q, k, v, None, True)[:2]
    elif kernel == "efficient":
        out, lse = aten._scaled_dot_product_efficient_attention(q, k, v, None, True)[:2]
    else:
        raise ConfigError(f"attention_backend: {kernel!r} has no log-sum-exp kernel")
    # efficient pads lse's query dim to a multiple of 32; cuDNN may add a trailing 1
    return out, lse.reshape(b, h, -1)[..., :lq].float()
