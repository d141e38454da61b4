"""Multi-process test harness for CPU / gloo: who failed, how, and when — never a hang.

`run_ranks(fn, world_size, timeout_s=...)` spawns one process per rank (spawn start method) and
returns one `RankOutcome` per rank. Design (after PyTorch's MultiProcessTestCase, minus its flaws):

- Rendezvous through a FileStore in a fresh temporary directory per call: no ports to collide
  with the other test runs on the machine.
- Short process-group timeouts (`pg_timeout_s`, default 5 s) so a blocked collective ends fast.
- One pipe per rank carries back a JSON outcome (no pickle of results): exception type name,
  message, traceback, the function's JSON-able return value. A rank that raises exits with the
  exception's `exit_code` attribute if it has one (streamdit errors do), else 1.
- A ready handshake: each rank says "ready" over its pipe once its imports are done (torch alone
  takes seconds on a loaded 2-core machine), and `timeout_s` counts from the moment every rank
  was ready, so a test's clock never includes start-up. Start-up itself is bounded apart
  (`startup_s`, generous): a rank that never gets ready is a timeout too.
- A hard wall-clock limit per call. On timeout the parent asks every live rank for a faulthandler
  stack dump (SIGUSR1), then kills its whole process group (each rank is a group leader), and
  marks it `timed_out`. Every child is killed on any exit path of the parent (`finally`).
- Exit times are the parent's `time.monotonic()` when it saw the rank exit; `seconds` counts from
  the moment every rank was ready (from the spawn if some never were). On Linux the monotonic
  clock is system-wide, so tests compare them with `t_mono` of events recorded inside the ranks
  (e.g. a flight record dumped to `ctx.flight_path`) to bound "the peer exited within N s of the
  fault".

Unlike MultiProcessTestCase, the parent does *not* stop the other ranks when one fails: break-it
tests assert that peers exit on their own (terminal message, typed error or timeout), so only the
wall-clock limit ends a rank from outside, and that is reported as `timed_out`.

Rank functions live at module level of a test module (spawn imports them by name) and take
`(ctx: RankContext, *args)`; they return JSON-able values. Call `init_gloo(ctx)` to join the world
group (FileStore rendezvous at `ctx.init_file`, timeout `ctx.pg_timeout_s`). Example::

    def rank_fn(ctx: RankContext) -> dict:
        world = init_gloo(ctx)
        ...
        return {"headers": n}

    outs = run_ranks(rank_fn, 2, timeout_s=60)
    assert outs[1].exc_type == "TransportError" and not outs[1].timed_out
"""

from __future__ import annotations

import contextlib
import faulthandler
import json
import logging
import multiprocessing as mp
import os
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any

_STACK_GRACE_S = 1.0  # time a hung rank gets to write its faulthandler dump before SIGKILL
STARTUP_S = 120.0  # spawn to "ready" (imports) on a loaded machine: bounded apart from the test


@dataclass(frozen=True)
class RankContext:
    """What a rank function receives: its rank, the rendezvous and a private scratch directory."""

    rank: int
    world_size: int
    init_file: str
    pg_timeout_s: float
    workdir: str

    @property
    def flight_path(self) -> Path:
        """Where a rank may dump its flight record; the parent loads it as `RankOutcome.flight`."""
        return Path(self.workdir) / f"flight-rank{self.rank}.json"

    @property
    def stack_path(self) -> Path:
        return Path(self.workdir) / f"stacks-rank{self.rank}.txt"


@dataclass
class RankOutcome:
    rank: int
    exitcode: int | None
    exc_type: str | None = None
    message: str | None = None
    traceback: str | None = None
    seconds: float | None = None  # parent-observed, from "every rank ready" to exit
    exited_at: float | None = None  # parent time.monotonic() at exit (comparable with rank t_mono)
    result: Any = None
    timed_out: bool = False
    stacks: str = ""
    flight: dict[str, Any] | None = None
    reported: bool = field(default=False, repr=False)  # the rank sent an outcome over its pipe
    ready_at: float | None = field(default=None, repr=False)  # parent monotonic time of "ready"

    def summary(self) -> str:
        head = f"rank{self.rank}: exit={self.exitcode} timed_out={self.timed_out} t={self.seconds}"
        detail = f" {self.exc_type}: {self.message}" if self.exc_type else ""
        tail = f"\n{self.traceback}" if self.traceback else ""
        stacks = f"\n--- stacks ---\n{self.stacks}" if self.stacks else ""
        return head + detail + tail + stacks


def init_gloo(ctx: RankContext, timeout_s: float | None = None) -> Any:
    """Join the gloo world group of this run (FileStore rendezvous); returns the world group."""
    import torch.distributed as dist

    dist.init_process_group(
        "gloo",
        init_method=f"file://{ctx.init_file}",
        rank=ctx.rank,
        world_size=ctx.world_size,
        timeout=timedelta(seconds=timeout_s or ctx.pg_timeout_s),
    )
    # Both ranks finish gloo's full-mesh connect before either runs test logic: a rank that
    # failed (on purpose) and exited at once used to break its peer's connect (a flaky row).
    dist.barrier()
    return dist.group.WORLD


