"""Local multi-rank launch: `streamdit run|serve --topology tp|pp --nproc N ...`.

Owns: `launch_local(argv, nproc, grace_s=...)` and the pieces other local launchers reuse
(`free_port`, `die_with_parent`, `kill_group`, `emulated_host_environment`). `launch_local`
is a small launcher with torchrun's contract and streamdit's exit codes: it re-runs the same
command as N local ranks with the torchrun environment (RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR=127.0.0.1, a free MASTER_PORT: rank0 hosts the rendezvous store on loopback),
the NCCL multicast switches and OMP_NUM_THREADS.

Why not torch's elastic agent: it turns SIGTERM / Ctrl-C into a traceback and exit 1, stops
every rank the moment one fails (before the survivors' watchdogs can say who was lost), and
reports the first failure rather than the job's verdict. Here:

- SIGINT, SIGTERM and SIGHUP to the launcher go to rank0 only, which drains and shuts its
  peers down (the ranks run in sessions of their own, so a terminal's Ctrl-C reaches the
  launcher once, not every rank at once); a second one aborts, as for a single process.
- No rank is stopped from outside while rank0 runs: the ranks' own liveness (watchdog,
  announced aborts, --dist-timeout) ends every failure. Once rank0 has exited, the others get
  `grace_s` to follow, then their process groups are killed (and named in the log).
- Each rank dies with the launcher (Linux parent-death signal): no orphans after a SIGKILL.
- The job's exit code is rank0's (it reports for the job: 0, 2, 5, 6, 130, ...); if rank0 was
  killed by a signal, the first documented code among the others (4 when they were orphaned).
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable

from streamdit.config import rank_environment
from streamdit.errors import EXIT_FAILURE

log = logging.getLogger(__name__)

FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
_PR_SET_PDEATHSIG = 1


def launch_local(argv: list[str], nproc: int, *, grace_s: float) -> int:
    """Run `python -m streamdit <argv>` as `nproc` ranks; returns the job's exit code."""
    port = free_port()
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "streamdit", *argv],
            env=rank_environment(rank, nproc, port),
            start_new_session=True,
            preexec_fn=die_with_parent,
        )
        for rank in range(nproc)
    ]
    previous = {sig: signal.signal(sig, _forward_to(procs[0])) for sig in FORWARDED}
    try:
        codes = _wait(procs, grace_s)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for p in procs:
            kill_group(p)
    log.info("ranks exited: %s", codes)
    return job_exit_code(codes)


def job_exit_code(codes: dict[int, int]) -> int:
    """rank0's code; if a signal killed rank0, the first documented code among the others."""
    if codes.get(0, -1) >= 0:
        return codes[0]
    others = [c for r, c in sorted(codes.items()) if r != 0 and c > 0]
    return others[0] if others else EXIT_FAILURE


def _wait(procs: list[subprocess.Popen], grace_s: float) -> dict[int, int]:
    codes: dict[int, int] = {}
    rank0_done: float | None = None
    while len(codes) < len(procs):
        for rank, p in enumerate(procs):
            if rank not in codes and p.poll() is not None:
                codes[rank] = p.returncode
        if rank0_done is None and 0 in codes:
            rank0_done = time.monotonic()
        if rank0_done is not None and time.monotonic() - rank0_done > grace_s:
            late = [r for r in range(len(procs)) if r not in codes]
            log.error("ranks %s still running %.0f s after rank0 exited: killed", late, grace_s)
            for r in late:
                kill_group(procs[r])
                codes[r] = procs[r].wait()
        time.sleep(0.05)
    return codes


def _forward_to(rank0: subprocess.Popen) -> Callable[[int, object], None]:
    def handler(signum: int, frame: object) -> None:
        if rank0.poll() is None:
            rank0.send_signal(signum)

    return handler


def die_with_parent() -> None:
    """In the child, before exec: SIGKILL when the launcher dies (Linux; a no-op elsewhere)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def kill_group(p: subprocess.Popen) -> None:
    if p.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(p.pid, signal.SIGKILL)
        p.wait()


def emulated_host_environment(rank: int) -> dict[str, str]:
    """Rank `rank` as its own emulated host on GPU 0: NCCL builds real communicators over
    loopback sockets (no NVLink, no shared memory) on a machine with fewer GPUs than ranks."""
    return {
        "LOCAL_RANK": "0",
        "NCCL_HOSTID": f"streamdit-emulated-host-{rank}",
        "NCCL_SOCKET_IFNAME": "lo",
        "NCCL_IB_DISABLE": "1",
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
