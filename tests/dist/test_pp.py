"""The `pp` topology end to end on CPU/gloo: rank0 out of the mesh, launched as users launch it.

- Equivalence: PP0 (rank0 + one mesh rank) and PP1 (rank0 + a TP=2 mesh) match the
  single-process run within 1e-4 on the generator output over 6 chunks with a soft transition, a
  scheduled hard cut and recompute r0a; only rank0 writes video and metrics.
- OM-07: the leader receives an envelope it must reject -> it never starts the mesh broadcast of
  that payload, broadcasts a terminal ERROR (mesh peers exit with the peer-abort code) and tells
  rank0 (PeerAbort).
- OM-08: a Phase B collective issued on the world group instead of mesh_pg raises GroupError on
  every mesh rank before the backend is called; rank0 is told; the job exits fast.
- OM-09: an immediate cut while results are in flight: rank0 drops the old-epoch results by
  `cache_epoch` (counted, logged, never decoded) and the stream continues.
- O-01 / O-02 / O-03 with the parity-checked stage-cost hooks (a fixed, known cost per stage):
  D=1 serializes (period ~ stage0 + stage1), D=2 overlaps (period ~ max); a planted
  "decode before send" bug shows the serialization signature; r0a costs the overlap, off keeps it.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import numpy as np
import pytest

from streamdit.protocol.header import Action
from streamdit.runtime.inspect import inspect_records
from streamdit.runtime.metrics import read_metrics

from ranks import BOUND_S, GEOM, TIMELINE, all_failed_fast, latents, run_cli, single_reference, spawn_ranks

pytestmark = pytest.mark.timeout(180)


STAGE0_MS, STAGE1_MS = 150, 250


def _rows(path: Path) -> list[dict]:
    return read_metrics(path).chunks


@pytest.fixture(scope="module")
def single_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[np.ndarray]]:
    return single_reference(tmp_path_factory.mktemp("single"))


@pytest.mark.parametrize(
    ("nproc", "warmup"), [(2, "auto"), (3, "auto"), (3, "on")], ids=["pp0", "pp1-tp2", "pp1-tp2-warmup"]
)
def test_pp_matches_single_process(tmp_path: Path, single_run, nproc: int, warmup: str) -> None:
    """`--warmup on`: the mesh's startup warm-up (what CUDA runs by default) leaves no state in
    the stream: the output is the same."""
    (tmp_path / "tl.json").write_text(TIMELINE)
    out, metrics = tmp_path / "v.npy", tmp_path / "m.jsonl"
    args = ["--topology", "pp", "--nproc", str(nproc), *GEOM, "--chunks", "6", "--recompute", "r0a"]
    args += ["--warmup", warmup]
    args += ["--timeline", str(tmp_path / "tl.json"), "--out", str(out), "--metrics", str(metrics)]
    proc = run_cli(args + ["--dist-timeout", "20"], hooks={"STREAMDIT_TEST_DUMP_LATENTS": str(tmp_path / "lat")}, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    ref_video, ref_latents = single_run
    got = latents(tmp_path / "lat")
    assert len(got) == len(ref_latents) == 6
    for k, (a, b) in enumerate(zip(got, ref_latents, strict=True)):
        assert np.abs(a - b).max() <= 1e-4, f"chunk {k}: max abs diff {np.abs(a - b).max()}"
    frames, frames_single = np.load(out), np.load(ref_video)
    assert frames.shape == frames_single.shape
    assert np.abs(frames.astype(int) - frames_single.astype(int)).max() <= 1
    rows = _rows(metrics)
    assert [r["cache_epoch"] for r in rows] == [0, 0, 0, 0, 1, 1]
    assert [r["generator_calls"] for r in rows] == [4, 5, 5, 5, 4, 5]
    assert all(r["stage1_ms"] > 0 and r["stage0_ms"] > 0 for r in rows)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lat", "m.jsonl", "tl.json", "v.npy"]  # rank0 only


def test_recompute_r0_builds_the_same_anchor_in_every_topology(tmp_path: Path) -> None:
    """r0: the generator ranks keep their own latents as the anchor; single, TP=2 and PP1 agree
    (the cache policy travels in every envelope: tp once failed this at chunk 1)."""
    base = [*GEOM, "--chunks", "5", "--recompute", "r0"]
    runs = {}
    layouts = (
        ("single", []),
        ("tp", ["--topology", "tp", "--nproc", "2", "--dist-timeout", "20"]),
        ("pp", ["--topology", "pp", "--nproc", "3", "--dist-timeout", "20"]),
    )
    for name, extra in layouts:
        hooks = {"STREAMDIT_TEST_DUMP_LATENTS": str(tmp_path / name)}
        proc = run_cli([*base, *extra, "--out", str(tmp_path / f"{name}.npy")], hooks=hooks, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs[name] = latents(tmp_path / name)
    assert len(runs["single"]) == len(runs["tp"]) == len(runs["pp"]) == 5
    for name in ("tp", "pp"):
        for k, (a, b) in enumerate(zip(runs[name], runs["single"], strict=True)):
            assert np.abs(a - b).max() <= 1e-4, f"{name} chunk {k}: max abs diff {np.abs(a - b).max()}"


@pytest.mark.parametrize("warmup", ["on", "off"])
def test_first_use_cost_of_the_mesh_is_paid_in_the_startup_warmup(tmp_path: Path, warmup: str) -> None:
    """A GPU's first-use work (here: 6 s more on each mesh rank's first generator call, 3x
    --dist-timeout; seen on NCCL as a 10.5 s first chunk) belongs to startup. With the warm-up
    the mesh pays it before the startup rendezvous, under --startup-timeout, and the stream
    runs; without it rank0's wait for result 0 runs past --dist-timeout: a fast, named failure."""
    # a short watchdog window: rank0 classifies its transport error (peer lost or not) sooner
    flags = ["--dist-timeout", "2", "--watchdog-window", "4", "--warmup", warmup, "--log-level", "INFO"]
    hooks = {"STREAMDIT_TEST_FIRST_CALL_MS": "6000"}
    rank0, leader, peer = spawn_ranks([flags] * 3, hooks, topology="pp", out_dir=tmp_path)
    if warmup == "on":
        for o in (rank0, leader, peer):
            assert o.code == 0, f"rank {o.rank} exited {o.code}:\n{o.log[-3000:]}"
        for o in (leader, peer):  # the mesh warmed up; rank0 (no generator) did not
            assert "generator warm-up: " in o.log, o.log[-3000:]
        assert "generator warm-up" not in rank0.log
        assert np.load(tmp_path / "v.npy").shape[0] == 9 + 12 + 12
        return
    assert rank0.code != 0 and rank0.since_ready < BOUND_S, rank0.log[-3000:]
    assert "TransportError: receiving header failed" in rank0.log, rank0.log[-3000:]
    assert "[field=header, group=link]" in rank0.log  # the wait for result 0
    assert "generator warm-up" not in leader.log
    assert all(o.since_ready < BOUND_S for o in (leader, peer))


