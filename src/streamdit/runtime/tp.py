"""The `tp` topology: generator-only workers (TP v1.1).

Owns: `run_tp(cfg, launch, stop)`. Every rank joins the process groups, runs the startup parity
handshake (every parity key, the effective attention backend, versions), builds the full DiT,
shards it (`parallel.tp.apply_tp`) and checks replicated-weight fingerprints — all before any
inference. Then:

- rank0 runs the shared chunk loop (`driver.drive`) with Phase A and C, broadcasting one
  `TPEnvelopeV1` per chunk before running its own shard; it ends the stream with `SHUTDOWN`
  (or `ERROR` when it fails, so workers exit at once instead of waiting out a timeout);
- workers construct no text encoder, no VAE and no writer: they loop on the broadcast channel
  and run Phase B only, exactly as the envelope says.

Drift tripwires (both parity keys): input digests of what each rank acts on, compared before
Phase B every `input_digest_every` chunks; output digests every `output_digest_every` chunks.
"""

from __future__ import annotations

import logging
import threading

import torch

from streamdit.config import LaunchEnv, RunConfig
from streamdit.errors import DriftError, ParityError, PeerAbort, StreamditError
from streamdit.parallel.groups import Groups
from streamdit.parallel.parity import check_replicated_fingerprints, handshake
from streamdit.parallel.tp import apply_tp
from streamdit.protocol.channel import BroadcastChannel, ChannelFaults
from streamdit.protocol.header import PROTOCOL_VERSION, Action, Kind
from streamdit.protocol.messages import TPEnvelopeV1
from streamdit.runtime.build import ValidatedRun, build_generator, build_model
from streamdit.runtime.compile_health import compile_gate, eager_warmup
from streamdit.runtime.driver import RunSummary, drive
from streamdit.runtime.faults import FaultPlan
from streamdit.runtime.generator import GeneratorRunner
from streamdit.runtime.live import LiveStream
from streamdit.runtime.liveness import StopFlag
from streamdit.runtime.plan import GENERATOR_INPUT_FIELDS, ChunkIds, GeneratorInputs
from streamdit.runtime.session import liveness_of, rank_session
from streamdit.runtime.single import build_stage0
from streamdit.runtime.tripwires import Tripwires

log = logging.getLogger(__name__)
TP_PLAN = "generator_only"


def run_tp(
    cfg: RunConfig, launch: LaunchEnv, stop: StopFlag, live: LiveStream | None = None
) -> RunSummary | None:
    """One rank of a TP job; returns rank0's summary, None on workers. `live`: rank0 of serve."""
    with rank_session(cfg, launch, topology="tp") as session:
        run, groups, faults = session.run, session.groups, session.faults
        assert groups.tp is not None
        handshake(parity_items(run, groups), groups.world, allowed="world", log=log)
        model = build_model(run)
        # Eager: c10d in-place all-reduces (2xH200, wan-14b: TP=2 1.37x vs 0.86x with functional
        # ones, bench/results/tp_wan14b_h200x2_eager.json). Compiled: functional, so the
        # collectives stay inside the graph.
        apply_tp(
            model,
            groups.tp,
            inplace_collectives=not cfg.compile or faults.disabled_collectives,
            hide_from_compiler=faults.disabled_collectives,
        )
        faults.mutate_weights(model, groups.global_rank)
        faults.add_graph_breaks(model, groups.global_rank)
        check_replicated_fingerprints(model, groups.tp, allowed="tp", log=log)
        runner = build_generator(run, model)
        runner.extra_calls = faults.extra_generator_calls
        runner.first_call_ms = faults.first_call_ms
        # Same synthetic call plan on every rank (derived from parity-checked config), then
        # every rank judges the same gathered counters.
        compile_gate(runner, cfg, run.dit, groups.startup, allowed="startup", record=session.flight)
        eager_warmup(runner, cfg, run.dit, record=session.flight)  # before all_ready (see there)
        channel = BroadcastChannel(
            groups.world.pg,
            0,
            role="rank0" if launch.rank == 0 else "worker",
            group_name="world",
            kinds=frozenset({Kind.TP_ENVELOPE}),
            faults=ChannelFaults(skip_sender_validation=faults.skip_sender_validation),
            **session.channel_kw(),
        )
        tripwires = Tripwires(cfg, groups.tp, model, faults=faults, world=groups.world)
        session.all_ready()
        summary = None
        if launch.rank == 0:
            if live is not None:
                live.liveness = liveness_of(session)
            summary = _rank0(run, runner, channel, tripwires, faults, stop, session.guard, live)
        else:
            _worker(runner, channel, tripwires, faults, groups.global_rank)
        session.done = True
        return summary


