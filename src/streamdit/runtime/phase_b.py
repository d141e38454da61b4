"""Phase B as one unit: the generator rank's bring-up, one chunk, and the receive loop.

Owns: `PhaseB`, the only place a generator rank is built and driven. `single`, rank0 and the
workers of `tp`, and every mesh rank of `pp` compose it; they differ only in where a chunk's
`GeneratorInputs` come from (Phase A in the same process, or an envelope) and where the latents
go, so nothing here knows the topology.

- `PhaseB.bring_up(run, ...)`: build the DiT, shard it over the Phase B group (none in single),
  build the runner (KV cache sized from the local heads), arm the test faults (one call), check
  replicated-weight fingerprints, then the compile gate / eager warm-up, and the tripwires.
- `infer(ids, inputs)`: one chunk: fault points, input digests, the runner, output digests.
- `serve(recv, relay)`: the loop of a rank that receives its work: NOOP (keepalive) → nothing,
  SHUTDOWN → return, ERROR → `PeerAbort`, INFER → `infer`. A `Relay` (the pp mesh leader) is told
  of each message so it can pass it on and answer; a plain worker has none.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Protocol

import torch

from streamdit.errors import PeerAbort
from streamdit.parallel.groups import GroupHandle
from streamdit.parallel.parity import check_replicated_fingerprints
from streamdit.parallel.tp import apply_tp
from streamdit.protocol.header import Action, Ids
from streamdit.protocol.messages import PPEnvelopeV1, TPEnvelopeV1
from streamdit.runtime.build import ValidatedRun, build_generator, build_model
from streamdit.runtime.compile_health import capture_warmup, compile_gate, eager_warmup
from streamdit.runtime.faults import FaultPlan
from streamdit.runtime.generator import GeneratorRunner
from streamdit.runtime.plan import GeneratorInputs
from streamdit.runtime.startup import StartupProgress
from streamdit.runtime.tripwires import Tripwires

log = logging.getLogger(__name__)

Envelope = TPEnvelopeV1 | PPEnvelopeV1
Record = Callable[[dict[str, object]], None]


class Relay(Protocol):
    """What a rank that passes work on (the pp mesh leader) does around each message."""

    def control(self, msg: Envelope) -> None:
        """A NOOP, SHUTDOWN or ERROR arrived (before the loop acts on it)."""

    def before(self, msg: Envelope) -> None:
        """An INFER arrived, before this rank runs it."""

    def failed(self, msg: Envelope, exc: BaseException) -> None:
        """This rank's Phase B of `msg` raised `exc` (re-raised afterwards)."""

    def after(self, msg: Envelope, latents: torch.Tensor, calls: int) -> None:
        """This rank ran `msg`: its latents and the generator calls made."""


class PhaseB:
    """Phase B on one generator rank (see the module docstring)."""

    def __init__(
        self, runner: GeneratorRunner, *, faults: FaultPlan, rank: int, tripwires: Tripwires | None
    ) -> None:
        self.runner = runner
        self.faults = faults
        self.rank = rank
        self.tripwires = tripwires

    @classmethod
    def bring_up(
        cls,
        run: ValidatedRun,
        *,
        faults: FaultPlan,
        rank: int,
        group: GroupHandle | None = None,
        startup: GroupHandle | None = None,
        world: GroupHandle | None = None,
        record: Record | None = None,
    ) -> PhaseB:
        """Everything before a generator rank's first chunk, in the order every rank runs it.

        `group`: the Phase B group ("tp" or "mesh"; None = one process); `startup` the group
        the compile verdict is gathered on (every rank of the job, rank0 of pp included);
        `world` only for the OM-08 hook (a digest issued on the wrong group).
        """
        cfg = run.cfg
        progress = StartupProgress.for_rank(cfg, rank)
        source = "loading the checkpoint" if cfg.checkpoint is not None else "seeding its weights"
        with progress.stage(f"building the {cfg.preset} DiT ({source})"):
            model = build_model(run)
        if group is not None:
            # Eager: c10d in-place all-reduces (2xH200, wan-14b: TP=2 1.37x vs 0.86x with
            # functional ones, bench/results/tp_wan14b_h200x2_eager.json). Compiled: functional,
            # so the collectives stay inside the graph.
            apply_tp(
                model,
                group,
                group=group.name,
                inplace_collectives=not cfg.compile or faults.disabled_collectives,
                hide_from_compiler=faults.disabled_collectives,
            )
        runner = build_generator(run, model)
        faults.arm(runner, rank)
        tripwires = None
        if group is not None:
            check_replicated_fingerprints(model, group, allowed=group.name, log=log)
            assert world is not None
            tripwires = Tripwires(cfg, group, model, faults=faults, world=world)
        if rank != 0:
            faults.slow_startup()
        # Same synthetic call plan on every rank (derived from parity-checked config), then every
        # rank judges the same gathered counters.
        allowed = startup.name if startup is not None else "world"
        warmup = None
        if cfg.compile:
            warmup = f"compiling the DiT blocks ({cfg.compile_backend}) and warming up"
            if cfg.graphs_calls():
                warmup += ", then capturing CUDA graphs"
        elif cfg.eager_warmup(run.device.type):
            warmup = "warming up the generator"
        with progress.stage(warmup):
            compile_gate(runner, cfg, run.dit, startup, allowed=allowed, record=record)
            eager_warmup(runner, cfg, run.dit, record=record)  # before all_ready (see RankSession)
            capture_warmup(runner, cfg, run.dit, record=record)
        return cls(runner, faults=faults, rank=rank, tripwires=tripwires)

    def infer(self, ids: Ids, inputs: GeneratorInputs) -> torch.Tensor:
        """One chunk on this rank; returns its denoised latents."""
        inputs = self.faults.phase_b_in(self.rank, ids, inputs, self.runner.model)
        if self.tripwires is not None:
            self.tripwires.inputs(ids, inputs)
        latents = self.runner.run(inputs, ids)
        self.faults.phase_b_out()
        if self.tripwires is not None:
            self.tripwires.output(ids, latents)
        return latents

    def serve(self, recv: Callable[[], Envelope], *, source: str, relay: Relay | None = None) -> None:
        """Receive and run chunks until SHUTDOWN (returns) or ERROR (raises PeerAbort).

        `source` names the sender in logs and in the PeerAbort message ("rank0", "mesh leader").
        """
        while True:
            msg = recv()
            if msg.action is not Action.INFER:
                if relay is not None:
                    relay.control(msg)
                if msg.action is Action.NOOP:
                    continue
                if msg.action is Action.SHUTDOWN:
                    log.info("rank %d: SHUTDOWN from %s at call_id=%d", self.rank, source, msg.call_id)
                    return
                raise PeerAbort(f"{source} aborted the stream ({msg.reason}) at call_id={msg.call_id}")
            if relay is not None:
                relay.before(msg)
            before = self.runner.calls_made
            try:
                latents = self.infer(msg.ids, GeneratorInputs(**msg.payload()))
            except BaseException as exc:
                if relay is not None:
                    relay.failed(msg, exc)
                raise
            if relay is not None:
                relay.after(msg, latents, self.runner.calls_made - before)
