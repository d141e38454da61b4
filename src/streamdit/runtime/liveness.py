"""Liveness: drain requests and the heartbeat watchdog that runs beside the data plane.

Owns: `StopFlag` (the first Ctrl-C / SIGTERM asks the loop to drain; a second one escalates to
KeyboardInterrupt, which still unwinds through `finally` and closes the file) and `Watchdog`.

The watchdog talks only to the job's rendezvous store (TCPStore at MASTER_ADDR:MASTER_PORT,
hosted by rank0 under torchrun-style launches, by the agent under an elastic launcher), on its
own connection and its own thread, so it keeps working while the main thread is blocked inside
a collective. Every rank bumps a counter `hb/<rank>` every `window / 5` seconds. rank0 watches
every other rank; the others watch rank0. A watched counter that has not advanced for `window`
seconds (a store that cannot be reached counts as not advancing) is a verdict:
- on a worker / mesh rank: orphaned — rank0 is dead, stopped or hung: exit code 4;
- on rank0: a peer is lost: exit code 6, after the output file is left valid.
The verdict runs `on_verdict(code, message)` from the watchdog thread (the runtime writes the
flight record and exits the process: the main thread may be stuck in a collective). A rank that
finishes cleanly marks `done/<rank>`, and its watchers stop watching it.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from datetime import timedelta

import torch.distributed as dist

from streamdit.config import LaunchEnv
from streamdit.errors import EXIT_ORPHANED, EXIT_PEER_LOST, Poisoned, StreamditError
from streamdit.protocol.errors import ChannelBroken, HeaderError, TransportError

log = logging.getLogger(__name__)

PREFIX = "streamdit/liveness"
Verdict = Callable[[int, str], None]


class StopFlag:
    """Set from a signal handler, read by the coordination loop between chunks."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self.reason = ""

    def request(self, reason: str) -> None:
        if self._event.is_set():
            raise KeyboardInterrupt(f"second stop request ({reason}): aborting now")
        self.reason = reason
        self._event.set()

    @property
    def requested(self) -> bool:
        return self._event.is_set()


class Watchdog:
    """Heartbeats through the rendezvous store; a silent peer ends the process (see module doc)."""

    def __init__(self, launch: LaunchEnv, *, window_s: float, on_verdict: Verdict) -> None:
        if window_s <= 0:
            raise ValueError(f"watchdog window must be > 0 s, got {window_s}")
        self.launch = launch
        self.window_s = window_s
        self.interval_s = max(0.05, window_s / 5)
        self.on_verdict = on_verdict
        rank, world = launch.rank, launch.world_size
        self.watched = [r for r in range(1, world)] if rank == 0 else [0]
        self._store: dist.TCPStore | None = None
        self._stop = threading.Event()
        self._verdict = threading.Event()
        self.verdict_message = ""
        self._thread = threading.Thread(target=self._loop, name="watchdog", daemon=True)
        # per watched peer: when its heartbeat last changed, and whether it ended cleanly
        # (written by the watchdog thread, read by a status page)
        self.last_change: dict[int, float] = dict.fromkeys(self.watched, time.monotonic())
        self.ended: set[int] = set()

    def start(self) -> None:
        """Connect to the rendezvous store and start beating (after the process group exists)."""
        self._store = dist.TCPStore(
            self.launch.master_addr,
            self.launch.master_port,
            is_master=False,
            timeout=timedelta(seconds=max(1.0, self.interval_s * 2)),
            wait_for_workers=False,
        )
        self._beat()
        self._thread.start()

    def stop(self, *, done: bool) -> None:
        """Stop beating; `done` tells the watchers this rank ended cleanly (not lost)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=self.interval_s * 4)
        if done and self._store is not None:
            try:
                self._store.add(f"{PREFIX}/done/{self.launch.rank}", 1)
            except Exception as exc:  # noqa: BLE001 - rank0's store may already be gone
                log.debug("could not mark done: %s", exc)

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
        if not self._thread.is_alive() and not self._verdict.is_set():
            return False
        return self._verdict.wait(timeout=wait_s)

    # ---- watchdog thread ------------------------------------------------------------------

    def _beat(self) -> None:
        assert self._store is not None
        self._store.add(f"{PREFIX}/hb/{self.launch.rank}", 1)

    def _loop(self) -> None:
        last_value = dict.fromkeys(self.watched, -1)
        last_change = self.last_change
        watched = list(self.watched)
        store_down = False  # its host (rank0 under torchrun) is gone: stop asking, let time tell
        while not self._stop.wait(self.interval_s):
            now = time.monotonic()
            for peer in list(watched):
                value = last_value[peer]
                if not store_down:
                    try:
                        self._beat()
                        if self._store is not None and self._store.add(f"{PREFIX}/done/{peer}", 0) > 0:
                            watched.remove(peer)  # ended cleanly: nothing more to watch
                            self.ended.add(peer)
                            continue
                        value = self._store.add(f"{PREFIX}/hb/{peer}", 0) if self._store else -1
                    except Exception as exc:  # noqa: BLE001 - an unreachable store = no heartbeat
                        log.warning("heartbeat store unreachable (%s): judging by silence", exc)
                        store_down = True
                if value != last_value[peer]:
                    last_value[peer], last_change[peer] = value, now
                elif now - last_change[peer] > self.window_s:
                    self._declare(peer, now - last_change[peer])
                    return

    def _declare(self, peer: int, silent_s: float) -> None:
        if self.launch.rank == 0:
            code = EXIT_PEER_LOST
            message = (
                f"rank {peer} has not heartbeat for {silent_s:.1f} s (dead, stopped or hung; window "
                f"{self.window_s:.1f} s): aborting the stream"
            )
        else:
            code = EXIT_ORPHANED
            message = (
                f"orphaned: rank0 has not heartbeat for {silent_s:.1f} s (dead, stopped or hung; "
                f"window {self.window_s:.1f} s): rank {self.launch.rank} exits"
            )
        self.verdict_message = message
        log.critical(message)
        self.on_verdict(code, message)  # normally ends the process: the event is for tests
        self._verdict.set()


def exit_on_verdict(record: Callable[[str], object], guard: threading.Lock) -> Verdict:
    """The runtime's verdict: record it (flight record), wait for a frame write in progress to
    finish (the output stays valid), then end the process with the verdict's code."""

    def verdict(code: int, message: str) -> None:
        try:
            record(message)
        finally:
            guard.acquire(timeout=5.0)  # never released: nothing may write after this
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
