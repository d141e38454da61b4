"""Channels over torch.distributed: one framing path, two transports, one owner thread.

Owns: `BroadcastChannel(group, src)` (TP: rank0 -> workers; PP1: leader -> mesh) and
`P2PChannel(group, peer)` (PP: rank0 <-> leader, both directions). Events and fault points are
in events.py; `__all__` re-exports them.
Must not import anything but torch, streamdit.errors and streamdit.protocol.*; never pickle.

Message layout on the wire (framing.py owns the bytes): at most two transfers, three when the meta
is longer than the control frame's inline capacity::

    +------------------------------------------+  +--------------------------+  +------------------+
    | control frame uint8[88 + inline_meta]    |  | meta uint8[meta_nbytes]  |  | payload          |
    | (4096 B by default, size fixed by Limits)|  | ONLY when meta_nbytes >  |  | uint8[nbytes]:   |
    |  header int64[11] little-endian: magic   |  | inline_meta_bytes (the   |  | non-empty tensors|
    |   version kind action call_id chunk_index|  | frame's meta area is     |  | in spec order at |
    |   cache_epoch control_epoch meta_nbytes  |  | then all zero)           |  | 64 B aligned     |
    |   n_tensors checksum                     |  +--------------------------+  | offsets; absent  |
    |  meta (canonical JSON: fields + specs    |                                | if nbytes == 0;  |
    |   [name,dtype,shape] sorted by name),    |                                | one non-empty    |
    |   when meta_nbytes <= inline_meta_bytes  |                                | tensor = its own |
    |  zero padding (checked by the receiver)  |                                | bytes, no pack   |
    +------------------------------------------+                                +------------------+

Sender states (`send`)::

    state        | what happens                                  | on exception
    -------------+-----------------------------------------------+-------------------------------
    PREFLIGHT    | prepare(): validate, specs, encode, dtypes,   | raise ProtocolError; nothing
                 | limits, materialize, build the control frame, | was sent: the peer is free
                 | pack the payload (docs/protocol.md §3 steps 1-5)   |
    COMMIT       | log the commitment line (rank, role, group,   | -
                 | ids, manifest), event "commit"                |
    HEADER_SENT  | control frame transferred: the peer is now    | POISON: log, event "poisoned",
                 | blocked. Fault point "after_header"           | exit(EXIT_POISONED). Never
    META_SENT    | separate meta transferred if any (event       | continue half-sent. (An ERROR,
                 | "meta_sent" either way). Fault "after_meta"   | a failing sender's last word:
    PAYLOAD      | fault "before_payload" (only when a payload   | raise Poisoned, no exit: the
                 | follows), then the one payload transfer       | sender keeps its own code.)
    SENT         | event "message_sent"                          |

Receiver states (`recv`)::

    state        | what happens                                  | on exception
    -------------+-----------------------------------------------+-------------------------------
    WAIT_HEADER  | blocked on the fixed-size control frame       | TransportError; channel broken
                 | (PG timeout bounds it); one device->host copy |
    HEADER_OK    | magic, version, checksum, kind, action, ids,  | HeaderError / LimitError /
                 | monotonicity, size limits, zero padding.      | MonotonicityError; broken
                 | Nothing allocated.                            |
    META_OK      | meta taken from the frame, or received apart  | CodecError / SchemaError /
                 | (meta_nbytes <= max_meta_bytes), decoded,     | EnvelopeError ...; broken
                 | schema- and plan-checked from specs alone     |
    ALLOCATED    | payload layout from the specs, one flat buffer| TransportError; broken
                 | allocated, tensors are views of it; received  |
    VALID        | message rebuilt and validated again           | EnvelopeError; framing intact
                 | -> returned; only then may compute start      |

Received tensors of one message share the flat buffer's storage (views at their offsets): keeping
any of them alive keeps the whole payload buffer alive.
"Broken" means framing sync is lost (bytes of the rejected message may still be in flight), so every
later call on the channel raises `ChannelBroken` at once. Timeouts are the process group's: this
module adds no waiting of its own, and a peer that dies surfaces as a TransportError.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist

from streamdit.errors import EXIT_POISONED, Poisoned, ProtocolError
from streamdit.protocol.codec import Limits, decode_meta, tensor_to_bytes
from streamdit.protocol.errors import (
    ChannelBroken,
    HeaderError,
    InjectedChannelFault,
    OwnershipError,
    TransportError,
)
from streamdit.protocol.events import NO_FAULTS, ChannelEvent, ChannelFaults, Observer
from streamdit.protocol.framing import (
    alloc_payload,
    control_nbytes,
    inline_meta,
    parse_header,
    payload_layout,
)
from streamdit.protocol.header import Action, Header, IdTracker, Kind
from streamdit.protocol.messages import MESSAGE_TYPES, Message
from streamdit.protocol.preflight import Prepared, prepare

log = logging.getLogger(__name__)

__all__ = ["BroadcastChannel", "ChannelEvent", "ChannelFaults", "Observer", "P2PChannel"]


class _Channel:
    """Framing, ownership, observer and poison logic shared by both transports."""

    transport = "?"

    def __init__(
        self,
        group: dist.ProcessGroup,
        *,
        device: torch.device | str = "cpu",
        limits: Limits | None = None,
        role: str = "?",
        group_name: str = "?",
        kinds: frozenset[Kind] | None = None,
        observer: Observer | None = None,
        faults: ChannelFaults = NO_FAULTS,
        exit_fn: Callable[[int], object] = os._exit,
    ) -> None:
        if group is None or group is dist.GroupMember.NON_GROUP_MEMBER:
            raise OwnershipError(
                "a channel needs an explicit group this rank belongs to",
                field="group",
                group=group_name,
            )
        self.group = group
        self.group_rank = group.rank()
        self.device = torch.device(device)
        self.limits = limits or Limits()
        self.role = role
        self.group_name = group_name
        self.kinds = kinds if kinds is not None else frozenset(Kind)
        self._observer = observer
        self._faults = faults
        self._exit_fn = exit_fn
        self._sent = IdTracker()  # ids this rank sent (preflight monotonicity)
        self._seen = IdTracker()  # ids this rank received (header monotonicity)
        self._owner: int | None = None
        self._claim = threading.Lock()
        self._busy = threading.Lock()
        self._broken: str | None = None

    # ---- transport primitives (subclasses) ------------------------------------------------

    def _put(self, t: torch.Tensor) -> None:
        raise NotImplementedError

    def _get(self, t: torch.Tensor) -> None:
        raise NotImplementedError

    # ---- send -------------------------------------------------------------------------------

    def _send(self, msg: Message) -> None:
        with self._owned("send"):
            try:
                prep = prepare(
                    msg,
                    self.limits,
                    self.device,
                    tracker=self._sent,
                    group=self.group_name,
                    skip_validation=self._faults.skip_sender_validation,
                )
            except ProtocolError as exc:
                self._emit("preflight_failed", None, detail=f"{type(exc).__name__}: {exc}", msg=msg)
                raise
            self._commit(prep)

    def _commit(self, prep: Prepared) -> None:
        h = prep.header
        log.info("commit %s %s", self._where(h), prep.summary())
        self._emit("commit", h, detail=prep.summary())
        self._sent.advance(h.action, h.ids)
        try:
            self._put(prep.control)
            self._emit("header_sent", h)
            self._fault("after_header")
            if prep.meta_tensor is not None:
                self._put(prep.meta_tensor)
            if h.meta_nbytes:
                self._emit("meta_sent", h, detail="inline" if prep.meta_tensor is None else "separate")
            self._fault("after_meta")
            if prep.payload is not None:
                self._fault("before_payload")
                self._put(prep.payload)
            self._emit("message_sent", h, detail=f"{len(prep.wire)} transfers")
        except BaseException as exc:  # after the commitment point nothing may propagate normally
            self._poison(exc, h)

    def _where(self, h: Header) -> str:
        """The ids every commitment-point log line carries."""
        i = h.ids
        return (
            f"rank={self.group_rank} role={self.role} group={self.group_name} "
            f"call_id={i.call_id} chunk_index={i.chunk_index} cache_epoch={i.cache_epoch} "
            f"control_epoch={i.control_epoch} action={h.action.name} kind={h.kind.name}"
        )

    def _fault(self, point: str) -> None:
        if self._faults.raise_at == point:
            raise InjectedChannelFault(f"injected fault at {point}")

    def _poison(self, exc: BaseException, h: Header) -> None:
        text = f"POISONED after commitment point: {self._where(h)}: {type(exc).__name__}: {exc}"
        log.critical(text)  # the error is named; a dead peer's raw traceback would only be noise
        log.debug("poisoned send", exc_info=exc)
        self._broken = "poisoned"
        self._emit("poisoned", h, detail=f"{type(exc).__name__}: {exc}")
        if h.action is not Action.ERROR:
            self._exit_fn(EXIT_POISONED)
        # an ERROR is the sender's last word (it is failing already, with its own error and
        # code): the channel is broken, and the caller exits with that error instead
        raise Poisoned(text) from exc  # reached only when exit_fn returns (unit tests) or for ERROR

    # ---- receive ------------------------------------------------------------------------------

    def _recv(self) -> Message:
        with self._owned("recv"):
            raw = torch.empty(control_nbytes(self.limits), dtype=torch.uint8, device=self.device)
            self._transfer_in(raw, None, "header")
            frame = tensor_to_bytes(raw)  # the one device -> host copy of a message's framing
            try:
                header = parse_header(frame, self.limits, self.group_name)
                if header.kind not in self.kinds:
                    raise HeaderError(
                        f"kind {header.kind.name} not accepted here",
                        field="kind",
                        **header.ids.ctx(self.group_name),
                    )
                self._seen.check(header.action, header.ids, self.group_name)
                meta = inline_meta(frame, header, self.limits, self.group_name)
            except ProtocolError as exc:
                self._mark_rejected("header_rejected", exc, None)
                raise
            self._seen.advance(header.action, header.ids)
            self._emit(
                "header_received",
                header,
                detail=f"meta={header.meta_nbytes}B n_tensors={header.n_tensors}",
            )
            return self._recv_body(header, meta)

    def _recv_body(self, header: Header, data: bytes | None) -> Message:
        """`data`: the inline meta from the control frame, or None when it follows apart."""
        cls = MESSAGE_TYPES[header.kind]
        ctx = header.ids.ctx(self.group_name)
        fields: dict[str, object] = {}
        specs: tuple = ()
        if header.meta_nbytes:
            where = "inline"
            if data is None:
                where = "separate"
                buf = torch.empty(header.meta_nbytes, dtype=torch.uint8, device=self.device)  # <= max_meta
                self._transfer_in(buf, header, "meta")
                data = tensor_to_bytes(buf)
            try:
                meta = decode_meta(data, cls.SCHEMA, self.limits, n_tensors=header.n_tensors, ctx=ctx)
                cls.check_payload(header.action, meta.fields, {s.name: s for s in meta.specs}, ctx)
            except ProtocolError as exc:
                self._mark_rejected("meta_rejected", exc, header)
                raise
            fields, specs = dict(meta.fields), meta.specs
            self._emit("meta_received", header, detail=where)
        layout = payload_layout(specs)  # from validated specs only: bounded by the limits
        flat, tensors = alloc_payload(specs, layout, self.device)
        self._emit("tensors_allocated", header, detail=f"{layout.nbytes}B")
        if flat is not None:
            self._transfer_in(flat, header, "payload")
        msg = cls.from_wire(header.action, header.ids, fields, tensors)
        try:
            msg.validate(self.group_name)
        except ProtocolError as exc:  # the whole message was consumed: framing stays in sync
            self._emit("message_rejected", header, detail=f"{type(exc).__name__}: {exc}")
            raise
        self._emit("message_received", header)
        return msg

    def _transfer_in(self, t: torch.Tensor, header: Header | None, part: str) -> None:
        try:
            self._get(t)
        except Exception as exc:  # peer gone, PG timeout, backend error
            ctx = header.ids.ctx(self.group_name) if header else {"group": self.group_name}
            self._broken = f"transport failed receiving {part}"
            self._emit("transport_error", header, detail=f"{part}: {type(exc).__name__}: {exc}")
            raise TransportError(
                f"receiving {part} failed: {type(exc).__name__}: {exc}", field=part, **ctx
            ) from exc

    def _mark_rejected(self, event: str, exc: ProtocolError, header: Header | None) -> None:
        # Bytes of the rejected message may still be on their way: framing sync is lost.
        self._broken = f"{event}: {type(exc).__name__}"
        self._emit(event, header, detail=f"{type(exc).__name__}: {exc}")

    # ---- ownership, observer ------------------------------------------------------------------

    @contextmanager
    def _owned(self, op: str) -> Iterator[None]:
        me = threading.get_ident()
        with self._claim:
            if self._owner is None:
                self._owner = me  # the first thread to use the channel owns it for good
        if self._owner != me:
            raise OwnershipError(
                f"{op} from thread {threading.current_thread().name}; "
                f"the channel is owned by thread id {self._owner}",
                field="thread",
                group=self.group_name,
            )
        if self._broken is not None:
            raise ChannelBroken(
                f"channel unusable after an earlier failure ({self._broken})", group=self.group_name
            )
        if not self._busy.acquire(blocking=False):
            raise OwnershipError(f"re-entrant {op} on a busy channel", field="thread", group=self.group_name)
        try:
            yield
        finally:
            self._busy.release()

    @property
    def broken(self) -> str | None:
        return self._broken

    def _emit(self, name: str, h: Header | None, *, detail: str = "", msg: Message | None = None) -> None:
        if self._observer is None:
            return
        if h is None and not isinstance(msg, Message):
            msg = None
        src = h.ids if h is not None else (msg.ids if msg is not None else None)
        action = h.action if h is not None else getattr(msg, "action", None)
        kind = h.kind if h is not None else getattr(msg, "KIND", None)
        event = ChannelEvent(
            name=name,
            t_mono=time.monotonic(),
            channel=self.transport,
            role=self.role,
            group=self.group_name,
            group_rank=self.group_rank,
            action=None if action is None else int(action),
            kind=None if kind is None else int(kind),
            call_id=src.call_id if src else None,
            chunk_index=src.chunk_index if src else None,
            cache_epoch=src.cache_epoch if src else None,
            detail=detail,
        )
        try:
            self._observer(event)
        except Exception:  # an observer never changes protocol behaviour
            log.exception("channel observer failed on %s", name)


class BroadcastChannel(_Channel):
    """One sender (`src`, a rank *within* `group`) broadcasts whole messages to all others."""

    transport = "broadcast"

    def __init__(self, group: dist.ProcessGroup, src: int, **kwargs: object) -> None:
        super().__init__(group, **kwargs)  # type: ignore[arg-type]
        if not 0 <= src < group.size():
            raise OwnershipError(f"src {src} is not a rank of a group of {group.size()}", field="src")
        self.src = src

    def send(self, msg: Message) -> None:
        if self.group_rank != self.src:
            raise OwnershipError(f"group rank {self.group_rank} is not the src {self.src}", field="src")
        self._send(msg)

    def recv(self) -> Message:
        if self.group_rank == self.src:
            raise OwnershipError("the src of a broadcast cannot receive on it", field="src")
        return self._recv()

    def _put(self, t: torch.Tensor) -> None:
        dist.broadcast(t, group=self.group, group_src=self.src)

    _get = _put


class P2PChannel(_Channel):
    """Point-to-point with one `peer` (a rank within `group`), both directions, one owner thread."""

    transport = "p2p"

    def __init__(self, group: dist.ProcessGroup, peer: int, **kwargs: object) -> None:
        super().__init__(group, **kwargs)  # type: ignore[arg-type]
        if not 0 <= peer < group.size() or peer == self.group_rank:
            raise OwnershipError(
                f"peer {peer} is not another rank of a group of {group.size()}", field="peer"
            )
        self.peer = peer

    def send(self, msg: Message) -> None:
        self._send(msg)

    def recv(self) -> Message:
        return self._recv()

    def _put(self, t: torch.Tensor) -> None:
        dist.send(t, group=self.group, group_dst=self.peer)

    def _get(self, t: torch.Tensor) -> None:
        dist.recv(t, group=self.group, group_src=self.peer)
