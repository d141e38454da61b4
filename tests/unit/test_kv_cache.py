"""KVCache / CrossAttnCache lifecycle: append, evict (sinks kept, order kept), overwrite, reset,
recompute rebuild, and the frame-index errors that catch caller bugs. Pure cache, no model."""

from __future__ import annotations

import pytest
import torch

from streamdit.errors import ConfigError, PlanError
from streamdit.model.kv_cache import ChunkSlots, CrossAttnCache, KVCache

LAYERS, HEADS, HEAD_DIM, TPF = 2, 2, 4, 3


def _cache(capacity: int = 6, sinks: int = 1) -> KVCache:
    return KVCache(
        num_layers=LAYERS,
        batch=1,
        heads=HEADS,
        head_dim=HEAD_DIM,
        tokens_per_frame=TPF,
        capacity_frames=capacity,
        sink_frames=sinks,
        dtype=torch.float32,
        device=torch.device("cpu"),
    )


def _frame_kv(start: int, n: int, layer: int, tag: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """K whose every element encodes (frame, layer, tag); V its negation."""
    frames = torch.arange(start, start + n, dtype=torch.float32) + 100 * layer + tag
    k = frames.repeat_interleave(TPF)[None, :, None, None].expand(1, n * TPF, HEADS, HEAD_DIM)
    return k.clone(), -k.clone()


def _write(cache: KVCache, start: int, n: int = 3, tag: float = 0.0) -> ChunkSlots:
    slots = cache.begin_chunk(start, n)
    for layer in range(LAYERS):
        cache.update(layer, *_frame_kv(start, n, layer, tag), slots)
    return slots


def _stored_frame_tags(cache: KVCache, layer: int) -> list[float]:
    """The (frame + tag) value each valid frame slot holds for `layer`, read from storage."""
    k, v = cache.layer_kv(layer)
    assert torch.equal(k, -v)
    per_frame = k[0, :, 0, 0].view(-1, TPF)
    assert torch.equal(per_frame, per_frame[:, :1].expand_as(per_frame)), "slot not uniform"
    return [x - 100 * layer for x in per_frame[:, 0].tolist()]


def test_append_fills_slots_in_order() -> None:
    cache = _cache()
    s0 = _write(cache, 0)
    s1 = _write(cache, 3)
    assert (s0.write_start, s0.write_end) == (0, 3 * TPF)
    assert (s1.write_start, s1.write_end) == (3 * TPF, 6 * TPF)
    assert cache.cached_frames() == [0, 1, 2, 3, 4, 5]
    assert cache.current_start_frame == 3 and cache.next_frame == 6
    for layer in range(LAYERS):
        assert _stored_frame_tags(cache, layer) == [0, 1, 2, 3, 4, 5]


@pytest.mark.parametrize(
    ("sinks", "expected"),
    [(1, [0, 7, 8, 9, 10, 11]), (0, [6, 7, 8, 9, 10, 11]), (2, [0, 1, 8, 9, 10, 11])],
)
def test_eviction_keeps_sinks_and_chronological_order(sinks: int, expected: list[int]) -> None:
    cache = _cache(capacity=6, sinks=sinks)
    for chunk in range(4):
        _write(cache, 3 * chunk)
    assert cache.cached_frames() == expected
    assert cache.slot_frames == expected  # window full, no empty slot
    for layer in range(LAYERS):
        # Contents moved with the bookkeeping: slot i holds the K/V of frame expected[i].
        assert _stored_frame_tags(cache, layer) == expected


def test_slot_bounds_are_constant_once_window_is_full() -> None:
    """Static shapes for compiled graphs: appends and overwrites in steady state share ints."""
    cache = _cache(capacity=6, sinks=1)
    _write(cache, 0)
    _write(cache, 3)
    seen = set()
    for chunk in range(2, 6):
        for _step in range(3):  # first call appends (evicts), later calls overwrite
            slots = _write(cache, 3 * chunk)
            seen.add((slots.write_start, slots.write_end))
    assert seen == {(3 * TPF, 6 * TPF)}


def test_rewrite_of_same_chunk_overwrites_in_place() -> None:
    cache = _cache()
    _write(cache, 0)
    first = _write(cache, 3, tag=0.25)
    frames_before = list(cache.slot_frames)
    second = _write(cache, 3, tag=0.5)
    assert first == second
    assert cache.slot_frames == frames_before and cache.num_valid_frames == 6
    for layer in range(LAYERS):
        # Earlier chunk untouched; the chunk's slots hold the LAST call's K/V.
        assert _stored_frame_tags(cache, layer) == [0, 1, 2, 3.5, 4.5, 5.5]


def test_update_returns_prefix_views_of_storage() -> None:
    cache = _cache()
    _write(cache, 0)
    slots = cache.begin_chunk(3, 3)
    k, v = _frame_kv(3, 3, 0)
    k_all, v_all = cache.update(0, k, v, slots)
    assert k_all.shape == (1, 6 * TPF, HEADS, HEAD_DIM)
    assert k_all.data_ptr() == cache.k[0].data_ptr()  # a view, not a copy
    assert torch.equal(k_all[:, 3 * TPF :], k) and torch.equal(v_all[:, 3 * TPF :], v)


def test_reset_clears_contents_validity_and_positions() -> None:
    cache = _cache()
    for chunk in range(3):
        _write(cache, 3 * chunk)
    cache.reset()
    assert cache.cached_frames() == [] and cache.slot_frames == [-1] * 6
    assert cache.num_valid_frames == 0 and cache.valid_tokens == 0
    assert cache.current_start_frame == -1 and cache.write_pos == 0
    assert cache.next_frame is None
    assert not any(t.any() for t in (*cache.k, *cache.v))
    # Positions reset: any start frame is accepted again, including an earlier one.
    assert _write(cache, 0).write_start == 0


def test_recompute_rebuild_equals_fresh_build() -> None:
    """reset() + one context write at [start-3, start) == the same write into a new cache."""
    used = _cache()
    for chunk in range(5):  # a history with evictions and overwrites
        _write(used, 3 * chunk)
        _write(used, 3 * chunk, tag=0.5)
    used.reset()
    fresh = _cache()
    for cache in (used, fresh):
        _write(cache, 12, tag=0.75)  # context frames 12..14 for the chunk at 15
        _write(cache, 15)  # then the chunk itself appends
    for attr in ("slot_frames", "num_valid_frames", "current_start_frame", "write_pos"):
        assert getattr(used, attr) == getattr(fresh, attr), attr
    assert torch.equal(torch.stack(used.k), torch.stack(fresh.k))
    assert torch.equal(torch.stack(used.v), torch.stack(fresh.v))


@pytest.mark.parametrize(
    ("start", "n", "why"),
    [
        (7, 3, "gap after frame 5"),
        (0, 3, "older chunk, not the last one written"),
        (4, 3, "partial overlap with the last chunk"),
        (2, 3, "straddles two chunks"),
        (-3, 3, "negative frame"),
        (6, 0, "empty chunk"),
    ],
)
def test_bad_frame_indices_raise_and_leave_state_alone(start: int, n: int, why: str) -> None:
    cache = _cache()
    _write(cache, 0)
    _write(cache, 3)
    before = (list(cache.slot_frames), cache.num_valid_frames, cache.current_start_frame)
    k_before = torch.stack(cache.k)
    with pytest.raises(PlanError, match="current_start_frame"):
        cache.begin_chunk(start, n)
    assert (list(cache.slot_frames), cache.num_valid_frames, cache.current_start_frame) == before
    assert torch.equal(torch.stack(cache.k), k_before), why


def test_chunk_larger_than_evictable_window_raises() -> None:
    cache = _cache(capacity=6, sinks=1)
    _write(cache, 0)
    with pytest.raises(PlanError):
        cache.begin_chunk(3, 6)  # would need to evict the sink


def test_update_rejects_wrong_local_heads_and_stale_slots() -> None:
    cache = _cache()
    slots = cache.begin_chunk(0, 3)
    wrong = torch.zeros(1, 3 * TPF, HEADS * 2, HEAD_DIM)
    with pytest.raises(ConfigError, match="local heads"):
        cache.update(0, wrong, wrong, slots)
    _write(cache, 0)
    cache.begin_chunk(3, 3)
    with pytest.raises(PlanError):
        cache.update(0, *_frame_kv(0, 3, 0), slots)  # slots of the previous chunk


def test_update_detaches_so_the_cache_never_joins_an_autograd_graph() -> None:
    cache = _cache()
    slots = cache.begin_chunk(0, 3)
    k = torch.ones(1, 3 * TPF, HEADS, HEAD_DIM, requires_grad=True)
    cache.update(0, k * 2, k * 3, slots)
    assert not any(t.requires_grad for t in (*cache.k, *cache.v))


@pytest.mark.parametrize(
    "kwargs",
    [{"capacity_frames": 2, "sink_frames": 2}, {"capacity_frames": 0}, {"heads": 0}],
)
def test_constructor_validates(kwargs: dict) -> None:
    base = dict(
        num_layers=1,
        batch=1,
        heads=1,
        head_dim=4,
        tokens_per_frame=1,
        capacity_frames=4,
        sink_frames=0,
        dtype=torch.float32,
        device=torch.device("cpu"),
    )
    with pytest.raises(ConfigError):
        KVCache(**{**base, **kwargs})


def test_cross_cache_lifecycle() -> None:
    cc = CrossAttnCache(2)
    assert not cc.filled and cc.lookup(0) is None
    k, v = torch.ones(1, 4, 2, 4), torch.zeros(1, 4, 2, 4)
    cc.store(0, k, v)
    assert not cc.filled  # layer 1 still missing
    cc.store(1, k, v)
    held = cc.lookup(1)
    assert cc.filled and torch.equal(held[0], k) and torch.equal(held[1], v)
    cc.reset()
    assert not cc.filled and cc.lookup(0) is None and cc.lookup(1) is None
    # a new conditioning of the same layout lands in the same storage (CUDA graphs read it there)
    cc.store(1, k * 2, v + 3)
    again = cc.lookup(1)
    assert [t.data_ptr() for t in again] == [t.data_ptr() for t in held]
    assert torch.equal(again[0], k * 2) and torch.equal(again[1], v + 3)
    cc.store(0, torch.ones(1, 5, 2, 4), v)  # another layout: new storage, not a resize
    assert cc.lookup(0)[0].shape == (1, 5, 2, 4)
