"""Meta codec and payload layout: canonical round trips, schema refusals, limits before
allocation, packing tensors into one buffer and back, and fuzzing.

The fuzz properties (hypothesis) are the decoder's contract with untrusted bytes: for any input,
`decode_meta` / `Header.parse` / the control-frame parse either return something within the limits
or raise a ProtocolError subclass — never another exception type, never a hang, never a large
allocation.
"""

from __future__ import annotations

import itertools
import json
import math
import tracemalloc

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from factories import tp_infer
from streamdit.errors import ProtocolError
from streamdit.protocol.codec import (
    DTYPES,
    FieldType,
    Limits,
    Schema,
    TensorSpec,
    check_specs,
    decode_meta,
    encode_meta,
    tensor_to_bytes,
)
from streamdit.protocol.errors import CodecError, DtypeError, LimitError, SchemaError
from streamdit.protocol.framing import (
    ALIGN,
    alloc_payload,
    control_nbytes,
    inline_meta,
    pack_payload,
    parse_header,
    payload_layout,
    unpack_payload,
)
from streamdit.protocol.header import HEADER_LEN, Header
from streamdit.protocol.messages import TPEnvelopeV1
from streamdit.protocol.preflight import prepare

pytestmark = pytest.mark.timeout(120)

SCHEMA = Schema(
    scalars={"n": FieldType.INT, "x": FieldType.FLOAT, "b": FieldType.BOOL, "s": FieldType.STR},
    tensors=frozenset({"a", "z"}),
    forbidden=frozenset({"video"}),
)
LIMITS = Limits(max_meta_bytes=4096, max_tensor_bytes=1 << 20, max_total_bytes=3 << 19, max_tensors=4)
SPECS = (TensorSpec("a", "bfloat16", (1, 2, 3)), TensorSpec("z", "int64", (4,)))
FIELDS = {"n": -(2**63), "x": 0.1, "b": False, "s": "héllo\n", "unset": None}


def good_meta() -> bytes:
    return encode_meta({k: v for k, v in FIELDS.items() if k != "unset"}, SPECS, SCHEMA, LIMITS)


def decode(data: bytes, n: int = 2, limits: Limits = LIMITS) -> object:
    return decode_meta(data, SCHEMA, limits, n_tensors=n)


def test_round_trip_is_canonical_and_skips_none() -> None:
    data = encode_meta(FIELDS, SPECS, SCHEMA, LIMITS)
    assert b" " not in data and b"unset" not in data
    meta = decode(data)
    assert dict(meta.fields) == {k: v for k, v in FIELDS.items() if v is not None}
    assert meta.specs == SPECS
    assert encode_meta(dict(meta.fields), meta.specs, SCHEMA, LIMITS) == data


def test_float_field_accepts_int_and_encodes_it_as_float() -> None:
    assert decode(encode_meta({"x": 3}, SPECS, SCHEMA, LIMITS)).fields["x"] == 3.0


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("n", 2**63),  # beyond int64
        ("n", True),  # bool is not an int on the wire
        ("n", 1.0),
        ("b", 1),
        ("x", float("nan")),
        ("x", float("inf")),
        ("s", "x" * 600),  # beyond max_str_len
        ("s", b"bytes"),
        ("n", object()),
        ("n", torch.tensor(3)),
    ],
)
def test_unencodable_values_fail_at_encode_naming_the_field(field: str, value: object) -> None:
    with pytest.raises(CodecError) as info:
        encode_meta({field: value}, SPECS, SCHEMA, LIMITS, ctx={"call_id": 4})
    assert info.value.field == field and "call_id=4" in str(info.value)


def test_unknown_field_refused_at_encode() -> None:
    with pytest.raises(SchemaError, match="not in the schema"):
        encode_meta({"video": 1}, SPECS, SCHEMA, LIMITS)


