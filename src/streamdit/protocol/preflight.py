"""Sender preflight: everything that can throw, done before the commitment point.

Owns: `prepare(msg, limits, device) -> Prepared`, steps 1-5 of protocol.md §3 in that order:

1. validate the message object (schema version, required / forbidden fields, plan, id monotonicity)
2. build the tensor list, sorted by name; reject nested / non-top-level tensors
3. encode the meta (an unencodable value fails here at the latest: OM-01)
4. check every dtype against the allowlist (OM-02) and every size against the limits
5. materialize every tensor (target device, contiguous) plus the header and meta buffers

A `Prepared` is inert data: sending it (step 6, in channel.py) can fail only in the transport.
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
)
from streamdit.protocol.errors import EnvelopeError, LimitError
from streamdit.protocol.header import Action, Header, IdTracker, check_ids
from streamdit.protocol.messages import MESSAGE_TYPES, Message, require_dense


@dataclass(frozen=True, kw_only=True, slots=True)
class Prepared:
    """A validated, encoded, materialized message: header, meta and tensors ready to send."""

    message: Message
    header: Header
    header_tensor: torch.Tensor
    meta: bytes
    meta_tensor: torch.Tensor | None
    specs: tuple[TensorSpec, ...]
    tensors: tuple[torch.Tensor, ...]

    @property
    def total_bytes(self) -> int:
        return sum(s.nbytes for s in self.specs)

    def summary(self) -> str:
        """Manifest for the commitment log line: n_specs, shapes, dtypes."""
        specs = ", ".join(f"{s.name}:{s.dtype}{list(s.shape)}" for s in self.specs)
        return f"meta={len(self.meta)}B tensors={len(self.specs)} [{specs}] total={self.total_bytes}B"


def prepare(
    msg: Message,
    limits: Limits,
    device: torch.device,
    *,
    tracker: IdTracker | None = None,
    group: str | None = None,
    skip_validation: bool = False,
) -> Prepared:
    """Steps 1-5 of protocol.md §3. Raises only ProtocolError subclasses; sends nothing.

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
    tensors = tuple(t.to(device=device).contiguous() for t in named.values())  # type: ignore[union-attr]  # step 5
    meta_tensor = bytes_to_tensor(meta, device) if meta else None
    return Prepared(
        message=msg,
        header=header,
        header_tensor=header.to_tensor(device),
        meta=meta,
        meta_tensor=meta_tensor,
        specs=specs,
        tensors=tensors,
    )
