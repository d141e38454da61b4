"""The `pp` topology: rank0 out of the mesh (Stage 0 = Phase A + C), ranks 1..N-1 run Phase B.

Owns: `run_pp(cfg, launch, stop)`, one rank's startup and role. Roles (docs/protocol.md §5): rank0 =
Stage 0, owns the video and metrics, never loads the generator and never touches `mesh_pg`;
global rank 1 = mesh leader; ranks 2..N-1 = mesh peers (TP inside `mesh_pg` when N-1 > 1, PP1;
PP0 is a mesh of one). Startup, before any inference, on every rank: groups (world, mesh, link),
the parity handshake on world (pp keys included), then on the mesh only: model, TP sharding on
`mesh_pg`, fingerprints. Any fatal error leaves a flight record per rank.
"""

from __future__ import annotations

import logging
import time

from streamdit.config import LaunchEnv, RunConfig
from streamdit.errors import ConfigError, DriftError, ParityError, PeerAbort
from streamdit.parallel.collectives import pair_warmup
from streamdit.parallel.groups import Groups
from streamdit.parallel.parity import handshake
from streamdit.protocol.channel import BroadcastChannel, ChannelFaults, P2PChannel
from streamdit.protocol.errors import TransportError
from streamdit.protocol.header import Action, Ids, Kind
from streamdit.protocol.messages import PPEnvelopeV1
from streamdit.protocol.rules import ENVELOPE_VERSION
from streamdit.runtime.build import ValidatedRun
from streamdit.runtime.compile_health import compile_gate
from streamdit.runtime.driver import RunSummary
from streamdit.runtime.live import LiveStream
from streamdit.runtime.liveness import StopFlag
from streamdit.runtime.phase_b import PhaseB
from streamdit.runtime.pp_link import LEADER, StageLink
from streamdit.runtime.pp_mesh import MeshLeader
from streamdit.runtime.pp_stage0 import drive_pipelined, pp_envelope
from streamdit.runtime.session import RankSession, liveness_of, rank_session
from streamdit.runtime.single import build_stage0
from streamdit.runtime.stage0 import rehearse
from streamdit.runtime.tp import parity_items

log = logging.getLogger(__name__)

MESH = "mesh"  # the only group Phase B collectives may use under pp


def run_pp(
    cfg: RunConfig, launch: LaunchEnv, stop: StopFlag, live: LiveStream | None = None
) -> RunSummary | None:
    """One rank of a pp job; returns rank0's summary, None on mesh ranks. `live`: rank0 of serve."""
    if launch.world_size < 2:
        raise ConfigError(
            f"pp needs at least 2 ranks (rank0 + a mesh), got {launch.world_size} [field=nproc]"
        )
    with rank_session(cfg, launch, topology="pp") as session:
        session.wire_drain(stop)
        session.flight.record({"name": "role", "detail": _role(launch.rank)})
        handshake(
            _pp_parity_items(session.run, session.groups), session.groups.world, allowed="world", log=log
        )
        summary = None
        if launch.rank == 0:
            summary = _stage0(session, stop, live)
        else:
            _mesh(session)
        session.done = True
        return summary


def _stay(code: int) -> None:
    """exit_fn for comm-thread channels: the channel then raises Poisoned into the thread."""


def _role(rank: int) -> str:
    return "stage0" if rank == 0 else "leader" if rank == LEADER else "mesh"


def _pp_parity_items(run: ValidatedRun, groups: Groups) -> dict[str, str]:
    items = parity_items(run, groups)
    for key in ("tp_plan", "tp_envelope_version"):
        items.pop(key, None)
    items.update({"pp_envelope_version": str(ENVELOPE_VERSION), "mesh_size": str(groups.world_size - 1)})
    return items


