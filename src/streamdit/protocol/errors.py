"""Typed protocol errors: every way a message can break the wire contract.

Owns: the subclasses of `streamdit.errors.ProtocolError` (which carries `field`, `call_id`,
`chunk_index`, `cache_epoch`, `group` in its message text) and the test-only `InjectedChannelFault`.
Must not import anything but `streamdit.errors`: every protocol module imports this one.
"""

from __future__ import annotations

from streamdit.errors import PlanError, ProtocolError


class HeaderError(ProtocolError):
    """Bad magic, unknown protocol version / action / kind, inconsistent counts, bad checksum."""


class CodecError(ProtocolError):
    """Meta bytes that cannot be encoded (sender, OM-01) or decoded (receiver, untrusted bytes)."""


class SchemaError(CodecError):
    """Meta that decodes but breaks the schema: unknown field, wrong type, bad or unsorted spec."""


class EnvelopeError(ProtocolError):
    """A message object that breaks a rule of docs/protocol.md §4 (required / forbidden / geometry)."""


class PlanMismatchError(EnvelopeError, PlanError):
    """An inconsistent phase plan (OM-03, OM-10): both a ProtocolError and a PlanError."""


class DtypeError(ProtocolError):
    """A tensor dtype outside the allowed set (OM-02)."""


class LimitError(ProtocolError):
    """A size beyond the configured limits, found before anything of that size is allocated."""


class MonotonicityError(ProtocolError):
    """`call_id`, `chunk_index`, `cache_epoch` or `control_epoch` went backwards."""


class OwnershipError(ProtocolError):
    """A channel used from a thread that does not own it, or in a role it does not have."""


class TransportError(ProtocolError):
    """The transport failed (peer gone, timeout) while this rank waited for or sent bytes."""


class ChannelBroken(ProtocolError):
    """The channel lost framing sync earlier; every later call fails at once."""


class InjectedChannelFault(RuntimeError):
    """Raised at a named fault point of a channel (tests only; see `channel.ChannelFaults`)."""
