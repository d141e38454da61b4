"""Generator (DiT) shape presets, parameter counts and the FLOP model of one generator call.

Owns: `DiTConfig` (frozen, validated), the `tiny` / `wan-1.3b` / `wan-14b` presets, and the
shape-only arithmetic (`dit_param_count`, `dit_flops_per_call`) that benchmarks use to report
achieved TFLOP/s. Nothing here allocates tensors.
Must not import torch-dependent streamdit modules or parallel/, protocol/, runtime/: it imports
`streamdit.errors` only, so config code can read presets cheaply.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

from streamdit.errors import ConfigError


@dataclass(frozen=True, kw_only=True, slots=True)
class DiTConfig:
    """Shapes of the causal Wan2.1-style DiT (see docs/model.md, "Shapes")."""

    name: str
    """Preset name, reported in logs and parity checks."""
    dim: int
    """Model width (hidden size of every token)."""
    num_layers: int
    """Number of transformer blocks."""
    num_heads: int
    """GLOBAL attention head count; under TP a rank holds a slice (read from weight shapes)."""
    ffn_dim: int
    """Hidden width of the feed-forward network."""
    text_dim: int
    """Width of the raw text embeddings fed to `text_embedding`."""
    text_len: int
    """Number of text tokens the conditioning carries (padded length)."""
    freq_dim: int = 256
    """Width of the sinusoidal timestep embedding."""
    in_channels: int = 16
    """Latent channels in."""
    out_channels: int = 16
    """Latent channels out (the flow prediction)."""
    patch_size: tuple[int, int, int] = (1, 2, 2)
    """(time, height, width) patch; time must be 1 so cache frames == latent frames."""
    eps: float = 1e-6
    """Epsilon of every LayerNorm / RMSNorm."""

    def __post_init__(self) -> None:
        if not self.name:
            raise ConfigError("dit.name: must be a non-empty string")
        for field in ("dim", "num_layers", "num_heads", "ffn_dim", "text_dim", "text_len"):
            _check_positive(field, getattr(self, field))
        for field in ("freq_dim", "in_channels", "out_channels"):
            _check_positive(field, getattr(self, field))
        if self.freq_dim % 2:
            raise ConfigError(f"dit.freq_dim: must be even (cos and sin halves), got {self.freq_dim}")
        if self.dim % self.num_heads:
            raise ConfigError(f"dit.num_heads: {self.num_heads} does not divide dit.dim={self.dim}")
        # RoPE gives each of the height/width bands 2*(head_dim//6) channels, so head_dim must be
        # even and at least 6 for every band to be non-empty.
        if self.head_dim % 2 or self.head_dim < 6:
            raise ConfigError(f"dit.num_heads: head_dim={self.head_dim} must be even and >= 6")
        if len(self.patch_size) != 3 or any(int(p) < 1 for p in self.patch_size):
            raise ConfigError(f"dit.patch_size: need 3 positive ints, got {self.patch_size}")
        # The KV cache and RoPE index latent frames one-to-one with token frames.
        if self.patch_size[0] != 1:
            raise ConfigError(f"dit.patch_size: time patch must be 1, got {self.patch_size[0]}")
        if not self.eps > 0:
            raise ConfigError(f"dit.eps: must be > 0, got {self.eps}")

    @property
    def head_dim(self) -> int:
        """Per-head width; identical on every TP rank (TP splits heads, never head_dim)."""
        return self.dim // self.num_heads


def _check_positive(field: str, value: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"dit.{field}: must be a positive int, got {value!r}")


DIT_PRESETS: Mapping[str, DiTConfig] = MappingProxyType(
    {
        "tiny": DiTConfig(
            name="tiny", dim=64, num_layers=2, num_heads=4, ffn_dim=256, text_dim=64, text_len=16
        ),
        "wan-1.3b": DiTConfig(
            name="wan-1.3b",
            dim=1536,
            num_layers=30,
            num_heads=12,
            ffn_dim=8960,
            text_dim=4096,
            text_len=512,
        ),
        "wan-14b": DiTConfig(
            name="wan-14b",
            dim=5120,
            num_layers=40,
            num_heads=40,
            ffn_dim=13824,
            text_dim=4096,
            text_len=512,
        ),
    }
)


def get_dit_config(name: str) -> DiTConfig:
    """Return the preset called `name`; unknown names raise ConfigError naming `preset`."""
    try:
        return DIT_PRESETS[name]
    except KeyError:
        valid = ", ".join(DIT_PRESETS)
        raise ConfigError(f"preset: unknown DiT preset {name!r}; valid: {valid}") from None


def dit_param_count(cfg: DiTConfig) -> int:
    """Exact parameter count of `CausalWanDiT(cfg)` from shapes alone (no allocation)."""
    d, f = cfg.dim, cfg.ffn_dim
    patch = math.prod(cfg.patch_size)
    attn = 4 * (d * d + d) + 2 * d  # q, k, v, o with bias + full-dim RMSNorm weights of q, k
    block = 2 * attn + 2 * d + (d * f + f) + (f * d + d) + 6 * d  # self, cross, norm3, ffn, mod
    embed = cfg.in_channels * patch * d + d
    text = (cfg.text_dim * d + d) + (d * d + d)
    time = (cfg.freq_dim * d + d) + (d * d + d) + (d * 6 * d + 6 * d)
    head = d * cfg.out_channels * patch + cfg.out_channels * patch + 2 * d
    return cfg.num_layers * block + embed + text + time + head


def dit_flops_per_call(
    cfg: DiTConfig, tokens: int, cached_tokens: int, text_len: int, *, cross_kv: bool = False
) -> int:
    """Matmul + attention FLOPs of one generator forward, for batch 1 (multiply by the batch).

    Let T = `tokens` (query tokens of the call: frames x tokens_per_frame), K = `cached_tokens`
    (cached keys that are NOT part of this call's chunk, so self-attention sees K + T keys),
    S = `text_len`, d = dim, f = ffn_dim, p = prod(patch_size), N = num_layers. Each linear
    costs 2*M*N*K; attention costs 4*Lq*Lk*d per layer (2 for QK^T, 2 for PV, summed over heads):

        patch embed   2*T*(C_in*p)*d
        time MLP      2*(freq_dim*d + d*d + d*6d)             (one row, independent of T)
        per block     2*T*d*d*4   self-attn q, k, v, o
                    + 2*T*d*d*2   cross-attn q, o
                    + 2*T*d*f*2   FFN up and down
                    + 4*T*(K+T)*d self-attention over cache + chunk
                    + 4*T*S*d     cross-attention over the text
        head          2*T*d*(C_out*p)

    The text-side cross-attention K/V projections and the text MLP run only when the
    cross-attention cache is (re)built; `cross_kv=True` adds them:
    N*(2*S*d*d*2) + 2*S*(text_dim*d + d*d). Elementwise work (norms, RoPE, modulation,
    softmax) is not counted. For T=1 and K=S=0 the count is about 2 * (token-applied weights).
    """
    for name, value in (
        ("tokens", tokens),
        ("cached_tokens", cached_tokens),
        ("text_len", text_len),
    ):
        if value < 0:
            raise ConfigError(f"{name}: must be >= 0, got {value}")
    d, f, t = cfg.dim, cfg.ffn_dim, tokens
    patch = math.prod(cfg.patch_size)
    linear = 2 * t * d * d * 6 + 2 * t * d * f * 2
    attention = 4 * t * (cached_tokens + t) * d + 4 * t * text_len * d
    total = cfg.num_layers * (linear + attention)
    total += 2 * t * cfg.in_channels * patch * d + 2 * t * d * cfg.out_channels * patch
    total += 2 * (cfg.freq_dim * d + d * d + d * 6 * d)
    if cross_kv:
        total += cfg.num_layers * 2 * text_len * d * d * 2
        total += 2 * text_len * (cfg.text_dim * d + d * d)
    return total
