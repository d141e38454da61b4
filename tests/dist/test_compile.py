"""torch.compile across ranks on CPU/gloo: equivalence to eager and the compile-health gates.

- Compiled TP=2 (aot_eager, functional collectives inside the graph) equals eager TP=2 within
  1e-4 over 6 chunks (soft transition, hard cut, r0a recompute); compiled PP1 (rank0 + a TP=2
  mesh) equals the eager single-process run; the default inductor backend compiles the tiny
  preset and matches eager.
- C-02: in-place collectives behind `dynamo.disable` (the reference system's layout) put a
  graph break at every collective: every rank fails the budget at startup, naming the count,
  the budget and dynamo's reason, before chunk 0.
- C-03: a graph break on one rank only: the post-warm-up counter gather differs, every rank
  fails naming that rank (under pp too, where rank0 runs no generator but joins the gather).
- Startup bound: pp's rank0 waits out a mesh startup 3× longer than --dist-timeout, compiled
  or eager (its first wait runs on the `startup` group); capped by --startup-timeout, the same
  wait fails fast, named.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from ranks import GEOM, TIMELINE, all_failed_fast, latents, run_cli, single_reference, spawn_ranks

pytestmark = pytest.mark.timeout(240)
AOT = ["--compile", "--compile-backend", "aot_eager"]


def _run(tmp: Path, name: str, args: list[str]) -> tuple[list[np.ndarray], str]:
    """One `streamdit run` over TIMELINE (6 chunks); its generator outputs and its log."""
    (tmp / "tl.json").write_text(TIMELINE)
    dump = tmp / f"lat-{name}"
    common = [*GEOM, "--chunks", "6", "--timeline", str(tmp / "tl.json")]
    common += ["--out", str(tmp / f"{name}.npy"), "--log-level", "INFO"]
    if "--topology" in args:  # a single process has no process group to time out
        common += ["--dist-timeout", "20"]
    proc = run_cli([*common, *args], hooks={"STREAMDIT_TEST_DUMP_LATENTS": str(dump)}, cwd=tmp)
    assert proc.returncode == 0, proc.stderr[-4000:]
    got = latents(dump)
    assert len(got) == 6
    return got, proc.stderr


def _close(got: list[np.ndarray], ref: list[np.ndarray], tol: float) -> None:
    for k, (a, b) in enumerate(zip(got, ref, strict=True)):
        assert np.abs(a - b).max() <= tol, f"chunk {k}: max abs diff {np.abs(a - b).max()}"


def _health(log: str) -> list[str]:
    """The compile-health lines of every rank: one per generator rank."""
    return re.findall(r"compile warm-up [\d.]+ s: (CompileCounters\(.*\))", log)


def test_compiled_tp2_matches_eager_tp2(tmp_path: Path) -> None:
    tp2 = ["--topology", "tp", "--nproc", "2"]
    eager, _ = _run(tmp_path, "eager", tp2)
    compiled, log = _run(tmp_path, "compiled", [*tp2, *AOT])
    _close(compiled, eager, 1e-4)
    health = _health(log)
    assert len(health) == 2, log[-3000:]  # both ranks warmed up and were judged
    assert all("breaks_per_call=0" in h and "steady_recompiles=0" in h for h in health), health
    assert health[0] == health[1]


def test_compiled_pp1_matches_eager_single(tmp_path: Path) -> None:
    _, ref = single_reference(tmp_path)
    compiled, log = _run(tmp_path, "pp", ["--topology", "pp", "--nproc", "3", *AOT])
    _close(compiled, ref, 1e-4)
    assert len(_health(log)) == 2, log[-3000:]  # the two mesh ranks; rank0 has no generator


def test_default_inductor_backend_compiles_the_tiny_preset(tmp_path: Path) -> None:
    _, ref = single_reference(tmp_path)
    compiled, log = _run(tmp_path, "inductor", ["--compile"])
    _close(compiled, ref, 1e-4)
    (health,) = _health(log)
    assert "breaks_per_call=0" in health and "graphs_per_call=2" in health, health


def test_c02_graph_break_around_every_collective_fails_the_budget(tmp_path: Path) -> None:
    outcomes = spawn_ranks([AOT, AOT], {"STREAMDIT_TEST_DISABLED_COLLECTIVES": "1"}, out_dir=tmp_path)
    all_failed_fast(
        outcomes, "CompileHealthError", "graph breaks per generator call > budget 2", "disable()`d"
    )
    for o in outcomes:
        assert o.code == 1, o.log[-3000:]
        # tiny: 2 blocks x 5 all-reduces, each hidden from dynamo: at least one break apiece
        breaks = int(re.search(r"(\d+) graph breaks per generator call", o.log).group(1))
        assert breaks >= 10, o.log[-3000:]
        assert "chunk_index" not in o.log.split("CompileHealthError")[0]  # failed before chunk 0
    assert not (tmp_path / "v.npy").exists()


def test_c03_graph_break_on_one_rank_fails_the_counter_gather(tmp_path: Path) -> None:
    outcomes = spawn_ranks([AOT, AOT], {"STREAMDIT_TEST_GRAPH_BREAK_RANK": "1"}, out_dir=tmp_path)
    all_failed_fast(outcomes, "CompileHealthError", "differ across ranks after warm-up (ranks [1] vs rank 0)")
    for o in outcomes:
        assert o.code == 1, o.log[-3000:]


def test_c03_under_pp_rank0_learns_the_mesh_verdict(tmp_path: Path) -> None:
    outcomes = spawn_ranks(
        [AOT, AOT, AOT], {"STREAMDIT_TEST_GRAPH_BREAK_RANK": "2"}, topology="pp", out_dir=tmp_path
    )
    all_failed_fast(outcomes, "CompileHealthError", "(ranks [2] vs rank 1)")


@pytest.mark.parametrize(
    ("extra", "error", "gather"),
    [(AOT, "CompileHealthError", "compile-health gather"), ([], "PeerLost", "startup rendezvous")],
    ids=["compiled", "eager"],
)
def test_pp_rank0_waits_out_a_mesh_startup_longer_than_dist_timeout(
    tmp_path: Path, extra: list[str], error: str, gather: str
) -> None:
    """The mesh spends 3× --dist-timeout more on startup (as a large preset's load or compile
    does): rank0's first wait is on the `startup` group (the compile verdict, or the startup
    rendezvous before the first transfer), so the job still succeeds; capping --startup-timeout
    below that delay turns the same wait into a fast, named failure on both ranks."""
    hooks = {"STREAMDIT_TEST_MESH_STARTUP_MS": "6000"}
    flags = [*extra, "--dist-timeout", "2"]
    ok = spawn_ranks([flags, flags], hooks, topology="pp", out_dir=tmp_path / "ok")
    for o in ok:
        assert o.code == 0, f"rank {o.rank} exited {o.code}:\n{o.log[-3000:]}"
    # the mesh's gather comes after its delay and its warm-up (6.5 s of aot_eager on a loaded
    # 2-core box): a long watchdog window keeps the orphan verdict from racing it
    capped = [*flags, "--startup-timeout", "3", "--watchdog-window", "30"]
    failed = spawn_ranks([capped, capped], hooks, topology="pp", out_dir=tmp_path / "capped")
    all_failed_fast(failed, error, f"{gather} on group 'startup'", "--startup-timeout 3 s")
    waited = re.search(r"failed on rank 0 after ([\d.]+) s", failed[0].log)
    assert waited is not None, failed[0].log[-3000:]
    assert 2.5 <= float(waited.group(1)) < 6.0  # rank0 gave up at the startup bound, not before
