"""Channel framing in one process, over an in-memory loopback transport.

The loopback replaces only `_put` / `_get` (the two transport calls), so framing, preflight,
ownership, observer events, receiver checks and the poison path are the production code. The gloo
versions of these tests are in tests/dist/test_channels.py.
"""

from __future__ import annotations

import collections
import json
import threading
from pathlib import Path

import pytest
import torch

from factories import control, pp_infer, pp_result, same, tp_infer
from streamdit.errors import EXIT_POISONED, Poisoned
from streamdit.protocol.channel import ChannelEvent, ChannelFaults, P2PChannel
from streamdit.protocol.codec import Limits
from streamdit.protocol.errors import (
    ChannelBroken,
    LimitError,
    MonotonicityError,
    OwnershipError,
    PlanMismatchError,
)
from streamdit.protocol.header import Action, Header, Ids, Kind
from streamdit.protocol.messages import TPEnvelopeV1
from streamdit.runtime.flight import FlightRecorder

pytestmark = pytest.mark.timeout(60)


class FakeGroup:
    def __init__(self, rank: int) -> None:
        self._rank = rank

    def rank(self) -> int:
        return self._rank

    def size(self) -> int:
        return 2


class Loop(P2PChannel):
    """P2P channel whose transport is a shared deque of byte copies."""

    def __init__(self, rank: int, wire: collections.deque, **kw: object) -> None:
        super().__init__(FakeGroup(rank), 1 - rank, **kw)  # type: ignore[arg-type]
        self.wire = wire

    def _put(self, t: torch.Tensor) -> None:
        self.wire.append(t.clone())

    def _get(self, t: torch.Tensor) -> None:
        if not self.wire:
            raise RuntimeError("Timed out waiting for recv (loopback is empty)")
        t.copy_(self.wire.popleft().view(t.dtype).reshape(t.shape))


def pair(**send_kw: object) -> tuple[Loop, Loop, FlightRecorder, FlightRecorder, list[int]]:
    wire: collections.deque = collections.deque()
    exits: list[int] = []
    tx_rec, rx_rec = FlightRecorder(label="tx"), FlightRecorder(label="rx")
    tx = Loop(0, wire, role="rank0", group_name="world", observer=tx_rec, exit_fn=exits.append, **send_kw)
    rx = Loop(1, wire, role="worker", group_name="world", observer=rx_rec, exit_fn=exits.append)
    return tx, rx, tx_rec, rx_rec, exits


def test_round_trip_every_type_many_in_a_row() -> None:
    tx, rx, tx_rec, rx_rec, exits = pair()
    msgs = [
        tp_infer(call_id=1, chunk_index=0),
        control(TPEnvelopeV1, Action.NOOP, 2),
        pp_infer(call_id=3, chunk_index=1, mode="latent_anchor"),
        pp_result(call_id=4, chunk_index=2),
        *(tp_infer(call_id=10 + i, chunk_index=3 + i, recompute=bool(i % 2)) for i in range(20)),
        control(TPEnvelopeV1, Action.ERROR, 40, reason="leader rejected chunk 7"),
        control(TPEnvelopeV1, Action.SHUTDOWN, 41),
    ]
    for msg in msgs:
        tx.send(msg)
        got = rx.recv()
        assert same(msg, got), type(msg).__name__
    assert not tx.wire and exits == []
    assert tx_rec.count("header_sent") == rx_rec.count("message_received") == len(msgs)


def test_poison_after_header_exits_with_poisoned_code() -> None:
    tx, rx, tx_rec, _, exits = pair(faults=ChannelFaults(raise_at="after_header"))
    with pytest.raises(Poisoned, match=r"call_id=5 chunk_index=2 cache_epoch=1"):
        tx.send(tp_infer())
    assert exits == [EXIT_POISONED]
    assert [e["name"] for e in tx_rec.events()] == ["commit", "header_sent", "poisoned"]
    with pytest.raises(ChannelBroken):
        tx.send(tp_infer(call_id=6, chunk_index=3))
    assert len(tx.wire) == 1  # the header went out, nothing else did


@pytest.mark.parametrize("point", ["after_meta", "after_first_tensor"])
def test_poison_later_points(point: str) -> None:
    tx, _, tx_rec, _, exits = pair(faults=ChannelFaults(raise_at=point))
    with pytest.raises(Poisoned):
        tx.send(tp_infer())
    assert exits == [EXIT_POISONED] and tx_rec.count("poisoned") == 1


