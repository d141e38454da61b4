"""The fixed int64 header and the control frame carrying it: round trips, every receiver check,
and id monotonicity.

Each rejection test asserts the error type *and* the field it names, because an operator reading
one log line must know which header field was wrong. Every header case runs twice: on the int64
values (`Header.parse`) and inside a control frame as it comes off the wire (`parse_header`).
"""

from __future__ import annotations

import pytest
import torch

from streamdit.errors import ProtocolError
from streamdit.protocol.codec import Limits
from streamdit.protocol.errors import HeaderError, LimitError, MonotonicityError
from streamdit.protocol.framing import (
    CONTROL_BYTES,
    HEADER_BYTES,
    control_nbytes,
    inline_meta,
    pack_control,
    parse_header,
)
from streamdit.protocol.header import (
    HEADER_LEN,
    MAGIC,
    PROTOCOL_VERSION,
    Action,
    Header,
    HeaderField,
    Ids,
    IdTracker,
    Kind,
    checksum,
)

LIMITS = Limits(max_meta_bytes=1024, max_tensors=8, inline_meta_bytes=256)


def raw(**fields: int) -> list[int]:
    """Header values with the given fields overridden and a *correct* checksum."""
    v = Header(
        kind=Kind.TP_ENVELOPE,
        action=Action.INFER,
        ids=Ids(7, 3, 1, 0),
        meta_nbytes=100,
        n_tensors=4,
    ).values()
    for name, value in fields.items():
        v[HeaderField[name.upper()]] = value
    v[HeaderField.CHECKSUM] = checksum(v)
    return v


def frame(values: list[int], meta: bytes = b"", limits: Limits = LIMITS) -> bytes:
    return pack_control(values, meta, limits)


def both_reject(values: list[int], error: type, group: str | None = None) -> list[Exception]:
    """The same rejection from the values and from the control frame holding them."""
    errors = []
    for parse in (
        lambda: Header.parse(values, LIMITS, group),
        lambda: parse_header(frame(values), LIMITS, group),
    ):
        with pytest.raises(error) as info:
            parse()
        errors.append(info.value)
    return errors


@pytest.mark.parametrize("kind", list(Kind))
@pytest.mark.parametrize("action", list(Action))
def test_round_trip_every_kind_and_action(kind: Kind, action: Action) -> None:
    chunk = 4 if action is Action.INFER else -1
    meta = 10 if action in (Action.INFER, Action.ERROR) else 0
    n = 3 if action is Action.INFER else 0
    h = Header(kind=kind, action=action, ids=Ids(9, chunk, 2, 1), meta_nbytes=meta, n_tensors=n)
    t = h.to_tensor(torch.device("cpu"))
    assert t.dtype == torch.int64 and t.shape == (HEADER_LEN,)
    assert Header.parse(t.tolist(), LIMITS) == h
    meta = bytes(range(65, 65 + meta))
    f = frame(h.values(), meta)
    assert len(f) == control_nbytes(LIMITS) == HEADER_BYTES + 256
    assert parse_header(f, LIMITS) == h and inline_meta(f, h, LIMITS) == meta


def test_layout_constants() -> None:
    v = raw()
    assert v[HeaderField.MAGIC] == MAGIC and v[HeaderField.VERSION] == PROTOCOL_VERSION
    assert HEADER_LEN == 11 and 0 < MAGIC < 2**63


@pytest.mark.parametrize(
    ("values", "field"),
    [
        (raw(magic=123), "magic"),
        (raw(version=2), "protocol_version"),
        (raw(version=-1), "protocol_version"),
        (raw(kind=9), "kind"),
        (raw(kind=0), "kind"),
        (raw(action=4), "action"),
        (raw(action=-3), "action"),
        (raw(chunk_index=-1), "chunk_index"),  # INFER needs a chunk
        (raw(action=Action.NOOP, chunk_index=3, meta_nbytes=0, n_tensors=0), "chunk_index"),
        (raw(call_id=-1), "call_id"),
        (raw(cache_epoch=-5), "cache_epoch"),
        (raw(action=Action.NOOP, chunk_index=-1, meta_nbytes=8, n_tensors=0), "meta_nbytes"),
        (raw(action=Action.SHUTDOWN, chunk_index=-1, meta_nbytes=0, n_tensors=1), "meta_nbytes"),
        (raw(action=Action.ERROR, chunk_index=-1, meta_nbytes=8, n_tensors=1), "n_tensors"),
        (raw(meta_nbytes=0), "meta_nbytes"),  # INFER without meta
    ],
)
def test_rejects_bad_fields(values: list[int], field: str) -> None:
    for error in both_reject(values, HeaderError, group="world"):
        assert error.field == field
        assert "group=world" in str(error)


@pytest.mark.parametrize(
    ("values", "field"),
    [
        (raw(meta_nbytes=2**62), "meta_nbytes"),
        (raw(meta_nbytes=1025), "meta_nbytes"),
        (raw(meta_nbytes=-1), "meta_nbytes"),
        (raw(n_tensors=9), "n_tensors"),
        (raw(n_tensors=2**40), "n_tensors"),
    ],
)
def test_absurd_sizes_are_limit_errors_with_ids(values: list[int], field: str) -> None:
    for error in both_reject(values, LimitError):
        assert error.field == field
        assert "call_id=7" in str(error) and "chunk_index=3" in str(error)


