"""CausalWanDiT on the `tiny` preset: Wan module names, seeded init, numerics, KV bias, chunked
causality, cross-attention caching, TP readiness (local heads from weight shapes; an emulated
TP=2 forward equals the single-device one) and compile-friendliness (static graphs)."""

from __future__ import annotations

import copy
import math
import threading

import pytest
import torch
from torch import nn

from streamdit.errors import ConfigError
from streamdit.model.attention import KeyBias, biased_attention, resolve_attention_backend, sdpa
from streamdit.model.dit import CausalWanDiT, WanRMSNorm, kv_key_bias
from streamdit.model.kv_cache import ChunkSlots, CrossAttnCache, KVCache
from streamdit.model.presets import get_dit_config
from streamdit.model.rope import apply_rope, rope_angles, rope_bands

CFG = get_dit_config("tiny")
CPU = torch.device("cpu")
LAT = 4  # latent height/width -> 2x2 = 4 tokens per frame
TPF = (LAT // 2) ** 2
FRAMES = 3


def _model(seed: int = 0, dtype: torch.dtype = torch.float32) -> CausalWanDiT:
    model = CausalWanDiT(CFG, CPU, dtype, "math")
    model.init_weights(seed)
    return model


def _caches(
    heads: int = CFG.num_heads, capacity: int = 6, dtype: torch.dtype = torch.float32
) -> tuple[KVCache, CrossAttnCache]:
    kv = KVCache(
        num_layers=CFG.num_layers,
        batch=1,
        heads=heads,
        head_dim=CFG.head_dim,
        tokens_per_frame=TPF,
        capacity_frames=capacity,
        sink_frames=1,
        dtype=dtype,
        device=CPU,
    )
    return kv, CrossAttnCache(CFG.num_layers)


def _inputs(seed: int, chunks: int = 3) -> tuple[list[torch.Tensor], torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    xs = [torch.randn(1, FRAMES, 16, LAT, LAT, generator=gen) for _ in range(chunks)]
    return xs, torch.randn(1, CFG.text_len, CFG.text_dim, generator=gen)


@torch.no_grad()
def _stream(
    model: CausalWanDiT,
    xs: list[torch.Tensor],
    ctx: torch.Tensor,
    caches: tuple[KVCache, CrossAttnCache] | None = None,
    *,
    kv_bias: float = 1.0,
) -> list[torch.Tensor]:
    """Generate chunk after chunk (one call each) and return every chunk's output."""
    kv, cc = caches if caches is not None else _caches(dtype=model.patch_embedding.weight.dtype)
    t = torch.tensor([500.0])
    return [
        model(x, t, ctx, kv_cache=kv, cross_cache=cc, start_frame=FRAMES * i, kv_bias=kv_bias)
        for i, x in enumerate(xs)
    ]


def test_module_names_and_shapes_match_wan() -> None:
    d, sd = CFG.dim, _model().state_dict()
    expected = {
        "patch_embedding.weight": (d, 16, 1, 2, 2),
        "text_embedding.0.weight": (d, CFG.text_dim),
        "text_embedding.2.weight": (d, d),
        "time_embedding.0.weight": (d, CFG.freq_dim),
        "time_projection.1.weight": (6 * d, d),
        "blocks.1.self_attn.o.weight": (d, d),
        "blocks.0.self_attn.norm_q.weight": (d,),
        "blocks.0.cross_attn.norm_k.weight": (d,),
        "blocks.0.norm3.weight": (d,),
        "blocks.0.norm3.bias": (d,),
        "blocks.0.ffn.0.weight": (CFG.ffn_dim, d),
        "blocks.0.ffn.2.weight": (d, CFG.ffn_dim),
        "blocks.0.modulation": (1, 6, d),
        "head.head.weight": (16 * 4, d),
        "head.modulation": (1, 2, d),
    }
    for key, shape in expected.items():
        assert tuple(sd[key].shape) == shape, key
    # norm1 / norm2 / head.norm have no affine parameters in Wan.
    assert not [k for k in sd if ".norm1." in k or ".norm2." in k or k.startswith("head.norm")]


def test_same_seed_bit_identical_and_different_seed_differs() -> None:
    a, b, c = _model(7), _model(7), _model(8)
    for key, value in a.state_dict().items():
        assert torch.equal(value, b.state_dict()[key]), key
    assert not torch.equal(a.blocks[0].self_attn.q.weight, c.blocks[0].self_attn.q.weight)
    xs, ctx = _inputs(0, chunks=2)
    out_a, out_b, out_c = _stream(a, xs, ctx), _stream(b, xs, ctx), _stream(c, xs, ctx)
    assert all(torch.equal(x, y) for x, y in zip(out_a, out_b, strict=True))
    assert not torch.allclose(out_a[1], out_c[1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_forward_finite_and_nontrivial(dtype: torch.dtype) -> None:
    xs, ctx = _inputs(1)
    xs = [x.to(dtype) for x in xs]
    outs = _stream(_model(0, dtype), xs, ctx.to(dtype))
    for x, out in zip(xs, outs, strict=True):
        assert out.shape == x.shape and out.dtype == dtype
        assert torch.isfinite(out.float()).all()
        assert out.float().std() > 1e-2  # not a zero-initialized head


def test_kv_bias_one_is_the_unmasked_path_and_below_one_changes_output() -> None:
    model, (xs, ctx) = _model(), _inputs(2, chunks=2)
    plain = _stream(model, xs, ctx, kv_bias=1.0)
    # A bias infinitesimally below 1 takes the masked path; it must agree with the unmasked one.
    nearly = _stream(model, xs, ctx, kv_bias=1.0 - 1e-6)
    torch.testing.assert_close(nearly[1], plain[1], rtol=1e-4, atol=1e-5)
    biased = _stream(model, xs, ctx, kv_bias=0.3)
    assert torch.equal(biased[0], plain[0])  # first chunk: no cached keys, nothing to bias
    assert not torch.allclose(biased[1], plain[1], atol=1e-4)


def _biased_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lo: int, hi: int, bias: float
) -> torch.Tensor:
    """Attention with keys [lo, hi) weighted by `bias`, written out: softmax, scale, renormalize."""
    probs = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)
    probs[..., lo:hi] *= bias
    return (probs / probs.sum(-1, keepdim=True)) @ v


def _qkv(seed: int, lq: int = 5, lk: int = 10, d: int = 8) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(1, 2, n, d, generator=gen) for n in (lq, lk, lk))


def test_kv_bias_scales_cached_key_probabilities() -> None:
    q, k, v = _qkv(3)
    slots = ChunkSlots(start_frame=2, num_frames=1, write_start=4, write_end=10)
    key_bias = kv_key_bias(slots, 0.25, device=CPU)
    assert key_bias is not None and (key_bias.start, key_bias.end) == (0, 4)
    expected = _biased_reference(q, k, v, 0, 4, 0.25)  # cached keys weighted, then renormalized
    torch.testing.assert_close(sdpa(q, k, v, backend="math", key_bias=key_bias), expected)
    assert kv_key_bias(slots, 1.0, device=CPU) is None


def test_kv_bias_can_spare_the_first_cached_keys() -> None:
    """Scope's rule: the recompute anchor (the first cached frame) keeps its weight."""
    q, k, v = _qkv(4)
    slots = ChunkSlots(start_frame=2, num_frames=1, write_start=4, write_end=10)
    key_bias = kv_key_bias(slots, 0.25, device=CPU, spare_tokens=2)
    expected = _biased_reference(q, k, v, 2, 4, 0.25)  # keys 0..1 spared, the chunk's own untouched
    torch.testing.assert_close(sdpa(q, k, v, backend="math", key_bias=key_bias), expected)
    assert kv_key_bias(slots, 0.25, device=CPU, spare_tokens=4) is None


@pytest.mark.parametrize(("lo", "hi"), [(0, 40), (8, 40), (1, 70), (30, 31)])
def test_biased_attention_by_log_sum_exp_equals_the_masked_call(lo: int, hi: int) -> None:
    """The fused path: one kernel call per key span, mixed by log-sum-exp, equals the one masked
    math call (PyTorch's flash kernel for CPU stands in for the CUDA kernels here)."""
    q, k, v = _qkv(5, lq=24, lk=70, d=16)
    key_bias = KeyBias(lo, hi, torch.tensor(math.log(0.3)))
    expected = _biased_reference(q, k, v, lo, hi, 0.3)
    torch.testing.assert_close(biased_attention(q, k, v, key_bias, kernel="flash"), expected)
    torch.testing.assert_close(sdpa(q, k, v, backend="math", key_bias=key_bias), expected)
    # a real bias: the unbiased result is far from it (the check above can fail)
    assert not torch.allclose(sdpa(q, k, v, backend="math"), expected, atol=1e-3)


def test_biased_attention_with_every_key_biased_is_plain_attention() -> None:
    q, k, v = _qkv(7, lq=24, lk=70, d=16)  # one span: a constant weight on all keys cancels
    key_bias = KeyBias(0, 70, torch.tensor(math.log(0.3)))
    torch.testing.assert_close(
        biased_attention(q, k, v, key_bias, kernel="flash"), sdpa(q, k, v, backend="math")
    )


def test_biased_attention_in_bfloat16_stays_within_rounding() -> None:
    q, k, v = (t.to(torch.bfloat16) for t in _qkv(6, lq=32, lk=96, d=64))
    key_bias = KeyBias(16, 64, torch.tensor(math.log(0.2)))
    expected = _biased_reference(q.float(), k.float(), v.float(), 16, 64, 0.2)
    got = biased_attention(q, k, v, key_bias, kernel="flash")
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), expected, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("bad", [0.0, -0.5, 1.5])
def test_kv_bias_out_of_range_is_rejected_before_the_cache_changes(bad: float) -> None:
    model, (xs, ctx) = _model(), _inputs(0, chunks=1)
    kv, cc = _caches()
    with pytest.raises(ConfigError, match="kv_cache_attention_bias"):
        model(xs[0], torch.tensor([1.0]), ctx, kv_cache=kv, cross_cache=cc, start_frame=0, kv_bias=bad)
    assert kv.cached_frames() == []