@pytest.mark.parametrize(
    ("text", "error", "field"),
    [
        ('{"fields":{},"tensors":[]} ', CodecError, "meta"),  # trailing space: not canonical
        ('{"tensors":[],"fields":{}}', CodecError, "meta"),  # key order: not canonical
        ('{"fields":{"x":1},"tensors":[]}', SchemaError, "x"),  # int literal in a float field
        ('{"fields":{"n":1,"n":2},"tensors":[]}', CodecError, "meta"),  # duplicate key
        ('{"fields":{"x":NaN},"tensors":[]}', CodecError, "meta"),
        ('{"fields":{"x":1e999},"tensors":[]}', CodecError, "meta"),
        ('{"fields":{"n":' + "9" * 40 + '},"tensors":[]}', CodecError, "meta"),
        ('{"fields":{"video":1},"tensors":[]}', SchemaError, "video"),
        ('{"fields":{"what":1},"tensors":[]}', SchemaError, "what"),
        ('{"fields":[],"tensors":[]}', SchemaError, "fields"),
        ('{"fields":{},"tensors":{}}', SchemaError, "tensors"),
        ('{"fields":{},"tensors":[],"x":1}', SchemaError, "meta"),
        ("[" * 5000 + "]" * 5000, CodecError, "meta"),  # deep nesting: RecursionError is mapped
        ("\xff", CodecError, "meta"),
    ],
)
def test_decode_refusals(text: str, error: type, field: str) -> None:
    data = text.encode("latin-1")
    with pytest.raises(error) as info:
        decode(data, n=0, limits=Limits(max_meta_bytes=20000))
    assert info.value.field == field


@pytest.mark.parametrize(
    ("specs", "error", "field"),
    [
        ([["z", "int64", [4]], ["a", "bfloat16", [1]]], SchemaError, "tensors"),  # unsorted
        ([["a", "int64", [4]], ["a", "int64", [4]]], SchemaError, "tensors"),  # duplicate
        ([["a", "float64", [4]], ["z", "int64", [1]]], DtypeError, "a"),  # OM-02 on receive
        ([["a", "int64", [-1]], ["z", "int64", [1]]], SchemaError, "a"),
        ([["a", "int64", [1.5]], ["z", "int64", [1]]], SchemaError, "a"),
        ([["a", "int64", [1] * 9], ["z", "int64", [1]]], LimitError, "a"),  # ndim
        ([["a", "uint8", [2**40]], ["z", "int64", [1]]], LimitError, "a"),  # absurd size
        ([["a", "uint8", [2**20]], ["z", "uint8", [2**20]]], LimitError, "tensors"),  # total
        ([["video", "uint8", [3]], ["z", "int64", [1]]], SchemaError, "video"),  # forbidden
        ([["b", "uint8", [3]], ["z", "int64", [1]]], SchemaError, "b"),  # not a tensor field
        ([["a", "uint8"], ["z", "int64", [1]]], SchemaError, "tensors"),
        ([["a", "uint8", [1]]], SchemaError, "n_tensors"),  # header said 2
    ],
)
def test_spec_refusals_before_allocation(specs: list, error: type, field: str) -> None:
    data = json.dumps({"fields": {}, "tensors": specs}, separators=(",", ":"), sort_keys=True).encode()
    with pytest.raises(error) as info:
        decode(data)
    assert info.value.field == field


def test_meta_longer_than_limit_is_refused_before_parsing() -> None:
    with pytest.raises(LimitError):
        decode(b"x" * 5000)


def test_check_specs_sizes_are_exact_python_ints() -> None:
    check_specs([TensorSpec("a", "bfloat16", (512, 1024))], LIMITS)  # exactly 1 MiB: allowed
    with pytest.raises(LimitError):  # 2**62 elements * 8 B would overflow int64
        check_specs([TensorSpec("a", "int64", (2**31, 2**31))], LIMITS)
    with pytest.raises(LimitError):
        check_specs([TensorSpec(f"t{i}", "uint8", (1,)) for i in range(5)], LIMITS)


