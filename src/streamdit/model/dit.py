"""The causal Wan2.1-style video DiT (the generator) for chunk-by-chunk generation.

Owns: the network of docs/model.md ("Generator block"), with module names identical to Wan2.1 /
Self-Forcing so their safetensors load with an identity key map, its seeded initialization, and
one generator call: write the chunk's K/V into the KV cache, attend over [cache window || chunk]
(block-causal), cross-attend to the text through the cross-attention cache.

Tensor-parallel readiness (sharding is applied from outside, gpt-fast style): local head counts
are read from weight shapes at forward time (`q.weight.shape[0] // head_dim`), and the full-dim
RMSNorm (model/norms.py) reduces its sum of squares through a replaceable `reduce_sum_of_squares`
attribute, so a TP pass only slices weights, sets that attribute and hooks row-parallel Linear
outputs. Numerics follow Wan: the residual stream, norms and modulation are float32; Linear
layers run in the parameter dtype. A block's residual + norm + modulation steps go through its
`add_norm` attribute (`norms.add_norm`, or one Triton kernel each after `use_fused_norms`).
Model code never picks a device; devices come from the constructor/inputs.
Imports torch and streamdit.errors / streamdit.model only.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from streamdit.errors import ConfigError
from streamdit.model.attention import KeyBias, check_resolved, sdpa
from streamdit.model.fp8 import FP8, ROW_TENSORS, Fp8Linear, RowQuantized, fp8_linear
from streamdit.model.kv_cache import ChunkSlots, CrossAttnCache, KVCache, LayerKV, write_chunk_kv
from streamdit.model.norms import AddNorm, WanLayerNorm, WanRMSNorm, add_norm, norm_pair
from streamdit.model.presets import DiTConfig
from streamdit.model.rope import apply_rope, rope_angles

Tensor = torch.Tensor
Rope = tuple[Tensor, Tensor]


class ChunkCall(NamedTuple):
    """One generator call's tensor inputs (`forward_chunk`'s arguments, in order)."""

    x: Tensor
    timestep: Tensor
    rope: Rope
    key_bias: KeyBias | None
    layer_kvs: list[LayerKV]
    text_kvs: list[LayerKV]
    slots: ChunkSlots


_Factory = dict[str, Any]  # {"device": ..., "dtype": ...} for every parameter


def input_dtype(layer: nn.Module) -> torch.dtype:
    """The dtype a linear layer takes: its parameter dtype, or what an FP8 layer declares."""
    return getattr(layer, "input_dtype", None) or layer.weight.dtype


def norm_output(layer: nn.Module) -> torch.dtype:
    """What a norm step hands `layer`: FP8 (quantized per row) for an FP8 layer, else its
    input dtype."""
    return FP8 if isinstance(layer, Fp8Linear) else input_dtype(layer)


def _cast(x: Tensor | RowQuantized, layer: nn.Module) -> Tensor | RowQuantized:
    """`x` in `layer`'s input dtype (the residual stream is float32); quantized rows as they are."""
    return x if isinstance(x, RowQuantized) else x.to(input_dtype(layer))


def _linear(layer: nn.Module, x: Tensor | RowQuantized) -> Tensor:
    return layer(_cast(x, layer))


def sinusoidal_embedding(dim: int, timestep: Tensor) -> Tensor:
    """Wan's `[cos | sin]` timestep embedding `[B, dim]` float32 (float64 inside, like Wan)."""
    half = dim // 2
    exponent = torch.arange(half, dtype=torch.float64, device=timestep.device) / half
    args = torch.outer(timestep.to(torch.float64), 10000.0**-exponent)
    return torch.cat([args.cos(), args.sin()], dim=1).to(torch.float32)


