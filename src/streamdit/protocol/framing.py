"""Wire layout of one message: the control frame and the packed payload, as pure functions.

Owns: the control frame (`control_nbytes`, `CONTROL_BYTES`, `HEADER_BYTES`, `pack_control`,
`parse_header`, `inline_meta`) and the payload (`ALIGN`, `PayloadLayout`, `payload_layout`,
`pack_payload`, `unpack_payload`, `alloc_payload`, `byte_view`). No transport, no events: the
channel decides when each function runs and what a failure means.

Control frame: `uint8[control_nbytes(limits)]`, `HEADER_LEN * 8 + limits.inline_meta_bytes` bytes
(`CONTROL_BYTES` = 4096 with the default Limits)::

    0                     88                      88 + meta_nbytes               control_nbytes
    | header: 11 x int64, | meta bytes, when      | zero ...                              |
    | little-endian       | meta_nbytes <= inline |                                       |

The receiver allocates the frame from its own Limits (never from received data), checks the header
part first (header.py), then `inline_meta` returns the meta from the same frame, or None when
`meta_nbytes > inline_meta_bytes`: then the whole meta area is zero and the meta follows as its own
transfer of exactly `meta_nbytes` bytes (<= max_meta_bytes, checked from the header). Every byte
after the meta must be zero; anything else is a desynchronized stream or a corrupt frame.

Payload: one `uint8[layout.nbytes]` transfer (none when 0). The non-empty tensors, in spec order
(sorted by name), each start at an offset aligned to `ALIGN` = 64 bytes; `nbytes` is the end of the
last one (no trailing pad); the gaps are zero; empty tensors have no bytes. Both sides derive the
layout from the specs alone: the sender from what it encoded, the receiver from the meta after it
was validated, so the receiver allocates one flat buffer and every tensor is a view of it,
`flat[off:off + n].view(dtype).view(shape)`. Rule for one non-empty tensor: its bytes at offset 0
are the whole payload, so the sender sends that tensor's byte view with no pack copy, and the
receiver's flat buffer is exactly that tensor (the same layout rule, no special case on the wire).
Must not import anything but torch, streamdit.errors and streamdit.protocol.*.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from streamdit.protocol.codec import DTYPES, Limits, TensorSpec
from streamdit.protocol.errors import HeaderError
from streamdit.protocol.header import HEADER_LEN, Header

_HEADER = struct.Struct(f"<{HEADER_LEN}q")
HEADER_BYTES = _HEADER.size  # 88
ALIGN = 64  # payload offsets: enough for any dtype view and for vectorized device copies


def control_nbytes(limits: Limits) -> int:
    """Size of the control frame: the header plus the inline meta capacity."""
    return HEADER_BYTES + limits.inline_meta_bytes


CONTROL_BYTES = control_nbytes(Limits())


# ---- control frame ------------------------------------------------------------------------------


def pack_control(values: Sequence[int], meta: bytes, limits: Limits) -> bytes:
    """The control frame for header `values` (int64 each); `meta` goes inline when it fits."""
    frame = bytearray(control_nbytes(limits))
    _HEADER.pack_into(frame, 0, *values)
    if len(meta) <= limits.inline_meta_bytes:
        frame[HEADER_BYTES : HEADER_BYTES + len(meta)] = meta
    return bytes(frame)


def parse_header(frame: bytes, limits: Limits, group: str | None = None) -> Header:
    """The header part of a received frame, with every check of `Header.parse` (nothing allocated)."""
    if len(frame) != control_nbytes(limits):
        raise HeaderError(
            f"control frame has {len(frame)} bytes, expected {control_nbytes(limits)}",
            field="header",
            group=group,
        )
    return Header.parse(list(_HEADER.unpack_from(frame, 0)), limits, group)


def inline_meta(frame: bytes, header: Header, limits: Limits, group: str | None = None) -> bytes | None:
    """The meta carried in the frame (b"" when none), or None when it follows as its own transfer.

    Raises HeaderError (field `control_padding`) when any byte after the meta is not zero.
    """
    n = header.meta_nbytes
    inline = n <= limits.inline_meta_bytes
    end = HEADER_BYTES + (n if inline else 0)
    if len(frame.rstrip(b"\0")) > end:
        raise HeaderError(
            "non-zero bytes after the meta in the control frame (corrupt or desynchronized stream)",
            field="control_padding",
            **header.ids.ctx(group),
        )
    return frame[HEADER_BYTES:end] if inline else None


# ---- payload ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PayloadLayout:
    """Where each spec's bytes lie in the one payload transfer (`nbytes` 0: no transfer)."""

    offsets: tuple[int, ...]  # per spec, in spec order; 0 for an empty tensor
    sizes: tuple[int, ...]  # per spec: its byte count
    nbytes: int
    direct: int | None  # index of the only non-empty tensor: its byte view is the whole payload