def test_dtype_allowlist_is_exactly_the_spec_set() -> None:
    assert set(DTYPES) == {"float32", "bfloat16", "float16", "int64", "int32", "uint8"}


@pytest.mark.parametrize(
    "bad",
    [
        {"max_meta_bytes": 0},
        {"max_tensors": -1},
        {"max_ndim": 2.0},
        {"inline_meta_bytes": -1},
        {"inline_meta_bytes": 1.0},
        {"inline_meta_bytes": 64 * 1024 + 1},  # more than max_meta_bytes
        {"max_meta_bytes": 1000},  # below the default inline capacity
    ],
)
def test_limits_are_validated(bad: dict) -> None:
    with pytest.raises(ValueError):
        Limits(**bad)


def test_inline_capacity_bounds() -> None:
    assert Limits().inline_meta_bytes == 4008
    assert Limits(inline_meta_bytes=0).inline_meta_bytes == 0
    assert Limits(max_meta_bytes=1000, inline_meta_bytes=1000).inline_meta_bytes == 1000


# ---- payload layout: all non-empty tensors in one buffer ----------------------------------------

MIXED = {
    "a": torch.arange(3, dtype=torch.int64),  # 24 B: the next offset is padded to 64
    "b": torch.zeros(0, 5, dtype=torch.float32),  # empty: no bytes, no offset consumed
    "c": torch.randn(2, 3, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16),
    "d": torch.tensor(7, dtype=torch.uint8),  # 0-dim
    "e": torch.arange(129, dtype=torch.float16),
}


def _specs(tensors: dict[str, torch.Tensor]) -> tuple[TensorSpec, ...]:
    return tuple(TensorSpec.of(n, t) for n, t in sorted(tensors.items()))


def test_layout_aligns_offsets_and_skips_empty_tensors() -> None:
    layout = payload_layout(_specs(MIXED))
    assert layout.offsets == (0, 0, 64, 128, 192) and layout.sizes == (24, 0, 12, 1, 258)
    assert layout.nbytes == 192 + 258 and layout.direct is None  # no trailing pad
    assert payload_layout(()).nbytes == 0 and payload_layout(()).direct is None


def test_pack_then_unpack_is_bitwise_and_gaps_are_zero() -> None:
    specs = _specs(MIXED)
    layout = payload_layout(specs)
    tensors = [MIXED[s.name] for s in specs]
    flat = pack_payload(tensors, layout)
    assert flat is not None and flat.dtype == torch.uint8 and flat.numel() == layout.nbytes
    assert not flat[24:64].any() and not flat[76:128].any() and not flat[129:192].any()
    got = unpack_payload(flat, specs, layout, torch.device("cpu"))
    assert list(got) == [s.name for s in specs]
    for name, want in MIXED.items():
        assert got[name].dtype == want.dtype and got[name].shape == want.shape
        assert torch.equal(got[name], want), name
    shared = {got[n].untyped_storage().data_ptr() for n in "acde"}
    assert shared == {flat.untyped_storage().data_ptr()}  # views of the one buffer, no copies
    assert all(got[n].data_ptr() % ALIGN == 0 for n in "acde")


def test_one_non_empty_tensor_is_sent_as_itself() -> None:
    t = torch.randn(3, 5)
    specs = _specs({"a": t, "b": torch.zeros(0)})
    layout = payload_layout(specs)
    assert layout.direct == 0 and layout.offsets[0] == 0 and layout.nbytes == t.numel() * 4
    sent = pack_payload([t, torch.zeros(0)], layout)
    assert sent is not None and sent.data_ptr() == t.data_ptr()  # no pack copy
    flat, got = alloc_payload(specs, layout, torch.device("cpu"))
    assert flat is not None and flat.numel() == layout.nbytes
    flat.copy_(sent)
    assert torch.equal(got["a"], t) and got["b"].shape == (0,)


