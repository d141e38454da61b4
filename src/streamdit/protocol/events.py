"""What a channel reports and where a test may break it.

Owns: `ChannelEvent` (one protocol event with its ids; what the observer / flight recorder sees),
`Observer`, `ChannelFaults` (named, test-only fault points, passed in explicitly by the caller:
protocol code never reads the environment), `EVENT_NAMES`, `FAULT_POINTS`.
Must not import anything but the standard library.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

# Every event a channel emits, in the order one message produces them.
EVENT_NAMES = (
    "preflight_failed",  # sender: nothing was sent
    "commit",  # sender: the commitment line was logged; the header goes next
    "header_sent",
    "meta_sent",
    "message_sent",
    "poisoned",  # sender: exception after the commitment point; the process exits
    "header_received",
    "header_rejected",  # receiver: nothing allocated, channel broken
    "meta_received",
    "meta_rejected",  # receiver: no tensor allocated, channel broken
    "tensors_allocated",
    "message_received",  # receiver: validated; compute may start
    "message_rejected",  # receiver: fully consumed but invalid
    "transport_error",  # receiver: peer gone or timeout
)

# Where `ChannelFaults.raise_at` may break a send, all after the commitment point:
# after_header   - the control frame (header + inline meta) went out: the peer is blocked
# after_meta     - after the separate meta transfer, if any (else right after after_header)
# before_payload - just before the one payload transfer (only when the message has one)
FAULT_POINTS = ("after_header", "after_meta", "before_payload")


@dataclass(frozen=True, kw_only=True, slots=True)
class ChannelFaults:
    """Named test-only fault points. Production code passes none (the default: all inert)."""

    skip_sender_validation: bool = False
    """Skip step 1 of preflight so a test can prove the receiver rejects the message (OM-03)."""
    raise_at: str | None = None
    """Raise InjectedChannelFault at this point of `send`, after the commitment point."""

    def __post_init__(self) -> None:
        if self.raise_at is not None and self.raise_at not in FAULT_POINTS:
            raise ValueError(f"raise_at={self.raise_at!r} is not one of {FAULT_POINTS}")


NO_FAULTS = ChannelFaults()


@dataclass(frozen=True, slots=True)
class ChannelEvent:
    """One protocol event, with the ids of the message it concerns (None when unknown)."""

    name: str
    t_mono: float
    channel: str
    role: str
    group: str
    group_rank: int
    action: int | None = None
    kind: int | None = None
    call_id: int | None = None
    chunk_index: int | None = None
    cache_epoch: int | None = None
    detail: str = ""

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


Observer = Callable[[ChannelEvent], None]