def kv_key_bias(
    slots: ChunkSlots, kv_bias: float, *, device: torch.device, spare_tokens: int = 0
) -> KeyBias | None:
    """The KV bias of one call: cached keys' attention weight multiplied by `kv_bias`.

    Cached keys (`[spare_tokens:write_start]`, earlier chunks) are biased; the first
    `spare_tokens` cached keys (a recompute anchor the recipe spares) and the chunk's own keys
    are not. None when it would be a no-op (kv_bias == 1 or no biased key).
    """
    if kv_bias == 1.0 or slots.write_start <= spare_tokens:
        return None
    log_weight = torch.full((), math.log(kv_bias), dtype=torch.float32, device=device)
    return KeyBias(spare_tokens, slots.write_start, log_weight)


class _Attention(nn.Module):
    """q/k/v/o projections with full-dim RMSNorm on q and k (Wan naming)."""

    def __init__(self, cfg: DiTConfig, layer_idx: int, attn_backend: str, fk: _Factory) -> None:
        super().__init__()
        self.head_dim = cfg.head_dim
        self.layer_idx = layer_idx
        self.attn_backend = attn_backend
        self.q = nn.Linear(cfg.dim, cfg.dim, **fk)
        self.k = nn.Linear(cfg.dim, cfg.dim, **fk)
        self.v = nn.Linear(cfg.dim, cfg.dim, **fk)
        self.o = nn.Linear(cfg.dim, cfg.dim, **fk)
        self.norm_q = WanRMSNorm(cfg.dim, cfg.eps, **fk)
        self.norm_k = WanRMSNorm(cfg.dim, cfg.eps, **fk)

    def local_heads(self) -> int:
        """Heads held by this rank, from the (possibly sharded) q weight."""
        return self.q.weight.shape[0] // self.head_dim

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, key_bias: KeyBias | None) -> Tensor:
        """`[B, L, h, d]` q against `[B, Lk, h, d]` k/v, then the O projection."""
        b, length, heads, _ = q.shape
        out = sdpa(
            q.transpose(1, 2),
            k.to(q.dtype).transpose(1, 2),
            v.to(q.dtype).transpose(1, 2),
            backend=self.attn_backend,
            key_bias=key_bias,
        )
        return self.o(out.transpose(1, 2).reshape(b, length, heads * self.head_dim))


class WanSelfAttention(_Attention):
    def __init__(self, cfg: DiTConfig, layer_idx: int, attn_backend: str, fk: _Factory) -> None:
        super().__init__(cfg, layer_idx, attn_backend, fk)
        self.fused = False

    def forward(
        self, x: Tensor, rope: Rope, layer_kv: LayerKV, slots: ChunkSlots, key_bias: KeyBias | None
    ) -> Tensor:
        b, length, _ = x.shape
        shape = (b, length, self.local_heads(), self.head_dim)
        q, k, v = self._project(_cast(x, self.q))
        q, k = norm_pair(self.norm_q, q, self.norm_k, k)
        q, k = apply_rope(q.view(shape), *rope), apply_rope(k.view(shape), *rope)
        k_all, v_all = write_chunk_kv(layer_kv, k, v.reshape(shape), slots)
        return self._attend(q, k_all, v_all, key_bias)

    def _project(self, x: Tensor | RowQuantized) -> tuple[Tensor, Tensor, Tensor]:
        if not self.fused:
            return self.q(x), self.k(x), self.v(x)
        if self.qkv_weight_scale is None:
            y = F.linear(x, self.qkv_weight, self.qkv_bias)
        else:
            y = fp8_linear(x, self.qkv_weight, self.qkv_weight_scale, self.qkv_bias, input_dtype(self.q))
        q, k, v = y.chunk(3, dim=-1)
        return q, k, v

    @torch.no_grad()
    def fuse_qkv(self) -> None:
        """q, k and v as ONE matmul of 3x the width (an H200 runs a [2160, 5120] x [5120, 15360]
        product ~1.3x faster than three 5120-wide ones; an FP8 layer quantizes x once, not 3x).

        Call after loading, quantizing and sharding (a TP shard fuses its local rows). The
        stacked tensors are non-persistent buffers and q/k/v's parameters become views of
        them: no memory is doubled, and state dicts, fingerprints and `local_heads` read the
        same parameters as before.
        """
        layers = (self.q, self.k, self.v)
        for name in ROW_TENSORS:
            parts = [getattr(layer, name, None) for layer in layers]
            if parts[0] is None:
                self.register_buffer(f"qkv_{name}", None, persistent=False)
                continue
            stacked = torch.cat([p.detach() for p in parts])
            self.register_buffer(f"qkv_{name}", stacked, persistent=False)
            rows = parts[0].shape[0]
            for i, layer in enumerate(layers):
                view = stacked[i * rows : (i + 1) * rows]
                setattr(layer, name, nn.Parameter(view, requires_grad=False))
        self.fused = True


