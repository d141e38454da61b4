"""Named fault-injection points for break-it tests, switched by STREAMDIT_TEST_* settings.

Owns: `FaultPlan`, parsed once from `RunConfig.test_hooks`. The hooks are parity keys (equal on
every rank), so a hook can never create a conditional collective. Production code asks the
plan at a named point; with no hooks set every point is inert.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from streamdit.config import RunConfig
from streamdit.errors import ConfigError
from streamdit.runtime.plan import GeneratorInputs


class InjectedFault(RuntimeError):
    """Raised at a named injection point; tests assert on this type."""


@dataclass(frozen=True, kw_only=True, slots=True)
class FaultPlan:
    crash_at_chunk: int | None = None
    """Raise InjectedFault in Phase B of this chunk (after earlier chunks were written)."""
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

    def before_generator(self, chunk_index: int) -> None:
        if self.crash_at_chunk is not None and chunk_index == self.crash_at_chunk:
            raise InjectedFault(f"injected crash at chunk {chunk_index} (STREAMDIT_TEST_CRASH_AT_CHUNK)")

    def after_generator(self, chunk_index: int, latents: torch.Tensor) -> None:
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

    def add_graph_breaks(self, model: torch.nn.Module, rank: int) -> None:
        """C-03: on `graph_break_rank`, a forward pre-hook in each block's FFN breaks the graph."""
        if self.graph_break_rank != rank:
            return
        blocks = model.get_submodule("blocks")
        for block in blocks:
            block.get_submodule("ffn").register_forward_pre_hook(_graph_break)

    def mutate_weights(self, model: torch.nn.Module, rank: int, chunk_index: int | None = None) -> None:
        """At startup (`chunk_index` None) or before Phase B of `mutate_weight_at_chunk`."""
        if self.mutate_weight_rank == rank and chunk_index == self.mutate_weight_at_chunk:
            param = model.get_parameter("head.modulation")  # replicated under TP
            with torch.no_grad():
                param.add_(1e-3)

    def corrupt_plan(self, chunk_index: int, inputs: GeneratorInputs) -> GeneratorInputs:
        if self.bad_plan_at_chunk != chunk_index:
            return inputs
        return dataclasses.replace(inputs, expected_generator_calls=inputs.expected_generator_calls + 1)

    def perturb_inputs(self, inputs: GeneratorInputs, rank: int) -> GeneratorInputs:
        if self.perturb_input_rank != rank:
            return inputs
        return dataclasses.replace(inputs, latents=inputs.latents + 1e-3)


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
