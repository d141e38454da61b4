"""The `tp` topology: generator-only workers (TP v1.1).

Owns: `run_tp(cfg, launch, stop)`. Every rank joins the process groups, runs the startup parity
handshake (every parity key, the effective attention backend, versions), builds the full DiT,
shards it (`parallel.tp.apply_tp`) and checks replicated-weight fingerprints — all before any
inference. Then:

- rank0 runs the shared chunk loop (`driver.drive`) with Phase A and C, broadcasting one
  `TPEnvelopeV1` per chunk before running its own shard; it ends the stream with `SHUTDOWN`
  (or `ERROR` when it fails, so workers exit at once instead of waiting out a timeout);
- workers construct no text encoder, no VAE and no writer: they serve the broadcast channel
  (`PhaseB.serve`) and run Phase B only, exactly as the envelope says.

Both run the same `PhaseB` unit (bring-up, digests, faults) as every other generator rank.

Drift tripwires (both parity keys): input digests of what each rank acts on, compared before
Phase B every `input_digest_every` chunks; output digests every `output_digest_every` chunks.
"""

from __future__ import annotations

import logging

import torch

from streamdit.config import LaunchEnv, RunConfig
from streamdit.errors import DriftError, ParityError, StreamditError
from streamdit.parallel.groups import Groups
from streamdit.parallel.parity import handshake
from streamdit.protocol.channel import BroadcastChannel, ChannelFaults
from streamdit.protocol.header import PROTOCOL_VERSION, Action, Ids, Kind
from streamdit.protocol.messages import TPEnvelopeV1
from streamdit.protocol.rules import ENVELOPE_VERSION
from streamdit.runtime.build import ValidatedRun
from streamdit.runtime.driver import RunSummary, drive
from streamdit.runtime.faults import FaultPlan
from streamdit.runtime.live import LiveStream
from streamdit.runtime.liveness import StopFlag
from streamdit.runtime.phase_b import PhaseB
from streamdit.runtime.plan import GENERATOR_INPUT_FIELDS, GeneratorInputs
from streamdit.runtime.session import RankSession, liveness_of, rank_session
from streamdit.runtime.single import build_stage0
from streamdit.runtime.stage0 import Stage0

log = logging.getLogger(__name__)
TP_PLAN = "generator_only"


def run_tp(
    cfg: RunConfig, launch: LaunchEnv, stop: StopFlag, live: LiveStream | None = None
) -> RunSummary | None:
    """One rank of a TP job; returns rank0's summary, None on workers. `live`: rank0 of serve."""
    with rank_session(cfg, launch, topology="tp") as session:
        session.wire_drain(stop)
        run, groups, faults = session.run, session.groups, session.faults
        assert groups.tp is not None
        handshake(parity_items(run, groups), groups.world, allowed="world", log=log)
        phase_b = PhaseB.bring_up(
            run,
            faults=faults,
            rank=groups.global_rank,
            group=groups.tp,
            startup=groups.startup,
            world=groups.world,
            record=session.flight,
        )
        channel = BroadcastChannel(
            groups.world.pg,
            0,
            role="rank0" if launch.rank == 0 else "worker",
            group_name="world",
            kinds=frozenset({Kind.TP_ENVELOPE}),
            faults=ChannelFaults(skip_sender_validation=faults.skip_sender_validation),
            **session.channel_kw(),
        )
        # rank0's Stage 0 (text encoder, VAE; under --compile its decoder compiles) before
        # all_ready: the workers wait for it under --startup-timeout, not in their first
        # receive under --dist-timeout
        stage0 = build_stage0(run, live) if launch.rank == 0 else None
        session.all_ready()
        summary = None
        if stage0 is not None:
            if live is not None:
                live.liveness = liveness_of(session)
            summary = _rank0(run, stage0, phase_b, channel, faults, stop, session, live)
        else:
            phase_b.serve(channel.recv, source="rank0")
        session.done = True
        return summary


def parity_items(run: ValidatedRun, groups: Groups) -> dict[str, str]:
    """The job-wide parity keys of docs/protocol.md §6 (also used by pp)."""
    items = run.cfg.parity_items()
    items.update(
        {
            "world_size": str(groups.world_size),
            "protocol_version": str(PROTOCOL_VERSION),
            "tp_plan": TP_PLAN,
            "tp_envelope_version": str(ENVELOPE_VERSION),
            "effective_attn_backend": run.attn_backend,
            "effective_norm_kernels": run.norm_kernels,
            "torch": torch.__version__,
            "dist_backend": groups.backend,
        }
    )
    return items


def tp_envelope(
    action: Action, ids: Ids, inputs: GeneratorInputs | None = None, **extra: object
) -> TPEnvelopeV1:
    payload = {n: getattr(inputs, n) for n in GENERATOR_INPUT_FIELDS} if inputs is not None else {}
    plan = {"tp_plan": TP_PLAN, "tp_envelope_version": ENVELOPE_VERSION} if inputs is not None else {}
    return TPEnvelopeV1(
        action=action,
        call_id=ids.call_id,
        chunk_index=ids.chunk_index,
        cache_epoch=ids.cache_epoch,
        **plan,
        **payload,
        **extra,
    )


def _rank0(
    run: ValidatedRun,
    built: tuple[Stage0, int],
    phase_b: PhaseB,
    channel: BroadcastChannel,
    faults: FaultPlan,
    stop: StopFlag,
    session: RankSession,
    live: LiveStream | None,
) -> RunSummary:
    stage0, chunks = built

    def publish(ids: Ids, inputs: GeneratorInputs) -> None:
        channel.send(tp_envelope(Action.INFER, ids, faults.shipped(ids.chunk_index, inputs)))

    def keepalive() -> None:
        # serve paused: workers wait in the next broadcast; a NOOP resets their timeout
        ids = Ids(call_id=stage0.take_call_id(), chunk_index=-1, cache_epoch=stage0.cache_epoch)
        channel.send(tp_envelope(Action.NOOP, ids))

    try:
        summary = drive(
            run.cfg,
            chunks=chunks,
            stage0=stage0,
            phase_b=phase_b,
            device=run.device,
            faults=faults,
            stop=stop,
            publish=publish,
            guard=session.guard,
            live=live,
            keepalive=keepalive,
        )
    except BaseException as exc:
        # A digest or parity mismatch was found by a collective comparison: every rank raised it
        # at the same point and is leaving, so there is nobody to tell. Anything else is rank0's
        # alone: tell the workers, or they would wait out the process-group timeout.
        # Out of band first (workers inside a collective with rank0 never see an envelope),
        # then in band (workers waiting for the next one): whichever reaches them, they exit 5.
        if not isinstance(exc, DriftError | ParityError):
            session.abort_peers(exc)
            _terminal(channel, stage0.take_call_id(), stage0.cache_epoch, Action.ERROR, type(exc).__name__)
        raise
    _terminal(channel, stage0.take_call_id(), stage0.cache_epoch, Action.SHUTDOWN, None)
    return summary


def _terminal(
    channel: BroadcastChannel, call_id: int, epoch: int, action: Action, reason: str | None
) -> None:
    """Tell workers the stream ended, unless the channel is already unusable (then they time out)."""
    if channel.broken is not None:
        return
    ids = Ids(call_id=call_id, chunk_index=-1, cache_epoch=epoch)
    extra = {"reason": reason[:200]} if reason else {}
    try:
        channel.send(tp_envelope(action, ids, **extra))
    except StreamditError as exc:  # best effort: the original error is what matters
        log.error("could not send %s to workers: %s", action.name, exc)
