"""The `tp` topology end to end on CPU/gloo, launched the way users launch it.

- Equivalence: `streamdit run --topology tp --nproc N` (the local launcher) for N = 2, 4
  matches the single-process run within 1e-4 on the generator output, over 6 chunks with a soft
  transition, a hard cut and KV recompute on; only rank0 writes video and metrics.
- Break-it rows, each asserting which rank failed, how, with which ids, and that every rank
  exited within the bound: ranks started with different flags (OM-04 / OM-05 / bad input across
  ranks), a perturbed input on one worker (OM-11), a mutated replicated weight (OM-12), an
  `auto` backend that resolves differently (C-04).
Ranks for the break-it rows are started as torchrun would (RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR, MASTER_PORT) so each can get its own flags; every process group is killed on exit.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from ranks import BOUND_S, GEOM, TIMELINE, all_failed_fast, latents, run_cli, single_reference, spawn_ranks
from streamdit.runtime.metrics import read_metrics

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def single_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[np.ndarray]]:
    return single_reference(tmp_path_factory.mktemp("single"))


@pytest.mark.parametrize("nproc", [2, 4])
def test_tp_matches_single_process(tmp_path: Path, single_run, nproc: int) -> None:
    (tmp_path / "tl.json").write_text(TIMELINE)
    dump, out, metrics = tmp_path / "lat", tmp_path / "v.npy", tmp_path / "m.jsonl"
    args = ["--topology", "tp", "--nproc", str(nproc), *GEOM, "--chunks", "6", "--dist-timeout", "20"]
    args += ["--timeline", str(tmp_path / "tl.json"), "--out", str(out), "--metrics", str(metrics)]
    proc = run_cli(args, hooks={"STREAMDIT_TEST_DUMP_LATENTS": str(dump)}, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    ref_video, ref_latents = single_run
    got = latents(dump)
    assert len(got) == len(ref_latents) == 6
    for k, (a, b) in enumerate(zip(got, ref_latents, strict=True)):
        assert np.abs(a - b).max() <= 1e-4, f"chunk {k}: max abs diff {np.abs(a - b).max()}"
    frames_tp, frames_single = np.load(out), np.load(ref_video)
    assert frames_tp.shape == frames_single.shape
    assert np.abs(frames_tp.astype(int) - frames_single.astype(int)).max() <= 1  # uint8 rounding
    rows = read_metrics(metrics).chunks
    assert [r["cache_epoch"] for r in rows] == [0, 0, 0, 0, 1, 1]
    assert [r["generator_calls"] for r in rows] == [4, 5, 5, 5, 4, 5]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lat", "m.jsonl", "tl.json", "v.npy"]  # rank0 only


@pytest.mark.parametrize(
    ("rank1_flags", "key"),
    [
        (["--steps", "3"], "denoising_step_list"),  # bad input across ranks
        (["--preset", "wan-1.3b"], "preset"),  # OM-04: a different model on one rank
        (["--input-digest-every", "0"], "input_digest_every"),  # OM-05: a flag gating a collective
        (["--compile"], "compile"),  # C-01: compile on one rank only, caught before any compile
    ],
    ids=["steps", "preset", "digest-flag", "compile"],
)
def test_rank_flag_mismatch_fails_every_rank_with_the_table(rank1_flags: list[str], key: str) -> None:
    outcomes = spawn_ranks([[], rank1_flags])
    all_failed_fast(outcomes, "ParityError", key)


def test_test_hook_on_one_rank_only_is_a_parity_failure() -> None:
    outcomes = spawn_ranks([[], []], per_rank={1: {"STREAMDIT_TEST_SLOW_CHUNK_MS": "5"}})
    all_failed_fast(outcomes, "ParityError", "STREAMDIT_TEST_SLOW_CHUNK_MS")


def test_om11_perturbed_input_on_a_worker_trips_the_input_digest(tmp_path: Path) -> None:
    outcomes = spawn_ranks([[], []], {"STREAMDIT_TEST_PERTURB_INPUT_RANK": "1"}, out_dir=tmp_path)
    all_failed_fast(outcomes, "DriftError", "input digest mismatch on ranks [1]", "latents", "chunk_index=0")
    for o in outcomes:  # each rank left a flight record: what it sent / received, then the fatal error
        path = re.search(r"flight record: (\S+)", o.log)
        assert path, o.log[-2000:]
        record = json.loads(Path(path.group(1)).read_text())
        names = [e["name"] for e in record["events"]]
        assert names[-1] == "fatal" and "DriftError" in record["events"][-1]["detail"]
        assert ("header_sent" if o.rank == 0 else "message_received") in names


def test_om12_mutated_replicated_weight_trips_the_fingerprint_check() -> None:
    outcomes = spawn_ranks([[], []], {"STREAMDIT_TEST_MUTATE_WEIGHT_RANK": "1"})
    all_failed_fast(outcomes, "ParityError", "fingerprint")


def test_om12_weight_mutated_mid_stream_is_caught_at_the_next_init_cache(tmp_path: Path) -> None:
    """Fingerprints are re-checked on a later chunk that re-initializes the cache (a hard cut)."""
    timeline = tmp_path / "tl.json"
    timeline.write_text('{"entries": [{"chunk": 0, "prompt": "a"}, {"chunk": 2, "prompt": "b", "transition": "hard"}]}')
    hooks = {
        "STREAMDIT_TEST_MUTATE_WEIGHT_RANK": "1",
        "STREAMDIT_TEST_MUTATE_WEIGHT_AT_CHUNK": "1",
        "STREAMDIT_TEST_DUMP_LATENTS": str(tmp_path / "lat"),
    }
    # output digests off: only the fingerprint check can catch the mutation
    flags = ["--timeline", str(timeline), "--output-digest-every", "0"]
    outcomes = spawn_ranks([flags, flags], hooks, out_dir=tmp_path)
    all_failed_fast(outcomes, "ParityError", "replicated-weight fingerprint differs on ranks [1]")
    # chunks 0 and 1 were generated (the mutation ran undetected through chunk 1), chunk 2 was not
    assert len(latents(tmp_path / "lat")) == 2


def test_c04_auto_backend_resolving_differently_fails_at_startup() -> None:
    outcomes = spawn_ranks([[], []], {"STREAMDIT_TEST_BACKEND_RANK": "1:efficient"})
    all_failed_fast(outcomes, "ParityError", "effective_attn_backend")


def test_om03_inconsistent_plan_is_rejected_by_rank0_before_the_broadcast() -> None:
    rank0, worker = spawn_ranks([[], []], {"STREAMDIT_TEST_BAD_PLAN_AT_CHUNK": "1"})
    assert rank0.code != 0 and rank0.since_ready < BOUND_S, rank0.log[-3000:]
    assert "PlanMismatchError" in rank0.log and "expected_generator_calls" in rank0.log
    assert "chunk_index=1" in rank0.log
    # the worker never saw the bad envelope: rank0 told it to stop, with a terminal ERROR or
    # its abort announced through the store (whichever arrives first), naming the error
    assert worker.code == 5 and worker.since_ready < BOUND_S, worker.log[-3000:]
    told = "PeerAbort" in worker.log or "rank 0 aborted: PlanMismatchError" in worker.log
    assert told and "PlanMismatchError" in worker.log, worker.log[-3000:]


def test_om03_inconsistent_plan_forced_past_rank0_is_rejected_by_the_worker() -> None:
    hooks = {"STREAMDIT_TEST_BAD_PLAN_AT_CHUNK": "1", "STREAMDIT_TEST_SKIP_SENDER_VALIDATION": "1"}
    outcomes = spawn_ranks([[], []], hooks)
    rank0, worker = outcomes
    # the worker rejects from the meta alone, before allocating tensors or entering Phase B
    assert worker.code != 0 and worker.since_ready < BOUND_S, worker.log[-3000:]
    assert "PlanMismatchError" in worker.log and "expected_generator_calls" in worker.log, worker.log[-3000:]
    assert "chunk_index=1" in worker.log and "call_id=1" in worker.log, worker.log[-3000:]
    # rank0 is then stranded in its next collective with a dead peer: it must fail, not hang
    assert rank0.code != 0 and rank0.since_ready < BOUND_S, rank0.log[-3000:]