def test_om07_leader_rejects_an_envelope_and_the_mesh_exits_cleanly(tmp_path: Path) -> None:
    hooks = {"STREAMDIT_TEST_BAD_PLAN_AT_CHUNK": "1", "STREAMDIT_TEST_SKIP_SENDER_VALIDATION": "1"}
    rank0, leader, peer = spawn_ranks([[], [], []], hooks, topology="pp", out_dir=tmp_path)
    # the leader rejects from the meta alone, before allocating or broadcasting the payload
    assert leader.code != 0 and leader.since_ready < BOUND_S, leader.log[-3000:]
    assert "PlanMismatchError" in leader.log and "expected_generator_calls" in leader.log
    assert "chunk_index=1" in leader.log and "call_id=1" in leader.log
    # the peer got a terminal ERROR instead of the payload and exited with the peer-abort code
    assert peer.code == 5 and peer.since_ready < BOUND_S, peer.log[-3000:]
    assert "PeerAbort" in peer.log and "PlanMismatchError" in peer.log
    record = json.loads((tmp_path / "flight" / "rank2.json").read_text())
    received = [(e["action"], e["chunk_index"]) for e in record["events"] if e["name"] == "header_received"]
    assert received == [(Action.INFER.value, 0), (Action.ERROR.value, -1)]  # never chunk 1's header
    # rank0 learns it from the leader's ERROR result, fast, and keeps chunk 0's frames
    assert rank0.code == 5 and rank0.since_ready < BOUND_S, rank0.log[-3000:]
    assert "PeerAbort" in rank0.log and "mesh leader aborted" in rank0.log
    assert np.load(tmp_path / "v.npy").shape[0] == 9  # chunk 0 decoded and written
    # `streamdit inspect` tells the cause (the leader) from the ranks that followed
    report = inspect_records(tmp_path)
    assert {r.rank: r.outcome for r in report.ranks} == {0: "symptom", 1: "cause", 2: "symptom"}
    assert report.first_failing == 1 and "PlanMismatchError" in report.why


def test_om08_collective_on_the_world_group_raises_before_the_backend() -> None:
    rank0, leader, peer = spawn_ranks([[], [], []], {"STREAMDIT_TEST_WRONG_GROUP_AT_CHUNK": "1"}, topology="pp")
    for o in (leader, peer):
        assert o.code == 1 and o.since_ready < BOUND_S, o.log[-3000:]
        assert "GroupError" in o.log and "group 'world'" in o.log and "may only use 'mesh'" in o.log
    assert rank0.code == 5 and rank0.since_ready < BOUND_S, rank0.log[-3000:]
    assert "GroupError" in rank0.log  # the leader's ERROR result names the cause


