"""The fixed-length int64 header and the ids it carries.

Owns: `Action`, `Kind`, `Ids`, `Header` (pack / parse with every receiver-side check of
docs/protocol.md §3 that needs no meta), `IdTracker` (monotonicity per sender), `MAGIC`,
`PROTOCOL_VERSION`, `HEADER_LEN` and the field index table `HeaderField`.

Layout (int64 each, index = `HeaderField`):

    0 MAGIC  1 VERSION  2 KIND  3 ACTION  4 CALL_ID  5 CHUNK_INDEX  6 CACHE_EPOCH
    7 CONTROL_EPOCH  8 META_NBYTES  9 N_TENSORS  10 CHECKSUM

The checksum mixes fields 0..9, so a desynchronized stream (tensor bytes read as a header) or a
corrupted header is refused even when the magic happens to match. On the wire the values travel as
little-endian bytes at the start of the control frame (framing.py), not as an int64 tensor.
Must not import anything but torch, streamdit.errors and streamdit.protocol.{errors,codec}.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeVar

import torch

from streamdit.protocol.codec import Limits
from streamdit.protocol.errors import HeaderError, LimitError, MonotonicityError

MAGIC = 0x5344_4954_5752_4531  # b"SDITWRE1"
PROTOCOL_VERSION = 1
_MASK64 = (1 << 64) - 1
_E = TypeVar("_E", bound=enum.IntEnum)


class Action(enum.IntEnum):
    NOOP = 0
    INFER = 1
    SHUTDOWN = 2
    ERROR = 3


class Kind(enum.IntEnum):
    TP_ENVELOPE = 1
    PP_ENVELOPE = 2
    PP_RESULT = 3


class HeaderField(enum.IntEnum):
    MAGIC = 0
    VERSION = 1
    KIND = 2
    ACTION = 3
    CALL_ID = 4
    CHUNK_INDEX = 5
    CACHE_EPOCH = 6
    CONTROL_EPOCH = 7
    META_NBYTES = 8
    N_TENSORS = 9
    CHECKSUM = 10


HEADER_LEN = len(HeaderField)


@dataclass(frozen=True, slots=True)
class Ids:
    """Identity of one message and of the work it carries (docs/architecture.md, "Identity of work").

    The one id type of the codebase: the header carries it, every message exposes it, and the
    runtime tags each chunk's work, log lines and errors with it.
    """

    call_id: int
    chunk_index: int
    cache_epoch: int
    control_epoch: int = 0

    def ctx(self, group: str | None = None) -> dict[str, int | str | None]:
        """Keyword arguments for IdError: the ids every error message must carry."""
        return {
            "call_id": self.call_id,
            "chunk_index": self.chunk_index,
            "cache_epoch": self.cache_epoch,
            "group": group,
        }


def checksum(values: Sequence[int]) -> int:
    """FNV-1a style mix of the first 10 fields, folded into a non-negative int64."""
    acc = 0xCBF2_9CE4_8422_2325
    for v in values[: HeaderField.CHECKSUM]:
        acc = ((acc ^ (v & _MASK64)) * 0x100_0000_01B3) & _MASK64
    return acc >> 1


@dataclass(frozen=True, kw_only=True, slots=True)
class Header:
    kind: Kind
    action: Action
    ids: Ids
    meta_nbytes: int
    n_tensors: int

    def values(self) -> list[int]:
        v = [
            MAGIC,
            PROTOCOL_VERSION,
            int(self.kind),
            int(self.action),
            self.ids.call_id,
            self.ids.chunk_index,
            self.ids.cache_epoch,
            self.ids.control_epoch,
            self.meta_nbytes,
            self.n_tensors,
        ]
        return [*v, checksum(v)]

    def to_tensor(self, device: torch.device) -> torch.Tensor:
        return torch.tensor(self.values(), dtype=torch.int64, device=device)

    @classmethod
    def parse(cls, values: Sequence[int], limits: Limits, group: str | None = None) -> Header:
        """Check a received header in docs/protocol.md §3 order; raises HeaderError / LimitError."""
        if len(values) != HEADER_LEN:
            raise HeaderError(
                f"header has {len(values)} fields, expected {HEADER_LEN}",
                field="header",
                group=group,
            )
        f = HeaderField
        if values[f.MAGIC] != MAGIC:
            raise HeaderError(f"bad magic {values[f.MAGIC]:#x}", field="magic", group=group)
        if values[f.VERSION] != PROTOCOL_VERSION:
            raise HeaderError(
                f"unknown protocol_version {values[f.VERSION]} (this build: {PROTOCOL_VERSION})",
                field="protocol_version",
                group=group,
            )
        if values[f.CHECKSUM] != checksum(values):
            raise HeaderError(
                "header checksum mismatch (corrupt or desynchronized stream)",
                field="checksum",
                group=group,
            )
        ids = Ids(values[f.CALL_ID], values[f.CHUNK_INDEX], values[f.CACHE_EPOCH], values[f.CONTROL_EPOCH])
        ctx = ids.ctx(group)
        kind = _enum(Kind, values[f.KIND], "kind", ctx)
        action = _enum(Action, values[f.ACTION], "action", ctx)
        header = cls(
            kind=kind,
            action=action,
            ids=ids,
            meta_nbytes=values[f.META_NBYTES],
            n_tensors=values[f.N_TENSORS],
        )
        header.check(limits, group)
        return header

    def check(self, limits: Limits, group: str | None = None) -> None:
        """Id ranges and sizes; shared by the sender (preflight) and the receiver."""
        ctx = self.ids.ctx(group)
        check_ids(self.action, self.ids, group)
        if not 0 <= self.meta_nbytes <= limits.max_meta_bytes:
            raise LimitError(
                f"meta_nbytes {self.meta_nbytes} outside [0, {limits.max_meta_bytes}]",
                field="meta_nbytes",
                **ctx,
            )
        if not 0 <= self.n_tensors <= limits.max_tensors:
            raise LimitError(
                f"n_tensors {self.n_tensors} outside [0, {limits.max_tensors}]",
                field="n_tensors",
                **ctx,
            )
        if self.action in (Action.NOOP, Action.SHUTDOWN) and (self.meta_nbytes or self.n_tensors):
            raise HeaderError(f"{self.action.name} carries no payload", field="meta_nbytes", **ctx)
        if self.action is Action.ERROR and self.n_tensors:
            raise HeaderError("ERROR carries no tensors", field="n_tensors", **ctx)
        if self.action is Action.INFER and self.meta_nbytes == 0:
            raise HeaderError("INFER needs meta", field="meta_nbytes", **ctx)


def check_ids(action: Action, ids: Ids, group: str | None = None) -> None:
    """Id ranges: non-negative ids; chunk_index is -1 unless INFER, and >= 0 under INFER."""
    ctx = ids.ctx(group)
    for name in ("call_id", "cache_epoch", "control_epoch"):
        value = getattr(ids, name)
        if type(value) is not int or not 0 <= value < 2**63:
            raise HeaderError(f"{name} must be an int in [0, 2**63), got {value!r}", field=name, **ctx)
    ci = ids.chunk_index
    if type(ci) is not int or ci >= 2**63 or not (ci >= 0 if action is Action.INFER else ci == -1):
        want = ">= 0 under INFER" if action is Action.INFER else "-1 unless INFER"
        raise HeaderError(f"chunk_index {ids.chunk_index!r} must be {want}", field="chunk_index", **ctx)


def _enum(cls: type[_E], value: int, name: str, ctx: dict[str, int | str | None]) -> _E:
    try:
        return cls(value)
    except ValueError:
        raise HeaderError(f"unknown {name} {value}", field=name, **ctx) from None


class IdTracker:
    """Monotonicity of one sender's ids, kept by the sender (preflight) and by each receiver.

    Rules: `call_id` strictly increases across all actions; `chunk_index` strictly increases over
    INFER; `cache_epoch` and `control_epoch` never decrease.
    """

    def __init__(self) -> None:
        self.last: Ids | None = None
        self.last_chunk: int | None = None

    def check(self, action: Action, ids: Ids, group: str | None = None) -> None:
        ctx = ids.ctx(group)
        last = self.last
        if last is not None:
            if ids.call_id <= last.call_id:
                raise MonotonicityError(
                    f"call_id {ids.call_id} <= last {last.call_id}", field="call_id", **ctx
                )
            for name in ("cache_epoch", "control_epoch"):
                if getattr(ids, name) < getattr(last, name):
                    raise MonotonicityError(
                        f"{name} {getattr(ids, name)} < last {getattr(last, name)}",
                        field=name,
                        **ctx,
                    )
        if action is Action.INFER and self.last_chunk is not None and ids.chunk_index <= self.last_chunk:
            raise MonotonicityError(
                f"chunk_index {ids.chunk_index} <= last {self.last_chunk}",
                field="chunk_index",
                **ctx,
            )

    def advance(self, action: Action, ids: Ids) -> None:
        self.last = ids
        if action is Action.INFER:
            self.last_chunk = ids.chunk_index
