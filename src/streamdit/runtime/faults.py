"""Named fault-injection points for break-it tests, switched by STREAMDIT_TEST_* settings.

Owns: `FaultPlan`, parsed once from `RunConfig.test_hooks`. The hooks are parity keys (equal on
every rank), so a hook can never create a conditional collective. With no hooks set every point
is inert. A generator rank arms the plan once (`arm`, at bring-up, before the fingerprint check
and the warm-up), then Phase B passes two named points per chunk; rank0's loops pass the rest:

- `arm` (every generator rank, bring-up): a mutated weight, graph breaks, extra calls, a slow
  first call;
- `phase_b_in` (every generator rank, before a chunk): a crash, a mid-stream weight mutation,
  perturbed inputs; `phase_b_out` (after it): the stage-1 cost of the O rows;
- `shipped` (rank0, the envelope it sends): an inconsistent plan (OM-03, OM-07);
- `received` (rank0, the generator output it decodes): latents dumped for equivalence tests;
- `stage_cost(0)` (rank0, Phase C): the stage-0 cost of the O rows.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from streamdit.config import RunConfig
from streamdit.errors import ConfigError, StreamditError
from streamdit.protocol.header import Ids
from streamdit.runtime.generator import GeneratorRunner
from streamdit.runtime.plan import GeneratorInputs


class InjectedFault(StreamditError):
    """Raised at a named injection point; tests assert on this type. A fault this rank found
    itself (exit 1): a cause, never mistaken for a transport error a dead peer caused."""


@dataclass(frozen=True, kw_only=True, slots=True)
class FaultPlan:
    crash_at_chunk: int | None = None
    """Raise InjectedFault in Phase B of this chunk (after earlier chunks were written)."""
    crash_rank: int | None = None
    """Only this rank raises at `crash_at_chunk` (default: every generator rank): a failure the
    others cannot see, while they wait for it inside a TP collective."""
    extra_generator_calls: int = 0
    """Make Phase B issue this many calls beyond its plan (the plan assertion must fire)."""
    slow_chunk_ms: int = 0
    """Sleep this long after each chunk is written (gives signal tests a window)."""
    mutate_weight_rank: int | None = None
    """OM-12: this rank perturbs a replicated weight after sharding."""
    mutate_weight_at_chunk: int | None = None
    """OM-12 mid-stream: the perturbation happens before this chunk's Phase B instead."""
    perturb_input_rank: int | None = None
    """OM-11: this worker perturbs the latents it received (receiver side)."""
    backend_override: tuple[int, str] | None = None
    """C-04: (rank, backend): that rank's `auto` resolves differently."""
    bad_plan_at_chunk: int | None = None
    """OM-03: rank0 builds this chunk's envelope with expected_generator_calls + 1 (its own
    preflight must reject it before the broadcast)."""
    skip_sender_validation: bool = False
    """OM-03 worker side: rank0's preflight skips message validation, so the inconsistent plan
    reaches the worker, which must reject it before Phase B."""
    wrong_group_at_chunk: int | None = None
    """OM-08: Phase B issues this chunk's digest all-gather on the world group (must raise)."""
    stage0_ms: int = 0
    """O rows: rank0 adds this fixed cost to each chunk's Phase C (a known Stage 0 time)."""
    stage1_ms: int = 0
    """O rows: the generator ranks add this fixed cost to each chunk's Phase B."""
    decode_before_send: bool = False
    """O-02: a planted serialization bug: pp rank0 decodes every result before sending the next
    envelope (the overlap signature must catch it)."""
    disabled_collectives: bool = False
    """C-02: under --compile, TP all-reduces are c10d in-place calls behind `dynamo.disable`
    (the reference system's layout): a graph break at every collective, over the budget."""
    graph_break_rank: int | None = None
    """C-03: this rank adds a graph break inside every block (the others do not)."""
    first_call_ms: int = 0
    """Every generator rank's first generator call takes this long more (first-use work of a
    GPU, which the startup warm-up must absorb under --startup-timeout)."""
    mesh_startup_ms: int = 0
    """pp's mesh ranks spend this long more on startup before the compile warm-up (the wait
    rank0 must survive under --startup-timeout though it exceeds --dist-timeout)."""
    dump_latents: Path | None = None
    """Rank0 saves every chunk's generator output here as float32 .npy (equivalence tests)."""

    @classmethod
    def from_config(cls, cfg: RunConfig) -> FaultPlan:
        return cls(
            crash_at_chunk=_int(cfg, "CRASH_AT_CHUNK"),
            crash_rank=_int(cfg, "CRASH_RANK"),
            extra_generator_calls=_int(cfg, "EXTRA_GENERATOR_CALLS") or 0,
            slow_chunk_ms=_int(cfg, "SLOW_CHUNK_MS") or 0,
            mutate_weight_rank=_int(cfg, "MUTATE_WEIGHT_RANK"),
            mutate_weight_at_chunk=_int(cfg, "MUTATE_WEIGHT_AT_CHUNK"),
            perturb_input_rank=_int(cfg, "PERTURB_INPUT_RANK"),
            backend_override=_rank_value(cfg, "BACKEND_RANK"),
            bad_plan_at_chunk=_int(cfg, "BAD_PLAN_AT_CHUNK"),
            skip_sender_validation=bool(_int(cfg, "SKIP_SENDER_VALIDATION")),
            wrong_group_at_chunk=_int(cfg, "WRONG_GROUP_AT_CHUNK"),
            stage0_ms=_int(cfg, "STAGE0_MS") or 0,
            stage1_ms=_int(cfg, "STAGE1_MS") or 0,
            decode_before_send=bool(_int(cfg, "DECODE_BEFORE_SEND")),
            disabled_collectives=bool(_int(cfg, "DISABLED_COLLECTIVES")),
            graph_break_rank=_int(cfg, "GRAPH_BREAK_RANK"),
            mesh_startup_ms=_int(cfg, "MESH_STARTUP_MS") or 0,
            first_call_ms=_int(cfg, "FIRST_CALL_MS") or 0,
            dump_latents=Path(raw) if (raw := cfg.hook("DUMP_LATENTS")) else None,
        )

    def arm(self, runner: GeneratorRunner, rank: int) -> None:
        """Bring-up of a generator rank: every startup hook, in one call (before the fingerprint
        check, so a mutated replicated weight is caught there, and before any compile trace)."""
        self._mutate(runner.model, rank, None)
        if self.graph_break_rank == rank:
            for block in runner.model.get_submodule("blocks"):
                block.get_submodule("ffn").register_forward_pre_hook(_graph_break)
        runner.extra_calls = self.extra_generator_calls
        runner.first_call_ms = self.first_call_ms

    def phase_b_in(
        self, rank: int, ids: Ids, inputs: GeneratorInputs, model: torch.nn.Module
    ) -> GeneratorInputs:
        """A generator rank about to run a chunk: the inputs it will act on."""
        crashes = self.crash_rank is None or self.crash_rank == rank
        if self.crash_at_chunk is not None and ids.chunk_index == self.crash_at_chunk and crashes:
            raise InjectedFault(f"injected crash at chunk {ids.chunk_index} (STREAMDIT_TEST_CRASH_AT_CHUNK)")
        self._mutate(model, rank, ids.chunk_index)
        if self.perturb_input_rank == rank:
            return dataclasses.replace(inputs, latents=inputs.latents + 1e-3)
        return inputs

    def phase_b_out(self) -> None:
        self.stage_cost(1)

    def shipped(self, chunk_index: int, inputs: GeneratorInputs) -> GeneratorInputs:
        """The inputs rank0 puts in the envelope of `chunk_index`."""
        if self.bad_plan_at_chunk != chunk_index:
            return inputs
        return dataclasses.replace(inputs, expected_generator_calls=inputs.expected_generator_calls + 1)

    def received(self, chunk_index: int, latents: torch.Tensor) -> None:
        """rank0 holds the generator output of `chunk_index` (about to decode it)."""
        if self.dump_latents is not None:
            self.dump_latents.mkdir(parents=True, exist_ok=True)
            np.save(self.dump_latents / f"chunk{chunk_index:04d}.npy", latents.float().cpu().numpy())

    def stage_cost(self, stage: int) -> None:
        """The fixed, known cost of the O rows: stage 0 = rank0's Phase C, 1 = Phase B."""
        ms = self.stage0_ms if stage == 0 else self.stage1_ms
        if ms:
            time.sleep(ms / 1e3)

    def slow_startup(self) -> None:
        if self.mesh_startup_ms:
            time.sleep(self.mesh_startup_ms / 1e3)

    def effective_backend(self, resolved: str, rank: int) -> str:
        if self.backend_override and self.backend_override[0] == rank:
            return self.backend_override[1]
        return resolved

    def _mutate(self, model: torch.nn.Module, rank: int, chunk_index: int | None) -> None:
        """OM-12: at startup (`chunk_index` None) or before Phase B of `mutate_weight_at_chunk`."""
        if self.mutate_weight_rank == rank and chunk_index == self.mutate_weight_at_chunk:
            param = model.get_parameter("head.modulation")  # replicated under TP
            with torch.no_grad():
                param.add_(1e-3)


def _graph_break(_module: torch.nn.Module, _args: object) -> None:
    torch._dynamo.graph_break()


def _rank_value(cfg: RunConfig, name: str) -> tuple[int, str] | None:
    raw = cfg.hook(name)
    if raw is None:
        return None
    rank, sep, value = raw.partition(":")
    if not sep or not rank.isdigit() or not value:
        raise ConfigError(f"STREAMDIT_TEST_{name}={raw!r} must be RANK:VALUE [field=STREAMDIT_TEST_{name}]")
    return int(rank), value


def _int(cfg: RunConfig, name: str) -> int | None:
    raw = cfg.hook(name)
    if raw is None:
        return None
    try:
        return int(raw)
    except ValueError as exc:
        raise ConfigError(
            f"STREAMDIT_TEST_{name}={raw!r} is not an integer [field=STREAMDIT_TEST_{name}]"
        ) from exc