class WanCrossAttention(_Attention):
    def forward(self, x: Tensor, text_kv: LayerKV) -> Tensor:
        b, length, _ = x.shape
        q = self.norm_q(_linear(self.q, x)).view(b, length, self.local_heads(), self.head_dim)
        return self._attend(q, text_kv[0], text_kv[1], None)

    def text_kv(self, text: Tensor) -> LayerKV:
        """This layer's K/V of the (embedded) text; cached for the conditioning's lifetime."""
        shape = (text.shape[0], text.shape[1], self.local_heads(), self.head_dim)
        k = self.norm_k(_linear(self.k, text)).view(shape)
        return k, _linear(self.v, text).view(shape)


class WanAttentionBlock(nn.Module):
    def __init__(self, cfg: DiTConfig, layer_idx: int, attn_backend: str, fk: _Factory) -> None:
        super().__init__()
        self.norm1 = WanLayerNorm(cfg.dim, cfg.eps, elementwise_affine=False, **fk)
        self.self_attn = WanSelfAttention(cfg, layer_idx, attn_backend, fk)
        self.norm3 = WanLayerNorm(cfg.dim, cfg.eps, elementwise_affine=True, **fk)
        self.cross_attn = WanCrossAttention(cfg, layer_idx, attn_backend, fk)
        self.norm2 = WanLayerNorm(cfg.dim, cfg.eps, elementwise_affine=False, **fk)
        self.ffn = nn.Sequential(
            nn.Linear(cfg.dim, cfg.ffn_dim, **fk),
            nn.GELU(approximate="tanh"),
            nn.Linear(cfg.ffn_dim, cfg.dim, **fk),
        )
        self.modulation = nn.Parameter(torch.zeros(1, 6, cfg.dim, **fk))
        # the residual + norm + modulation steps; `CausalWanDiT.use_fused_norms` swaps in one
        # kernel per step (model/norm_kernels.py) with the same arguments and math
        self.add_norm: AddNorm = add_norm

    def forward(
        self,
        x: Tensor,
        e0: Tensor,
        rope: Rope,
        *,
        layer_kv: LayerKV,
        text_kv: LayerKV,
        slots: ChunkSlots,
        key_bias: KeyBias | None,
    ) -> Tensor:
        """One block: the unit `compile_blocks` compiles (every block runs the same graph).

        Only tensors and the slot bounds (Python ints, constant once the window is full) come
        in; the block's own cache storage is passed as tensors, not looked up by layer index,
        so nothing layer-specific is baked into the graph.
        """
        # Wan's order: shift, scale, gate for self-attn, then for the FFN; each [B, 1, dim].
        mod = (self.modulation.float() + e0).unsqueeze(2).unbind(1)
        add_norm = self.add_norm
        _, h = add_norm(x, None, None, self.norm1, mod[0], mod[1], norm_output(self.self_attn.q))
        y = self.self_attn(h, rope, layer_kv, slots, key_bias)
        x, h = add_norm(x, y, mod[2], self.norm3, None, None, norm_output(self.cross_attn.q))
        y = self.cross_attn(h, text_kv)
        x, h = add_norm(x, y, None, self.norm2, mod[3], mod[4], norm_output(self.ffn[0]))
        y = _linear_seq(self.ffn, h)
        return x + y.float() * mod[5]