def test_preflight_failure_sends_nothing() -> None:
    tx, _, tx_rec, _, exits = pair()
    with pytest.raises(PlanMismatchError):
        tx.send(tp_infer(expected_generator_calls=4))
    assert not tx.wire and exits == [] and tx_rec.count("header_sent") == 0
    assert tx_rec.count("preflight_failed") == 1
    tx.send(tp_infer())  # the same ids may still be used: nothing reached the wire


def test_second_thread_gets_an_immediate_ownership_error() -> None:
    tx, _, _, _, _ = pair()
    tx.send(control(TPEnvelopeV1, Action.NOOP, 1))
    errors: list[BaseException] = []
    worker = threading.Thread(target=lambda: _capture(errors, tx.send, control(TPEnvelopeV1, Action.NOOP, 2)))
    worker.start()
    worker.join(5)
    assert len(errors) == 1 and isinstance(errors[0], OwnershipError)
    assert "owned by thread" in str(errors[0])


def _capture(errors: list[BaseException], fn: object, *args: object) -> None:
    try:
        fn(*args)  # type: ignore[operator]
    except BaseException as exc:
        errors.append(exc)


def test_receiver_rejects_absurd_header_before_allocating() -> None:
    tx, rx, _, rx_rec, _ = pair()
    big = Header(
        kind=Kind.TP_ENVELOPE,
        action=Action.INFER,
        ids=Ids(1, 0, 0, 0),
        meta_nbytes=2**40,
        n_tensors=4,
    )
    tx.wire.append(torch.tensor(big.values(), dtype=torch.int64))
    with pytest.raises(LimitError) as info:
        rx.recv()
    assert info.value.field == "meta_nbytes" and "call_id=1" in str(info.value)
    assert rx_rec.count("header_rejected") == 1 and rx_rec.count("tensors_allocated") == 0
    with pytest.raises(ChannelBroken):
        rx.recv()


def test_receiver_rejects_forced_inconsistent_plan_from_meta_alone() -> None:
    tx, rx, _, rx_rec, _ = pair(faults=ChannelFaults(skip_sender_validation=True))
    tx.send(tp_infer(expected_generator_calls=6))  # OM-03 forced past the sender
    with pytest.raises(PlanMismatchError) as info:
        rx.recv()
    assert info.value.field == "expected_generator_calls" and "call_id=5" in str(info.value)
    assert rx_rec.count("meta_rejected") == 1 and rx_rec.count("tensors_allocated") == 0


def test_receiver_rejects_non_monotonic_ids() -> None:
    wire: collections.deque = collections.deque()
    rx = Loop(1, wire)
    Loop(0, wire).send(tp_infer(call_id=5, chunk_index=2))
    assert rx.recv().call_id == 5
    Loop(0, wire).send(tp_infer(call_id=6, chunk_index=2))  # a "restarted" sender reuses a chunk
    with pytest.raises(MonotonicityError) as info:
        rx.recv()
    assert info.value.field == "chunk_index"


def test_limits_apply_on_both_sides() -> None:
    tx, _, _, _, _ = pair(limits=Limits(max_total_bytes=100))
    with pytest.raises(LimitError):
        tx.send(tp_infer())


def test_transport_failure_on_receive_is_typed_and_breaks_the_channel() -> None:
    _, rx, _, rx_rec, _ = pair()
    with pytest.raises(Exception) as info:
        rx.recv()
    assert type(info.value).__name__ == "TransportError" and info.value.field == "header"
    assert rx_rec.count("transport_error") == 1 and rx.broken


def test_flight_recorder_dump(tmp_path: Path) -> None:
    rec = FlightRecorder(capacity=3, label="rank0")
    for i in range(5):
        rec(
            ChannelEvent(
                name="header_sent",
                t_mono=float(i),
                channel="p2p",
                role="r",
                group="g",
                group_rank=0,
            )
        )
    path = rec.dump(tmp_path / "flight" / "rank0.json")
    data = json.loads(path.read_text())
    assert data["counts"] == {"header_sent": 5} and len(data["events"]) == 3
    assert [e["t_mono"] for e in data["events"]] == [2.0, 3.0, 4.0]


def test_poison_exit_writes_the_flight_record_then_exits(tmp_path: Path) -> None:
    rec, codes = FlightRecorder(label="rank0"), []
    exit_fn = rec.exit_after_dump(tmp_path / "f.json", exit_fn=codes.append)
    tx = Loop(
        0, collections.deque(), observer=rec, exit_fn=exit_fn, faults=ChannelFaults(raise_at="after_meta")
    )
    with pytest.raises(Poisoned):
        tx.send(tp_infer())
    assert codes == [EXIT_POISONED]
    events = json.loads((tmp_path / "f.json").read_text())["events"]
    assert [e["name"] for e in events][-1] == "poisoned" and events[-1]["call_id"] == 5