def parity_items(run: ValidatedRun, groups: Groups) -> dict[str, str]:
    """The job-wide parity keys of protocol.md §6 (also used by pp)."""
    items = run.cfg.parity_items()
    items.update(
        {
            "world_size": str(groups.world_size),
            "protocol_version": str(PROTOCOL_VERSION),
            "tp_plan": TP_PLAN,
            "tp_envelope_version": "1",
            "effective_attn_backend": run.attn_backend,
            "torch": torch.__version__,
            "dist_backend": groups.backend,
        }
    )
    return items


def tp_envelope(
    action: Action, ids: ChunkIds, inputs: GeneratorInputs | None = None, **extra: object
) -> TPEnvelopeV1:
    payload = {n: getattr(inputs, n) for n in GENERATOR_INPUT_FIELDS} if inputs is not None else {}
    plan = {"tp_plan": TP_PLAN, "tp_envelope_version": 1} if inputs is not None else {}
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
    runner: GeneratorRunner,
    channel: BroadcastChannel,
    tripwires: Tripwires,
    faults: FaultPlan,
    stop: StopFlag,
    guard: threading.Lock,
    live: LiveStream | None,
) -> RunSummary:
    stage0, chunks = build_stage0(run, live)

    def publish(ids: ChunkIds, inputs: GeneratorInputs) -> None:
        channel.send(tp_envelope(Action.INFER, ids, faults.corrupt_plan(ids.chunk_index, inputs)))
        faults.mutate_weights(runner.model, 0, ids.chunk_index)
        tripwires.inputs(ids, inputs)

    def check(ids: ChunkIds, inputs: GeneratorInputs, latents: torch.Tensor) -> None:
        tripwires.output(ids, latents)

    def keepalive() -> None:
        # serve paused: workers wait in the next broadcast; a NOOP resets their timeout
        ids = ChunkIds(call_id=stage0.take_call_id(), chunk_index=-1, cache_epoch=stage0.cache_epoch)
        channel.send(tp_envelope(Action.NOOP, ids))

    try:
        summary = drive(
            run.cfg,
            chunks=chunks,
            stage0=stage0,
            runner=runner,
            device=run.device,
            faults=faults,
            stop=stop,
            publish=publish,
            check=check,
            guard=guard,
            live=live,
            keepalive=keepalive,
        )
    except BaseException as exc:
        # A digest or parity mismatch was found by a collective comparison: every rank raised it
        # at the same point and is leaving, so there is nobody to tell. Anything else is rank0's
        # alone: tell the workers, or they would wait out the process-group timeout.
        if not isinstance(exc, DriftError | ParityError):
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
    ids = ChunkIds(call_id=call_id, chunk_index=-1, cache_epoch=epoch)
    extra = {"reason": reason[:200]} if reason else {}
    try:
        channel.send(tp_envelope(action, ids, **extra))
    except StreamditError as exc:  # best effort: the original error is what matters
        log.error("could not send %s to workers: %s", action.name, exc)


def _worker(
    runner: GeneratorRunner, channel: BroadcastChannel, tripwires: Tripwires, faults: FaultPlan, rank: int
) -> None:
    while True:
        msg = channel.recv()
        if msg.action is Action.NOOP:
            continue
        if msg.action is Action.SHUTDOWN:
            log.info("worker rank %d: SHUTDOWN at call_id=%d", rank, msg.call_id)
            return
        ids = ChunkIds(call_id=msg.call_id, chunk_index=msg.chunk_index, cache_epoch=msg.cache_epoch)
        if msg.action is Action.ERROR:
            raise PeerAbort(f"rank0 aborted the stream ({msg.reason}) at call_id={msg.call_id}")
        inputs = faults.perturb_inputs(GeneratorInputs(**msg.payload()), rank)
        faults.mutate_weights(runner.model, rank, ids.chunk_index)
        tripwires.inputs(ids, inputs)
        latents = runner.run(inputs, ids)
        tripwires.output(ids, latents)
