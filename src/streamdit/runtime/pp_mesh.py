"""Stage 1 of the `pp` topology: the generator mesh (global ranks 1..N-1, `mesh_pg`).

Owns: the mesh leader's loop (global rank 1: receive an envelope from rank0 on the world group,
re-broadcast it to the mesh on `mesh_pg`, run its Phase B shard, send the result back on the
`link` group) and the mesh peers' loop (receive the broadcast, run their shard). Every Phase B
collective runs on `mesh_pg`, named "mesh" (the wrappers refuse any other group, OM-08).

Anti-stranding (protocol.md §3, OM-07): the leader validates a whole envelope (the channel does,
from the meta alone, before allocating) before it re-broadcasts anything. An envelope it must
reject becomes a terminal ERROR broadcast to the mesh — peers exit cleanly with the peer-abort
code, never having seen a payload header — and an ERROR result tells rank0. A failure inside
Phase B on the leader is sent to rank0 as an ERROR result as well (rank0 could not see it).
The leader measures `stage1_ms` (envelope in hand to result ready) and `mesh_idle_ms` (result
sent to next envelope in hand) on its own clock and reports both in the result.
"""

from __future__ import annotations

import logging
import time

import torch

from streamdit.errors import PeerAbort, StreamditError
from streamdit.parallel.groups import Groups
from streamdit.parallel.parity import tensor_digest
from streamdit.protocol.channel import BroadcastChannel, P2PChannel
from streamdit.protocol.header import Action
from streamdit.protocol.messages import PPEnvelopeV1, PPResultV1
from streamdit.runtime.faults import FaultPlan
from streamdit.runtime.generator import GeneratorRunner
from streamdit.runtime.liveness import transport_like
from streamdit.runtime.plan import ChunkIds, GeneratorInputs
from streamdit.runtime.tripwires import Tripwires

log = logging.getLogger(__name__)


class MeshRank:
    """Phase B on one mesh rank; the leader also owns the rank0 links and the mesh broadcast."""

    def __init__(
        self,
        runner: GeneratorRunner,
        tripwires: Tripwires,
        faults: FaultPlan,
        groups: Groups,
        *,
        broadcast: BroadcastChannel | None,
    ) -> None:
        self.runner = runner
        self.tripwires = tripwires
        self.faults = faults
        self.rank = groups.global_rank
        self.broadcast = broadcast  # None in PP0 (a mesh of one)
        # (call_id, cache_epoch) last sent on each leader channel: a terminal the leader makes
        # up itself must keep that channel's ids monotonic
        self.last_broadcast: tuple[int, int] | None = None
        self.last_result: tuple[int, int] | None = None

    def phase_b(self, msg: PPEnvelopeV1) -> tuple[torch.Tensor, int]:
        """Run the envelope's chunk; returns (latents, generator calls made)."""
        ids = ChunkIds(call_id=msg.call_id, chunk_index=msg.chunk_index, cache_epoch=msg.cache_epoch)
        inputs = self.faults.perturb_inputs(GeneratorInputs(**msg.payload()), self.rank)
        self.faults.mutate_weights(self.runner.model, self.rank, ids.chunk_index)
        self.tripwires.inputs(ids, inputs)
        self.faults.before_generator(ids.chunk_index)
        before = self.runner.calls_made
        latents = self.runner.run(inputs, ids)
        self.faults.stage_cost(1)
        self.tripwires.output(ids, latents)
        return latents, self.runner.calls_made - before

    def run_peer(self) -> None:
        assert self.broadcast is not None
        while True:
            msg = self.broadcast.recv()
            assert isinstance(msg, PPEnvelopeV1)
            if msg.action is Action.NOOP:
                continue
            if msg.action is Action.SHUTDOWN:
                log.info("mesh rank %d: SHUTDOWN at call_id=%d", self.rank, msg.call_id)
                return
            if msg.action is Action.ERROR:
                raise PeerAbort(f"mesh leader aborted the stream ({msg.reason}) at call_id={msg.call_id}")
            self.phase_b(msg)

    def run_leader(self, envelopes: P2PChannel, results: P2PChannel) -> None:
        idle_since = time.perf_counter()
        while True:
            msg = self._receive(envelopes, results)
            got = time.perf_counter()
            if msg.action is Action.NOOP:
                # rank0 is idle (serve paused): pass the keepalive on to the mesh and answer it,
                # so no rank's blocking receive reaches the process-group timeout
                self._forward_terminal(msg)
                results.send(PPResultV1(action=Action.NOOP, call_id=msg.call_id, cache_epoch=msg.cache_epoch))
                continue
            if msg.action is not Action.INFER:
                self._forward_terminal(msg)
                if msg.action is Action.ERROR:
                    raise PeerAbort(f"rank0 aborted the stream ({msg.reason}) at call_id={msg.call_id}")
                results.send(
                    PPResultV1(action=Action.SHUTDOWN, call_id=msg.call_id, cache_epoch=msg.cache_epoch)
                )
                log.info("mesh leader: SHUTDOWN at call_id=%d", msg.call_id)
                return
            if self.broadcast is not None:
                self.broadcast.send(msg)  # validated again in the channel's preflight
                self.last_broadcast = (msg.call_id, msg.cache_epoch)
            try:
                latents, calls = self.phase_b(msg)
                if latents.device.type == "cuda":
                    torch.cuda.synchronize(latents.device)
            except BaseException as exc:
                self._tell_rank0(results, exc, (msg.call_id, msg.cache_epoch))
                raise
            done = time.perf_counter()
            results.send(
                PPResultV1(
                    action=Action.INFER,
                    call_id=msg.call_id,
                    chunk_index=msg.chunk_index,
                    cache_epoch=msg.cache_epoch,
                    pp_result_version=1,
                    observed_generator_calls=calls,
                    mesh_current_start_frame=self.runner.kv_cache.current_start_frame,
                    output_digest=tensor_digest(latents),
                    stage1_ms=(done - got) * 1e3,
                    mesh_idle_ms=(got - idle_since) * 1e3,
                    latents_out=latents,
                )
            )
            self.last_result = (msg.call_id, msg.cache_epoch)
            idle_since = time.perf_counter()

    def _receive(self, envelopes: P2PChannel, results: P2PChannel) -> PPEnvelopeV1:
        try:
            msg = envelopes.recv()
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
            self._tell_rank0(results, exc, _after(self.last_result))
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

    def _tell_rank0(self, results: P2PChannel, exc: BaseException, ids: tuple[int, int]) -> None:
        """Best effort ERROR result: rank0 cannot see a failure that happened on the mesh."""
        if results.broken is not None:
            return
        reason = f"{type(exc).__name__}: {exc}"[:200]
        try:
            results.send(PPResultV1(action=Action.ERROR, call_id=ids[0], cache_epoch=ids[1], reason=reason))
        except StreamditError as err:
            log.error("could not send ERROR to rank0: %s", err)


def _after(last: tuple[int, int] | None) -> tuple[int, int]:
    """Ids for a message the leader makes up: the next call_id, the same epoch."""
    return (0, 0) if last is None else (last[0] + 1, last[1])
