"""OM-13 and clean shutdown: heartbeats and the watchdog beside the data plane (CPU/gloo).

Ranks are started as torchrun would (rank0 hosts the rendezvous store); the watchdog window is
3 s and the process-group timeout 10 s, so a verdict within the window cannot be a PG timeout.
- rank0 SIGKILLed while idle (sleeping between chunks) and mid-stream, tp and pp: every other
  rank exits with the orphan code 4 within the window (+ start-up slack), saying why.
- a worker SIGSTOPped mid-stream: rank0 sees it stop heartbeating within the window, exits with
  code 6 naming the rank, and the video written so far is valid (every metrics line's frames).
- SIGTERM to rank0 mid-stream: it drains, every rank exits 0, the video holds every decoded frame.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from ranks import collect, env, start_ranks

pytestmark = pytest.mark.timeout(120)
WINDOW_S = 3.0
FLAGS = ["--watchdog-window", str(WINDOW_S), "--chunks", "40"]


def _wait_for_chunks(metrics: Path, n: int, procs: list, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= n:
            return
        dead = [p.returncode for p in procs if p.poll() is not None]
        assert not dead, f"a rank exited early: {dead}: {procs[0].communicate()[0][-3000:]}"
        time.sleep(0.02)
    raise AssertionError(f"fewer than {n} chunks after {timeout} s")


def _frames_in_metrics(metrics: Path) -> int:
    return sum(json.loads(line)["frames"] for line in metrics.read_text().splitlines())


@pytest.mark.parametrize(
    ("topology", "world", "idle"),
    [("tp", 2, True), ("tp", 2, False), ("pp", 3, True), ("pp", 3, False)],
    ids=["tp-idle", "tp-mid-stream", "pp-idle", "pp-mid-stream"],
)
def test_om13_rank0_killed_orphans_exit_with_code_4(tmp_path: Path, topology: str, world: int, idle: bool) -> None:
    metrics = tmp_path / "m.jsonl"
    flags = [*FLAGS, "--metrics", str(metrics)]
    # idle: rank0 sleeps 1.5 s after each chunk, workers wait for the next envelope
    hooks = {"STREAMDIT_TEST_SLOW_CHUNK_MS": "1500" if idle else "0"}
    t0 = time.monotonic()
    procs = start_ranks([flags] * world, hooks, topology=topology, out_dir=tmp_path, chunks=40)
    _wait_for_chunks(metrics, 2, procs)
    if idle:
        time.sleep(0.3)  # inside rank0's sleep
    os.killpg(procs[0].pid, signal.SIGKILL)
    t_kill = time.monotonic()
    outcomes = collect(procs, t0)
    for o in outcomes[1:]:
        assert o.code == 4, f"rank {o.rank} exited {o.code}:\n{o.log[-3000:]}"
        assert "orphaned" in o.log and "rank0" in o.log, o.log[-3000:]
        gone_after = o.seconds - (t_kill - t0)
        assert gone_after < WINDOW_S + 3.0, f"rank {o.rank} took {gone_after:.1f} s after the kill"
    # what was written before the kill is a valid video
    assert np.load(tmp_path / "v.npy").shape[0] >= 9 + 12


@pytest.mark.parametrize(("topology", "world"), [("tp", 2), ("pp", 3)])
def test_om13_stopped_worker_is_detected_by_rank0(tmp_path: Path, topology: str, world: int) -> None:
    metrics = tmp_path / "m.jsonl"
    flags = [*FLAGS, "--metrics", str(metrics)]
    t0 = time.monotonic()
    procs = start_ranks([flags] * world, {"STREAMDIT_TEST_SLOW_CHUNK_MS": "200"}, topology=topology, out_dir=tmp_path)
    _wait_for_chunks(metrics, 2, procs)
    os.killpg(procs[1].pid, signal.SIGSTOP)
    t_stop = time.monotonic()
    try:
        rank0 = collect(procs[:1], t0)[0]
    finally:
        os.killpg(procs[1].pid, signal.SIGKILL)
    others = collect(procs[2:], t0)
    collect(procs[1:2], t0)
    assert rank0.code == 6, rank0.log[-3000:]
    assert "rank 1 has not heartbeat" in rank0.log, rank0.log[-3000:]
    assert rank0.seconds - (t_stop - t0) < WINDOW_S + 3.0
    for o in others:  # the pp mesh peer loses rank0 in turn
        assert o.code == 4 and "orphaned" in o.log, o.log[-3000:]
    frames = np.load(tmp_path / "v.npy")
    assert frames.shape[0] == _frames_in_metrics(metrics) > 0  # valid, nothing half-written
    # `streamdit inspect` names the stopped rank although it left no record
    proc = subprocess.run(
        [sys.executable, "-m", "streamdit", "inspect", str(tmp_path)], env=env(), capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    assert "first failing: rank 1: stopped heartbeating" in proc.stdout, proc.stdout
    assert re.search(r"^\s+1\s+missing", proc.stdout, re.M), proc.stdout


@pytest.mark.parametrize(("topology", "world"), [("tp", 2), ("pp", 3)])
def test_sigterm_to_rank0_drains_and_every_rank_exits_0(tmp_path: Path, topology: str, world: int) -> None:
    metrics = tmp_path / "m.jsonl"
    flags = [*FLAGS, "--metrics", str(metrics)]
    t0 = time.monotonic()
    procs = start_ranks([flags] * world, {"STREAMDIT_TEST_SLOW_CHUNK_MS": "200"}, topology=topology, out_dir=tmp_path)
    _wait_for_chunks(metrics, 2, procs)
    procs[0].send_signal(signal.SIGTERM)
    t_term = time.monotonic()
    outcomes = collect(procs, t0)
    for o in outcomes:
        assert o.code == 0, f"rank {o.rank} exited {o.code}:\n{o.log[-3000:]}"
        assert o.seconds - (t_term - t0) < 30
    assert "interrupted (SIGTERM)" in outcomes[0].log
    rows = metrics.read_text().splitlines()
    assert 2 <= len(rows) < 40
    assert np.load(tmp_path / "v.npy").shape[0] == _frames_in_metrics(metrics)
