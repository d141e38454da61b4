"""Schema-checked meta codec, tensor specs, the dtype allowlist and size limits.

Owns: `Limits`, `TensorSpec`, `Schema`, `FieldType`, `DTYPES`, `encode_meta` / `decode_meta`.
The meta is canonical JSON (sorted keys, no spaces, ASCII, no NaN) of a flat map of scalar fields
plus the tensor specs `[name, dtype, [dims]]` sorted by name. Canonical means one byte string per
message: the decoder re-encodes what it parsed and rejects any difference, so digests of meta bytes
are meaningful and "almost valid" encodings never slip through.

Decoding untrusted bytes runs no code (no pickle; `json` builds only dicts, lists, str, int, float,
bool, None) and is bounded: the byte length is capped before parsing, integers are capped at 20
digits before conversion, and every spec is checked against `Limits` before a caller allocates.
Must not import anything but torch and streamdit.errors / streamdit.protocol.errors.
"""

from __future__ import annotations

import ctypes
import enum
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType

import torch

from streamdit.protocol.errors import CodecError, DtypeError, LimitError, SchemaError

# The allowed dtypes, by wire name. Anything else is refused in preflight (OM-02) and in decode.
DTYPES: Mapping[str, torch.dtype] = MappingProxyType(
    {
        "float32": torch.float32,
        "bfloat16": torch.bfloat16,
        "float16": torch.float16,
        "int64": torch.int64,
        "int32": torch.int32,
        "uint8": torch.uint8,
    }
)
FLOAT_DTYPES = frozenset({"float32", "bfloat16", "float16"})
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1
_MAX_INT_DIGITS = 20  # len(str(-2**63)); longer digit strings are refused before int() runs

ErrCtx = Mapping[str, int | str | None]  # ids for error messages: call_id, chunk_index, ...
_NO_CTX: ErrCtx = MappingProxyType({})


def dtype_name(dtype: torch.dtype) -> str:
    """Wire name of a torch dtype (`torch.bfloat16` -> `bfloat16`), allowed or not."""
    return str(dtype).removeprefix("torch.")


@dataclass(frozen=True, kw_only=True, slots=True)
class Limits:
    """Size limits, checked before any allocation. A parity key: equal on every rank.

    `inline_meta_bytes` is the meta capacity of the fixed-size control frame (framing.py): the
    frame is `HEADER_LEN * 8 + inline_meta_bytes` bytes (4096 by default) and sets the size of
    every message's first transfer, so two ranks whose `inline_meta_bytes` differ cannot exchange
    a single message (the transfer sizes disagree; under NCCL that is undefined, not an error).
    A meta longer than it (up to `max_meta_bytes`) follows the frame as its own transfer.
    """

    max_meta_bytes: int = 64 * 1024
    max_tensor_bytes: int = 1 << 30
    max_total_bytes: int = 2 << 30
    max_tensors: int = 16
    max_ndim: int = 8
    max_str_len: int = 512
    inline_meta_bytes: int = 4008

    def __post_init__(self) -> None:
        for name in self.__slots__:
            value = getattr(self, name)
            if name == "inline_meta_bytes":
                if type(value) is not int or value < 0:
                    raise ValueError(f"Limits.{name} must be a non-negative int, got {value!r}")
            elif type(value) is not int or value <= 0:
                raise ValueError(f"Limits.{name} must be a positive int, got {value!r}")
        if self.inline_meta_bytes > self.max_meta_bytes:
            raise ValueError(
                f"Limits.inline_meta_bytes {self.inline_meta_bytes} > max_meta_bytes "
                f"{self.max_meta_bytes}: lower inline_meta_bytes along with max_meta_bytes"
            )


class FieldType(enum.Enum):
    """Type of a scalar meta field. Every field is optional on the wire (None = not encoded)."""

    INT = "int"
    FLOAT = "float"
    BOOL = "bool"
    STR = "str"


