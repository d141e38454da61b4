"""Stage 1 of the `pp` topology: the generator mesh (global ranks 1..N-1, `mesh_pg`).

Owns: `MeshLeader` (global rank 1: receive an envelope from rank0 on the world group,
re-broadcast it to the mesh on `mesh_pg`, run its Phase B shard, send the result back on the
`link` group), a `Relay` around the one Phase B loop (`PhaseB.serve`); mesh peers serve the
broadcast with that same loop and no relay. Every Phase B collective runs on `mesh_pg`, named
"mesh" (the wrappers refuse any other group, OM-08).

Anti-stranding (docs/protocol.md §3, OM-07): the leader validates a whole envelope (the channel does,
from the meta alone, before allocating) before it re-broadcasts anything. An envelope it must
reject becomes a terminal ERROR broadcast to the mesh — peers exit cleanly with the peer-abort
code, never having seen a payload header — and an ERROR result tells rank0. A failure inside
Phase B on the leader is sent to rank0 as an ERROR result as well (rank0 could not see it),
unless a mesh peer went silent: then the watchdog's verdict names that peer on every rank.
The leader measures `stage1_ms` (envelope in hand to result ready) and `mesh_idle_ms` (result
sent to next envelope in hand) on its own clock and reports both in the result.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import torch

from streamdit.errors import StreamditError
from streamdit.parallel.parity import tensor_digest
from streamdit.protocol.channel import BroadcastChannel, P2PChannel
from streamdit.protocol.header import Action
from streamdit.protocol.messages import PPEnvelopeV1, PPResultV1
from streamdit.runtime.liveness import transport_like
from streamdit.runtime.phase_b import Envelope, PhaseB

log = logging.getLogger(__name__)


class MeshLeader:
    """The mesh leader: `PhaseB.serve` on the envelopes from rank0, with itself as the relay
    that passes each message on to the mesh peers and answers rank0 on the result link."""

    def __init__(
        self,
        phase_b: PhaseB,
        *,
        envelopes: P2PChannel,
        results: P2PChannel,
        broadcast: BroadcastChannel | None,
        peer_went_silent: Callable[[BaseException], bool],
    ) -> None:
        self.phase_b = phase_b
        self.peer_went_silent = peer_went_silent  # RankSession's: asks the watchdog
        self.envelopes = envelopes
        self.results = results
        self.broadcast = broadcast  # None in PP0 (a mesh of one)
        # (call_id, cache_epoch) last sent on each leader channel: a terminal the leader makes
        # up itself must keep that channel's ids monotonic
        self.last_broadcast: tuple[int, int] | None = None
        self.last_result: tuple[int, int] | None = None
        self.idle_since = time.perf_counter()
        self.got = self.idle_since

    def run(self) -> None:
        self.phase_b.serve(self._receive, source="rank0", relay=self)

    # ---- Relay -----------------------------------------------------------------------------

    def control(self, msg: Envelope) -> None:
        """NOOP (rank0 idle: serve paused) / SHUTDOWN / ERROR: to the mesh, then answered, so no
        rank's blocking receive reaches the process-group timeout."""
        assert isinstance(msg, PPEnvelopeV1)
        self._forward_terminal(msg)
        if msg.action in (Action.NOOP, Action.SHUTDOWN):
            self.results.send(PPResultV1(action=msg.action, call_id=msg.call_id, cache_epoch=msg.cache_epoch))

    def before(self, msg: Envelope) -> None:
        self.got = time.perf_counter()
        if self.broadcast is not None:
            self.broadcast.send(msg)  # validated again in the channel's preflight
            self.last_broadcast = (msg.call_id, msg.cache_epoch)

    def failed(self, msg: Envelope, exc: BaseException) -> None:
        if self.peer_went_silent(exc):
            return  # a mesh peer is gone: the watchdog's verdict names it (rank0's sees it too)
        self._tell_rank0(exc, (msg.call_id, msg.cache_epoch))

    def after(self, msg: Envelope, latents: torch.Tensor, calls: int) -> None:
        if latents.device.type == "cuda":
            torch.cuda.synchronize(latents.device)
        done = time.perf_counter()
        self.results.send(
            PPResultV1(
                action=Action.INFER,
                call_id=msg.call_id,
                chunk_index=msg.chunk_index,
                cache_epoch=msg.cache_epoch,
                pp_result_version=1,
                observed_generator_calls=calls,
                mesh_current_start_frame=self.phase_b.runner.kv_cache.current_start_frame,
                output_digest=tensor_digest(latents),
                stage1_ms=(done - self.got) * 1e3,
                mesh_idle_ms=(self.got - self.idle_since) * 1e3,
                latents_out=latents,
            )
        )
        self.last_result = (msg.call_id, msg.cache_epoch)
        self.idle_since = time.perf_counter()

    # ---- rank0 side ------------------------------------------------------------------------

    def _receive(self) -> Envelope:
        try:
            msg = self.envelopes.recv()
        except StreamditError as exc:
            if transport_like(exc):
                raise  # rank0 is gone: nobody to tell; the watchdog decides (orphan)
            # OM-07: nothing of this envelope reaches the mesh; a terminal action does.
            log.error("mesh leader rejected an envelope: %s: %s", type(exc).__name__, exc)
            reason = f"{type(exc).__name__}: {exc}"[:200]
            call_id, epoch = _after(self.last_broadcast)
            self._forward_terminal(
                PPEnvelopeV1(action=Action.ERROR, call_id=call_id, cache_epoch=epoch, reason=reason)
            )
            self._tell_rank0(exc, _after(self.last_result))
            exc.peers_told = True  # type: ignore[attr-defined] - told in band: no announcement
            raise
        assert isinstance(msg, PPEnvelopeV1)
        return msg

    def _forward_terminal(self, msg: PPEnvelopeV1) -> None:
        """NOOP / SHUTDOWN / ERROR to the mesh peers, best effort (none in PP0)."""
        if self.broadcast is None or self.broadcast.broken is not None:
            return
        try:
            self.broadcast.send(
                PPEnvelopeV1(
                    action=msg.action, call_id=msg.call_id, cache_epoch=msg.cache_epoch, reason=msg.reason
                )
            )
        except StreamditError as exc:
            log.error("could not send %s to the mesh: %s", msg.action.name, exc)

    def _tell_rank0(self, exc: BaseException, ids: tuple[int, int]) -> None:
        """Best effort ERROR result: rank0 cannot see a failure that happened on the mesh."""
        if self.results.broken is not None:
            return
        reason = f"{type(exc).__name__}: {exc}"[:200]
        try:
            self.results.send(
                PPResultV1(action=Action.ERROR, call_id=ids[0], cache_epoch=ids[1], reason=reason)
            )
        except StreamditError as err:
            log.error("could not send ERROR to rank0: %s", err)


def _after(last: tuple[int, int] | None) -> tuple[int, int]:
    """Ids for a message the leader makes up: the next call_id, the same epoch."""
    return (0, 0) if last is None else (last[0] + 1, last[1])
