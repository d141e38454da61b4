"""Launch streamdit ranks as separate processes, the way torchrun would, for the dist tests.

Owns: `spawn_ranks` (one process per rank with RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR /
MASTER_PORT, each rank with its own flags; every process group is killed on exit, so a test can
never leave a hung rank behind), `run_cli` (the `--nproc` form through torch's elastic launcher),
`all_failed_fast` (the matrix's "good failure" assertions), `latents` (the chunks a run dumped).
"""

from __future__ import annotations

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

from streamdit.runtime.launch import emulated_host_environment

# `streamdit matrix --backend nccl` runs the same rows on GPUs (one per rank)
BACKEND = os.environ.get("STREAMDIT_MATRIX_BACKEND", "gloo")
# Every rank must be gone this long after its ready line (imports done; short PG timeouts below).
# On GPUs, CUDA and NCCL start-up alone take 12-28 s per rank (2xH200), and up to 33 s when 3
# ranks compile on one GPU as emulated hosts (C-03/pp): start-up + 15 s.
BOUND_S = 45.0 if BACKEND == "nccl" else 30.0
GEOM = ["--height", "32", "--width", "48", *(["--device", "cuda"] if BACKEND == "nccl" else [])]
# `--emulate-hosts`: each rank its own host with one GPU (GPU 0), NCCL over loopback sockets
EMULATE_HOSTS = os.environ.get("STREAMDIT_MATRIX_EMULATE_HOSTS", "0") == "1"
# `streamdit matrix --logs DIR`: every rank's log is kept there (the evidence of a failing row)
LOG_DIR = os.environ.get("STREAMDIT_MATRIX_LOG_DIR")


def host_env(rank: int) -> dict[str, str]:
    """LOCAL_RANK and, when hosts are emulated, the NCCL settings that make `rank` its own host."""
    return emulated_host_environment(rank) if EMULATE_HOSTS else {"LOCAL_RANK": str(rank)}


def env(**extra: str) -> dict[str, str]:
    """This environment without STREAMDIT_TEST_* hooks, with src on PYTHONPATH, plus `extra`;
    every rank prints its ready line (`Outcome.since_ready`)."""
    out = {k: v for k, v in os.environ.items() if not k.startswith("STREAMDIT_TEST_")}
    out["STREAMDIT_TEST_READY_LINE"] = "1"
    src = str(Path(__file__).resolve().parents[1] / "src")
    out["PYTHONPATH"] = src + os.pathsep + out.get("PYTHONPATH", "")
    out.update(extra)
    return out


# 6 chunks: a soft transition at chunk 2, a scheduled hard cut at chunk 4 (equivalence runs)
TIMELINE = (
    '{"entries": [{"chunk": 0, "prompt": "a fox"}, {"chunk": 2, "prompt": "a fox at night", '
    '"transition": "soft"}, {"chunk": 4, "prompt": "a harbour", "transition": "hard"}]}'
)