@dataclass(frozen=True, slots=True)
class TensorSpec:
    """What a receiver needs to allocate one tensor: name, wire dtype name, shape."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * DTYPES[self.dtype].itemsize

    @classmethod
    def of(cls, name: str, tensor: torch.Tensor) -> TensorSpec:
        return cls(name, dtype_name(tensor.dtype), tuple(int(d) for d in tensor.shape))

    def allocate(self, device: torch.device) -> torch.Tensor:
        """Allocate the receive buffer; callers run `check_specs` first (this trusts the spec)."""
        return torch.empty(self.shape, dtype=DTYPES[self.dtype], device=device)


@dataclass(frozen=True, kw_only=True, slots=True)
class Schema:
    """The fields one message kind may carry on the wire."""

    scalars: Mapping[str, FieldType]
    tensors: frozenset[str]
    forbidden: frozenset[str] = field(default_factory=frozenset)  # named, never accepted


@dataclass(frozen=True, slots=True)
class Meta:
    """Decoded meta: scalar fields (absent = None) and tensor specs in wire order."""

    fields: Mapping[str, object]
    specs: tuple[TensorSpec, ...]


def check_scalar(name: str, ftype: FieldType, value: object, limits: Limits, ctx: ErrCtx = _NO_CTX) -> object:
    """Return the wire form of one scalar, or raise CodecError naming the field (OM-01)."""
    kind = type(value)  # exact types: bool is not an int here, numpy scalars are refused
    if ftype is FieldType.BOOL and kind is bool:
        return value
    if ftype is FieldType.INT and kind is int and _INT64_MIN <= value <= _INT64_MAX:  # type: ignore[operator]
        return value
    if ftype is FieldType.FLOAT and kind in (int, float) and math.isfinite(value):  # type: ignore[arg-type]
        return float(value)  # type: ignore[arg-type]
    if ftype is FieldType.STR and kind is str and len(value) <= limits.max_str_len:  # type: ignore[arg-type]
        return value
    shown = repr(value)[:80]
    raise CodecError(f"cannot encode {kind.__name__} {shown} as {ftype.value}", field=name, **ctx)


def encode_meta(
    fields: Mapping[str, object],
    specs: Sequence[TensorSpec],
    schema: Schema,
    limits: Limits,
    ctx: ErrCtx = _NO_CTX,
) -> bytes:
    """Canonical meta bytes; raises CodecError / SchemaError on anything outside the schema."""
    wire: dict[str, object] = {}
    for name, value in fields.items():
        if value is None:
            continue  # absent fields are never encoded: one canonical form per message
        ftype = schema.scalars.get(name)
        if ftype is None:
            raise SchemaError("field is not in the schema", field=name, **ctx)
        wire[name] = check_scalar(name, ftype, value, limits, ctx)
    tensors = [[s.name, s.dtype, list(s.shape)] for s in specs]
    try:
        text = json.dumps(
            {"fields": wire, "tensors": tensors},
            sort_keys=True,
            separators=(",", ":"),
            ensure_ascii=True,
            allow_nan=False,
        )
    except (TypeError, ValueError) as exc:  # a spec holding a non-JSON value
        raise CodecError(f"meta not encodable: {exc}", field="tensors", **ctx) from exc
    return text.encode("ascii")


def decode_meta(
    data: bytes, schema: Schema, limits: Limits, *, n_tensors: int, ctx: ErrCtx = _NO_CTX
) -> Meta:
    """Decode untrusted meta bytes. Raises only ProtocolError subclasses; allocates O(len(data))."""
    if len(data) > limits.max_meta_bytes:
        raise LimitError(f"meta is {len(data)} bytes > {limits.max_meta_bytes}", field="meta_nbytes", **ctx)
    obj = _parse(data, ctx)
    if not isinstance(obj, dict) or sorted(obj) != ["fields", "tensors"]:
        raise SchemaError("meta must be an object with exactly 'fields' and 'tensors'", field="meta", **ctx)
    fields = _decode_fields(obj["fields"], schema, limits, ctx)
    specs = _decode_specs(obj["tensors"], schema, limits, n_tensors, ctx)
    check_specs(specs, limits, ctx)
    if encode_meta(fields, specs, schema, limits, ctx) != data:
        raise CodecError("meta is not in canonical form", field="meta", **ctx)
    return Meta(fields=MappingProxyType(fields), specs=specs)


def check_specs(specs: Sequence[TensorSpec], limits: Limits, ctx: ErrCtx = _NO_CTX) -> None:
    """Dtype allowlist (OM-02), then count, rank and byte limits; pure arithmetic, no allocation."""
    if len(specs) > limits.max_tensors:
        raise LimitError(f"{len(specs)} tensors > {limits.max_tensors}", field="n_tensors", **ctx)
    total = 0
    for spec in specs:
        check_dtype(spec, ctx)
        if len(spec.shape) > limits.max_ndim:
            raise LimitError(f"ndim {len(spec.shape)} > {limits.max_ndim}", field=spec.name, **ctx)
        if any(d < 0 for d in spec.shape):
            raise LimitError(f"negative dim in shape {spec.shape}", field=spec.name, **ctx)
        nbytes = spec.nbytes  # exact Python int: no overflow for absurd shapes
        if nbytes > limits.max_tensor_bytes:
            raise LimitError(
                f"{nbytes} bytes > max_tensor_bytes {limits.max_tensor_bytes}",
                field=spec.name,
                **ctx,
            )
        total += nbytes
    if total > limits.max_total_bytes:
        raise LimitError(
            f"{total} bytes in all > max_total_bytes {limits.max_total_bytes}",
            field="tensors",
            **ctx,
        )


def check_dtype(spec: TensorSpec, ctx: ErrCtx = _NO_CTX) -> None:
    """OM-02: the dtype must be in the allowlist (float64, bool, fp8, complex... are refused)."""
    if spec.dtype not in DTYPES:
        why = f"dtype {spec.dtype} is not allowed (allowed: {sorted(DTYPES)})"
        raise DtypeError(why, field=spec.name, **ctx)


# Host <-> CUDA copies on a comm thread go through pinned memory, asynchronously on the thread's
# stream. A pageable copy blocks inside the driver (D2H: until the copy is done, i.e. until the
# NCCL recv feeding it completes), and other threads' pageable copies queue behind it; under pp
# that is rank0's main thread (Stage 0 moving its inputs to the GPU) waiting for a result that
# needs the envelope it has not yet built: a deadlock until the NCCL timeout.


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`t` on `device`; a host tensor reaches a CUDA device by a pinned, stream-ordered copy."""
    if device.type != "cuda" or t.device.type != "cpu":
        return t.to(device=device)
    return t.contiguous().pin_memory().to(device=device, non_blocking=True)