def test_chunked_causality() -> None:
    """Chunk k sees earlier chunks and all of itself, never storage where later chunks go."""
    model, (xs, ctx) = _model(), _inputs(4)
    base = _stream(model, xs, ctx, _caches(capacity=9))
    # Garbage in the slots chunk 2 will occupy must not change chunk 1's output: keys are the
    # storage prefix [:write_end], never the whole buffer.
    kv, cc = _caches(capacity=9)
    t = torch.tensor([500.0])
    with torch.no_grad():
        model(xs[0], t, ctx, kv_cache=kv, cross_cache=cc, start_frame=0)
        for buf in (*kv.k, *kv.v):
            buf[:, 6 * TPF :].normal_()
        out1 = model(xs[1], t, ctx, kv_cache=kv, cross_cache=cc, start_frame=FRAMES)
    assert torch.equal(out1, base[1])
    # Outputs of chunks 0..k are the same whatever comes after them.
    shorter = _stream(model, xs[:2], ctx, _caches(capacity=9))
    assert all(torch.equal(a, b) for a, b in zip(shorter, base[:2], strict=True))
    # Chunk 1 depends on chunk 0 (through the cache) ...
    changed = _stream(model, [xs[0] + 1.0, xs[1]], ctx, _caches(capacity=9))
    assert not torch.allclose(changed[1], base[1], atol=1e-4)
    # ... and its first frame sees its own last frame (full attention inside a chunk).
    x1 = xs[1].clone()
    x1[:, -1] += 1.0
    within = _stream(model, [xs[0], x1], ctx, _caches(capacity=9))
    assert not torch.allclose(within[1][:, 0], base[1][:, 0], atol=1e-5)