def test_no_bytes_means_no_payload() -> None:
    specs = _specs({"b": torch.zeros(0, 5)})
    layout = payload_layout(specs)
    assert pack_payload([torch.zeros(0, 5)], layout) is None
    flat, got = alloc_payload(specs, layout, torch.device("cpu"))
    assert flat is None and got["b"].shape == (0, 5)


def test_pack_and_unpack_refuse_a_mismatched_layout() -> None:
    specs = _specs(MIXED)
    layout = payload_layout(specs)
    with pytest.raises(ValueError):
        pack_payload([MIXED[s.name] for s in specs][:-1], layout)
    with pytest.raises(ValueError):
        pack_payload([torch.zeros(1) for _ in specs], layout)
    with pytest.raises(ValueError):
        unpack_payload(torch.zeros(layout.nbytes - 1, dtype=torch.uint8), specs, layout, torch.device("cpu"))


@settings(max_examples=100, deadline=None, derandomize=True, database=None)
@given(
    st.lists(
        st.tuples(st.sampled_from(sorted(DTYPES)), st.lists(st.integers(0, 9), max_size=3)),
        max_size=6,
    )
)
def test_layout_property_round_trip(raw: list[tuple[str, list[int]]]) -> None:
    tensors = {}
    for i, (dtype, shape) in enumerate(raw):
        tensors[f"t{i}"] = torch.arange(math.prod(shape), dtype=torch.int64).reshape(shape).to(DTYPES[dtype])
    specs = _specs(tensors)
    layout = payload_layout(specs)
    spans = [(o, o + n) for o, n in zip(layout.offsets, layout.sizes, strict=True) if n]
    assert all(o % ALIGN == 0 for o, _ in spans) and all(a[1] <= b[0] for a, b in itertools.pairwise(spans))
    assert layout.nbytes == (spans[-1][1] if spans else 0)
    assert layout.nbytes <= sum(layout.sizes) + (ALIGN - 1) * len(spans)
    assert (layout.direct is not None) == (len(spans) == 1)
    flat = pack_payload([tensors[s.name] for s in specs], layout)
    got = unpack_payload(flat, specs, layout, torch.device("cpu"))
    assert all(torch.equal(got[n], t) and got[n].dtype == t.dtype for n, t in tensors.items())


# ---- fuzzing ------------------------------------------------------------------------------------

# Deterministic (derandomize) so CI never flakes; no example database written into the repo.
FUZZ = settings(
    max_examples=150,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
ENVELOPE_META = prepare(tp_infer(), Limits(), torch.device("cpu")).meta


def _assert_bounded_decode(data: bytes, schema: Schema, limits: Limits, n: int) -> None:
    """Decode must end in a ProtocolError or in specs within limits, allocating O(len(data))."""
    tracemalloc.start()
    try:
        meta = decode_meta(data, schema, limits, n_tensors=n)
    except ProtocolError:
        return
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert peak < 64 * len(data) + (1 << 20), f"decode allocated {peak} B for {len(data)} B"
    assert sum(s.nbytes for s in meta.specs) <= limits.max_total_bytes
    assert all(s.nbytes <= limits.max_tensor_bytes for s in meta.specs)


@FUZZ
@given(st.binary(max_size=2048), st.integers(0, 4))
def test_fuzz_random_bytes(data: bytes, n: int) -> None:
    _assert_bounded_decode(data, SCHEMA, LIMITS, n)


@FUZZ
@given(st.data())
def test_fuzz_mutated_envelope_meta(data: st.DataObject) -> None:
    buf = bytearray(ENVELOPE_META)
    for _ in range(data.draw(st.integers(1, 4))):
        op = data.draw(st.sampled_from(["flip", "delete", "insert", "digits"]))
        i = data.draw(st.integers(0, len(buf) - 1))
        if op == "flip":
            buf[i] = data.draw(st.integers(0, 255))
        elif op == "delete":
            del buf[i : i + data.draw(st.integers(1, 16))]
        elif op == "insert":
            buf[i:i] = data.draw(st.binary(min_size=1, max_size=16))
        else:  # grow a number: the classic "absurd size" mutation
            buf[i:i] = b"9" * data.draw(st.integers(1, 25))
        if not buf:
            buf = bytearray(b"{")
    limits = Limits(max_tensor_bytes=1 << 24, max_total_bytes=1 << 25)
    _assert_bounded_decode(bytes(buf), TPEnvelopeV1.SCHEMA, limits, data.draw(st.integers(0, 5)))


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=10),
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=8), kids, max_size=4),
    max_leaves=20,
)