def bytes_to_tensor(data: bytes, device: torch.device) -> torch.Tensor:
    """Bytes as a uint8 tensor on `device` (the wire form of the control frame and of the meta)."""
    # bytearray: torch.frombuffer wants a writable buffer; the copy is a few KB at most.
    return to_device(torch.frombuffer(bytearray(data), dtype=torch.uint8), device)


def tensor_to_bytes(buf: torch.Tensor) -> bytes:
    """A received uint8 buffer as bytes: one memcpy (no numpy, no per-element Python loop).

    From CUDA: into pinned memory on the current stream, then a wait on that stream alone.
    """
    buf = buf.detach().contiguous()
    if buf.device.type == "cuda":
        host = torch.empty(buf.shape, dtype=buf.dtype, pin_memory=True)
        host.copy_(buf, non_blocking=True)
        torch.cuda.current_stream(buf.device).synchronize()
    else:
        host = buf
    nbytes = host.numel() * host.element_size()
    return ctypes.string_at(host.data_ptr(), nbytes) if nbytes else b""


def _parse(data: bytes, ctx: ErrCtx) -> object:
    try:
        text = data.decode("ascii")
        return json.loads(
            text,
            parse_int=_parse_int,
            parse_float=_parse_float,
            parse_constant=_reject_constant,
            object_pairs_hook=_unique_keys,
        )
    except (
        ValueError,
        RecursionError,
    ) as exc:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise CodecError(f"meta is not valid canonical JSON: {str(exc)[:120]}", field="meta", **ctx) from None


def _parse_int(text: str) -> int:
    if len(text) > _MAX_INT_DIGITS:
        raise ValueError(f"integer literal of {len(text)} digits")
    return int(text)


def _parse_float(text: str) -> float:
    if len(text) > 64:
        raise ValueError(f"float literal of {len(text)} characters")
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"non-finite float {text[:20]}")
    return value


def _reject_constant(text: str) -> object:
    raise ValueError(f"{text} is not allowed")


def _unique_keys(pairs: list[tuple[str, object]]) -> dict[str, object]:
    out = dict(pairs)
    if len(out) != len(pairs):
        raise ValueError("duplicate key")
    return out


def _decode_fields(raw: object, schema: Schema, limits: Limits, ctx: ErrCtx) -> dict[str, object]:
    if not isinstance(raw, dict):
        raise SchemaError("'fields' must be an object", field="fields", **ctx)
    out: dict[str, object] = {}
    for name, value in raw.items():
        if name in schema.forbidden:
            raise SchemaError("field is forbidden on this message", field=name, **ctx)
        ftype = schema.scalars.get(name)
        if ftype is None:
            raise SchemaError("unknown field", field=name[:64], **ctx)
        if ftype is FieldType.FLOAT and type(value) is not float:
            raise SchemaError(f"expected float, got {type(value).__name__}", field=name, **ctx)
        try:
            out[name] = check_scalar(name, ftype, value, limits, ctx)
        except CodecError as exc:
            raise SchemaError(exc.reason, field=name, **ctx) from None
    return out


def _decode_specs(
    raw: object, schema: Schema, limits: Limits, n_tensors: int, ctx: ErrCtx
) -> tuple[TensorSpec, ...]:
    if not isinstance(raw, list):
        raise SchemaError("'tensors' must be a list", field="tensors", **ctx)
    if len(raw) != n_tensors:
        raise SchemaError(
            f"{len(raw)} tensor specs but the header says {n_tensors}", field="n_tensors", **ctx
        )
    specs: list[TensorSpec] = []
    for item in raw:
        if not (isinstance(item, list) and len(item) == 3 and type(item[0]) is str and type(item[1]) is str):
            raise SchemaError("a tensor spec must be [name, dtype, [dims]]", field="tensors", **ctx)
        name, dtype, shape = item
        if name in schema.forbidden:
            raise SchemaError("tensor is forbidden on this message", field=name, **ctx)
        if name not in schema.tensors:
            raise SchemaError("unknown tensor", field=name[:64], **ctx)
        if dtype not in DTYPES:
            raise DtypeError(f"dtype {dtype[:32]} is not allowed", field=name, **ctx)
        if not isinstance(shape, list) or len(shape) > limits.max_ndim:
            raise LimitError(f"shape must be a list of at most {limits.max_ndim} dims", field=name, **ctx)
        if any(type(d) is not int or d < 0 for d in shape):
            raise SchemaError("dims must be non-negative ints", field=name, **ctx)
        specs.append(TensorSpec(name, dtype, tuple(shape)))
    names = [s.name for s in specs]
    if names != sorted(set(names)):
        raise SchemaError(f"tensor specs must be sorted by name and unique: {names}", field="tensors", **ctx)
    return tuple(specs)
