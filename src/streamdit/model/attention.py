"""The attention backend setting and the one SDPA call site of the generator.

Owns: the backend names (`auto | flash | efficient | cudnn | math`), their resolution to an
effective backend ONCE at startup (`resolve_attention_backend`), and `sdpa`, which runs
`scaled_dot_product_attention` pinned to exactly that backend. Pinning (rather than letting
PyTorch pick per call) keeps every TP rank on the same kernel and makes the effective backend a
value the runtime can put in its startup parity check.
Imports torch and `streamdit.errors` only.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from streamdit.errors import ConfigError

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


def resolve_attention_backend(requested: str, device: torch.device, dtype: torch.dtype) -> str:
    """Turn the configured backend name into the effective one; call once at startup.

    `auto` -> `flash` on CUDA with fp16/bf16, otherwise `math`. Explicit names are checked
    against the device and dtype here, so an impossible choice fails at startup instead of
    raising "no available kernel" in the first generator call.
    """
    if requested not in ATTENTION_BACKENDS:
        valid = ", ".join(ATTENTION_BACKENDS)
        raise ConfigError(f"attention_backend: unknown backend {requested!r}; valid: {valid}")
    on_cuda = torch.device(device).type == "cuda"
    if requested == "auto":
        return "flash" if on_cuda and dtype in _HALF_DTYPES else "math"
    if requested != "math" and not on_cuda:
        raise ConfigError(f"attention_backend: {requested!r} needs a CUDA device, got {torch.device(device)}")
    if requested in ("flash", "cudnn") and dtype not in _HALF_DTYPES:
        raise ConfigError(f"attention_backend: {requested!r} needs fp16/bf16, got {dtype}")
    return requested


def kernel_for(backend: str, *, has_mask: bool) -> str:
    """The backend `sdpa` actually pins for one call.

    Flash attention cannot take an additive float mask, so a masked call (a KV bias < 1 on
    cached keys) on `flash` runs on `efficient` instead. The rule depends only on the resolved
    name and whether a mask is present, both identical on every rank, so ranks never diverge.
    """
    if backend not in _KERNELS:
        raise ConfigError(f"attention_backend: {backend!r} is not a resolved backend name")
    if has_mask and backend == "flash":
        return "efficient"
    return backend


def sdpa(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    backend: str,
    attn_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Scaled dot-product attention on `[B, H, L, D]` tensors, pinned to one backend.

    `attn_mask` (optional) is an additive float mask broadcastable to `[B, H, Lq, Lk]` in q's
    dtype. Compile-friendly: the kernel choice is a Python-level constant per call site.
    """
    kernel = _KERNELS[kernel_for(backend, has_mask=attn_mask is not None)]
    with sdpa_kernel([kernel]):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