def run_ranks(
    fn: Callable[..., Any],
    world_size: int,
    *,
    timeout_s: float,
    args: Sequence[Any] = (),
    env: Mapping[str, str] | None = None,
    pg_timeout_s: float = 5.0,
    startup_s: float = STARTUP_S,
) -> list[RankOutcome]:
    """Run `fn(ctx, *args)` on `world_size` spawned ranks; returns within about startup +
    timeout_s + 2 s (`timeout_s` counted once every rank is ready)."""
    spawn = mp.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="streamdit-ranks-") as workdir:
        init_file = os.path.join(workdir, "filestore")
        procs: list[Any] = []
        conns: list[Connection] = []
        start = time.monotonic()
        try:
            for rank in range(world_size):
                ctx = RankContext(rank, world_size, init_file, pg_timeout_s, workdir)
                recv_end, send_end = spawn.Pipe(duplex=False)
                proc = spawn.Process(
                    target=_child,
                    args=(fn, ctx, tuple(args), dict(env or {}), send_end),
                    name=f"rank{rank}",
                )
                proc.daemon = True
                proc.start()
                send_end.close()
                procs.append(proc)
                conns.append(recv_end)
            outcomes = _collect(procs, conns, start, timeout_s, start + startup_s)
        finally:
            for proc in procs:
                _kill_tree(proc)
        for outcome in outcomes:
            _load_artifacts(outcome, Path(workdir))
        return outcomes


def _collect(
    procs: list[Any], conns: list[Connection], start: float, timeout_s: float, startup_deadline: float
) -> list[RankOutcome]:
    outcomes = [RankOutcome(rank=r, exitcode=None) for r in range(len(procs))]
    open_conns = dict(enumerate(conns))
    deadline, clock_started = startup_deadline, False
    while any(o.exited_at is None for o in outcomes):
        if not clock_started and all(o.ready_at or o.exited_at for o in outcomes):
            start = max(o.ready_at or o.exited_at or start for o in outcomes)  # the test's clock
            deadline, clock_started = start + timeout_s, True
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            _time_out(procs, outcomes, start)
            break
        live = [p.sentinel for p, o in zip(procs, outcomes, strict=True) if o.exited_at is None]
        wait([*open_conns.values(), *live], timeout=remaining)
        _drain(open_conns, outcomes)
        now = time.monotonic()
        for proc, outcome in zip(procs, outcomes, strict=True):
            if outcome.exited_at is None and not proc.is_alive():
                proc.join(0)
                outcome.exitcode, outcome.exited_at, outcome.seconds = (
                    proc.exitcode,
                    now,
                    now - start,
                )
    _drain(open_conns, outcomes)
    return outcomes


def _drain(open_conns: dict[int, Connection], outcomes: list[RankOutcome]) -> None:
    for rank, conn in list(open_conns.items()):
        try:
            while conn.poll(0):
                report = json.loads(conn.recv_bytes())
                o = outcomes[rank]
                if report.get("ready"):
                    o.ready_at = time.monotonic()
                    continue
                o.exc_type, o.message, o.traceback = (
                    report["exc_type"],
                    report["message"],
                    report["traceback"],
                )
                o.result, o.reported = report["result"], True
        except (EOFError, OSError):
            del open_conns[rank]


def _time_out(procs: list[Any], outcomes: list[RankOutcome], start: float) -> None:
    hung = [(p, o) for p, o in zip(procs, outcomes, strict=True) if o.exited_at is None]
    for proc, _ in hung:
        _signal(proc.pid, signal.SIGUSR1)  # faulthandler dumps every thread's stack
    time.sleep(_STACK_GRACE_S)
    now = time.monotonic()
    for proc, outcome in hung:
        _kill_tree(proc)
        outcome.timed_out, outcome.exitcode = True, proc.exitcode
        outcome.exited_at, outcome.seconds = now, now - start


def _signal(pid: int | None, sig: int) -> None:
    if pid is None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


def _kill_tree(proc: Any) -> None:
    """SIGKILL the rank's process group (the rank leads its own group), then reap it."""
    if proc.pid is not None and proc.is_alive():
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            _signal(proc.pid, signal.SIGKILL)
    proc.join(5)


def _load_artifacts(outcome: RankOutcome, workdir: Path) -> None:
    stacks = workdir / f"stacks-rank{outcome.rank}.txt"
    if stacks.exists():
        outcome.stacks = stacks.read_text(encoding="utf-8", errors="replace")
    flight = workdir / f"flight-rank{outcome.rank}.json"
    if flight.exists():
        outcome.flight = json.loads(flight.read_text(encoding="utf-8"))


def _child(
    fn: Callable[..., Any], ctx: RankContext, args: tuple, env: dict[str, str], conn: Connection
) -> None:
    os.setpgid(0, 0)  # lead a process group, so the parent can kill this rank's whole tree at once
    os.environ.update(env)
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # loopback only: no interface guessing
    stack_file = open(ctx.stack_path, "w", encoding="utf-8")  # noqa: SIM115 (lives until exit)
    faulthandler.register(signal.SIGUSR1, file=stack_file, all_threads=True)
    logging.basicConfig(level=logging.INFO, format=f"[rank{ctx.rank}] %(levelname)s %(name)s: %(message)s")
    import torch

    torch.set_num_threads(1)  # 2-core CI shared with other runs
    report: dict[str, Any] = {"exc_type": None, "message": None, "traceback": None, "result": None}
    code = 0
    conn.send_bytes(b'{"ready": true}')  # imports done: the test's clock may start
    try:
        report["result"] = fn(ctx, *args)
    except BaseException as exc:  # report every way a rank can end, including SystemExit
        code = _exit_code(exc)
        report.update(exc_type=type(exc).__name__, message=str(exc), traceback=traceback.format_exc())
    try:
        conn.send_bytes(json.dumps(report, default=repr).encode("utf-8"))
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)  # skip atexit / PG destructors: a clean exit must not hang either


def _exit_code(exc: BaseException) -> int:
    if isinstance(exc, SystemExit):
        return exc.code if isinstance(exc.code, int) else 1
    code = getattr(exc, "exit_code", 1)
    return code if isinstance(code, int) and code != 0 else 1