def test_rewriting_a_chunk_matches_a_single_call_on_the_final_input() -> None:
    """Denoise steps overwrite the chunk's slot: after two calls on chunk 1 the cache (and so
    chunk 2) is exactly as if only the second call had happened."""
    model, (xs, ctx) = _model(), _inputs(5)
    once = _stream(model, xs, ctx)
    kv, cc = _caches()
    t = torch.tensor([500.0])
    with torch.no_grad():
        model(xs[0], t, ctx, kv_cache=kv, cross_cache=cc, start_frame=0)
        model(xs[1] * 3.0, t, ctx, kv_cache=kv, cross_cache=cc, start_frame=FRAMES)  # noisy step
        model(xs[1], t, ctx, kv_cache=kv, cross_cache=cc, start_frame=FRAMES)  # final step
        out2 = model(xs[2], t, ctx, kv_cache=kv, cross_cache=cc, start_frame=2 * FRAMES)
    assert torch.equal(out2, once[2])


def test_cross_attention_kv_computed_once_per_cache_lifetime() -> None:
    model, (xs, ctx) = _model(), _inputs(6)
    calls = {"k": 0, "text": 0}
    for block in model.blocks:
        block.cross_attn.k.register_forward_hook(lambda *_: calls.__setitem__("k", calls["k"] + 1))
    model.text_embedding.register_forward_hook(lambda *_: calls.__setitem__("text", calls["text"] + 1))
    kv, cc = _caches()
    first = _stream(model, xs, ctx, (kv, cc))
    assert calls == {"k": CFG.num_layers, "text": 1}
    # New text without a reset is ignored (the runtime must reset on conditioning_updated).
    kv2, _ = _caches()
    stale = _stream(model, xs[:1], ctx + 5.0, (kv2, cc))
    assert torch.equal(stale[0], first[0]) and calls["k"] == CFG.num_layers
    cc.reset()
    kv3, _ = _caches()
    fresh = _stream(model, xs[:1], ctx + 5.0, (kv3, cc))
    assert calls == {"k": 2 * CFG.num_layers, "text": 2}
    assert not torch.allclose(fresh[0], first[0], atol=1e-5)