def _linear_seq(seq: nn.Sequential, x: Tensor | RowQuantized) -> Tensor:
    return seq(_cast(x, seq[0]))


class WanHead(nn.Module):
    def __init__(self, cfg: DiTConfig, fk: _Factory) -> None:
        super().__init__()
        self.norm = WanLayerNorm(cfg.dim, cfg.eps, elementwise_affine=False, **fk)
        out = cfg.out_channels * math.prod(cfg.patch_size)
        self.head = nn.Linear(cfg.dim, out, **fk)
        self.modulation = nn.Parameter(torch.zeros(1, 2, cfg.dim, **fk))

    def forward(self, x: Tensor, e: Tensor) -> Tensor:
        shift, scale = (self.modulation.float() + e.unsqueeze(1)).unsqueeze(2).unbind(1)
        return _linear(self.head, self.norm(x) * (1 + scale) + shift)


class CausalWanDiT(nn.Module):
    """Causal Wan2.1-style DiT; one `forward` = one generator call on one latent chunk."""

    def __init__(
        self,
        cfg: DiTConfig,
        device: torch.device | str,
        dtype: torch.dtype = torch.float32,
        attn_backend: str = "math",
    ) -> None:
        super().__init__()
        check_resolved(attn_backend)  # rejects unresolved names such as "auto"
        fk = {"device": torch.device(device), "dtype": dtype}
        d = cfg.dim
        self.cfg = cfg
        self.attn_backend = attn_backend
        self.patch_embedding = nn.Conv3d(
            cfg.in_channels, d, kernel_size=cfg.patch_size, stride=cfg.patch_size, **fk
        )
        self.text_embedding = nn.Sequential(
            nn.Linear(cfg.text_dim, d, **fk), nn.GELU(approximate="tanh"), nn.Linear(d, d, **fk)
        )
        self.time_embedding = nn.Sequential(
            nn.Linear(cfg.freq_dim, d, **fk), nn.SiLU(), nn.Linear(d, d, **fk)
        )
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(d, 6 * d, **fk))
        self.blocks = nn.ModuleList(
            WanAttentionBlock(cfg, i, attn_backend, fk) for i in range(cfg.num_layers)
        )
        self.head = WanHead(cfg, fk)

    @torch.no_grad()
    def init_weights(self, seed: int) -> None:
        """Deterministic init on the parameters' device: same seed -> bit-identical weights.

        Linear/conv weights ~ N(0, 0.02), biases 0, norm weights 1, modulation tables
        ~ N(0, 1/dim) (Wan's scale). Nothing is zero-initialized that would make outputs trivial.
        """
        gen = torch.Generator(device=self.patch_embedding.weight.device).manual_seed(seed)
        for name, param in self.named_parameters():  # registration order: deterministic
            if name.endswith("modulation"):
                param.normal_(0.0, self.cfg.dim**-0.5, generator=gen)
            elif param.dim() >= 2:
                param.normal_(0.0, 0.02, generator=gen)
            elif name.endswith("bias"):
                param.zero_()
            else:
                param.fill_(1.0)

    def forward(
        self,
        x: Tensor,
        timestep: Tensor,
        context: Tensor,
        *,
        kv_cache: KVCache,
        cross_cache: CrossAttnCache,
        start_frame: int,
        kv_bias: float = 1.0,
        kv_bias_spare_frames: int = 0,
    ) -> Tensor:
        """Flow prediction for latent chunk `x` `[B, F, C, H, W]` at frames `start_frame + i`.

        `timestep` `[B]` in [0, 1000]; `context` raw text embeddings `[B, L, text_dim]` (read
        only when the cross cache is empty). Writes the chunk's K/V into `kv_cache` (overwriting
        the slot if this chunk is already there), then attends over every cached key.
        `kv_bias` in (0, 1] multiplies the attention weight of keys from earlier chunks, except
        the first `kv_bias_spare_frames` cached frames.
        """
        call = self.prepare(
            x,
            timestep,
            context,
            kv_cache=kv_cache,
            cross_cache=cross_cache,
            start_frame=start_frame,
            kv_bias=kv_bias,
            kv_bias_spare_frames=kv_bias_spare_frames,
        )
        return self.forward_chunk(*call)

    def prepare(
        self,
        x: Tensor,
        timestep: Tensor,
        context: Tensor,
        *,
        kv_cache: KVCache,
        cross_cache: CrossAttnCache,
        start_frame: int,
        kv_bias: float = 1.0,
        kv_bias_spare_frames: int = 0,
        fill_text: Callable[[Tensor, CrossAttnCache], None] | None = None,
    ) -> ChunkCall:
        """`forward`'s bookkeeping (checks, slots, RoPE, bias, text K/V): `forward_chunk`'s inputs.

        `fill_text` computes a new conditioning's text K/V into `cross_cache` when it is empty
        (default `fill_cross_cache`; the runtime passes a CUDA-graphed one)."""
        grid = self._check_inputs(x, timestep, context, kv_cache, cross_cache, kv_bias)
        slots = kv_cache.begin_chunk(start_frame, grid[0])
        positions = torch.arange(grid[0], device=x.device) + start_frame
        rope = rope_angles(self.cfg.head_dim, positions, grid[1], grid[2])
        spare = kv_bias_spare_frames * kv_cache.tokens_per_frame
        key_bias = kv_key_bias(slots, kv_bias, device=x.device, spare_tokens=spare)
        if not cross_cache.filled:
            (fill_text or self.fill_cross_cache)(context, cross_cache)
        layer_kvs = [kv_cache.layer(i) for i in range(len(self.blocks))]
        return ChunkCall(x, timestep, rope, key_bias, layer_kvs, cross_cache.layers(), slots)

    def fill_cross_cache(self, context: Tensor, cross_cache: CrossAttnCache) -> None:
        """Text K/V of every layer, once per conditioning (new prompt or a cache reset)."""
        text = _linear_seq(self.text_embedding, context)
        kvs = [block.cross_attn.text_kv(text) for block in self.blocks]
        for i, (k, v) in enumerate(kvs):  # stored only once all layers succeeded
            cross_cache.store(i, k, v)

    def forward_chunk(
        self,
        x: Tensor,
        timestep: Tensor,
        rope: Rope,
        key_bias: KeyBias | None,
        layer_kvs: list[LayerKV],
        text_kvs: list[LayerKV],
        slots: ChunkSlots,
    ) -> Tensor:
        """The tensor math of one call, after `forward` did the cache bookkeeping.

        Everything that depends on the absolute frame index (slot choice, eviction shift, RoPE
        angles, KV bias) and the text path were done by `forward`; the only Python ints
        seen here are the slot bounds, the same on every call once the window is full.
        """
        dtype = self.patch_embedding.weight.dtype
        tokens = self.patch_embedding(x.transpose(1, 2).to(dtype)).flatten(2).transpose(1, 2)
        e = _linear_seq(self.time_embedding, sinusoidal_embedding(self.cfg.freq_dim, timestep))
        e = e.float()
        e0 = self.time_projection(e.to(dtype)).float().unflatten(1, (6, self.cfg.dim))
        h = tokens.float()
        for block, layer_kv, text_kv in zip(self.blocks, layer_kvs, text_kvs, strict=True):
            h = block(h, e0, rope, layer_kv=layer_kv, text_kv=text_kv, slots=slots, key_bias=key_bias)
        _, ph, pw = self.cfg.patch_size
        grid = (x.shape[1], x.shape[3] // ph, x.shape[4] // pw)
        return self._unpatchify(self.head(h, e), grid).to(x.dtype)

    def use_fused_norms(self) -> None:
        """Every block's residual + norm + modulation steps as one Triton kernel each
        (model/norm_kernels.py; CUDA with Triton only). Call before compile."""
        from streamdit.model.norm_kernels import fused_add_norm  # imports triton

        for block in self.blocks:
            block.add_norm = fused_add_norm

    def fuse_projections(self) -> None:
        """Every block's q/k/v as one matmul (WanSelfAttention.fuse_qkv): after TP, before compile."""
        for block in self.blocks:
            block.self_attn.fuse_qkv()

    def compile_blocks(self, **options: Any) -> None:
        """Regional compile: every block compiled with the same graph (compiled once, reused).

        Blocks differ only in their parameters and cache tensors, which dynamo treats as inputs,
        so a 40-layer model compiles one block graph instead of unrolling 40 (minutes less).
        Static shapes: the slot bounds are specialized (a handful of graphs while the window
        fills, then one). `options` go to `torch.compile` (backend, mode).
        """
        for block in self.blocks:
            block.compile(**{"fullgraph": True, "dynamic": False, **options})

    def _check_inputs(
        self,
        x: Tensor,
        timestep: Tensor,
        context: Tensor,
        kv_cache: KVCache,
        cross_cache: CrossAttnCache,
        kv_bias: float,
    ) -> tuple[int, int, int]:
        """Validate before touching any cache; return the token grid (frames, rows, cols)."""
        cfg = self.cfg
        _, ph, pw = cfg.patch_size
        if x.dim() != 5 or x.shape[2] != cfg.in_channels or x.shape[3] % ph or x.shape[4] % pw:
            raise ConfigError(
                f"latents: need [B, F, {cfg.in_channels}, H, W] with H % {ph} == W % {pw} == 0, "
                f"got {tuple(x.shape)}"
            )
        b, frames, _, height, width = x.shape
        if tuple(timestep.shape) != (b,):
            raise ConfigError(f"timestep: need shape [{b}], got {tuple(timestep.shape)}")
        if context.dim() != 3 or context.shape[0] != b or context.shape[2] != cfg.text_dim:
            raise ConfigError(f"conditioning: need [{b}, L, {cfg.text_dim}], got {tuple(context.shape)}")
        if not 0.0 < kv_bias <= 1.0:
            raise ConfigError(f"kv_cache_attention_bias: must be in (0, 1], got {kv_bias}")
        grid = (frames, height // ph, width // pw)
        if kv_cache.tokens_per_frame != grid[1] * grid[2] or kv_cache.num_layers != len(self.blocks):
            raise ConfigError(
                f"kv_cache: built for {kv_cache.num_layers} layers x {kv_cache.tokens_per_frame} "
                f"tokens/frame, model has {len(self.blocks)} x {grid[1] * grid[2]}"
            )
        heads = self.blocks[0].self_attn.local_heads()
        if (kv_cache.heads, kv_cache.head_dim) != (heads, cfg.head_dim):
            raise ConfigError(
                f"kv_cache: built for {kv_cache.heads} heads x {kv_cache.head_dim}; the model's local heads "
                f"x head_dim are {heads} x {cfg.head_dim}"
            )
        if cross_cache.num_layers != len(self.blocks):
            raise ConfigError(f"cross_cache: {cross_cache.num_layers} layers != {len(self.blocks)}")
        return grid

    def _unpatchify(self, out: Tensor, grid: tuple[int, int, int]) -> Tensor:
        """`[B, L, pt*ph*pw*C]` (Wan's (p, q, r, c) order) -> `[B, F, C, H, W]`."""
        pt, ph, pw = self.cfg.patch_size
        f, h, w = grid
        c = self.cfg.out_channels
        out = out.view(out.shape[0], f, h, w, pt, ph, pw, c)
        out = out.permute(0, 1, 4, 7, 2, 5, 3, 6)  # b, f, pt, c, h, ph, w, pw
        return out.reshape(out.shape[0], f * pt, c, h * ph, w * pw)
