"""parallel/ on gloo: TP-sharded DiT equals the single-process one, and group misuse fails locally.

- TP=2 and TP=4 (the tiny preset has 4 heads): every rank builds the same seeded model, runs a
  stream of generator calls unsharded (the reference), shards it with `apply_tp`, builds its
  caches with the LOCAL head count and runs the same stream: overwrite of a chunk's slot by a
  later step, kv_bias < 1, eviction, a recompute-style reset (KV and cross-attention caches, new
  text) — outputs match within 1e-4 and are bit-identical across ranks.
- OM-08: a collective issued with the wrong group raises GroupError before any backend call (a
  backend call by one rank alone would block until the PG timeout), the groups stay usable, and
  ranks that end on a GroupError exit within the bound. This test goes through `init_groups`
  (TCP rendezvous, like torchrun).
"""

from __future__ import annotations

import logging
import socket
import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode

from harness import RankContext, init_gloo, run_ranks
from streamdit.config import LaunchEnv
from streamdit.errors import GroupError
from streamdit.model.dit import CausalWanDiT
from streamdit.model.fp8 import Fp8Linear, quantize_blocks
from streamdit.model.kv_cache import CrossAttnCache, KVCache
from streamdit.model.presets import get_dit_config
from streamdit.parallel import collectives
from streamdit.parallel.collectives import all_gather_bytes, all_gather_int64, all_reduce_sum
from streamdit.parallel.groups import GroupHandle, destroy_groups, init_groups
from streamdit.parallel.parity import check_replicated_fingerprints, tensor_digest
from streamdit.parallel.tp import apply_tp, local_heads, tp_collectives_per_call

CFG = get_dit_config("tiny")  # 4 heads, ffn 256: divisible by 2 and 4
CPU = torch.device("cpu")
LAT, FRAMES = 4, 3  # 2x2 tokens per latent frame, 3 frames per chunk
BOUND_S = 30.0  # spawn + torch import on a shared 2-core machine dominates
log = logging.getLogger("test_parallel_tp")


def _handles(ctx: RankContext) -> tuple[GroupHandle, GroupHandle]:
    """world + a distinct TP group over all ranks (FileStore rendezvous of the harness)."""
    world_pg = init_gloo(ctx)
    tp_pg = dist.new_group(ranks=list(range(ctx.world_size)), timeout=timedelta(seconds=ctx.pg_timeout_s))
    world = GroupHandle(world_pg, "world", ctx.rank, ctx.world_size, CPU)
    return world, GroupHandle(tp_pg, "tp", dist.get_rank(tp_pg), dist.get_world_size(tp_pg), CPU)