def _keep_heads(model: CausalWanDiT, rows: slice, keep_bias: bool) -> None:
    """Shard `model` in place to the heads in `rows`, as an external TP pass would."""

    def cut(lin: nn.Linear, *, dim: int) -> None:
        lin.weight = nn.Parameter(lin.weight[rows] if dim == 0 else lin.weight[:, rows])
        if dim == 0:
            lin.bias = nn.Parameter(lin.bias[rows])
        elif not keep_bias:  # a row-parallel bias is added once, on one rank only
            lin.bias = nn.Parameter(torch.zeros_like(lin.bias))

    for block in model.blocks:
        for attn in (block.self_attn, block.cross_attn):
            for lin in (attn.q, attn.k, attn.v):
                cut(lin, dim=0)
            cut(attn.o, dim=1)
            for norm in (attn.norm_q, attn.norm_k):
                norm.weight = nn.Parameter(norm.weight[rows])


def test_local_head_count_comes_from_weight_shapes() -> None:
    model, (xs, ctx) = _model(), _inputs(7, chunks=2)
    half = copy.deepcopy(model)
    _keep_heads(half, slice(0, CFG.dim // 2), keep_bias=True)
    outs = _stream(half, xs, ctx, _caches(heads=CFG.num_heads // 2))
    assert outs[1].shape == xs[1].shape and torch.isfinite(outs[1]).all()
    with pytest.raises(ConfigError, match="local heads"):
        _stream(half, xs, ctx, _caches(heads=CFG.num_heads))


class _ThreadAllReduce:
    """Sum-all-reduce between threads (rank order, so every rank gets the same bits)."""

    def __init__(self, world: int) -> None:
        self.barrier = threading.Barrier(world, timeout=60)
        self.parts: list[torch.Tensor | None] = [None] * world

    def __call__(self, rank: int, t: torch.Tensor) -> torch.Tensor:
        self.parts[rank] = t
        self.barrier.wait()
        total = sum(self.parts[1:], self.parts[0])
        self.barrier.wait()
        return total


def test_emulated_tensor_parallel_forward_matches_single_device() -> None:
    """Slice weights + set the RMSNorm reduction + all-reduce row-parallel outputs (the plan of
    docs/model.md) from outside: TP=2 output equals the unsharded model's."""
    model, (xs, ctx) = _model(), _inputs(8, chunks=2)
    expected = _stream(model, xs, ctx)
    reduce, world = _ThreadAllReduce(2), 2
    results: list[list[torch.Tensor] | BaseException | None] = [None, None]
    width, ffn_width = CFG.dim // world, CFG.ffn_dim // world

    def rank_main(rank: int) -> None:
        try:
            results[rank] = run_rank(rank)
        except BaseException as exc:  # surfaced below with the rank's own traceback
            results[rank] = exc
            reduce.barrier.abort()  # do not leave the peer waiting

    def run_rank(rank: int) -> list[torch.Tensor]:
        shard = copy.deepcopy(model)
        _keep_heads(shard, slice(rank * width, (rank + 1) * width), keep_bias=rank == 0)
        ar = lambda t: reduce(rank, t)  # noqa: E731
        for block in shard.blocks:
            up, down = block.ffn[0], block.ffn[2]
            cols = slice(rank * ffn_width, (rank + 1) * ffn_width)
            up.weight, up.bias = nn.Parameter(up.weight[cols]), nn.Parameter(up.bias[cols])
            down.weight = nn.Parameter(down.weight[:, cols])
            if rank:
                down.bias = nn.Parameter(torch.zeros_like(down.bias))
            for attn in (block.self_attn, block.cross_attn):
                attn.norm_q.reduce_sum_of_squares = ar
                attn.norm_k.reduce_sum_of_squares = ar
            for row_parallel in (block.self_attn.o, block.cross_attn.o, down):
                row_parallel.register_forward_hook(lambda _m, _i, out: ar(out))
        return _stream(shard, xs, ctx, _caches(heads=CFG.num_heads // world))

    threads = [threading.Thread(target=rank_main, args=(r,)) for r in range(world)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=120)
    for rank in range(world):
        outcome = results[rank]
        if isinstance(outcome, BaseException):
            raise AssertionError(f"rank {rank} raised") from outcome
        assert outcome is not None, f"rank {rank} did not finish"
        for got, want in zip(outcome, expected, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_rms_norm_over_full_dim_from_shards() -> None:
    gen = torch.Generator().manual_seed(9)
    x = torch.randn(3, 8, generator=gen)
    full = WanRMSNorm(8, 1e-6, device=CPU, dtype=torch.float32)
    full.weight.data.normal_(generator=gen)
    halves = []
    for rank in range(2):
        part = WanRMSNorm(8, 1e-6, device=CPU, dtype=torch.float32)
        part.weight = nn.Parameter(full.weight[rank * 4 : (rank + 1) * 4])
        other = x[:, (1 - rank) * 4 : (2 - rank) * 4]
        part.reduce_sum_of_squares = lambda ss, o=other: ss + o.pow(2).sum(-1, keepdim=True)
        halves.append(part(x[:, rank * 4 : (rank + 1) * 4]))
    torch.testing.assert_close(torch.cat(halves, dim=-1), full(x))


def test_rope_bands_positions_and_norm() -> None:
    assert rope_bands(128) == (44, 42, 42) and rope_bands(32) == (12, 10, 10) and rope_bands(16) == (8, 4, 4)
    x = torch.randn(1, 2 * 2 * 2, 1, 32)
    cos, sin = rope_angles(32, torch.tensor([5, 6]), 2, 2)
    out = apply_rope(x, cos, sin)
    torch.testing.assert_close(out.norm(dim=-1), x.norm(dim=-1))  # a rotation
    # Relative property: <rope(q, p), rope(k, p')> depends only on p - p' (time band).
    q, k = torch.randn(1, 1, 1, 32), torch.randn(1, 1, 1, 32)

    def at(v: torch.Tensor, frame: int) -> torch.Tensor:
        c, s = rope_angles(32, torch.tensor([frame]), 1, 1)
        return apply_rope(v, c, s)

    near = (at(q, 10) * at(k, 7)).sum()
    far = (at(q, 100_003) * at(k, 100_000)).sum()  # long stream: no table to overflow
    torch.testing.assert_close(near, far, rtol=1e-4, atol=1e-4)
    assert apply_rope(x.bfloat16(), cos, sin).dtype == torch.bfloat16


def test_cached_keys_carry_rope_of_absolute_frame_positions() -> None:
    """The K written for a chunk at frame s is norm_k(k(x)) rotated by frames s, s+1, ..."""
    model, (xs, ctx) = _model(), _inputs(11, chunks=2)
    captured: list[torch.Tensor] = []
    model.blocks[0].self_attn.k.register_forward_hook(lambda _m, _i, out: captured.append(out))
    kv, cc = _caches()
    start = 1000
    with torch.no_grad():
        for i, x in enumerate(xs):
            model(
                x,
                torch.tensor([500.0]),
                ctx,
                kv_cache=kv,
                cross_cache=cc,
                start_frame=start + 3 * i,
            )
        raw = model.blocks[0].self_attn.norm_k(captured[-1])
    raw = raw.view(1, FRAMES * TPF, CFG.num_heads, CFG.head_dim)
    cos, sin = rope_angles(CFG.head_dim, torch.arange(start + 3, start + 6), 2, 2)
    stored_k, _ = kv.layer_kv(0)
    torch.testing.assert_close(stored_k[:, FRAMES * TPF :], apply_rope(raw, cos, sin))


def test_stream_output_is_invariant_to_a_shift_of_all_frame_indices() -> None:
    """RoPE is relative: the same stream started at frame 0 or at frame 4000 agrees."""
    model, (xs, ctx) = _model(), _inputs(12, chunks=3)
    outs = {}
    for start in (0, 4000):
        kv, cc = _caches()
        with torch.no_grad():
            outs[start] = [
                model(
                    x,
                    torch.tensor([500.0]),
                    ctx,
                    kv_cache=kv,
                    cross_cache=cc,
                    start_frame=start + FRAMES * i,
                )
                for i, x in enumerate(xs)
            ]
    for a, b in zip(outs[0], outs[4000], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_attention_backend_resolution() -> None:
    cuda = torch.device("cuda", 0)  # only inspected, never allocated on
    assert resolve_attention_backend("auto", CPU, torch.bfloat16) == "math"
    assert resolve_attention_backend("auto", cuda, torch.bfloat16, cudnn_ok=True) == "cudnn"
    assert resolve_attention_backend("auto", cuda, torch.bfloat16, cudnn_ok=False) == "flash"
    assert resolve_attention_backend("auto", cuda, torch.float32, cudnn_ok=True) == "math"
    assert resolve_attention_backend("efficient", cuda, torch.float32) == "efficient"
    for name, device, dtype in (
        ("bogus", CPU, torch.float32),
        ("flash", CPU, torch.bfloat16),
        ("flash", cuda, torch.float32),
    ):
        with pytest.raises(ConfigError, match="attention_backend"):
            resolve_attention_backend(name, device, dtype)
    with pytest.raises(ConfigError):
        CausalWanDiT(CFG, torch.device("meta"), torch.float32, "auto")  # must be resolved


def test_sdpa_is_pinned() -> None:
    q = torch.randn(1, 2, 5, 8)
    torch.testing.assert_close(sdpa(q, q, q, backend="flash"), sdpa(q, q, q, backend="math"))
    # Pinned means no silent fallback: a kernel this device lacks is an error, not math.
    with pytest.raises(RuntimeError):
        sdpa(q, q, q, backend="efficient")
    with pytest.raises(ConfigError, match="not a resolved backend"):
        sdpa(q, q, q, backend="auto")


def test_compiled_blocks_share_one_graph_and_see_static_shapes() -> None:
    """compile_blocks (fullgraph, static): no graph breaks, bit-equal to eager, every layer runs
    the SAME graph (one compile per distinct slot bounds, not per layer), and no new graph once
    the window is full (slot bounds are constant Python ints)."""
    model, (xs, ctx) = _model(), _inputs(10, chunks=5)
    assert len(model.blocks) >= 2
    eager = _stream(model, xs, ctx, kv_bias=0.5)
    graphs: list[int] = []

    def count(gm: torch.fx.GraphModule, _inputs: list) -> object:
        graphs.append(1)
        return gm.forward

    torch._dynamo.reset()
    model.compile_blocks(backend=count)
    kv, cc = _caches()
    outs, per_call = [], []
    for i, x in enumerate(xs):
        with torch.no_grad():
            out = model(
                x,
                torch.tensor([500.0]),
                ctx,
                kv_cache=kv,
                cross_cache=cc,
                start_frame=FRAMES * i,
                kv_bias=0.5,
            )
        outs.append(out)
        per_call.append(len(graphs))
    assert per_call[0] == 1, "the second block did not reuse the first block's graph"
    assert per_call[-1] == per_call[2], f"recompiled after the window filled: {per_call}"
    assert all(torch.equal(a, b) for a, b in zip(outs, eager, strict=True))