def _stage0(session: RankSession, stop: StopFlag, live: LiveStream | None) -> RunSummary:
    """rank0: Phase A + C only (no generator), through the two comm threads."""
    run, groups, faults = session.run, session.groups, session.faults
    assert groups.mesh is None and groups.link is not None  # rank0 is never in mesh_pg
    # rank0's channels belong to comm threads: a poisoned send must not end the process from
    # that thread; the main thread closes the video, then exits with the error.
    channel_kw = {
        **session.channel_kw(),
        "exit_fn": session.flight.exit_after_dump(session.flight_path, exit_fn=_stay),
    }
    stage0, chunks = build_stage0(run, live)
    if run.device.type == "cuda":  # before any NCCL transfer is pending (see `rehearse`)
        t0 = time.perf_counter()
        n = rehearse(stage0, chunks)
        log.info("stage 0 rehearsed %d chunks in %.1f s", n, time.perf_counter() - t0)
    if live is not None:
        live.liveness = liveness_of(session)
    compile_gate(None, run.cfg, run.dit, groups.startup, allowed="startup", record=session.flight)
    link = StageLink(
        P2PChannel(
            groups.world.pg,
            LEADER,
            role="stage0",
            group_name="world",
            kinds=frozenset({Kind.PP_ENVELOPE}),
            faults=ChannelFaults(skip_sender_validation=faults.skip_sender_validation),
            **channel_kw,
        ),
        P2PChannel(
            groups.link.pg,
            1,
            role="stage0",
            group_name="link",
            kinds=frozenset({Kind.PP_RESULT}),
            **channel_kw,
        ),
        depth=run.cfg.queue_depth,
        device=run.device,
        timeout_s=run.cfg.dist_timeout_s,
        now=time.perf_counter,
    )
    session.all_ready()  # the mesh has built its generator: only now does --dist-timeout apply
    pair_warmup(groups.world, LEADER, send=True, allowed="world")
    pair_warmup(groups.link, 1, send=False, allowed="link")
    link.start()
    try:
        summary = drive_pipelined(
            run.cfg,
            chunks=chunks,
            stage0=stage0,
            link=link,
            device=run.device,
            faults=faults,
            stop=stop,
            guard=session.guard,
            live=live,
        )
    except BaseException as exc:
        # Tell the mesh only about failures it cannot see: not its own (PeerAbort), not a dead
        # link, not a comparison every mesh rank made itself.
        mesh_knows = (
            isinstance(exc, PeerAbort | TransportError | DriftError | ParityError) or link.failed is not None
        )
        if not mesh_knows:
            session.abort_peers(exc)  # out of band first: a mesh inside a collective
        terminal = (
            None if mesh_knows else _terminal(stage0.take_call_id(), stage0.cache_epoch, Action.ERROR, exc)
        )
        session.destroy_groups = link.close(terminal) and not link.poisoned
        raise
    session.destroy_groups = link.close(
        _terminal(stage0.take_call_id(), stage0.cache_epoch, Action.SHUTDOWN, None)
    )
    return summary


def _terminal(call_id: int, epoch: int, action: Action, exc: BaseException | None) -> PPEnvelopeV1:
    ids = Ids(call_id=call_id, chunk_index=-1, cache_epoch=epoch)
    extra = {"reason": f"{type(exc).__name__}: {exc}"[:200]} if exc is not None else {}
    return pp_envelope(action, ids, **extra)


def _mesh(session: RankSession) -> None:
    """Mesh ranks: bring up Phase B on mesh_pg (the compile verdict gathered on `startup`, every
    rank with the long timeout, rank0 included with an absent row), then serve."""
    run, groups = session.run, session.groups
    channel_kw = session.channel_kw()
    mesh = groups.mesh
    assert mesh is not None and mesh.name == MESH
    phase_b = PhaseB.bring_up(
        run,
        faults=session.faults,
        rank=groups.global_rank,
        group=mesh,
        startup=groups.startup,
        world=groups.world,
        record=session.flight,
    )
    broadcast = None
    if mesh.size > 1:
        broadcast = BroadcastChannel(
            mesh.pg,
            0,
            role="leader" if mesh.rank == 0 else "mesh",
            group_name=MESH,
            kinds=frozenset({Kind.PP_ENVELOPE}),
            **channel_kw,
        )
    session.all_ready()
    if mesh.rank != 0:
        assert broadcast is not None
        phase_b.serve(broadcast.recv, source="mesh leader")
        return
    assert groups.link is not None
    envelopes = P2PChannel(
        groups.world.pg,
        0,
        role="leader",
        group_name="world",
        kinds=frozenset({Kind.PP_ENVELOPE}),
        **channel_kw,
    )
    results = P2PChannel(
        groups.link.pg, 0, role="leader", group_name="link", kinds=frozenset({Kind.PP_RESULT}), **channel_kw
    )
    pair_warmup(groups.world, 0, send=False, allowed="world")  # same order as rank0
    pair_warmup(groups.link, 0, send=True, allowed="link")
    MeshLeader(
        phase_b,
        envelopes=envelopes,
        results=results,
        broadcast=broadcast,
        peer_went_silent=session.peer_went_silent,
    ).run()
