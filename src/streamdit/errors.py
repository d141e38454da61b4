"""Exception types and process exit codes shared by every layer.

Owns: the error taxonomy of the crash-over-hang posture and the exit code each one maps to.
Must not import anything from streamdit (every layer imports this module).
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_BAD_INPUT = 2
EXIT_POISONED = 3
EXIT_ORPHANED = 4
EXIT_PEER_ABORT = 5
EXIT_PEER_LOST = 6
EXIT_INTERRUPTED = 130
# What each exit code means (README "Exit codes" repeats this table):
#   0   success, or a drain requested with SIGTERM (every decoded frame written)
#   1   an error on this rank (its message names the field and ids)
#   2   bad input, rejected before any model work
#   3   poisoned: an exception after a commitment point (a half-sent message)
#   4   orphaned: rank0, or the rendezvous store, went silent (killed, stopped or hung)
#   5   a peer aborted the stream and said why (ERROR action)
#   6   a peer other than rank0 stopped heartbeating (named; rank0's output holds every written chunk)
#   130 Ctrl-C: drained (first) or aborted (second)


def mark_hard_exit(exc: BaseException) -> BaseException:
    """`exc` leaves a process whose comm threads are still blocked inside the backend (a
    poisoned link): it must end with `os._exit` once its output is closed and its error logged,
    since C++ teardown at a normal exit meets those threads and aborts (SIGABRT, not the code)."""
    exc.streamdit_hard_exit = True  # type: ignore[attr-defined]
    return exc


def needs_hard_exit(exc: BaseException) -> bool:
    return bool(getattr(exc, "streamdit_hard_exit", False))


class StreamditError(Exception):
    """Base of every error streamdit raises on purpose."""

    exit_code: int = EXIT_FAILURE


class ConfigError(StreamditError):
    """Bad user input found before any model work (flags, geometry, timeline, files)."""

    exit_code = EXIT_BAD_INPUT


class CheckpointError(ConfigError):
    """A weight file whose keys or shapes do not match the model."""


class IdError(StreamditError):
    """An error that names the message field and the ids of the work it concerns.

    The ids go into the message text so that one log line is enough to find the failing
    chunk on every rank.
    """

    def __init__(
        self,
        reason: str,
        *,
        field: str | None = None,
        call_id: int | None = None,
        chunk_index: int | None = None,
        cache_epoch: int | None = None,
        group: str | None = None,
    ) -> None:
        self.reason = reason
        self.field = field
        self.call_id = call_id
        self.chunk_index = chunk_index
        self.cache_epoch = cache_epoch
        self.group = group
        ids = ", ".join(
            f"{k}={v}"
            for k, v in (
                ("field", field),
                ("call_id", call_id),
                ("chunk_index", chunk_index),
                ("cache_epoch", cache_epoch),
                ("group", group),
            )
            if v is not None
        )
        super().__init__(f"{reason} [{ids}]" if ids else reason)


class PlanError(IdError):
    """A phase plan that is inconsistent, or generator calls that do not match it."""


class ProtocolError(IdError):
    """A message that breaks the wire contract (see protocol/errors.py for subclasses)."""


class ParityError(StreamditError):
    """Startup parity keys or fingerprints differ across ranks."""


class CompileHealthError(ParityError):
    """After warm-up, compiled generators differ across ranks (C-03) or break too often (C-02)."""


class DriftError(IdError):
    """Ranks acted on different inputs or produced different outputs."""


class GroupError(IdError):
    """A collective issued on a group its caller may not use."""


class StaleResult(IdError):
    """A result from an older cache epoch (dropped, never decoded)."""


class OrphanedError(StreamditError):
    """A worker lost its coordinator (rank0) and exits with the orphan code."""

    exit_code = EXIT_ORPHANED


class PeerLost(StreamditError):
    """A peer other than rank0 stopped heartbeating (or never arrived): the stream cannot continue."""

    exit_code = EXIT_PEER_LOST


class PeerAbort(StreamditError):
    """A peer announced a failure with an ERROR action; this rank exits without computing."""

    exit_code = EXIT_PEER_ABORT


class Poisoned(StreamditError):
    """An exception after a commitment point: the process must exit, never continue."""

    exit_code = EXIT_POISONED
