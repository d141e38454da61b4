"""Compile health: the judge's rules on gathered counters, the warm-up plan, the counting probe."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from streamdit.config import RunConfig
from streamdit.errors import CompileHealthError, ConfigError
from streamdit.model.presets import get_dit_config
from streamdit.protocol.header import Ids
from streamdit.runtime.build import build_generator, validate_run
from streamdit.runtime.compile_health import (
    CompileCounters,
    compile_gate,
    eager_warmup,
    judge,
    warmup_chunks,
)
from streamdit.runtime.faults import FaultPlan

OK = CompileCounters(
    generator=1,
    graph_breaks=0,
    unique_graphs=3,
    graphs_compiled=3,
    graphs_per_call=2,
    breaks_per_call=0,
    steady_recompiles=0,
)


def test_agreeing_ranks_within_budget_pass_and_absent_rows_are_ignored() -> None:
    judge([CompileCounters.absent(), OK, OK], blocks=2, budget=0)


def test_a_rank_that_compiled_differently_fails_naming_it() -> None:
    other = dataclasses.replace(OK, graphs_per_call=4, breaks_per_call=2, graph_breaks=2)
    with pytest.raises(CompileHealthError, match=r"ranks \[2\] vs rank 0") as err:
        judge([OK, OK, other], blocks=2, budget=5)
    table = str(err.value).splitlines()[1:]
    assert table[0].split()[:2] == ["rank", "graph_breaks"] and len(table) == 4  # header + 3 ranks


def test_breaks_over_budget_fail_with_count_budget_and_reasons() -> None:
    broken = dataclasses.replace(OK, graphs_per_call=6, breaks_per_call=4)
    with pytest.raises(
        CompileHealthError, match=r"4 graph breaks per generator call > budget 2.*disabled fn"
    ):
        judge([broken, broken], blocks=2, budget=2, reasons=["disabled fn (x4)"])
    judge([broken, broken], blocks=2, budget=4)  # at the budget is fine


def test_blocks_that_fell_back_to_eager_fail() -> None:
    eager = dataclasses.replace(OK, graphs_per_call=0)
    with pytest.raises(CompileHealthError, match="fell back to eager"):
        judge([eager], blocks=2, budget=2)


@pytest.mark.parametrize("recompute", ["off", "r0a", "r0", "append"])
def test_warmup_plan_reaches_the_steady_window_then_a_soft_chunk(recompute: str) -> None:
    cfg = RunConfig(recompute=recompute, height=32, width=48, local_attn_frames=6, frames_per_chunk=3)
    chunks = warmup_chunks(cfg, get_dit_config("tiny"), torch.device("cpu"), torch.float32)
    assert chunks[0].init_cache and not any(c.init_cache for c in chunks[1:])
    # the window (6 frames) is full and evicting before the last two chunks
    assert chunks[-2].current_start_frame >= cfg.local_attn_frames + cfg.frames_per_chunk
    assert [c.kv_cache_attention_bias for c in chunks[-2:]] == [1.0, cfg.soft_bias]
    # the soft chunk brings a new conditioning (a blend step), so its text K/V refill warms up
    assert [c.conditioning_updated for c in chunks[-2:]] == [False, True]
    assert chunks[-1].reset_crossattn_cache
    assert not torch.equal(chunks[-1].conditioning_embeds, chunks[-2].conditioning_embeds)
    for k, c in enumerate(chunks):
        c.check()  # a plan the generator accepts
        assert c.cache_policy == cfg.cache_policy.value
        assert c.do_kv_recompute == (recompute in ("r0a", "r0") and k > 0)
        assert c.latents.shape == (1, 3, 16, 4, 6)


def _runner(budget: int, hooks: dict[str, str] | None = None):
    cfg = RunConfig(
        height=32,
        width=48,
        compile=True,
        compile_backend="aot_eager",
        graph_break_budget=budget,
        test_hooks=hooks or {},
    )
    run = validate_run(cfg)
    runner = build_generator(run)
    FaultPlan.from_config(cfg).arm(runner, 0)
    return cfg, run, runner


def test_the_probe_measures_a_clean_compile_and_a_broken_one() -> None:
    cfg, run, runner = _runner(0)
    clean = compile_gate(runner, cfg, run.dit, None, allowed="world")
    assert clean is not None and clean.breaks_per_call == 0 and clean.steady_recompiles == 0
    assert clean.graphs_per_call == run.dit.num_layers  # one graph per compiled block
    cfg, run, runner = _runner(0, {"STREAMDIT_TEST_GRAPH_BREAK_RANK": "0"})
    with pytest.raises(CompileHealthError, match="graph_break"):
        compile_gate(runner, cfg, run.dit, None, allowed="world")


def test_eager_warmup_runs_where_the_setting_says_and_leaves_the_stream_unchanged() -> None:
    assert RunConfig(topology="tp").eager_warmup("cuda") and RunConfig(topology="pp").eager_warmup("cuda")
    assert not RunConfig(topology="tp").eager_warmup("cpu")  # auto: distributed CUDA only
    assert not RunConfig().eager_warmup("cuda")  # single has no peer to time out on
    assert RunConfig(warmup="on").eager_warmup("cpu")
    assert not RunConfig(topology="pp", warmup="off").eager_warmup("cuda")
    with pytest.raises(ConfigError, match=r"field=warmup"):
        RunConfig(warmup="sometimes")
    cfg = RunConfig(height=32, width=48, warmup="on")
    assert "warmup" in cfg.parity_items()  # it decides whether collectives run at startup
    run = validate_run(cfg)
    warmed, fresh = build_generator(run), build_generator(run)
    ran = eager_warmup(warmed, cfg, run.dit)
    assert ran == len(warmup_chunks(cfg, run.dit, warmed.device, warmed.dtype))
    assert warmed.calls_made > 0
    assert eager_warmup(fresh, RunConfig(height=32, width=48, warmup="off"), run.dit) == 0
    for k, inputs in enumerate(warmup_chunks(cfg, run.dit, fresh.device, fresh.dtype)[:3]):
        ids = Ids(call_id=100 + k, chunk_index=k, cache_epoch=1)
        assert torch.equal(warmed.run(inputs, ids), fresh.run(inputs, ids))  # chunk 0 resets all
