"""Channel framing in one process, over an in-memory loopback transport.

The loopback replaces only `_put` / `_get` (the two transport calls), so framing, preflight,
ownership, observer events, receiver checks and the poison path are the production code. Each
wire entry is one transfer, so "at most two transfers per message" is counted here. The gloo
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
from streamdit.protocol.codec import Limits, tensor_to_bytes
from streamdit.protocol.errors import (
    ChannelBroken,
    HeaderError,
    LimitError,
    MonotonicityError,
    OwnershipError,
    PlanMismatchError,
    TransportError,
)
from streamdit.protocol.framing import HEADER_BYTES, pack_control
from streamdit.protocol.header import Action, Header, Ids, Kind
from streamdit.protocol.messages import PPResultV1, TPEnvelopeV1
from streamdit.runtime.flight import FlightRecorder
from streamdit.runtime.liveness import transport_like

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
        self.sent_ptrs: list[int] = []  # data_ptr of every tensor handed to the transport

    def _put(self, t: torch.Tensor) -> None:
        self.sent_ptrs.append(t.data_ptr())
        self.wire.append(t.clone())

    def _get(self, t: torch.Tensor) -> None:
        if not self.wire:
            raise RuntimeError("Timed out waiting for recv (loopback is empty)")
        t.copy_(self.wire.popleft().view(t.dtype).reshape(t.shape))


def pair(
    rx_kw: dict | None = None, **send_kw: object
) -> tuple[Loop, Loop, FlightRecorder, FlightRecorder, list[int]]:
    wire: collections.deque = collections.deque()
    exits: list[int] = []
    tx_rec, rx_rec = FlightRecorder(label="tx"), FlightRecorder(label="rx")
    tx = Loop(0, wire, role="rank0", group_name="world", observer=tx_rec, exit_fn=exits.append, **send_kw)
    rx = Loop(
        1, wire, role="worker", group_name="world", observer=rx_rec, exit_fn=exits.append, **(rx_kw or {})
    )
    return tx, rx, tx_rec, rx_rec, exits


SMALL_INLINE = Limits(inline_meta_bytes=16)  # every meta but the shortest travels apart


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
        want = 1 if msg.action in (Action.NOOP, Action.SHUTDOWN, Action.ERROR) else 2
        assert len(tx.wire) == want, (type(msg).__name__, msg.action)  # control [+ payload]
        assert tx.wire[0].numel() == 4096 and tx.wire[0].dtype == torch.uint8
        got = rx.recv()
        assert same(msg, got), type(msg).__name__
    assert not tx.wire and exits == []
    assert tx_rec.count("header_sent") == rx_rec.count("message_received") == len(msgs)
    assert rx_rec.count("meta_received") == tx_rec.count("meta_sent") == len(msgs) - 2  # NOOP, SHUTDOWN


def test_meta_beyond_inline_capacity_is_a_separate_exact_transfer() -> None:
    tx, rx, tx_rec, rx_rec, exits = pair(rx_kw={"limits": SMALL_INLINE}, limits=SMALL_INLINE)
    msgs = [
        tp_infer(call_id=1, chunk_index=0),
        pp_result(call_id=2, chunk_index=1),
        control(TPEnvelopeV1, Action.ERROR, 3, reason="x" * 40),
        control(TPEnvelopeV1, Action.NOOP, 4),
    ]
    for msg in msgs:
        tx.send(msg)
        if msg.action is Action.NOOP:
            assert [t.numel() for t in tx.wire] == [HEADER_BYTES + 16]
        else:
            control_frame, meta = tx.wire[0], tx.wire[1]
            assert control_frame.numel() == HEADER_BYTES + 16 and not control_frame[HEADER_BYTES:].any()
            assert len(tx.wire) == (2 if msg.action is Action.ERROR else 3)
            assert meta.numel() == int(control_frame[:HEADER_BYTES].view(torch.int64)[8])  # meta_nbytes
        assert same(msg, rx.recv()), type(msg).__name__
    assert [e["detail"] for e in rx_rec.events() if e["name"] == "meta_received"] == ["separate"] * 3
    assert tx_rec.count("meta_sent") == 3 and exits == []


def test_multi_tensor_payload_is_one_buffer_and_one_tensor_is_sent_as_itself() -> None:
    tx, rx, _, rx_rec, _ = pair()
    msg = tp_infer()
    tx.send(msg)
    payload = tx.wire[1]
    got = rx.recv()
    names = ("conditioning_embeds", "context_frames_override", "denoising_step_list", "latents")
    storages = {getattr(got, n).untyped_storage().data_ptr() for n in names}
    assert len(storages) == 1 and all(getattr(got, n).data_ptr() % 64 == 0 for n in names)
    assert payload.numel() == getattr(got, names[0]).untyped_storage().nbytes()
    result = pp_result(call_id=6, chunk_index=3)
    tx.send(result)
    assert tx.sent_ptrs[-1] == result.latents_out.data_ptr()  # no pack copy for a lone tensor
    got = rx.recv()
    assert isinstance(got, PPResultV1) and torch.equal(got.latents_out, result.latents_out)


def test_poison_after_header_exits_with_poisoned_code() -> None:
    tx, rx, tx_rec, _, exits = pair(faults=ChannelFaults(raise_at="after_header"))
    with pytest.raises(Poisoned, match=r"call_id=5 chunk_index=2 cache_epoch=1"):
        tx.send(tp_infer())
    assert exits == [EXIT_POISONED]
    assert [e["name"] for e in tx_rec.events()] == ["commit", "header_sent", "poisoned"]
    with pytest.raises(ChannelBroken):
        tx.send(tp_infer(call_id=6, chunk_index=3))
    assert len(tx.wire) == 1  # the control frame went out, nothing else did


@pytest.mark.parametrize(
    ("point", "limits", "sent"),
    [
        ("after_meta", Limits(), 1),  # inline meta: right after the control frame
        ("after_meta", SMALL_INLINE, 2),  # after the separate meta transfer
        ("before_payload", Limits(), 1),
        ("before_payload", SMALL_INLINE, 2),
    ],
)
def test_poison_later_points(point: str, limits: Limits, sent: int) -> None:
    tx, _, tx_rec, _, exits = pair(faults=ChannelFaults(raise_at=point), limits=limits)
    with pytest.raises(Poisoned):
        tx.send(tp_infer())
    assert exits == [EXIT_POISONED] and tx_rec.count("poisoned") == 1
    assert len(tx.wire) == sent and tx_rec.count("message_sent") == 0
    assert [e["name"] for e in tx_rec.events()] == ["commit", "header_sent", "meta_sent", "poisoned"]


def test_before_payload_is_skipped_when_there_is_no_payload() -> None:
    tx, rx, tx_rec, _, exits = pair(faults=ChannelFaults(raise_at="before_payload"))
    tx.send(control(TPEnvelopeV1, Action.NOOP, 1))  # nothing follows the control frame
    assert rx.recv().action is Action.NOOP and exits == [] and tx_rec.count("message_sent") == 1


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
    tx.wire.append(torch.frombuffer(bytearray(pack_control(big.values(), b"", Limits())), dtype=torch.uint8))
    with pytest.raises(LimitError) as info:
        rx.recv()
    assert info.value.field == "meta_nbytes" and "call_id=1" in str(info.value)
    assert rx_rec.count("header_rejected") == 1 and rx_rec.count("tensors_allocated") == 0
    assert rx_rec.count("meta_received") == 0
    with pytest.raises(ChannelBroken):
        rx.recv()


def test_receiver_rejects_non_zero_padding_before_anything_else() -> None:
    tx, rx, _, rx_rec, _ = pair()
    tx.send(tp_infer(call_id=3, chunk_index=1))
    tx.wire[0][-1] = 7  # a corrupt byte in the frame's padding
    with pytest.raises(HeaderError) as info:
        rx.recv()
    assert info.value.field == "control_padding" and "call_id=3, chunk_index=1" in str(info.value)
    assert rx_rec.count("header_rejected") == 1 and rx_rec.count("header_received") == 0
    assert rx_rec.count("tensors_allocated") == 0 and rx.broken


def test_receiver_rejects_absurd_spec_in_a_separate_meta_before_allocating() -> None:
    tx, rx, _, rx_rec, _ = pair(rx_kw={"limits": SMALL_INLINE}, limits=SMALL_INLINE)
    tx.send(tp_infer(call_id=8, chunk_index=2))
    meta = bytearray(tensor_to_bytes(tx.wire[1]))
    at = meta.rindex(b"[1,3,16,4,6]")  # latents' shape (the last spec)
    meta[at : at + 12] = b"[9999999999]"  # same length, canonical: 20 GB of bfloat16
    tx.wire[1] = torch.frombuffer(meta, dtype=torch.uint8)
    with pytest.raises(LimitError) as info:
        rx.recv()
    assert info.value.field == "latents" and "call_id=8, chunk_index=2" in str(info.value)
    assert rx_rec.count("meta_rejected") == 1 and rx_rec.count("tensors_allocated") == 0


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


def test_errors_a_dead_peer_causes_are_judged_by_the_watchdog() -> None:
    """An aborted NCCL receive returns a buffer of leftovers: its bad magic may mean a dead peer."""
    assert transport_like(TransportError("recv failed", field="header"))
    assert transport_like(HeaderError("bad magic 0x400c40c1bf0bea05", field="magic"))
    assert not transport_like(HeaderError("unknown protocol version 9", field="protocol_version"))
    assert not transport_like(PlanMismatchError("calls off by one", field="expected_generator_calls"))
