"""The startup parity handshake and weight fingerprints across real ranks (gloo).

- Equal items pass; a rank whose items are too large to send still joins, so every rank fails
  at once with a ParityError instead of a peer waiting out the timeout.
- Differing items (`denoising_step_list`, `preset`, a `STREAMDIT_TEST_X` hook on one rank only):
  every rank raises ParityError whose message is the per-key table with both values, listing
  only the differing keys; every rank exits within the bound.
- OM-12: a replicated weight mutated on rank 1 after sharding fails every rank, naming rank 1
  and both fingerprints; shards of a correctly sharded model differ across ranks.
"""

from __future__ import annotations

import logging
import re
import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

from harness import RankContext, init_gloo, run_ranks
from streamdit.config import RunConfig
from streamdit.errors import ParityError
from streamdit.model.dit import CausalWanDiT
from streamdit.model.presets import get_dit_config
from streamdit.parallel.groups import GroupHandle
from streamdit.parallel.parity import LOCAL_ERROR, check_replicated_fingerprints, fingerprints, handshake
from streamdit.parallel.tp import apply_tp

pytestmark = pytest.mark.timeout(60)
CPU = torch.device("cpu")
BOUND_S = 30.0  # from spawn to exit; spawn + torch import dominate on a shared 2-core machine
log = logging.getLogger("test_parallel_parity")


def _handles(ctx: RankContext) -> tuple[GroupHandle, GroupHandle]:
    world_pg = init_gloo(ctx)
    tp_pg = dist.new_group(ranks=list(range(ctx.world_size)), timeout=timedelta(seconds=ctx.pg_timeout_s))
    world = GroupHandle(world_pg, "world", ctx.rank, ctx.world_size, CPU)
    return world, GroupHandle(tp_pg, "tp", dist.get_rank(tp_pg), dist.get_world_size(tp_pg), CPU)


def _sharded_model(tp: GroupHandle) -> CausalWanDiT:
    model = CausalWanDiT(get_dit_config("tiny"), CPU, torch.float32, "math")
    model.init_weights(0)
    apply_tp(model, tp)
    return model


def rank_equal_then_oversize(ctx: RankContext) -> dict:
    world, tp = _handles(ctx)
    items = RunConfig().parity_items()
    handshake(items, world, allowed="world", log=log)  # equal: passes
    model = _sharded_model(tp)
    check_replicated_fingerprints(model, tp, allowed="tp", log=log)  # equal replicated: passes
    big = {**items, "STREAMDIT_TEST_BLOB": "x" * (1 << 17)} if ctx.rank == 1 else items
    t0 = time.monotonic()
    try:
        handshake(big, world, allowed="world", log=log)
    except ParityError as exc:
        return {"message": str(exc), "seconds": time.monotonic() - t0, "fp": fingerprints(model)}
    raise AssertionError("oversized items did not fail the handshake")


def test_equal_items_pass_and_oversized_items_fail_every_rank_at_once() -> None:
    outs = run_ranks(rank_equal_then_oversize, 2, timeout_s=40)
    for o in outs:
        assert o.exitcode == 0 and not o.timed_out, o.summary()
        assert LOCAL_ERROR in o.result["message"] and "131" in o.result["message"]  # the size
        assert o.result["seconds"] < 2.0  # not the 5 s PG timeout
    fp0, fp1 = (o.result["fp"] for o in outs)
    assert fp0["replicated"] == fp1["replicated"] and fp0["sharded"] != fp1["sharded"]


def rank_mismatched_items(ctx: RankContext) -> None:
    world, _ = _handles(ctx)
    cfg = RunConfig()
    if ctx.rank == 1:
        cfg = cfg.replace(denoising_step_list=(1000, 500, 250), preset="wan-1.3b")
    items = cfg.parity_items()
    if ctx.rank == 1:
        items["STREAMDIT_TEST_X"] = "1"
    handshake(items, world, allowed="world", log=log)


def _row(message: str, key: str) -> list[str]:
    line = next(line for line in message.splitlines() if line.startswith(key + " "))
    return [cell.strip() for cell in line.split(" | ")]


def test_mismatched_items_fail_every_rank_with_the_table() -> None:
    outs = run_ranks(rank_mismatched_items, 2, timeout_s=40)
    ref = RunConfig()
    steps = ",".join(map(str, ref.denoising_step_list))
    for o in outs:
        assert not o.timed_out and o.exc_type == "ParityError", o.summary()
        assert o.exitcode != 0 and o.seconds is not None and o.seconds < BOUND_S, o.summary()
        msg = o.message
        assert [c.strip() for c in msg.splitlines()[1].split(" | ")] == ["key", "rank0", "rank1"]
        assert _row(msg, "denoising_step_list") == ["denoising_step_list", steps, "1000,500,250"]
        assert _row(msg, "preset") == ["preset", ref.preset, "wan-1.3b"]
        assert _row(msg, "STREAMDIT_TEST_X") == ["STREAMDIT_TEST_X", "<missing>", "1"]
        assert len(msg.splitlines()) == 5  # summary + header + exactly the 3 differing keys
        assert "height" not in msg  # equal keys are not listed


def rank_mutated_replicated_weight(ctx: RankContext) -> None:
    _, tp = _handles(ctx)
    model = _sharded_model(tp)
    if ctx.rank == 1:
        with torch.no_grad():
            model.blocks[1].norm3.weight[0] += 1e-6  # replicated: must be bit-identical
    check_replicated_fingerprints(model, tp, allowed="tp", log=log)


def test_om12_mutated_replicated_weight_fails_every_rank_with_both_fingerprints() -> None:
    outs = run_ranks(rank_mutated_replicated_weight, 2, timeout_s=40)
    for o in outs:
        assert not o.timed_out and o.exc_type == "ParityError", o.summary()
        assert o.exitcode != 0 and o.seconds is not None and o.seconds < BOUND_S, o.summary()
        assert "differs on ranks [1]" in o.message
        found = dict(re.findall(r"rank(\d): replicated=([0-9a-f]{16})", o.message))
        assert set(found) == {"0", "1"} and found["0"] != found["1"], o.message
    assert outs[0].message == outs[1].message  # every rank tells the same story