def payload_layout(specs: Sequence[TensorSpec]) -> PayloadLayout:
    """The layout rule of the module docstring; pure arithmetic on (already checked) specs."""
    offsets: list[int] = []
    sizes: list[int] = []
    filled: list[int] = []
    end = 0
    for i, spec in enumerate(specs):
        n = spec.nbytes
        off = -(-end // ALIGN) * ALIGN if n else 0
        offsets.append(off)
        sizes.append(n)
        if n:
            filled.append(i)
            end = off + n
    return PayloadLayout(tuple(offsets), tuple(sizes), end, filled[0] if len(filled) == 1 else None)


def byte_view(t: torch.Tensor) -> torch.Tensor:
    """A contiguous tensor's bytes as uint8 (same storage): transports never see its dtype."""
    return t.reshape(-1).view(torch.uint8)


def pack_payload(tensors: Sequence[torch.Tensor], layout: PayloadLayout) -> torch.Tensor | None:
    """Sender: the payload (contiguous tensors on one device, in spec order), or None when empty.

    One non-empty tensor: its byte view, no copy. Otherwise one new buffer, filled by one `cat`.
    """
    if len(tensors) != len(layout.sizes):
        raise ValueError(f"{len(tensors)} tensors for a layout of {len(layout.sizes)}")
    for t, n in zip(tensors, layout.sizes, strict=True):
        if t.numel() * t.element_size() != n:
            raise ValueError(f"tensor of {t.numel() * t.element_size()} bytes where the spec says {n}")
    if layout.nbytes == 0:
        return None
    if layout.direct is not None:
        return byte_view(tensors[layout.direct])
    pieces: list[torch.Tensor] = []
    end = 0
    for t, off, n in zip(tensors, layout.offsets, layout.sizes, strict=True):
        if not n:
            continue
        if off > end:
            pieces.append(t.new_zeros(off - end, dtype=torch.uint8))
        pieces.append(byte_view(t))
        end = off + n
    return torch.cat(pieces)


def unpack_payload(
    flat: torch.Tensor | None, specs: Sequence[TensorSpec], layout: PayloadLayout, device: torch.device
) -> dict[str, torch.Tensor]:
    """Receiver: every tensor as a view of `flat` (empty ones allocated apart), by spec name."""
    have = 0 if flat is None else flat.numel()
    if have != layout.nbytes or (flat is not None and flat.dtype != torch.uint8):
        raise ValueError(f"payload buffer of {have} bytes for a layout of {layout.nbytes}")
    out: dict[str, torch.Tensor] = {}
    for spec, off, n in zip(specs, layout.offsets, layout.sizes, strict=True):
        dtype = DTYPES[spec.dtype]
        if n == 0 or flat is None:
            out[spec.name] = torch.empty(spec.shape, dtype=dtype, device=device)
        else:
            out[spec.name] = flat[off : off + n].view(dtype).view(spec.shape)
    return out


def alloc_payload(
    specs: Sequence[TensorSpec], layout: PayloadLayout, device: torch.device
) -> tuple[torch.Tensor | None, dict[str, torch.Tensor]]:
    """Receiver: the one flat buffer to receive into (None: no transfer) and the tensors over it."""
    flat = torch.empty(layout.nbytes, dtype=torch.uint8, device=device) if layout.nbytes else None
    return flat, unpack_payload(flat, specs, layout, device)