def test_om09_results_in_flight_at_an_immediate_cut_are_dropped_not_decoded(tmp_path: Path) -> None:
    timeline = tmp_path / "tl.json"
    timeline.write_text('{"entries": [{"chunk": 0, "prompt": "a"}, {"chunk": 3, "prompt": "b", "transition": "cut"}]}')
    flags = ["--timeline", str(timeline), "--queue-depth", "2", "--recompute", "off"]
    flags += ["--metrics", str(tmp_path / "m.jsonl")]
    hooks = {"STREAMDIT_TEST_STAGE1_MS": "150"}  # results arrive after the cut was prepared
    rank0, leader = spawn_ranks([flags, flags], hooks, topology="pp", out_dir=tmp_path, chunks=6)
    assert rank0.code == 0 and leader.code == 0, rank0.log[-3000:]
    rows = _rows(tmp_path / "m.jsonl")
    # chunks 1 and 2 (epoch 0) were in flight when chunk 3 bumped the epoch: dropped, never decoded
    assert [r["chunk_index"] for r in rows] == [0, 3, 4, 5]
    assert [r["cache_epoch"] for r in rows] == [0, 1, 1, 1]
    assert "dropped stale result call_id=1 chunk_index=1 cache_epoch=0" in rank0.log
    assert "dropped stale result call_id=2 chunk_index=2 cache_epoch=0" in rank0.log
    # only decoded chunks are in the video; an epoch starts with a 9-frame chunk
    assert np.load(tmp_path / "v.npy").shape[0] == 9 + 9 + 12 + 12
    summary = read_metrics(tmp_path / "m.jsonl").summary
    assert summary is not None
    assert (summary["dropped_stale"], summary["chunks"], summary["frames"]) == (2, 4, 42)
    assert (summary["outcome"], summary["topology"]) == ("completed", "pp")


def _overlap_run(tmp_path: Path, depth: int, recompute: str, hooks: dict[str, str]) -> tuple[float, float, list]:
    """One pp job with the fixed stage costs; (median period after warm-up, OverlapScore, rows)."""
    metrics = tmp_path / f"m{depth}{recompute}{len(hooks)}.jsonl"
    flags = ["--queue-depth", str(depth), "--metrics", str(metrics), "--recompute", recompute]
    # fixed costs that dominate the tiny model's real work on any CPU: stage1 > stage0
    base = {"STREAMDIT_TEST_STAGE0_MS": str(STAGE0_MS), "STREAMDIT_TEST_STAGE1_MS": str(STAGE1_MS), **hooks}
    outcomes = spawn_ranks([flags, flags], base, topology="pp", out_dir=tmp_path, chunks=7)
    assert all(o.code == 0 for o in outcomes), outcomes[0].log[-3000:]
    rows = _rows(metrics)[2:]  # after warm-up
    period = statistics.median(r["period_ms"] for r in rows)
    score = float(outcomes[0].log.split("overlap_score=", 1)[1].split()[0])
    summary = read_metrics(metrics).summary
    assert summary is not None and summary["overlap_score"] == pytest.approx(score, abs=1e-3)
    return period, score, rows


def test_o01_queue_depth_1_serializes_and_2_overlaps(tmp_path: Path) -> None:
    p1, s1, _ = _overlap_run(tmp_path, 1, "off", {})
    p2, s2, _ = _overlap_run(tmp_path, 2, "off", {})
    # D=1: the period is about stage0 + stage1; D=2: about max(stage0, stage1)
    assert p1 >= 0.95 * (STAGE0_MS + STAGE1_MS) and s1 <= 0.3, (p1, s1)
    assert p2 <= 0.75 * p1 and s2 >= 0.6, (p2, s2, p1)


def test_o02_planted_decode_before_send_bug_shows_the_serialization_signature(tmp_path: Path) -> None:
    p2, s2, healthy = _overlap_run(tmp_path, 2, "off", {})
    pb, sb, buggy = _overlap_run(tmp_path, 2, "off", {"STREAMDIT_TEST_DECODE_BEFORE_SEND": "1"})
    # healthy: the mesh never waits long for work; the bug: period back to the sum, and the mesh
    # idles for about the decode time while the queues sit empty
    assert s2 >= 0.6 and statistics.median(r["mesh_idle_ms"] for r in healthy) < 60, (p2, s2)
    assert pb >= 0.95 * (STAGE0_MS + STAGE1_MS) and sb <= 0.3, (pb, sb)
    assert statistics.median(r["mesh_idle_ms"] for r in buggy) >= 0.9 * STAGE0_MS
    assert all(r["d_out"] == 0 for r in buggy)


def test_o03_recompute_r0a_costs_the_overlap_that_off_keeps(tmp_path: Path) -> None:
    po, so, _ = _overlap_run(tmp_path, 2, "off", {})
    pr, sr, _ = _overlap_run(tmp_path, 2, "r0a", {})
    # r0a ties each envelope to the previous decode: the stages serialize
    assert so >= 0.6 and sr <= 0.3 and pr >= 0.95 * (STAGE0_MS + STAGE1_MS), (po, so, pr, sr)
    print(f"O-03: off {po:.0f} ms/chunk, score {so:.2f}; r0a {pr:.0f} ms/chunk, score {sr:.2f}")
