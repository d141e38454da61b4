"""Sender preflight: everything that can throw, done before the commitment point.

Owns: `prepare(msg, limits, device) -> Prepared`, steps 1-5 of docs/protocol.md §3 in that order:

1. validate the message object (schema version, required / forbidden fields, plan, id monotonicity)
2. build the tensor list, sorted by name; reject nested / non-top-level tensors
3. encode the meta (an unencodable value fails here at the latest: OM-01)
4. check every dtype against the allowlist (OM-02) and every size against the limits
5. materialize every tensor (target device, contiguous), then the wire buffers of framing.py:
   the control frame (header + inline meta), the separate meta buffer when the meta does not fit
   inline, and the payload (every non-empty tensor packed into one buffer; the tensor's own byte
   view when only one is non-empty)

A `Prepared` is inert data: sending it (step 6, in channel.py) can fail only in the transport, and
a failure anywhere in here (packing included) happens before anything was sent.
Must not import anything but torch, streamdit.errors and streamdit.protocol.*.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from streamdit.protocol.codec import (
    Limits,
    TensorSpec,
    bytes_to_tensor,
    check_specs,
    encode_meta,
    to_device,
)
from streamdit.protocol.errors import EnvelopeError, LimitError
from streamdit.protocol.framing import PayloadLayout, pack_control, pack_payload, payload_layout
from streamdit.protocol.header import Action, Header, IdTracker, check_ids
from streamdit.protocol.messages import MESSAGE_TYPES, Message, require_dense


@dataclass(frozen=True, kw_only=True, slots=True)
class Prepared:
    """A validated, encoded, materialized message and its wire buffers (at most 3 transfers)."""

    message: Message
    header: Header
    meta: bytes
    specs: tuple[TensorSpec, ...]
    tensors: tuple[torch.Tensor, ...]  # materialized: on the channel device, contiguous
    layout: PayloadLayout
    control: torch.Tensor  # uint8 control frame: header, then the meta when it fits inline
    meta_tensor: torch.Tensor | None  # the meta as its own transfer; None when inline or empty
    payload: torch.Tensor | None  # uint8, layout.nbytes; None when no tensor has bytes

    @property
    def wire(self) -> tuple[torch.Tensor, ...]:
        """The transfers, in order."""
        parts = (self.control, self.meta_tensor, self.payload)
        return tuple(t for t in parts if t is not None)

    @property
    def total_bytes(self) -> int:
        return sum(s.nbytes for s in self.specs)

    def summary(self) -> str:
        """Manifest for the commitment log line: n_specs, shapes, dtypes."""
        specs = ", ".join(f"{s.name}:{s.dtype}{list(s.shape)}" for s in self.specs)
        where = "separate" if self.meta_tensor is not None else "inline"
        return (
            f"meta={len(self.meta)}B({where}) tensors={len(self.specs)} [{specs}] "
            f"total={self.total_bytes}B payload={self.layout.nbytes}B transfers={len(self.wire)}"
        )


def prepare(
    msg: Message,
    limits: Limits,
    device: torch.device,
    *,
    tracker: IdTracker | None = None,
    group: str | None = None,
    skip_validation: bool = False,
) -> Prepared:
    """Steps 1-5 of docs/protocol.md §3. Raises only ProtocolError subclasses; sends nothing.

    `skip_validation` is a test hook (OM-03, second half): it skips step 1's message rules so a
    test can prove the *receiver* rejects an inconsistent plan. Steps 2-5 always run.
    """
    if type(msg) not in MESSAGE_TYPES.values():
        raise EnvelopeError(f"{type(msg).__name__} is not a protocol message", field="message", group=group)
    ctx = msg.ids.ctx(group)
    if not isinstance(msg.action, Action):  # framing checks are never skipped, even by the hook
        raise EnvelopeError(f"action {msg.action!r} is not an Action", field="action", **ctx)
    check_ids(msg.action, msg.ids, group)
    if not skip_validation:
        msg.validate(group)  # step 1
    if tracker is not None:
        tracker.check(msg.action, msg.ids, group)
    named = msg.tensor_fields()  # step 2: top-level fields only, sorted by name
    for name, value in named.items():
        require_dense(name, value, ctx)
    specs = tuple(TensorSpec.of(name, t) for name, t in named.items())  # type: ignore[arg-type]
    has_meta = msg.action is Action.INFER or (msg.action is Action.ERROR and msg.reason is not None)
    meta = encode_meta(msg.scalars(), specs, msg.SCHEMA, limits, ctx) if has_meta else b""  # step 3
    check_specs(specs, limits, ctx)  # step 4
    if len(meta) > limits.max_meta_bytes:
        raise LimitError(f"meta is {len(meta)} bytes > {limits.max_meta_bytes}", field="meta_nbytes", **ctx)
    header = Header(
        kind=msg.KIND, action=msg.action, ids=msg.ids, meta_nbytes=len(meta), n_tensors=len(specs)
    )
    header.check(limits, group)
    tensors = tuple(to_device(t, device).contiguous() for t in named.values())  # type: ignore[arg-type]  # step 5
    layout = payload_layout(specs)
    inline = len(meta) <= limits.inline_meta_bytes
    return Prepared(
        message=msg,
        header=header,
        meta=meta,
        specs=specs,
        tensors=tensors,
        layout=layout,
        control=bytes_to_tensor(pack_control(header.values(), meta, limits), device),
        meta_tensor=None if inline else bytes_to_tensor(meta, device),
        payload=pack_payload(tensors, layout),
    )
