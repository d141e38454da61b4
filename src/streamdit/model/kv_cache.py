"""Self-attention KV cache (rolling window + sinks) and cross-attention (text) cache.

Owns: fixed-size K/V storage for every layer of one generator rank, the per-frame-slot
bookkeeping of which absolute latent frame each slot holds, and the cache lifecycle of docs/model.md
(write, overwrite, evict, hard reset, recompute). Under tensor parallelism a rank's cache holds
only its LOCAL heads; nothing here knows the global head count.
Imports torch and `streamdit.errors` only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from streamdit.errors import ConfigError, PlanError

LayerKV = tuple[torch.Tensor, torch.Tensor]  # one layer's (K, V)


@dataclass(frozen=True, slots=True)
class ChunkSlots:
    """Where one generator call's chunk lives in storage (token indices, Python ints).

    Keys for attention are the storage prefix `[:write_end]`; `[:write_start]` are cached keys
    from earlier chunks (the ones a KV bias applies to), `[write_start:write_end]` the chunk.
    """

    start_frame: int
    num_frames: int
    write_start: int
    write_end: int


class KVCache:
    """Rolling window of `capacity_frames` latent frames per layer, first `sink_frames` pinned.

    Storage: `k`, `v`, one tensor per layer of shape `[batch, capacity_frames*tokens_per_frame,
    heads, head_dim]`, allocated once. Separate per-layer tensors (not one stacked tensor) keep
    a compiled graph's in-place write to one layer from being functionalized into a copy of
    every layer's storage. Frames are kept in chronological order, so the keys a chunk
    attends to are always the prefix `[:write_end]` of storage and every slice bound is a Python
    int. Once the window is full those ints are the same on every chunk, so a compiled graph sees
    static shapes. Storage past the valid prefix is always zero.

    Bookkeeping: `slot_frames[i]` is the absolute frame held by frame slot i (-1 = empty);
    `num_valid_frames`; `current_start_frame` (first frame of the last chunk written, -1 after a
    reset); `write_pos` (token index where that chunk starts). Sinks are the first `sink_frames`
    frames written after a reset (the stream's first frames, or the recompute anchor).

    `begin_chunk(s, n)`, stored frames P (in slot order, last frame e-1):

    | state / request                       | result                                              |
    |---------------------------------------|-----------------------------------------------------|
    | empty (after construction or reset)   | append at slot 0; any s >= 0                        |
    | s == e, room for n frames             | append after P                                      |
    | s == e, window full                   | shift non-sink frames left by the overflow (oldest  |
    |                                       | non-sink frames evicted), append at the end         |
    | [s, s+n) == last n frames of P        | overwrite those slots in place (later denoise step) |
    | s > e (gap), s < e and not a suffix   | PlanError (a bug in the caller's frame indexing)    |
    | overflow larger than evictable frames | PlanError                                           |

    Lifecycle: each generator call does `slots = begin_chunk(...)` once (bookkeeping and the
    eviction shift for all layers), then `update(layer, k, v, slots)` per layer. Hard cut /
    `init_cache`: `reset()`. Recompute: `reset()`, then one generator call over the context frames
    at positions `[start - ctx, start)`; the next chunk at `start` then appends.
    """

    def __init__(
        self,
        *,
        num_layers: int,
        batch: int,
        heads: int,
        head_dim: int,
        tokens_per_frame: int,
        capacity_frames: int,
        sink_frames: int = 0,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        for name, value in (
            ("num_layers", num_layers),
            ("batch", batch),
            ("heads", heads),
            ("head_dim", head_dim),
            ("tokens_per_frame", tokens_per_frame),
            ("capacity_frames", capacity_frames),
        ):
            if value < 1:
                raise ConfigError(f"kv_cache.{name}: must be >= 1, got {value}")
        if not 0 <= sink_frames < capacity_frames:
            raise ConfigError(
                f"kv_cache.sink_frames: must be in [0, capacity_frames={capacity_frames}), got {sink_frames}"
            )
        self.num_layers = num_layers
        self.batch = batch
        self.heads = heads
        self.head_dim = head_dim
        self.tokens_per_frame = tokens_per_frame
        self.capacity_frames = capacity_frames
        self.sink_frames = sink_frames
        shape = (batch, capacity_frames * tokens_per_frame, heads, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.slot_frames: list[int] = [-1] * capacity_frames
        self.num_valid_frames = 0
        self.current_start_frame = -1
        self.write_pos = 0

    # ------------------------------------------------------------------ queries
    def cached_frames(self) -> list[int]:
        """Absolute frame indices held, in storage (= chronological) order."""
        return self.slot_frames[: self.num_valid_frames]

    @property
    def next_frame(self) -> int | None:
        """The frame an append must start at; None when empty (any start is accepted)."""
        return self.slot_frames[self.num_valid_frames - 1] + 1 if self.num_valid_frames else None

    @property
    def valid_tokens(self) -> int:
        return self.num_valid_frames * self.tokens_per_frame

    def layer_kv(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Views of layer `layer`'s valid K and V, `[batch, valid_tokens, heads, head_dim]`."""
        end = self.valid_tokens
        return self.k[layer][:, :end], self.v[layer][:, :end]

    # ------------------------------------------------------------------ lifecycle
    def reset(self) -> None:
        """Hard cut / init_cache: zero the contents, forget every frame, reset positions."""
        # Only the valid prefix can be non-zero (the invariant above), so zero just that.
        end = self.valid_tokens
        for buf in (*self.k, *self.v):
            buf[:, :end].zero_()
        self.slot_frames = [-1] * self.capacity_frames
        self.num_valid_frames = 0
        self.current_start_frame = -1
        self.write_pos = 0

    def begin_chunk(self, start_frame: int, num_frames: int) -> ChunkSlots:
        """Claim the slots of frames `[start_frame, start_frame + num_frames)` for all layers."""
        if start_frame < 0 or num_frames < 1:
            raise PlanError(
                f"bad chunk frames start={start_frame} n={num_frames}", field="current_start_frame"
            )
        held = self.cached_frames()
        frames = list(range(start_frame, start_frame + num_frames))
        if num_frames <= len(held) and held[-num_frames:] == frames:
            first_slot = len(held) - num_frames  # a later call for the same chunk: overwrite
        elif not held or start_frame == held[-1] + 1:
            first_slot = self._make_room(num_frames)
        else:
            raise PlanError(
                f"chunk frames [{start_frame}, {start_frame + num_frames}) are neither the next "
                f"frames nor the last ones written; cache holds {held}",
                field="current_start_frame",
            )
        self.slot_frames[first_slot : first_slot + num_frames] = frames
        self.num_valid_frames = first_slot + num_frames
        self.current_start_frame = start_frame
        self.write_pos = first_slot * self.tokens_per_frame
        return ChunkSlots(start_frame, num_frames, self.write_pos, self.valid_tokens)

    def _make_room(self, num_frames: int) -> int:
        """Evict the oldest non-sink frames if needed; return the first free frame slot."""
        valid = self.num_valid_frames
        overflow = valid + num_frames - self.capacity_frames
        if overflow <= 0:
            return valid
        sinks = min(self.sink_frames, valid)
        if overflow > valid - sinks:
            raise PlanError(
                f"chunk of {num_frames} frames does not fit a window of {self.capacity_frames} "
                f"frames with {sinks} sink frames",
                field="current_start_frame",
            )
        tpf = self.tokens_per_frame
        dst, src, end = sinks * tpf, (sinks + overflow) * tpf, valid * tpf
        # Overlapping ranges: copy through a temporary.
        for buf in (*self.k, *self.v):
            buf[:, dst : end - (src - dst)] = buf[:, src:end].clone()
        kept = self.slot_frames[:sinks] + self.slot_frames[sinks + overflow : valid]
        self.slot_frames = kept + [-1] * (self.capacity_frames - len(kept))
        self.num_valid_frames = len(kept)
        return len(kept)

    def update(
        self, layer: int, k: torch.Tensor, v: torch.Tensor, slots: ChunkSlots
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write layer `layer`'s chunk K/V (`[batch, tokens, heads, head_dim]`, after RoPE).

        Returns views of all keys and values the chunk attends to: storage `[:write_end]`.
        """
        # Compare slot bounds only (not frame indices): they are constant once the window is
        # full, so this check adds no per-chunk guard to a compiled graph.
        if slots.write_start != self.write_pos or slots.write_end != self.valid_tokens:
            raise PlanError(
                f"update with slots [{slots.write_start}, {slots.write_end}) but the cache's "
                f"current chunk is [{self.write_pos}, {self.valid_tokens})",
                field="current_start_frame",
            )
        expected = (self.batch, slots.write_end - slots.write_start, self.heads, self.head_dim)
        if tuple(k.shape) != expected or tuple(v.shape) != expected:
            raise ConfigError(
                f"kv_cache: layer {layer} K/V shapes {tuple(k.shape)}/{tuple(v.shape)} do not "
                f"match [batch, tokens, local heads, head_dim] = {expected}"
            )
        return write_chunk_kv((self.k[layer], self.v[layer]), k, v, slots)

    def layer(self, layer: int) -> LayerKV:
        """Layer `layer`'s whole K and V storage (what `write_chunk_kv` writes into)."""
        return self.k[layer], self.v[layer]


def write_chunk_kv(layer_kv: LayerKV, k: torch.Tensor, v: torch.Tensor, slots: ChunkSlots) -> LayerKV:
    """Write one layer's chunk K/V into its storage at `slots`; return the keys/values attended.

    Pure tensor code on one layer's storage (no bookkeeping, no layer index), so a compiled block
    runs it for every layer with one graph; `KVCache.begin_chunk` chose the slots beforehand.
    """
    # Inference-only storage: detach so a grad-enabled caller cannot chain every chunk's
    # autograd graph through the cache (unbounded memory growth over a stream).
    k_buf, v_buf = layer_kv
    k_buf[:, slots.write_start : slots.write_end] = k.detach()
    v_buf[:, slots.write_start : slots.write_end] = v.detach()
    return k_buf[:, : slots.write_end], v_buf[:, : slots.write_end]


class CrossAttnCache:
    """Per-layer text K/V of the cross-attention, computed on first use after `reset()`.

    The text of a conditioning does not change between generator calls, so its K/V projections
    run once per cache lifetime. The runtime calls `reset()` when `conditioning_updated` or
    `reset_crossattn_cache` is set (and on a hard cut); the generator then rebuilds every layer on
    its next call. Under TP each rank stores its local heads only.

    Storage is kept across resets: a new conditioning of the same shape is copied into the
    tensors the last one occupied, so a layer's text K/V keep their addresses for the cache's
    life (a CUDA graph of a generator call reads them in place: runtime/graphs.py).
    """

    def __init__(self, num_layers: int) -> None:
        if num_layers < 1:
            raise ConfigError(f"cross_cache.num_layers: must be >= 1, got {num_layers}")
        self.num_layers = num_layers
        self._kv: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * num_layers
        self._storage: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * num_layers

    def reset(self) -> None:
        """Forget every layer's text K/V; the next generator call recomputes them."""
        self._kv = [None] * self.num_layers

    @property
    def filled(self) -> bool:
        """True when every layer holds text K/V (the generator may skip the text path)."""
        return all(entry is not None for entry in self._kv)

    def lookup(self, layer: int) -> LayerKV | None:
        """Layer `layer`'s cached (k, v), or None when it must be computed."""
        return self._kv[layer]

    def layers(self) -> list[LayerKV]:
        """Every layer's (k, v); only valid when `filled`."""
        if not self.filled:
            raise ConfigError("cross_cache: read before every layer was filled (reset it and rebuild)")
        return [entry for entry in self._kv if entry is not None]

    def storage(self) -> list[LayerKV] | None:
        """Every layer's storage (where the next conditioning of its layout is written), or
        None while some layer has none yet."""
        held = [entry for entry in self._storage if entry is not None]
        return held if len(held) == self.num_layers else None

    def adopt_storage(self) -> None:
        """Every layer holds what its storage holds: a new conditioning written there in place
        by other means (a replayed CUDA graph of the refill, runtime/graphs.py)."""
        held = self.storage()
        if held is None:
            raise ConfigError("cross_cache: adopt_storage before every layer has storage")
        self._kv = list(held)

    def store(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Keep layer `layer`'s text K/V until the next `reset()` (in its storage, if it fits)."""
        held = self._storage[layer]
        if held is not None and all(_same_layout(a, b) for a, b in zip(held, (k, v), strict=True)):
            held[0].copy_(k)
            held[1].copy_(v)
        else:
            # owned copies: later conditionings are written here, never into the caller's tensors
            held = (k.detach().clone(), v.detach().clone())
            self._storage[layer] = held
        self._kv[layer] = held


def _same_layout(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and a.device == b.device
