"""Compile health (docs/protocol.md §11): startup warm-up, graph-break budget (C-02), counter parity (C-03).

Owns:
- `CompileProbe`, the torch.compile backend of every compiled block. It wraps the configured
  backend (inductor with its mode, aot_eager, eager) and counts the graphs it compiled and the
  graphs it ran. Each block is one compiled region, so a generator call that runs more graphs
  than the model has blocks broke somewhere: `graphs_per_call - blocks` is the number of graph
  breaks per generator call, measured on the real forward, not estimated from compile logs.
- `warmup_chunks(cfg, dit)`: the synthetic chunks of the warm-up, derived from the config alone
  (a parity-checked object), so every rank runs the same call plan and the same collectives.
- `compile_gate(...)`: called by the topology's startup code (never by a constructor): warm up,
  run one steady probe chunk, gather every rank's `CompileCounters` and judge them with
  `judge`, which every rank evaluates on the same gathered table, so all ranks fail together.
- `eager_warmup(...)`: the same synthetic chunks through an eager generator (`--warmup`), so a
  GPU's first-use work (library handles, kernels, the TP communicator) happens at startup,
  bounded by --startup-timeout, instead of inside chunk 0, bounded by the short --dist-timeout
  (seen on NCCL: a 2-rank mesh's first chunk took 10.5 s, past a 10 s timeout).
- `capture_warmup(...)`: after the compile gate, the same chunks once more with the generator's
  CUDA graphs on (runtime/graphs.py), so every signature a stream meets is captured at startup.
"""

from __future__ import annotations

import functools
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import astuple, dataclass, fields, replace
from typing import Any

import torch
import torch._dynamo
from torch._dynamo.utils import counters as dynamo_counters

from streamdit.config import RunConfig
from streamdit.errors import CompileHealthError
from streamdit.model.presets import DiTConfig
from streamdit.parallel.collectives import gather_at_startup
from streamdit.parallel.groups import GroupHandle
from streamdit.protocol.header import Ids
from streamdit.runtime.generator import GeneratorRunner
from streamdit.runtime.plan import GeneratorInputs, chunk_plan, seeded_normal
from streamdit.runtime.stage0 import LATENT_CHANNELS

log = logging.getLogger(__name__)
WARMUP_SEED = 0x5EED  # synthetic inputs: values do not matter, shapes and plan do
MAX_REASONS = 3


class CompileProbe:
    """A counting torch.compile backend (one per generator, shared by every block).

    Sharing one backend object keeps the blocks on one dynamo cache entry (the backend is part
    of the guard), so a 40-layer model still compiles one block graph.
    """

    def __init__(self, backend: str, mode: str) -> None:
        self.name = backend
        self.mode = mode
        self.graphs_compiled = 0
        self.graph_calls = 0
        self._inner: Callable[..., Any] | None = None

    def _compiler(self) -> Callable[..., Any]:
        if self._inner is None:
            if self.name == "inductor":
                from torch._inductor.compile_fx import compile_fx

                patches = torch._inductor.list_mode_options(self.mode) if self.mode != "default" else {}
                self._inner = functools.partial(compile_fx, config_patches=patches)
            else:
                self._inner = torch._dynamo.lookup_backend(self.name)
        return self._inner

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: list[Any]) -> Callable[..., Any]:
        compiled = self._compiler()(gm, example_inputs)
        self.graphs_compiled += 1

        def run(*args: Any) -> Any:
            self.graph_calls += 1
            return compiled(*args)

        return run


@dataclass(frozen=True, kw_only=True, slots=True)
class CompileCounters:
    """One rank's compile facts after warm-up (the gathered record; all ints, fixed layout)."""

    generator: int  # 1 on ranks that run the generator, 0 on pp's rank0 (row ignored)
    graph_breaks: int  # dynamo's graph-break events while compiling (warm-up)
    unique_graphs: int  # dynamo's distinct graphs
    graphs_compiled: int  # graphs our backend compiled (warm-up)
    graphs_per_call: int  # graphs run by one steady generator call
    breaks_per_call: int  # graphs_per_call - blocks (each block is one region)
    steady_recompiles: int  # graphs compiled during the steady probe chunk (should be 0)

    @classmethod
    def absent(cls) -> CompileCounters:
        return cls(**{f.name: 0 for f in fields(cls)})