def _caches(heads: int) -> tuple[KVCache, CrossAttnCache]:
    kv = KVCache(
        num_layers=CFG.num_layers,
        batch=1,
        heads=heads,
        head_dim=CFG.head_dim,
        tokens_per_frame=(LAT // 2) ** 2,
        capacity_frames=6,
        sink_frames=1,
        dtype=torch.float32,
        device=CPU,
    )
    return kv, CrossAttnCache(CFG.num_layers)


@torch.no_grad()
def _stream(model: CausalWanDiT, heads: int) -> list[torch.Tensor]:
    """Eight generator calls exercising every cache path; same inputs on every rank (seeded)."""
    gen = torch.Generator().manual_seed(42)
    xs = [torch.randn(1, FRAMES, 16, LAT, LAT, generator=gen) for _ in range(4)]
    texts = [torch.randn(1, CFG.text_len, CFG.text_dim, generator=gen) for _ in range(2)]
    kv, cc = _caches(heads)
    outs: list[torch.Tensor] = []

    def call(x: torch.Tensor, t: float, text: torch.Tensor, start: int, bias: float = 1.0) -> None:
        ts = torch.tensor([t])
        outs.append(model(x, ts, text, kv_cache=kv, cross_cache=cc, start_frame=start, kv_bias=bias))

    call(xs[0], 1000.0, texts[0], 0)  # builds the cross cache (cross norm_k all-reduce)
    call(xs[0], 500.0, texts[0], 0)  # a later step overwrites the chunk's slot
    call(xs[1], 1000.0, texts[0], 3, bias=0.3)  # soft transition: cached keys down-weighted
    call(xs[1], 250.0, texts[0], 3, bias=0.3)
    call(xs[2], 1000.0, texts[0], 6)  # window full: evicts non-sink frames
    kv.reset()  # recompute before chunk 3: rebuild from clean context frames at timestep 0
    cc.reset()  # with a new conditioning: text K/V rebuilt
    call(outs[-1], 0.0, texts[1], 6)
    call(xs[3], 1000.0, texts[1], 9, bias=0.5)
    call(xs[3], 500.0, texts[1], 9, bias=0.5)
    return outs


@torch.no_grad()
def _vary_vectors(model: CausalWanDiT) -> None:
    """init_weights zeroes biases and sets norm weights to 1: vary them, so a wrong slice or a
    row-parallel bias counted on every rank cannot hide."""
    gen = torch.Generator().manual_seed(5)
    for name, param in model.named_parameters():
        if param.dim() == 1:
            param.add_(torch.randn(param.shape, generator=gen) * (0.02 if name.endswith("bias") else 0.1))


def rank_tp_equivalence(ctx: RankContext, fp8: bool = False) -> dict:
    world, tp = _handles(ctx)
    model = CausalWanDiT(CFG, CPU, torch.float32, "math")
    model.init_weights(3)
    _vary_vectors(model)
    exact = _stream(model, CFG.num_heads)
    if fp8:  # quantized before sharding, as build_model does: shards of one quantized model
        quantize_blocks(model.blocks)
    reference = _stream(model, CFG.num_heads) if fp8 else exact
    apply_tp(model, tp)
    model.fuse_projections()  # as build_generator does: each rank fuses its local q/k/v rows
    heads = local_heads(model)
    check_replicated_fingerprints(model, tp, allowed="tp", log=log)
    with _CollectiveCounter() as counter:
        got = _stream(model, heads)
    digests = all_gather_int64([tensor_digest(t) for t in got], world, allowed="world")
    return {
        "heads": heads,
        "q_rows": model.blocks[0].self_attn.q.weight.shape[0],
        "fp8_layers": sum(isinstance(m, Fp8Linear) for m in model.modules()),
        "max_diff": [float((a - b).abs().max()) for a, b in zip(got, reference, strict=True)],
        "fp8_err": max(float((a - b).abs().max()) for a, b in zip(reference, exact, strict=True)),
        "tp_err": max(float((a - b).abs().max()) for a, b in zip(got, exact, strict=True)),
        "same_on_all_ranks": all(d == digests[0] for d in digests),
        "all_reduces": counter.all_reduces,
    }


class _CollectiveCounter(TorchDispatchMode):
    """Counts the all-reduce ops actually dispatched (what the backend is asked to run)."""

    def __init__(self) -> None:
        super().__init__()
        self.all_reduces = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        if "all_reduce" in func.name():
            self.all_reduces += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.timeout(90)
@pytest.mark.parametrize(("size", "fp8"), [(2, False), (4, False), (2, True)])
def test_tp_sharded_dit_matches_single_process(size: int, fp8: bool) -> None:
    """fp8: the FP8 layers (rowwise scales) shard exactly too: CPU runs `_scaled_mm` as well."""
    t0 = time.monotonic()
    outs = run_ranks(rank_tp_equivalence, size, timeout_s=60, args=(fp8,))
    for o in outs:
        assert o.exitcode == 0 and not o.timed_out, o.summary()
        r = o.result
        assert r["heads"] == CFG.num_heads // size and r["q_rows"] == CFG.dim // size
        assert r["fp8_layers"] == (10 * CFG.num_layers if fp8 else 0)
        assert len(r["max_diff"]) == 8
        if fp8:
            # a row-parallel shard quantizes its slice of each activation row with its own
            # scale, so TP is not bit-for-bit single-GPU FP8; it stays within FP8's own error
            assert 1e-4 < r["fp8_err"] and max(r["max_diff"]) < r["fp8_err"], r
            assert r["tp_err"] < 1.5 * r["fp8_err"], r
        else:
            assert max(r["max_diff"]) <= 1e-4, r["max_diff"]
        assert r["same_on_all_ranks"]
        # 8 calls x (3 row-parallel + 2 norm all-reduces) per block, plus the text K/V norm
        # all-reduce per block on the 2 calls that rebuild the cross-attention cache.
        counts = tp_collectives_per_call(CFG)
        expected = 8 * (counts["large"] + counts["tiny"]) + 2 * counts["tiny_on_text_rebuild"]
        assert r["all_reduces"] == expected == 42 * CFG.num_layers, r["all_reduces"]
    assert time.monotonic() - t0 < 60


def _count_backend_calls() -> dict[str, int]:
    """Wrap the backend entry points collectives.py reaches (this process only)."""
    calls = {"n": 0}

    def counting(fn):  # noqa: ANN001, ANN202
        def wrapper(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
            calls["n"] += 1
            return fn(*args, **kwargs)

        return wrapper

    collectives.funcol.all_reduce = counting(collectives.funcol.all_reduce)
    collectives.dist.all_gather = counting(collectives.dist.all_gather)
    return calls


def rank_wrong_group(ctx: RankContext, port: int) -> None:
    launch = LaunchEnv(rank=ctx.rank, world_size=ctx.world_size, master_port=port, launched=True)
    groups = init_groups(launch, device=CPU, timeout_s=ctx.pg_timeout_s)
    try:
        assert (groups.world.name, groups.tp.name, groups.backend) == ("world", "tp", "gloo")
        assert groups.tp.pg is not groups.world.pg and groups.tp.size == groups.world_size == ctx.world_size
        calls = _count_backend_calls()
        if ctx.rank == 1:  # alone: had the backend been called, this rank would block for 5 s
            t0 = time.monotonic()
            for misuse in (
                lambda: all_reduce_sum(torch.ones(2), groups.world, allowed="tp"),
                lambda: all_gather_int64([1], groups.tp, allowed="world"),
                lambda: all_gather_bytes(b"x", groups.world, allowed="mesh"),
            ):
                with pytest.raises(GroupError, match="may only use"):
                    misuse()
            assert calls["n"] == 0 and time.monotonic() - t0 < 1.0
        # The groups are still in step: a correct collective on each works on both ranks.
        total = all_reduce_sum(torch.full((2,), float(ctx.rank + 1)), groups.tp, allowed="tp")
        assert total.tolist() == [3.0, 3.0]
        assert all_gather_int64([ctx.rank], groups.world, allowed="world") == [[0], [1]]
        assert calls["n"] == 2
        all_reduce_sum(torch.ones(1), groups.world, allowed="tp")  # now both ranks end on it
    finally:
        destroy_groups(groups)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.timeout(60)
def test_collective_on_the_wrong_group_raises_before_the_backend() -> None:
    outs = run_ranks(rank_wrong_group, 2, timeout_s=40, args=(_free_port(),))
    for o in outs:
        assert not o.timed_out and o.exc_type == "GroupError", o.summary()
        assert "group 'world'" in o.message and "'tp'" in o.message and "group=world" in o.message
        assert o.exitcode == 1 and o.seconds is not None and o.seconds < BOUND_S, o.summary()
