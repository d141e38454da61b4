"""Stage 0 of the `pp` topology on rank0: Phase A and C overlapped with the mesh's Phase B.

Owns: `drive_pipelined()`, rank0's chunk loop. Up to `queue_depth` (D) envelopes are in flight:
envelope k+1 is prepared and sent before result k is decoded, and a full pipeline blocks Phase A
(nothing fresh is ever dropped). Results are accepted by docs/protocol.md §4: a result of an older
`cache_epoch` is dropped (counted, logged, never decoded); any other result must be the oldest
envelope in flight (ids echoed), with the planned call count, the envelope's latent shape and
finite values.

When the pipeline must empty first:
- a scheduled hard cut ("hard" in the timeline): every chunk of the old scene is shown, so the
  results in flight are decoded before the epoch bumps (an immediate "cut" does not wait: its
  in-flight results arrive stale and are dropped);
- recompute r0a: the next envelope's anchor comes from the previous decode, so Stage 0 and
  Stage 1 serialize (O-03 measures the cost; r0 and off keep the overlap).

Per chunk it writes the pp metrics (stage0_ms, stage1_ms, period_ms, mesh_idle_ms, queue depths);
the summary carries the OverlapScore and the dropped-stale count.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass

import torch

from streamdit.config import RunConfig
from streamdit.errors import StaleResult
from streamdit.protocol.errors import EnvelopeError
from streamdit.protocol.header import Action, Ids
from streamdit.protocol.messages import PPEnvelopeV1, PPResultV1
from streamdit.protocol.rules import ENVELOPE_VERSION
from streamdit.runtime.driver import RunSummary, StreamOutputs, sync
from streamdit.runtime.faults import FaultPlan
from streamdit.runtime.live import LiveStream
from streamdit.runtime.liveness import StopFlag
from streamdit.runtime.metrics import ChunkMetrics
from streamdit.runtime.output import OutputGuard
from streamdit.runtime.plan import GENERATOR_INPUT_FIELDS, GeneratorInputs, id_kwargs
from streamdit.runtime.pp_link import StageLink
from streamdit.runtime.stage0 import ChunkNotes, Stage0

log = logging.getLogger(__name__)


def pp_envelope(
    action: Action, ids: Ids, inputs: GeneratorInputs | None = None, **extra: object
) -> PPEnvelopeV1:
    payload = {n: getattr(inputs, n) for n in GENERATOR_INPUT_FIELDS} if inputs is not None else {}
    plan = {"pp_envelope_version": ENVELOPE_VERSION} if inputs else {}
    return PPEnvelopeV1(
        action=action,
        call_id=ids.call_id,
        chunk_index=ids.chunk_index,
        cache_epoch=ids.cache_epoch,
        **plan,
        **payload,
        **extra,
    )


@dataclass(frozen=True, kw_only=True, slots=True)
class InFlight:
    ids: Ids
    inputs: GeneratorInputs
    notes: ChunkNotes
    phase_a_ms: float
    paused_ms: float = 0.0


class PipelinedDriver:
    """rank0's loop state for one stream (see the module docstring)."""

    def __init__(
        self,
        cfg: RunConfig,
        *,
        stage0: Stage0,
        link: StageLink,
        device: torch.device,
        faults: FaultPlan,
        outputs: StreamOutputs,
    ) -> None:
        self.cfg = cfg
        self.outputs = outputs  # the writer thread writes, logs and shows each chunk
        self.stage0 = stage0
        self.link = link
        self.device = device
        self.faults = faults
        self.pending: deque[InFlight] = deque()
        self.last_emit: float | None = None
        self.depth = 1 if faults.decode_before_send else cfg.queue_depth

    def step(self, k: int, paused_s: float = 0.0) -> None:
        """Phase A of chunk k, then send it once fewer than D envelopes are in flight.
        `paused_s`: how long the loop idled at this chunk's boundary (serve's pause)."""
        state = self.stage0.state(k)
        scheduled_cut = state.hard_cut and not state.drop_in_flight
        if scheduled_cut or self.stage0.needs_previous_decode(k):
            self.drain()
        t0 = time.perf_counter()
        ids, inputs, notes = self.stage0.prepare(k)
        sync(self.device)
        phase_a_ms = (time.perf_counter() - t0) * 1e3
        while len(self.pending) >= self.depth:
            self.take_one()
        sent = self.faults.shipped(k, inputs)  # OM-03/07 hook: the plan rank0 ships
        self.link.submit(pp_envelope(Action.INFER, ids, sent))
        self.pending.append(
            InFlight(ids=ids, inputs=inputs, notes=notes, phase_a_ms=phase_a_ms, paused_ms=paused_s * 1e3)
        )

    def keepalive(self) -> None:
        """A NOOP through the link while idle: the leader forwards it to the mesh and answers
        with a NOOP result, so no rank's blocking receive reaches the process-group timeout."""
        ids = Ids(call_id=self.stage0.take_call_id(), chunk_index=-1, cache_epoch=self.stage0.cache_epoch)
        self.link.submit(pp_envelope(Action.NOOP, ids))

    def drain(self) -> None:
        while self.pending:
            self.take_one()

    def take_one(self) -> None:
        arrival = self.link.take()
        item = self.pending.popleft()
        result = arrival.result
        if result.cache_epoch != self.stage0.cache_epoch:
            self._drop(result, item)
            return
        latents = self._accept(result, item)
        t0 = time.perf_counter()
        frames = self.stage0.finish(latents)
        self.faults.stage_cost(0)
        sync(self.device)
        now = time.perf_counter()
        d_in, d_out = self.link.depths()
        record = ChunkMetrics(
            chunk_index=item.ids.chunk_index,
            cache_epoch=item.ids.cache_epoch,
            call_id=item.ids.call_id,
            frames=int(frames.shape[0]),
            generator_calls=int(result.observed_generator_calls or 0),
            phase_a_ms=item.phase_a_ms,
            phase_b_ms=float(result.stage1_ms or 0.0),
            phase_c_ms=(now - t0) * 1e3,
            transition=item.notes.transition,
            text_ms=item.notes.text_ms,
            paused_ms=item.paused_ms,
            kv_recompute=item.inputs.do_kv_recompute,
            stage0_ms=item.phase_a_ms + (now - t0) * 1e3,
            stage1_ms=result.stage1_ms,
            period_ms=None if self.last_emit is None else (now - self.last_emit) * 1e3,
            mesh_idle_ms=result.mesh_idle_ms,
            in_flight=len(self.pending),
            d_in=d_in,
            d_out=d_out,
        )
        self.outputs.emit(frames, record)
        self.last_emit = now
        if self.faults.slow_chunk_ms:  # test hook: rank0 idles after each chunk (signal windows)
            time.sleep(self.faults.slow_chunk_ms / 1e3)

    def _drop(self, result: PPResultV1, item: InFlight) -> None:
        if result.cache_epoch != item.ids.cache_epoch or result.call_id != item.ids.call_id:
            raise StaleResult(
                f"stale result does not echo the oldest envelope in flight (call_id={item.ids.call_id})",
                field="call_id",
                call_id=result.call_id,
                chunk_index=result.chunk_index,
                cache_epoch=result.cache_epoch,
            )
        self.outputs.dropped_stale += 1  # the summary counts it, whatever ends the stream
        log.warning(
            "dropped stale result call_id=%d chunk_index=%d cache_epoch=%d (current epoch %d); not decoded",
            result.call_id,
            result.chunk_index,
            result.cache_epoch,
            self.stage0.cache_epoch,
        )

    def _accept(self, result: PPResultV1, item: InFlight) -> torch.Tensor:
        """docs/protocol.md §4 acceptance: ids of the oldest envelope in flight, call count, latents."""
        ids, kw = item.ids, dict(group="link", **id_kwargs(item.ids))
        if (result.call_id, result.chunk_index) != (ids.call_id, ids.chunk_index):
            raise StaleResult(
                f"result call_id={result.call_id} chunk_index={result.chunk_index} is not the oldest "
                f"envelope in flight (call_id={ids.call_id} chunk_index={ids.chunk_index})",
                field="call_id",
                **kw,
            )
        if result.observed_generator_calls != item.inputs.expected_generator_calls:
            raise EnvelopeError(
                f"mesh made {result.observed_generator_calls} generator calls, the plan expected "
                f"{item.inputs.expected_generator_calls}",
                field="observed_generator_calls",
                **kw,
            )
        if result.mesh_current_start_frame != item.inputs.current_start_frame:
            raise EnvelopeError(
                f"mesh cache at frame {result.mesh_current_start_frame}, the envelope said "
                f"{item.inputs.current_start_frame}",
                field="mesh_current_start_frame",
                **kw,
            )
        latents = result.latents_out
        assert latents is not None  # the channel validated the result
        if tuple(latents.shape) != tuple(item.inputs.latents.shape) or not bool(
            torch.isfinite(latents).all()
        ):
            raise EnvelopeError(
                f"latents_out {tuple(latents.shape)} (finite={bool(torch.isfinite(latents).all())}) vs "
                f"envelope latents {tuple(item.inputs.latents.shape)}",
                field="latents_out",
                **kw,
            )
        self.faults.received(ids.chunk_index, latents)
        return latents


def drive_pipelined(
    cfg: RunConfig,
    *,
    chunks: int,
    stage0: Stage0,
    link: StageLink,
    device: torch.device,
    faults: FaultPlan,
    stop: StopFlag,
    guard: OutputGuard,
    live: LiveStream | None = None,
) -> RunSummary:
    """Every chunk through the pipeline; files closed on any exit (valid video).

    `live` (serve): while paused, the pipeline drains (every chunk in flight is shown), then
    idles at the boundary with a NOOP keepalive through the link every keepalive period."""
    with StreamOutputs(cfg, chunks, live, guard, stop) as outputs:
        driver = PipelinedDriver(cfg, stage0=stage0, link=link, device=device, faults=faults, outputs=outputs)
        for k in range(chunks):
            paused_s = live.boundary(driver.keepalive, before_idle=driver.drain) if live is not None else 0.0
            if stop.requested:
                log.warning("draining after %d chunks sent (%s)", k, stop.reason)
                break
            driver.step(k, paused_s)
        driver.drain()
    summary = outputs.summary()
    log.info("pp: dropped_stale=%d overlap_score=%s", summary.dropped_stale, summary.overlap_score)
    return summary