def warmup_chunks(
    cfg: RunConfig, dit: DiTConfig, device: torch.device, dtype: torch.dtype
) -> list[GeneratorInputs]:
    """Enough chunks to reach the steady state every later chunk runs in, then one soft one.

    Chunk 0 initializes the cache; later chunks follow the run's cache policy (recompute,
    append) until the KV window is full and evicting, so every slot-bound variant a stream meets
    is compiled here; the last chunk is a soft transition (under the recipe's bias rule: the
    masked attention variant) with a new conditioning, as a blend step has (its text K/V
    refill). Plans come from `chunk_plan`, as Phase A's do.
    """
    steady = cfg.window_fill_chunks
    steps = torch.tensor(cfg.denoising_step_list, dtype=torch.int64)
    latent_shape = (1, cfg.frames_per_chunk, LATENT_CHANNELS, cfg.height // 8, cfg.width // 8)
    ctx_shape = (1, cfg.context_frames, *latent_shape[2:])
    text_shape = (1, dit.text_len, dit.text_dim)
    text = seeded_normal(WARMUP_SEED, text_shape, device=device, dtype=dtype)
    blended = seeded_normal(WARMUP_SEED + 1, text_shape, device=device, dtype=dtype)
    chunks = []
    for k in range(steady + 1):
        init, soft = k == 0, k == steady
        plan, bias = chunk_plan(cfg, init=init, soft_active=soft)
        ships_ctx = plan.do_kv_recompute and plan.cache_policy.ships_context
        chunks.append(
            GeneratorInputs(
                cache_policy=plan.cache_policy.value,
                height=cfg.height,
                width=cfg.width,
                current_start_frame=k * cfg.frames_per_chunk,
                init_cache=init,
                reset_kv_cache=init,
                reset_crossattn_cache=init or soft,  # a blend step is a new conditioning
                conditioning_updated=init or soft,
                kv_cache_attention_bias=bias,
                do_kv_recompute=plan.do_kv_recompute,
                num_denoise_steps=plan.num_denoise_steps,
                expected_generator_calls=plan.expected_generator_calls,
                base_seed=WARMUP_SEED + k,
                denoising_step_list=steps.clone(),
                latents=seeded_normal(WARMUP_SEED + k, latent_shape, device=device, dtype=dtype),
                conditioning_embeds=blended if soft else text,
                context_frames_override=(
                    seeded_normal(-k, ctx_shape, device=device, dtype=dtype) if ships_ctx else None
                ),
            )
        )
    return chunks


def measure(runner: GeneratorRunner, probe: CompileProbe, cfg: RunConfig, dit: DiTConfig) -> CompileCounters:
    """Warm up, then run the steady chunk once more and count what it ran and compiled."""
    before = _dynamo_totals()
    chunks = warmup_chunks(cfg, dit, runner.device, runner.dtype)
    for k, inputs in enumerate(chunks):
        runner.run(inputs, Ids(call_id=k, chunk_index=k, cache_epoch=0))
    after = _dynamo_totals()
    compiled, ran, calls = probe.graphs_compiled, probe.graph_calls, runner.calls_made
    steady = chunks[-2]  # bias 1.0, window full: what almost every chunk of a stream looks like
    runner.run(
        _shifted(steady, len(chunks) * cfg.frames_per_chunk),
        Ids(call_id=len(chunks), chunk_index=len(chunks), cache_epoch=0),
    )
    per_call = math.ceil((probe.graph_calls - ran) / max(runner.calls_made - calls, 1))
    return CompileCounters(
        generator=1,
        graph_breaks=after[0] - before[0],
        unique_graphs=after[1] - before[1],
        graphs_compiled=compiled,
        graphs_per_call=per_call,
        breaks_per_call=max(per_call - len(runner.model.blocks), 0),
        steady_recompiles=probe.graphs_compiled - compiled,
    )


def _shifted(inputs: GeneratorInputs, start: int) -> GeneratorInputs:
    return replace(inputs, current_start_frame=start)


def _dynamo_totals() -> tuple[int, int]:
    return sum(dynamo_counters["graph_break"].values()), dynamo_counters["stats"]["unique_graphs"]


def break_reasons(limit: int = MAX_REASONS) -> list[str]:
    """dynamo's graph-break reasons seen in this process, first line of each, most frequent first."""
    items = sorted(dynamo_counters["graph_break"].items(), key=lambda kv: -kv[1])
    return [f"{reason.splitlines()[0][:160]} (x{n})" for reason, n in items[:limit]]


def judge(rows: Sequence[CompileCounters], *, blocks: int, budget: int, reasons: Sequence[str] = ()) -> None:
    """Raise CompileHealthError unless the generator ranks agree (C-03) and stay in budget (C-02).

    Pure: every rank calls it on the same gathered rows, so every rank raises the same error.
    """
    present = [(r, row) for r, row in enumerate(rows) if row.generator]
    if not present:
        return
    ref_rank, ref = present[0]
    differ = [r for r, row in present if row != ref]
    if differ:
        raise CompileHealthError(
            f"compile counters differ across ranks after warm-up (ranks {differ} vs rank {ref_rank}): "
            "the ranks compiled different graphs, so their collective sequences may diverge\n"
            + _table(present)
        )
    if ref.graphs_per_call < blocks:
        raise CompileHealthError(
            f"a generator call ran {ref.graphs_per_call} compiled graphs for {blocks} compiled blocks: "
            "blocks fell back to eager (dynamo's recompile limit?)\n" + _table(present)
        )
    if ref.breaks_per_call > budget:
        why = "; ".join(reasons) if reasons else "no reason recorded by dynamo"
        raise CompileHealthError(
            f"{ref.breaks_per_call} graph breaks per generator call > budget {budget} "
            f"(--graph-break-budget); dynamo's reasons: {why}\n" + _table(present)
        )


def _table(present: Sequence[tuple[int, CompileCounters]]) -> str:
    names = [f.name for f in fields(CompileCounters)][1:]
    head = "rank  " + "  ".join(names)
    lines = [
        f"{r:>4}  " + "  ".join(f"{v:>{len(n)}}" for n, v in zip(names, astuple(c)[1:], strict=True))
        for r, c in present
    ]
    return "\n".join([head, *lines])


def compile_gate(
    runner: GeneratorRunner | None,
    cfg: RunConfig,
    dit: DiTConfig,
    handle: GroupHandle | None,
    *,
    allowed: str,
    record: Callable[[dict[str, object]], None] | None = None,
) -> CompileCounters | None:
    """Warm up the compiled generator and judge every rank's counters (no-op without --compile).

    `runner` is None on a rank without a generator (pp's rank0): it still takes part in the
    gather, with an absent row. `handle` None = single process (the budget alone applies).
    """
    if not cfg.compile:
        return None
    t0 = time.perf_counter()
    mine = CompileCounters.absent()
    blocks = dit.num_layers
    if runner is not None:
        probe = runner.compile_probe
        assert probe is not None, "compile on but the generator was not compiled through a probe"
        mine = measure(runner, probe, cfg, dit)
    warm_s = time.perf_counter() - t0
    rows = [mine]
    if handle is not None:
        gathered = gather_at_startup(
            list(astuple(mine)),
            handle,
            allowed=allowed,
            what="compile-health gather",
            bound_s=cfg.startup_timeout_s,
            error=CompileHealthError,
        )
        rows = [
            CompileCounters(**dict(zip([f.name for f in fields(CompileCounters)], row, strict=True)))
            for row in gathered
        ]
    if record is not None:
        record({"name": "compile_health", "detail": {**_as_dict(mine), "warmup_s": round(warm_s, 3)}})
    if mine.steady_recompiles:
        log.warning(
            "compiled generator recompiled %d graph(s) in the steady probe chunk", mine.steady_recompiles
        )
    if runner is not None:
        log.info("compile warm-up %.1f s: %s", warm_s, mine)
    judge(rows, blocks=blocks, budget=cfg.graph_break_budget, reasons=break_reasons())
    return mine


def eager_warmup(
    runner: GeneratorRunner,
    cfg: RunConfig,
    dit: DiTConfig,
    *,
    record: Callable[[dict[str, object]], None] | None = None,
) -> int:
    """Run the warm-up chunks once through an eager generator when `cfg.eager_warmup` says so
    (compile warms up in `compile_gate`). Every generator rank decides from parity-checked
    settings, so all of them run the same calls and collectives. Returns the chunks run."""
    if cfg.compile or not cfg.eager_warmup(runner.device.type):
        return 0
    t0 = time.perf_counter()
    chunks = warmup_chunks(cfg, dit, runner.device, runner.dtype)
    for k, inputs in enumerate(chunks):
        runner.run(inputs, Ids(call_id=k, chunk_index=k, cache_epoch=0))
    if runner.device.type == "cuda":  # the first-use work is done, not merely queued
        torch.cuda.current_stream(runner.device).synchronize()
    warm_s = time.perf_counter() - t0
    log.info("generator warm-up: %d chunks in %.1f s", len(chunks), warm_s)
    if record is not None:
        record({"name": "generator_warmup", "detail": {"chunks": len(chunks), "warmup_s": round(warm_s, 3)}})
    return len(chunks)


def _as_dict(c: CompileCounters) -> dict[str, int]:
    return {f.name: getattr(c, f.name) for f in fields(c)}


def capture_warmup(
    runner: GeneratorRunner,
    cfg: RunConfig,
    dit: DiTConfig,
    *,
    record: Callable[[dict[str, object]], None] | None = None,
) -> int:
    """Capture the generator calls' CUDA graphs when `cfg.graphs_calls()`; returns the count.

    Runs after `compile_gate`, whose counters need the compiled code itself to run: the warm-up
    chunks and the steady probe chunk again, graphs on, so each signature is seen twice (a graph
    is captured at its second sight, see runtime/graphs.py) before the stream's clock starts."""
    if not cfg.graphs_calls():
        return 0
    t0 = time.perf_counter()
    runner.graphs.enabled = True
    chunks = warmup_chunks(cfg, dit, runner.device, runner.dtype)
    chunks.append(_shifted(chunks[-2], len(chunks) * cfg.frames_per_chunk))
    for k, inputs in enumerate(chunks):
        runner.run(inputs, Ids(call_id=k, chunk_index=k, cache_epoch=0))
    torch.cuda.current_stream(runner.device).synchronize()
    warm_s = time.perf_counter() - t0
    captured, text = runner.graphs.captured, runner.graphs.captured_text
    log.info(
        "CUDA graphs: %d generator-call graphs and %d text-refill graphs captured in %.1f s",
        captured,
        text,
        warm_s,
    )
    if record is not None:
        detail = {"captured": captured, "text_refill": text, "warmup_s": round(warm_s, 3)}
        record({"name": "cuda_graphs", "detail": detail})
    return captured