def test_checksum_catches_a_flipped_field_and_wrong_length() -> None:
    v = raw()
    v[HeaderField.CALL_ID] += 1  # checksum not recomputed: a corrupted or desynchronized header
    with pytest.raises(HeaderError, match="checksum"):
        Header.parse(v, LIMITS)
    with pytest.raises(HeaderError, match="checksum"):
        parse_header(frame(v), LIMITS)
    with pytest.raises(HeaderError, match="fields"):
        Header.parse(raw()[:-1], LIMITS)


# ---- the control frame around the header --------------------------------------------------------


def test_default_control_frame_is_4096_bytes_and_little_endian() -> None:
    assert CONTROL_BYTES == control_nbytes(Limits()) == 4096 and HEADER_BYTES == HEADER_LEN * 8
    f = frame(raw(), limits=Limits())
    assert len(f) == 4096 and f[:8] == MAGIC.to_bytes(8, "little")


def test_frame_of_the_wrong_length_is_refused() -> None:
    for data in (frame(raw())[:-1], frame(raw()) + b"\0", frame(raw())[:HEADER_BYTES]):
        with pytest.raises(HeaderError) as info:
            parse_header(data, LIMITS, group="world")
        assert info.value.field == "header" and "group=world" in str(info.value)


def test_meta_longer_than_inline_capacity_travels_apart() -> None:
    meta = b"m" * 257  # inline capacity 256
    values = raw(meta_nbytes=len(meta))
    f = frame(values, meta)
    assert f[HEADER_BYTES:] == bytes(256)  # the meta area stays zero
    h = parse_header(f, LIMITS)
    assert h.meta_nbytes == 257 and inline_meta(f, h, LIMITS) is None
    at_capacity = raw(meta_nbytes=256)
    f = frame(at_capacity, b"m" * 256)
    assert inline_meta(f, parse_header(f, LIMITS), LIMITS) == b"m" * 256


@pytest.mark.parametrize(("meta_nbytes", "at"), [(100, HEADER_BYTES + 100), (100, -1), (300, HEADER_BYTES)])
def test_non_zero_padding_is_refused_with_ids(meta_nbytes: int, at: int) -> None:
    values = raw(meta_nbytes=meta_nbytes)
    f = bytearray(frame(values, b"x" * meta_nbytes))
    f[at] = 1
    h = parse_header(bytes(f), LIMITS, group="mesh")  # the header part alone is fine
    with pytest.raises(HeaderError) as info:
        inline_meta(bytes(f), h, LIMITS, group="mesh")
    assert info.value.field == "control_padding"
    assert "call_id=7, chunk_index=3" in str(info.value) and "group=mesh" in str(info.value)


def test_inline_capacity_zero_sends_every_meta_apart() -> None:
    limits = Limits(inline_meta_bytes=0)
    f = frame(raw(), b"x" * 100, limits)
    assert len(f) == HEADER_BYTES and inline_meta(f, parse_header(f, limits), limits) is None
    empty = raw(action=Action.NOOP, chunk_index=-1, meta_nbytes=0, n_tensors=0)
    f = frame(empty, b"", limits)
    assert inline_meta(f, parse_header(f, limits), limits) == b""


def test_tracker_call_id_strictly_increasing_across_actions() -> None:
    tr = IdTracker()
    tr.check(Action.NOOP, Ids(3, -1, 0, 0))
    tr.advance(Action.NOOP, Ids(3, -1, 0, 0))
    for bad in (3, 2):
        with pytest.raises(MonotonicityError) as info:
            tr.check(Action.INFER, Ids(bad, 0, 0, 0), group="mesh")
        assert info.value.field == "call_id" and "group=mesh" in str(info.value)
    tr.check(Action.INFER, Ids(4, 0, 0, 0))


def test_tracker_chunk_index_over_infer_only() -> None:
    tr = IdTracker()
    tr.advance(Action.INFER, Ids(1, 5, 0, 0))
    tr.advance(Action.NOOP, Ids(2, -1, 0, 0))  # a NOOP in between does not reset the chunk rule
    with pytest.raises(MonotonicityError) as info:
        tr.check(Action.INFER, Ids(3, 5, 0, 0))
    assert info.value.field == "chunk_index" and "call_id=3" in str(info.value)
    tr.check(Action.INFER, Ids(3, 6, 0, 0))
    tr.check(Action.SHUTDOWN, Ids(3, -1, 0, 0))


@pytest.mark.parametrize("name", ["cache_epoch", "control_epoch"])
def test_tracker_epochs_never_decrease(name: str) -> None:
    tr = IdTracker()
    tr.advance(Action.INFER, Ids(1, 1, 2, 2))
    tr.check(Action.INFER, Ids(2, 2, 2, 2))  # equal is fine
    low = Ids(2, 2, 1, 2) if name == "cache_epoch" else Ids(2, 2, 2, 1)
    with pytest.raises(MonotonicityError) as info:
        tr.check(Action.INFER, low)
    assert info.value.field == name
    assert isinstance(info.value, ProtocolError)