def single_reference(tmp: Path) -> tuple[Path, list[np.ndarray]]:
    """The single-process run over TIMELINE: its video and every chunk's generator output."""
    (tmp / "tl.json").write_text(TIMELINE)
    args = [*GEOM, "--chunks", "6", "--timeline", str(tmp / "tl.json"), "--out", str(tmp / "v.npy")]
    proc = run_cli(args, hooks={"STREAMDIT_TEST_DUMP_LATENTS": str(tmp / "lat")}, cwd=tmp, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return tmp / "v.npy", latents(tmp / "lat")


def latents(path: Path) -> list[np.ndarray]:
    return [np.load(p) for p in sorted(path.glob("chunk*.npy"))]


def run_cli(args: list[str], *, hooks: dict[str, str] | None = None, cwd: Path, timeout: float = 150):
    """`streamdit run ARGS` in a subprocess (a launcher run starts its own ranks)."""
    cmd = [sys.executable, "-m", "streamdit", "run", *args, "--no-progress"]
    return subprocess.run(
        cmd, env=env(**(hooks or {})), capture_output=True, text=True, timeout=timeout, cwd=cwd
    )


@dataclass
class Outcome:
    rank: int
    code: int
    seconds: float  # from the caller's t0 (the spawn) to the exit
    log: str
    ready_at: float | None = None  # the rank's ready line (time.monotonic, as t0), if it printed one
    exited_at: float = 0.0

    @property
    def since_ready(self) -> float:
        """Seconds from the rank's ready line (imports done) to its exit: what a bound judges,
        so a loaded machine's slow imports never count against it."""
        return self.exited_at - (
            self.ready_at if self.ready_at is not None else self.exited_at - self.seconds
        )


READY = re.compile(r"streamdit: ready rank=\d+ monotonic=([\d.]+)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_ranks(
    flags: list[list[str]],
    hooks: dict[str, str] | None = None,
    *,
    topology: str = "tp",
    per_rank: dict[int, dict[str, str]] | None = None,
    out_dir: Path | None = None,
    chunks: int = 3,
    port: int | None = None,
) -> list[subprocess.Popen]:
    """Start one process per rank with a torchrun-compatible env (each in its own session).

    `hooks` go to every rank; `per_rank` adds variables to single ranks only; `port` is the
    rendezvous store's (rank0 hosts it; a free one by default). The caller must end them with
    `collect` (which kills whatever is left).
    """
    port, world = port or free_port(), len(flags)
    out_dir = out_dir or Path(tempfile.mkdtemp(prefix=f"streamdit-{topology}-"))
    procs = []
    for rank, extra in enumerate(flags):
        rank_env = env(
            RANK=str(rank),
            WORLD_SIZE=str(world),
            **host_env(rank),
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
            OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 1) // world)),  # as torchrun / the launcher
            PYTHONUNBUFFERED="1",
            **(hooks or {}),
            **(per_rank or {}).get(rank, {}),
        )
        cmd = [
            sys.executable,
            "-m",
            "streamdit",
            "run",
            "--topology",
            topology,
            *GEOM,
            "--chunks",
            str(chunks),
            "--out",
            str(out_dir / "v.npy"),
            "--no-progress",
            "--dist-timeout",
            "10",
            *extra,
        ]
        procs.append(
            subprocess.Popen(
                cmd,
                env=rank_env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                start_new_session=True,
            )
        )
    return procs


def collect(procs: list[subprocess.Popen], t0: float, bound_s: float = BOUND_S + 30) -> list[Outcome]:
    """Wait for every rank (until t0 + bound_s), then kill every process group still there."""
    outcomes = []
    try:
        for rank, p in enumerate(procs):
            left = max(1.0, bound_s - (time.monotonic() - t0))
            try:
                out, _ = p.communicate(timeout=left)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                out, _ = p.communicate()
                out += "\n<killed by the harness: still running at the bound>"
            ready = READY.search(out)
            now = time.monotonic()
            outcomes.append(
                Outcome(
                    rank,
                    p.returncode,
                    now - t0,
                    out,
                    ready_at=float(ready.group(1)) if ready else None,
                    exited_at=now,
                )
            )
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
    keep_logs(outcomes)
    return outcomes


def keep_logs(outcomes: list[Outcome]) -> None:
    """Under `streamdit matrix --logs`: each rank's log as `<test>-<n>-rank<R>.log`."""
    if not LOG_DIR:
        return
    test = os.environ.get("PYTEST_CURRENT_TEST", "ranks").split(" ")[0].split("::")[-1]
    name = "".join(c if c.isalnum() or c in "-_." else "_" for c in test)
    n = len(list(Path(LOG_DIR).glob(f"{name}-*-rank0.log")))  # a test may start several jobs
    for o in outcomes:
        Path(LOG_DIR, f"{name}-{n}-rank{o.rank}.log").write_text(
            f"exit {o.code} after {o.seconds:.1f} s\n{o.log}"
        )


def spawn_ranks(flags: list[list[str]], hooks: dict[str, str] | None = None, **kw: object) -> list[Outcome]:
    """`start_ranks` then `collect`: every rank's exit code, time and log."""
    t0 = time.monotonic()
    return collect(start_ranks(flags, hooks, **kw), t0)  # type: ignore[arg-type]


def all_failed_fast(outcomes: list[Outcome], error: str, *needles: str) -> None:
    for o in outcomes:
        assert o.code != 0, f"rank {o.rank} exited 0:\n{o.log[-3000:]}"
        assert o.since_ready < BOUND_S, f"rank {o.rank} took {o.since_ready:.1f}s after its ready line"
        assert error in o.log, f"rank {o.rank} lacks {error}:\n{o.log[-3000:]}"
        for needle in needles:
            assert needle in o.log, f"rank {o.rank} lacks {needle!r}:\n{o.log[-3000:]}"
