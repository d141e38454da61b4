"""The `--nproc` launcher keeps the documented exit codes, and a SIGTERM anywhere drains the job.

Jobs run `streamdit run --topology tp|pp --nproc N` (CPU/gloo) with slow chunks, so signals land
mid-stream; every clock starts once the metrics show chunks (every rank is up by then).
- SIGTERM to the launcher drains (exit 0, the video holds every claimed frame); Ctrl-C (SIGINT)
  drains with 130; a SIGKILLed worker makes the job exit 6 (rank0's verdict), no traceback.
- SIGTERM to a worker (hand launch or launcher): rank0 drains the whole job, every rank exits 0.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from ranks import GEOM, collect, env, start_ranks
from streamdit.runtime.metrics import read_metrics

pytestmark = pytest.mark.timeout(150)
FLAGS = ["--watchdog-window", "3", "--dist-timeout", "10", "--chunks", "40", "--no-progress"]


def _launch(tmp_path: Path, topology: str, nproc: int) -> tuple[subprocess.Popen, Path]:
    metrics = tmp_path / "m.jsonl"
    cmd = [sys.executable, "-m", "streamdit", "run", "--topology", topology, "--nproc", str(nproc), *GEOM]
    cmd += [*FLAGS, "--out", str(tmp_path / "v.npy"), "--metrics", str(metrics)]
    proc = subprocess.Popen(
        cmd,
        env=env(STREAMDIT_TEST_SLOW_CHUNK_MS="200"),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    return proc, metrics


def _rows(metrics: Path) -> list[dict]:
    return read_metrics(metrics).chunks if metrics.exists() else []


def _wait_rows(proc: subprocess.Popen, metrics: Path, n: int = 2) -> None:
    deadline = time.monotonic() + 100
    while len(_rows(metrics)) < n:
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        assert time.monotonic() < deadline, "no chunks"
        time.sleep(0.05)


def _rank_pid(launcher: int, rank: int) -> int:
    """The launcher's child whose environment says RANK=rank."""
    children = Path(f"/proc/{launcher}/task/{launcher}/children").read_text().split()
    for pid in children:
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        if f"RANK={rank}".encode() in environ:
            return int(pid)
    raise AssertionError(f"no rank {rank} among {children}")


def _finish(proc: subprocess.Popen, timeout: float = 60) -> str:
    try:
        return proc.communicate(timeout=timeout)[0]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()


def _valid(tmp_path: Path, metrics: Path) -> None:
    rows = _rows(metrics)
    assert [r["chunk_index"] for r in rows] == list(range(len(rows)))
    assert np.load(tmp_path / "v.npy").shape[0] == sum(r["frames"] for r in rows) > 0


@pytest.mark.parametrize(
    ("topology", "nproc", "sig", "code"),
    [("tp", 2, signal.SIGTERM, 0), ("pp", 3, signal.SIGTERM, 0), ("tp", 2, signal.SIGINT, 130)],
    ids=["tp-sigterm", "pp-sigterm", "tp-ctrl-c"],
)
def test_a_signal_to_the_launcher_drains_with_the_documented_code(
    tmp_path: Path, topology: str, nproc: int, sig: signal.Signals, code: int
) -> None:
    proc, metrics = _launch(tmp_path, topology, nproc)
    _wait_rows(proc, metrics)
    proc.send_signal(sig)
    t_sig = time.monotonic()
    log = _finish(proc)
    assert proc.returncode == code, log[-3000:]
    assert time.monotonic() - t_sig < 30
    assert f"interrupted ({sig.name})" in log and "Traceback" not in log, log[-3000:]
    assert len(_rows(metrics)) < 40
    _valid(tmp_path, metrics)


def test_a_killed_worker_makes_the_job_exit_6(tmp_path: Path) -> None:
    proc, metrics = _launch(tmp_path, "tp", 2)
    _wait_rows(proc, metrics)
    os.kill(_rank_pid(proc.pid, 1), signal.SIGKILL)
    t_kill = time.monotonic()
    log = _finish(proc)
    assert proc.returncode == 6, log[-3000:]
    assert time.monotonic() - t_kill < 3 + 10, "rank0's verdict is bounded by the window"
    assert "rank 1 has not heartbeat" in log and "Traceback" not in log, log[-3000:]
    _valid(tmp_path, metrics)


@pytest.mark.parametrize(("topology", "nproc"), [("tp", 2), ("pp", 3)])
def test_sigterm_to_a_worker_drains_the_job_under_the_launcher(tmp_path: Path, topology: str, nproc: int) -> None:
    proc, metrics = _launch(tmp_path, topology, nproc)
    _wait_rows(proc, metrics)
    os.kill(_rank_pid(proc.pid, nproc - 1), signal.SIGTERM)
    log = _finish(proc)
    assert proc.returncode == 0, log[-3000:]
    assert f"interrupted (SIGTERM on rank {nproc - 1})" in log, log[-3000:]
    _valid(tmp_path, metrics)


def test_sigterm_to_a_hand_launched_worker_drains_every_rank(tmp_path: Path) -> None:
    """No launcher (torchrun / SLURM style): the worker's SIGTERM reaches rank0 by the store."""
    metrics = tmp_path / "m.jsonl"
    t0 = time.monotonic()
    procs = start_ranks(
        [[*FLAGS, "--metrics", str(metrics)]] * 2, {"STREAMDIT_TEST_SLOW_CHUNK_MS": "200"}, out_dir=tmp_path
    )
    _wait_rows(procs[0], metrics)
    procs[1].send_signal(signal.SIGTERM)
    outcomes = collect(procs, t0)
    for o in outcomes:
        assert o.code == 0, f"rank {o.rank} exited {o.code}:\n{o.log[-3000:]}"
    assert "interrupted (SIGTERM on rank 1)" in outcomes[0].log
    _valid(tmp_path, metrics)
