"""Liveness: drain requests and the heartbeat watchdog that runs beside the data plane.

Owns: `StopFlag` (the first Ctrl-C / SIGTERM asks the loop to drain; a second one escalates to
KeyboardInterrupt, which still unwinds through `finally` and closes the file) and `Watchdog`.

The watchdog talks only to the job's rendezvous store (TCPStore at MASTER_ADDR:MASTER_PORT,
hosted by rank0 under torchrun-style launches, by the agent under an elastic launcher), on its
own connection, with two threads of its own, so it keeps working while the main thread is
blocked inside a collective:

- the store thread (the only user of that connection) bumps this rank's counter `hb/<rank>`
  every `window / 5` seconds and reads every other rank's counter and `done/<rank>` mark in one
  `multi_get`. A store call may block for as long as the store's host is frozen (a stopped
  TCPStore server does not answer, and the client's timeout does not cover every call), so
  this thread only publishes what it read and when its last round trip completed;
- the judge thread decides from those timestamps alone, on its own clock, so a blocked store
  call cannot silence it. A counter that has not advanced over `window` seconds of readings is
  a lost peer; a store that has not completed a round trip for `window` seconds is a lost
  store host (a peer's silence counts only what the store showed, plus at most two heartbeats
  of the store's own lateness, so a dead store host is not mistaken for a peer that was late).

Keys live under `streamdit/liveness/<run id>/`, the run id being agreed by every rank of this
job at startup: another job's or a stale client's keys cannot mark a rank done or alive.

Verdicts (`on_verdict(code, message)` from the judge thread; the runtime writes the flight
record and exits the process, since the main thread may be stuck in a collective):

| what went silent                       | on rank0        | on any other rank |
|----------------------------------------|-----------------|-------------------|
| the store (rank0 or the agent hosts it)| 4 orphaned      | 4 orphaned        |
| rank0's counter                        | -               | 4 orphaned        |
| rank r's counter (r != 0)              | 6 peer r lost   | 6 peer r lost     |
| rank r announced an abort (`abort/<r>`)| 5 peer abort    | 5 peer abort      |

A drain request travels the same way: `request_drain(reason)` (a worker's SIGTERM / SIGHUP /
Ctrl-C) sets `drain/<r>`, and rank0's watchdog passes it to `on_drain`, which drains the
stream as rank0's own signal would (every rank then exits 0).

`announce_abort(reason)` is how a rank that fails on its own (a fault only it saw, possibly
after its peers entered a collective with it) tells every peer at once, out of band: the
store thread writes `reason/<r>` and bumps `abort/<r>`; every watcher's next reading carries
it, and its judge exits 5 naming the rank and the reason within about `window / 5` seconds,
instead of waiting out a collective's timeout.

When several went silent, the one silent longest is named (the others may only be following
it). A judge that was itself
not scheduled for `stall_s` (the whole process stopped, or starved) re-bases every clock at its
wake-up instead of judging peers by a silence it did not watch; if that stall outlasted the
window, a later verdict on a silent peer says so (the peers most likely left because they
ruled this rank lost: `streamdit inspect` then names this rank). A rank that finishes cleanly
marks `done/<rank>`, and its watchers stop watching it.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from datetime import timedelta
from typing import TYPE_CHECKING

import torch.distributed as dist

from streamdit.config import LaunchEnv
from streamdit.errors import EXIT_ORPHANED, EXIT_PEER_ABORT, EXIT_PEER_LOST, Poisoned, StreamditError
from streamdit.protocol.errors import ChannelBroken, HeaderError, TransportError

if TYPE_CHECKING:
    from streamdit.runtime.output import OutputGuard

log = logging.getLogger(__name__)

PREFIX = "streamdit/liveness"
MAX_REASON = 500  # characters of an abort's reason kept in the store
Verdict = Callable[[int, str], None]


class StopFlag:
    """Set from a signal handler, read by the coordination loop between chunks.

    On a rank that runs no loop of its own (a tp worker, a pp mesh rank) `forward` passes the
    first request on (to rank0, through the watchdog), so a SIGTERM to any rank drains the job.
    """

    def __init__(self) -> None:
        self._event = threading.Event()
        self.reason = ""
        self._forward: Callable[[str], object] | None = None

    def forward(self, to: Callable[[str], object]) -> None:
        self._forward = to

    def request(self, reason: str) -> None:
        if self._event.is_set():
            raise KeyboardInterrupt(f"second stop request ({reason}): aborting now")
        self.reason = reason
        self._event.set()
        if self._forward is not None:
            self._forward(reason)

    @property
    def requested(self) -> bool:
        return self._event.is_set()


class Watchdog:
    """Heartbeats through the rendezvous store; a silent peer ends the process (see module doc)."""

    def __init__(
        self, launch: LaunchEnv, *, window_s: float, on_verdict: Verdict, run_id: str = "job"
    ) -> None:
        if window_s <= 0:
            raise ValueError(f"watchdog window must be > 0 s, got {window_s}")
        if not run_id or "/" in run_id:
            raise ValueError(f"run id must be a non-empty key part, got {run_id!r}")
        self.launch = launch
        self.window_s = window_s
        self.interval_s = max(0.05, window_s / 5)
        self.stall_s = window_s / 2  # a judge tick this late: this process was not running
        self.own_stall = (0.0, 0.0)  # the latest such stall of this process: (seconds, ended at)
        self.on_verdict = on_verdict
        self.prefix = f"{PREFIX}/{run_id}"
        self.watched = [r for r in range(launch.world_size) if r != launch.rank]
        self._store: dist.TCPStore | None = None
        self._stop = threading.Event()
        self._mark_done = False
        self._wake = threading.Event()  # the store thread: a round now (stop, an abort to send)
        self._abort_reason = ""
        self._abort_sent = threading.Event()
        self._abort_acked = threading.Event()  # every live watcher has read this rank's abort
        self._verdict = threading.Event()
        self.verdict_message = ""
        self._lock = threading.Lock()  # the store thread's published reading
        now = time.monotonic()
        self._read_at = now  # when the store thread's last round trip completed
        self._beats: dict[int, int] = {}
        self._done: set[int] = set()
        self._aborts: dict[int, str] = {}
        self._drain_reason = ""  # this rank's drain request, for the store thread to send
        self._drains_seen: set[int] = set()
        self.on_drain: Callable[[str], object] | None = None  # rank0: drain the stream
        self._store_thread = threading.Thread(target=self._store_loop, name="watchdog-store", daemon=True)
        self._judge_thread = threading.Thread(target=self._judge_loop, name="watchdog", daemon=True)
        # per watched peer: when its heartbeat last changed, and whether it ended cleanly
        # (written by the judge thread, read by a status page)
        self.last_change: dict[int, float] = dict.fromkeys(self.watched, now)
        self.ended: set[int] = set()

    def start(self) -> None:
        """Connect to the rendezvous store and start beating (after the process group exists).

        The first beat and the creation of every key happen here, so a `multi_get` never
        waits for a key a slow peer has yet to write; then the store thread owns the connection.
        """
        self._store = dist.TCPStore(
            self.launch.master_addr,
            self.launch.master_port,
            is_master=False,
            timeout=timedelta(seconds=max(1.0, self.interval_s * 2)),
            wait_for_workers=False,
        )
        for r in range(self.launch.world_size):
            self._store.add(self._key("hb", r), 1 if r == self.launch.rank else 0)
            self._store.add(self._key("done", r), 0)
            self._store.add(self._key("abort", r), 0)
            self._store.add(self._key("ack", r), 0)
            self._store.add(self._key("drain", r), 0)
        self._read_at = time.monotonic()
        self._store_thread.start()
        self._judge_thread.start()

    def stop(self, *, done: bool) -> None:
        """Stop beating; `done` tells the watchers this rank ended cleanly (not lost)."""
        self._mark_done = done
        self._stop.set()
        self._wake.set()
        for thread in (self._judge_thread, self._store_thread):
            if thread.is_alive():
                thread.join(timeout=self.interval_s * 4)  # a store call may block: bounded

    def peers(self) -> list[dict[str, object]]:
        """Liveness of every watched peer: seconds since its last heartbeat, and a verdict."""
        now = time.monotonic()
        out = []
        for peer in self.watched:
            silent = now - self.last_change[peer]
            state = "done" if peer in self.ended else "alive" if silent <= self.window_s else "lost"
            out.append({"rank": peer, "state": state, "silent_s": round(silent, 2)})
        return out

    def peer_lost(self, wait_s: float) -> bool:
        """After a transport error: does a watched peer turn out silent within `wait_s`?

        The verdict's `on_verdict` normally ends the process first; True is returned only when
        it does not (tests), False when every watched peer keeps beating.
        """
        if self._abort_reason or (not self._judge_thread.is_alive() and not self._verdict.is_set()):
            return False  # after this rank's own abort its peers leave: that is no verdict
        return self._verdict.wait(timeout=wait_s)

    def announce_abort(self, reason: str) -> bool:
        """Tell every peer through the store that this rank is failing, and why (they exit 5
        naming it). Waits until the store thread wrote it and every live peer read it (their
        store threads acknowledge), for at most two heartbeats: this rank may host the store,
        which must outlive the reading. False if it could not be written."""
        if not self._store_thread.is_alive() or self._abort_reason:
            return False
        self._abort_reason = reason[:MAX_REASON] or "(no reason given)"
        self._wake.set()
        bound = 2 * self.interval_s + 1.0
        if not self._abort_sent.wait(bound):
            return False
        if not self._abort_acked.wait(bound):
            log.warning("abort announced; not every peer acknowledged it within %.1f s", bound)
        return True

    def request_drain(self, reason: str) -> None:
        """Ask rank0 to drain the job (from a signal handler: only flags it for the store thread)."""
        self._drain_reason = reason or "drain"
        self._wake.set()

    def _key(self, kind: str, rank: int) -> str:
        return f"{self.prefix}/{kind}/{rank}"

    # ---- store thread: the only user of the connection ------------------------------------

    def _store_loop(self) -> None:
        assert self._store is not None
        kinds = ("hb", "done", "abort", "drain")
        keys = [self._key(kind, r) for kind in kinds for r in self.watched]
        keys.append(self._key("ack", self.launch.rank))  # who has read this rank's abort
        mine = self._key("hb", self.launch.rank)
        warned = False
        while not self._stop.is_set():
            try:
                self._send_abort()
                self._send_drain()
                self._store.add(mine, 1)
                values = [int(v) for v in self._store.multi_get(keys)] if keys else []
                n = len(self.watched)
                aborts = self._abort_reasons(values[2 * n : 3 * n])
                self._pass_drains(values[3 * n : 4 * n])
                if self._abort_sent.is_set() and values[-1] >= n - len(self._done):
                    self._abort_acked.set()
            except Exception as exc:  # noqa: BLE001 - an unreachable store = no fresh reading
                if not warned:
                    log.warning("heartbeat store unreachable (%s): the judge decides by time", exc)
                    warned = True
            else:
                with self._lock:
                    self._read_at = time.monotonic()
                    self._beats = dict(zip(self.watched, values[:n], strict=True))
                    self._done = {r for r, d in zip(self.watched, values[n : 2 * n], strict=True) if d > 0}
                    self._aborts = aborts
            self._wake.wait(self.interval_s)
            self._wake.clear()
        if self._mark_done:
            try:
                self._store.add(self._key("done", self.launch.rank), 1)
            except Exception as exc:  # noqa: BLE001 - rank0's store may already be gone
                log.debug("could not mark done: %s", exc)

    def _send_drain(self) -> None:
        if self._drain_reason and self._drain_reason != "sent":
            assert self._store is not None
            self._store.set(self._key("drain_reason", self.launch.rank), self._drain_reason)
            self._store.add(self._key("drain", self.launch.rank), 1)
            self._drain_reason = "sent"

    def _pass_drains(self, flags: list[int]) -> None:
        for peer, flag in zip(self.watched, flags, strict=True):
            if flag > 0 and peer not in self._drains_seen and self.on_drain is not None:
                assert self._store is not None
                why = self._store.get(self._key("drain_reason", peer)).decode("utf-8", "replace")
                self._drains_seen.add(peer)
                log.warning("rank %d asks for a drain (%s)", peer, why)
                self.on_drain(f"{why} on rank {peer}")

    def _send_abort(self) -> None:
        if self._abort_reason and not self._abort_sent.is_set():
            assert self._store is not None
            self._store.set(self._key("reason", self.launch.rank), self._abort_reason)
            self._store.add(self._key("abort", self.launch.rank), 1)  # after the reason: never read half
            self._abort_sent.set()

    def _abort_reasons(self, flags: list[int]) -> dict[int, str]:
        out = dict(self._aborts)
        for peer, flag in zip(self.watched, flags, strict=True):
            if flag > 0 and peer not in out:
                assert self._store is not None
                out[peer] = self._store.get(self._key("reason", peer)).decode("utf-8", "replace")
                self._store.add(self._key("ack", peer), 1)  # the announcer may now let its store go
        return out

    # ---- judge thread: decides on its own clock -------------------------------------------

    def _judge_loop(self) -> None:
        last_value: dict[int, int] = {}
        tick = rebased = time.monotonic()
        while not self._stop.wait(self.interval_s):
            now = time.monotonic()
            if now - tick > self.stall_s:
                log.warning(
                    "watchdog: this process was not scheduled for %.1f s (stopped or starved): "
                    "giving every peer a fresh window instead of judging a silence it did not see",
                    now - tick,
                )
                rebased, self.own_stall = now, (now - tick, now)
            tick = now
            with self._lock:
                read_at, beats, done = self._read_at, dict(self._beats), set(self._done)
                aborts = dict(self._aborts)
            if self._abort_reason:
                return  # this rank is failing and told its peers: their leaving is no verdict
            if aborts:
                peer = min(aborts)
                self._declare(EXIT_PEER_ABORT, f"rank {peer} aborted: {aborts[peer]}")
                return
            for peer in self.watched:
                if peer in done:
                    self.ended.add(peer)
                value = beats.get(peer, -1)
                if value != last_value.get(peer, -1):  # dated by the reading that showed it
                    last_value[peer], self.last_change[peer] = value, read_at
            verdict = self._judge(now, max(read_at, rebased), rebased)
            if verdict is not None:
                self._declare(*verdict)
                return

    def _judge(self, now: float, read_at: float, rebased: float) -> tuple[int, str] | None:
        store_silent = now - read_at
        if store_silent > self.window_s:
            if 0 in self.ended and not self.launch.agent_store:
                return None  # rank0 ended cleanly and took its store along: the job is ending
            return EXIT_ORPHANED, self._store_message(store_silent)
        # A peer's silence is what the store showed (from its last change to the latest reading)
        # plus at most two heartbeats of the store's own lateness (a round trip's jitter, or a
        # peer's verdict that was due as the store host left). A store silent for longer is the
        # bigger fact: a peer whose beat was merely late when rank0 died is not named for it.
        late = min(now - read_at, 2 * self.interval_s)
        silent = {
            p: read_at - max(self.last_change[p], rebased) + late for p in self.watched if p not in self.ended
        }
        lost = [p for p, s in silent.items() if s > self.window_s]
        if not lost:
            return None
        # the first to go quiet (the others may only be following it); rank0 on a tie
        peer = max(lost, key=lambda p: (round(silent[p], 1), p == 0))
        how = (
            f"has not heartbeat for {silent[peer]:.1f} s (dead, stopped or hung; "
            f"window {self.window_s:.1f} s)"
        )
        if peer == 0:
            return EXIT_ORPHANED, f"orphaned: rank0 {how}: rank {self.launch.rank} exits"
        action = "aborting the stream" if self.launch.rank == 0 else f"rank {self.launch.rank} exits"
        return EXIT_PEER_LOST, f"rank {peer} {how}{self._own_stall_note(now)}: {action}"

    def _own_stall_note(self, now: float) -> str:
        """Peers that fell silent right after this rank itself stood still past the window were
        most likely reacting to it (they ruled it lost and left): the verdict says so."""
        stalled_s, ended_at = self.own_stall
        if stalled_s <= self.window_s or now - ended_at > 2 * self.window_s:
            return ""
        return (
            f", after this rank itself stalled {stalled_s:.1f} s past the window "
            "(its peers will have ruled it lost first)"
        )

    def _store_message(self, silent_s: float) -> str:
        where = f"{self.launch.master_addr}:{self.launch.master_port}"
        host = "the launcher's agent" if self.launch.agent_store else "rank0"
        return (
            f"orphaned: the rendezvous store at {where} (hosted by {host}) has not answered for "
            f"{silent_s:.1f} s ({host} dead, stopped or hung; window {self.window_s:.1f} s): "
            f"rank {self.launch.rank} exits"
        )

    def _declare(self, code: int, message: str) -> None:
        self.verdict_message = message
        log.critical(message)
        self.on_verdict(code, message)  # normally ends the process: the event is for tests
        self._verdict.set()


def exit_on_verdict(record: Callable[[str], object], guard: OutputGuard) -> Verdict:
    """The runtime's verdict: record it (flight record), take the output guard (a chunk being
    written finishes; the video is closed whole and its lines claimed), then end the process
    with the verdict's code."""

    def verdict(code: int, message: str) -> None:
        try:
            record(message)
        finally:
            guard.take_for_exit(timeout_s=5.0)  # the output closed whole; nothing writes after
            logging.shutdown()
            os._exit(code)

    return verdict


def transport_like(exc: BaseException) -> bool:
    """Errors a dead or stopped peer causes (as opposed to a fault found by this rank).

    A header with a bad magic is one too: when NCCL aborts a receive because the peer exited,
    the call returns and the buffer holds whatever was there (seen on NCCL: "bad magic" on the
    leader right after rank0 died). The caller asks the watchdog which it was.
    """
    if isinstance(exc, TransportError | ChannelBroken | Poisoned):
        return True
    if isinstance(exc, HeaderError) and exc.field == "magic":
        return True
    return isinstance(exc, RuntimeError) and not isinstance(exc, StreamditError)