@FUZZ
@given(
    st.dictionaries(st.sampled_from(["n", "x", "b", "s", "q"]), _json, max_size=5),
    st.lists(st.lists(_json, max_size=4), max_size=4),
)
def test_fuzz_structured_json(fields: dict, tensors: list) -> None:
    text = json.dumps({"fields": fields, "tensors": tensors}, separators=(",", ":"), sort_keys=True)
    _assert_bounded_decode(text.encode("ascii", "replace"), SCHEMA, LIMITS, len(tensors))


@FUZZ
@given(st.lists(st.integers(-(2**63), 2**63 - 1), min_size=0, max_size=HEADER_LEN + 2))
def test_fuzz_random_headers(values: list[int]) -> None:
    try:
        h = Header.parse(values, LIMITS)
    except ProtocolError:
        return
    assert 0 <= h.meta_nbytes <= LIMITS.max_meta_bytes and 0 <= h.n_tensors <= LIMITS.max_tensors


CONTROL = tensor_to_bytes(prepare(tp_infer(), Limits(), torch.device("cpu")).control)
CONTROL_LIMITS = Limits(max_tensor_bytes=1 << 24, max_total_bytes=1 << 25)


def _assert_bounded_control(frame: bytes) -> None:
    """Header checks, padding check, then the inline meta: a ProtocolError or specs within limits."""
    try:
        h = parse_header(frame, CONTROL_LIMITS)
        meta = inline_meta(frame, h, CONTROL_LIMITS)
        assert h.meta_nbytes <= CONTROL_LIMITS.max_meta_bytes and h.n_tensors <= CONTROL_LIMITS.max_tensors
        if meta:
            _assert_bounded_decode(meta, TPEnvelopeV1.SCHEMA, CONTROL_LIMITS, h.n_tensors)
    except ProtocolError:
        return


@FUZZ
@given(st.binary(max_size=512), st.booleans())
def test_fuzz_random_control_frames(data: bytes, valid_magic: bool) -> None:
    size = control_nbytes(CONTROL_LIMITS)
    frame = (CONTROL[:16] if valid_magic else b"") + data  # random bytes, zero tail
    _assert_bounded_control(frame[:size].ljust(size, b"\0"))


@FUZZ
@given(st.lists(st.tuples(st.integers(0, 4095), st.integers(0, 255)), min_size=1, max_size=4))
def test_fuzz_mutated_control_frame(edits: list[tuple[int, int]]) -> None:
    frame = bytearray(CONTROL)
    for i, b in edits:
        frame[i] = b
    _assert_bounded_control(bytes(frame))


@FUZZ
@given(st.integers(0, HEADER_LEN - 1), st.integers(-(2**63), 2**63 - 1))
def test_fuzz_mutated_valid_header(index: int, value: int) -> None:
    values = prepare(tp_infer(), Limits(), torch.device("cpu")).header.values()
    values[index] = value
    try:
        h = Header.parse(values, LIMITS)
    except ProtocolError:
        return
    assert h.meta_nbytes <= LIMITS.max_meta_bytes  # only an unchanged header can pass the checksum
    assert values == prepare(tp_infer(), Limits(), torch.device("cpu")).header.values()
