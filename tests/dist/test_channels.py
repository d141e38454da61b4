"""Channels over gloo in real processes: round trips and break-it rows, asserting who / how / when.

Rows: OM-01, OM-02, OM-03 (both halves), OM-10 of docs/test-matrix.md, plus the extra rows "sender
throws after the header" (poison), "unknown version / action / kind and absurd sizes rejected
before allocation", "non-monotonic call_id / chunk_index rejected". Every rank that fails must do so
with a typed error whose text carries the ids; every peer must exit on its own (never be killed by
the harness) within BOUND_S of the fault. Rank functions dump a flight record to
`ctx.flight_path`, which the harness loads, so "the peer never saw a header" is checked from the
peer's own record, not inferred.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.distributed as dist

from factories import control, pp_infer, pp_result, same, tp_infer
from harness import RankContext, RankOutcome, init_gloo, run_ranks
from streamdit.errors import EXIT_POISONED
from streamdit.protocol.channel import BroadcastChannel, ChannelFaults, P2PChannel
from streamdit.protocol.codec import Limits, TensorSpec, encode_meta
from streamdit.protocol.framing import pack_control
from streamdit.protocol.header import Action, Header, HeaderField, Ids, Kind, checksum
from streamdit.protocol.messages import PPEnvelopeV1, PPResultV1, TPEnvelopeV1
from streamdit.runtime.flight import FlightRecorder

BOUND_S = 20.0  # docs/test-matrix.md: every process exits within 20 s of the fault on CPU/gloo
HARD_S = 60.0  # harness wall clock per test: far beyond any correct run
pytestmark = [pytest.mark.timeout(90)]


def _channel(kind: str, group: Any, other: int, rec: FlightRecorder, **kw: Any) -> Any:
    cls = BroadcastChannel if kind == "broadcast" else P2PChannel
    return cls(group, other, role=f"r{group.rank()}", group_name="world", observer=rec, **kw)


def _headers(o: RankOutcome) -> list[dict]:
    assert o.flight is not None, o.summary()
    return [e for e in o.flight["events"] if e["name"] == "header_received"]


def _first(o: RankOutcome, name: str) -> dict:
    assert o.flight is not None, o.summary()
    return next(e for e in o.flight["events"] if e["name"] == name)


# ---- round trips --------------------------------------------------------------------------------


def _script() -> list[Any]:
    """What rank0 broadcasts on the world group: every TP shape, control actions, many in a row."""
    msgs: list[Any] = [
        tp_infer(call_id=0, chunk_index=0, cache_epoch=0),
        control(TPEnvelopeV1, Action.NOOP, 1, cache_epoch=0),
        tp_infer(
            call_id=2,
            chunk_index=1,
            cache_epoch=0,
            recompute=False,
            latents=torch.ones(1, 3, 16, 4, 6),
        ),
    ]
    msgs += [tp_infer(call_id=3 + i, chunk_index=2 + i, recompute=bool(i % 3)) for i in range(40)]
    return [*msgs, control(TPEnvelopeV1, Action.ERROR, 50, reason="leader said no")]


def _pp_round(i: int) -> tuple[PPEnvelopeV1, PPResultV1]:
    mode = ("rank0_anchor", "off", "latent_anchor")[i % 3]
    return pp_infer(call_id=100 + i, chunk_index=10 + i, mode=mode), pp_result(
        call_id=100 + i, chunk_index=10 + i
    )


SEPARATE_META = Limits(inline_meta_bytes=0)  # the p2p legs send every meta as its own transfer


def rank_round_trips(ctx: RankContext) -> dict:
    world = init_gloo(ctx)
    mesh = dist.new_group([1, 2])  # every rank calls new_group; rank0 gets a non-member handle
    rec = FlightRecorder()
    received = 0
    if ctx.rank == 0:
        bc = _channel("broadcast", world, 0, rec)
        for msg in _script():
            bc.send(msg)
        p2p = _channel("p2p", world, 1, rec, limits=SEPARATE_META)
        for i in range(12):
            env, want = _pp_round(i)
            p2p.send(env)
            assert same(p2p.recv(), want), f"result {i} differs"
            received += 1
        bc.send(control(TPEnvelopeV1, Action.SHUTDOWN, 60))
    else:
        bc = _channel("broadcast", world, 0, rec)
        for want in _script():
            assert same(bc.recv(), want), f"broadcast call_id={want.call_id} differs"
            received += 1
        mesh_ch = BroadcastChannel(mesh, 0, role=f"mesh{mesh.rank()}", group_name="mesh", observer=rec)
        if ctx.rank == 1:
            p2p = _channel("p2p", world, 0, rec, limits=SEPARATE_META)
            for i in range(12):
                env, result = _pp_round(i)
                assert same(p2p.recv(), env), f"envelope {i} differs"
                mesh_ch.send(env)  # the leader re-broadcasts on mesh_pg (group rank 0 = global 1)
                p2p.send(result)
        else:
            for i in range(12):
                assert same(mesh_ch.recv(), _pp_round(i)[0]), f"mesh envelope {i} differs"
                received += 1
        assert bc.recv().action is Action.SHUTDOWN
    return {"received": received, "headers": rec.count("header_received")}


@pytest.mark.timeout(120)
def test_round_trips_all_types_both_channels_three_ranks() -> None:
    outs = run_ranks(rank_round_trips, 3, timeout_s=90)
    for o in outs:
        assert o.exitcode == 0 and not o.timed_out, o.summary()
    n = len(_script())
    assert [o.result["received"] for o in outs] == [12, n, n + 12]
    assert outs[0].result["headers"] == 12 and outs[1].result["headers"] == n + 13


# ---- OM-01 / OM-02 / OM-03 / OM-10, sender side --------------------------------------------------

ROWS = {
    "OM-01": ("CodecError", "base_seed", {"base_seed": 2**64}),
    "OM-02": (
        "DtypeError",
        "conditioning_embeds",
        {"conditioning_embeds": torch.zeros(1, 8, 32, dtype=torch.float64)},
    ),
    "OM-03": ("PlanMismatchError", "expected_generator_calls", {"expected_generator_calls": 6}),
    "OM-10": ("PlanMismatchError", "context_frames_override", {"context_frames_override": None}),
}


def rank_preflight_rows(ctx: RankContext, transport: str) -> dict:
    world = init_gloo(ctx)
    rec = FlightRecorder()
    ch = _channel(transport, world, 1 - ctx.rank if transport == "p2p" else 0, rec)
    try:
        if ctx.rank == 1:
            ch.recv()  # must never return: no header may arrive; ends when rank0 is gone
            return {"unexpected": "received a message"}
        seen: dict[str, Any] = {}
        for row, (_, _, over) in ROWS.items():
            try:
                ch.send(tp_infer(call_id=7, chunk_index=3, cache_epoch=2, **over))
            except Exception as exc:
                seen[row] = [type(exc).__name__, exc.field, str(exc)]  # type: ignore[attr-defined]
        ch.send(tp_infer(call_id=7, chunk_index=3, cache_epoch=2, base_seed=2**64))  # OM-01, uncaught
        return seen
    finally:
        rec.dump(ctx.flight_path)


@pytest.mark.parametrize("transport", ["broadcast", "p2p"])
def test_preflight_rows_never_send_a_header(transport: str) -> None:
    """OM-01/02/03/10: rank0 fails in preflight; rank1 never sees a header and exits on its own."""
    sender, peer = run_ranks(rank_preflight_rows, 2, timeout_s=HARD_S, args=(transport,))
    assert sender.exitcode == 1 and sender.exc_type == "CodecError", sender.summary()
    assert "field=base_seed" in sender.message and "call_id=7, chunk_index=3, cache_epoch=2" in sender.message
    assert sender.flight["counts"].get("header_sent", 0) == 0
    assert sender.flight["counts"]["preflight_failed"] == len(ROWS) + 1
    # who / how: the peer ends with a typed transport error, never killed by the harness
    assert not peer.timed_out and peer.exitcode == 1 and peer.exc_type == "TransportError", peer.summary()
    assert _headers(peer) == [] and "tensors_allocated" not in peer.flight["counts"]
    # how, per row: a typed error that names the field and carries the ids
    failed = [e for e in sender.flight["events"] if e["name"] == "preflight_failed"]
    for event, (row, (etype, field, _)) in zip(failed, ROWS.items(), strict=False):
        assert event["detail"].startswith(f"{etype}:"), (row, event["detail"])
        assert f"field={field}, call_id=7, chunk_index=3, cache_epoch=2" in event["detail"], row
    # when: the peer exited within the bound after rank0's last preflight failure
    assert peer.exited_at - failed[-1]["t_mono"] < BOUND_S


# ---- OM-03, receiver side: forced past rank0 by the named test hook -----------------------------


def rank_forced_plan(ctx: RankContext) -> dict:
    world = init_gloo(ctx)
    rec = FlightRecorder()
    if ctx.rank == 0:
        faults = ChannelFaults(skip_sender_validation=True)
        ch = _channel("broadcast", world, 0, rec, faults=faults, exit_fn=rec.exit_after_dump(ctx.flight_path))
        ch.send(tp_infer(call_id=9, chunk_index=4, expected_generator_calls=4))
        rec.dump(ctx.flight_path)
        return {"sent": True}
    ch = _channel("broadcast", world, 0, rec)
    try:
        ch.recv()
        return {"unexpected": "accepted"}
    finally:
        rec.dump(ctx.flight_path)


def test_om03_forced_past_rank0_worker_rejects_before_allocating() -> None:
    sender, worker = run_ranks(rank_forced_plan, 2, timeout_s=HARD_S)
    assert worker.exitcode == 1 and worker.exc_type == "PlanMismatchError", worker.summary()
    assert "field=expected_generator_calls" in worker.message and "call_id=9, chunk_index=4" in worker.message
    assert (
        worker.flight["counts"]["meta_rejected"] == 1 and "tensors_allocated" not in worker.flight["counts"]
    )
    # the sender was stranded mid-message until the worker left, then poisoned itself: no hang
    assert not sender.timed_out and sender.exitcode in (0, EXIT_POISONED), sender.summary()
    reject_t = _first(worker, "meta_rejected")["t_mono"]
    assert sender.exited_at - reject_t < BOUND_S


# ---- poison after the commitment point ----------------------------------------------------------


def rank_poison(ctx: RankContext, transport: str) -> dict:
    world = init_gloo(ctx)
    rec = FlightRecorder()
    other = 1 - ctx.rank if transport == "p2p" else 0
    if ctx.rank == 0:
        faults = ChannelFaults(raise_at="after_header")
        ch = _channel(
            transport, world, other, rec, faults=faults, exit_fn=rec.exit_after_dump(ctx.flight_path)
        )
        ch.send(tp_infer(call_id=11, chunk_index=6, cache_epoch=3))
        return {"unexpected": "send returned"}
    ch = _channel(transport, world, other, rec)
    try:
        ch.recv()
        return {"unexpected": "received"}
    finally:
        rec.dump(ctx.flight_path)


@pytest.mark.parametrize("transport", ["broadcast", "p2p"])
def test_throw_after_header_poisons_sender_and_peer_exits(transport: str) -> None:
    sender, peer = run_ranks(rank_poison, 2, timeout_s=HARD_S, args=(transport,))
    assert sender.exitcode == EXIT_POISONED and not sender.reported, sender.summary()
    poisoned = _first(sender, "poisoned")
    assert poisoned["call_id"] == 11 and "InjectedChannelFault" in poisoned["detail"]
    assert not peer.timed_out and peer.exitcode == 1 and peer.exc_type == "TransportError", peer.summary()
    # the peer got the control frame (header + inline meta), allocated, then waited for the payload
    assert "field=payload" in peer.message and "call_id=11, chunk_index=6, cache_epoch=3" in peer.message
    assert [h["call_id"] for h in _headers(peer)] == [11]
    assert peer.flight["counts"]["meta_received"] == 1 and "message_received" not in peer.flight["counts"]
    assert peer.exited_at - poisoned["t_mono"] < BOUND_S


# ---- receiver rejections: version, action, kind, sizes, monotonicity ----------------------------


def _raw_control(meta: bytes = b"", **fields: int) -> torch.Tensor:
    """A control frame (default Limits) around a header with `fields` overridden, checksum correct."""
    v = Header(
        kind=Kind.TP_ENVELOPE,
        action=Action.INFER,
        ids=Ids(20, 8, 0, 0),
        meta_nbytes=64,
        n_tensors=4,
    ).values()
    for name, value in fields.items():
        v[HeaderField[name.upper()]] = value
    v[HeaderField.CHECKSUM] = checksum(v)
    return torch.frombuffer(bytearray(pack_control(v, meta, Limits())), dtype=torch.uint8)


def _absurd_meta() -> bytes:
    specs = [TensorSpec("latents", "bfloat16", (1, 3, 16, 2**20, 2**20))]
    return encode_meta({}, specs, TPEnvelopeV1.SCHEMA, Limits())


HEADER_CASES = {
    "version": ({"version": 99}, "HeaderError", "protocol_version"),
    "action": ({"action": 7}, "HeaderError", "action"),
    "kind": ({"kind": 42}, "HeaderError", "kind"),
    "magic": ({"magic": 0}, "HeaderError", "magic"),
    "meta_nbytes": ({"meta_nbytes": 2**50}, "LimitError", "meta_nbytes"),
    "n_tensors": ({"n_tensors": 10**6}, "LimitError", "n_tensors"),
}


def rank_receiver_rejects(ctx: RankContext) -> dict:
    world = init_gloo(ctx)
    if ctx.rank == 0:
        for over, _, _ in HEADER_CASES.values():
            dist.send(_raw_control(**over), group=world, group_dst=1)  # a control frame, then nothing
        meta = _absurd_meta()  # fits inline: one frame carries the header and the absurd spec
        dist.send(_raw_control(meta, meta_nbytes=len(meta), n_tensors=1), group=world, group_dst=1)
        P2PChannel(world, 1).send(control(TPEnvelopeV1, Action.NOOP, 30))
        P2PChannel(world, 1).send(control(TPEnvelopeV1, Action.NOOP, 29))  # a restarted sender
        P2PChannel(world, 1).send(tp_infer(call_id=41, chunk_index=5))
        dist.send(
            _raw_control(call_id=42, chunk_index=5, cache_epoch=1), group=world, group_dst=1
        )  # chunk reused
        return {}
    out: dict[str, Any] = {}
    ch, rec = None, FlightRecorder()
    for name in [*HEADER_CASES, "absurd_spec", None, "call_id", None, "chunk_index"]:
        if ch is None or ch.broken:  # a rejection breaks framing sync: the next case needs a new one
            rec = FlightRecorder()
            ch = P2PChannel(world, 0, observer=rec, group_name="world")
        before = rec.snapshot()["counts"]
        try:
            msg = ch.recv()
            assert name is None, f"{name}: accepted {msg}"
        except Exception as exc:
            after = rec.snapshot()["counts"]
            new = {k: v - before.get(k, 0) for k, v in after.items() if v != before.get(k, 0)}
            out[name] = [type(exc).__name__, getattr(exc, "field", None), str(exc), new]
    return out


def test_receiver_rejects_bad_headers_and_ids_before_allocating() -> None:
    sender, receiver = run_ranks(rank_receiver_rejects, 2, timeout_s=HARD_S)
    assert sender.exitcode == 0 and receiver.exitcode == 0, sender.summary() + receiver.summary()
    got = receiver.result
    for name, (_, etype, field) in HEADER_CASES.items():
        assert got[name][:2] == [etype, field], got[name]
        assert "tensors_allocated" not in got[name][3] and "meta_received" not in got[name][3]
    assert got["absurd_spec"][:2] == ["LimitError", "latents"], got["absurd_spec"]
    assert "tensors_allocated" not in got["absurd_spec"][3] and got["absurd_spec"][3]["meta_rejected"] == 1
    assert got["call_id"][:2] == ["MonotonicityError", "call_id"] and "call_id=29" in got["call_id"][2]
    assert got["chunk_index"][:2] == ["MonotonicityError", "chunk_index"]
    assert "call_id=42, chunk_index=5" in got["chunk_index"][2]
