"""What a rank does before its first chunk, shown while it happens: a model build, a checkpoint
load or a compile warm-up that takes a minute is never a minute of silence.

Owns: `StartupProgress`. On rank0 of a run on a terminal (`cfg.progress`) each stage is one line
on stderr, redrawn every second with its elapsed time by a ticker thread, then closed with its
duration; everywhere else each finished stage is an INFO log line (`--log-level INFO`).
One owner: the stage's thread writes the line; the ticker only redraws it under the same lock.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import threading
import time
from collections.abc import Iterator
from typing import TextIO

from streamdit.config import RunConfig

log = logging.getLogger(__name__)
TICK_S = 1.0


class StartupProgress:
    def __init__(self, *, enabled: bool, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self._lock = threading.Lock()

    @classmethod
    def for_rank(cls, cfg: RunConfig, rank: int) -> StartupProgress:
        return cls(enabled=cfg.progress and rank == 0)

    @contextlib.contextmanager
    def stage(self, what: str | None) -> Iterator[None]:
        """Time and show one stage (None: nothing to show)."""
        if what is None:
            yield
            return
        t0 = time.monotonic()
        done = threading.Event()
        ticker = None
        if self.enabled:
            self._draw(f"streamdit: {what} ...")
            ticker = threading.Thread(target=self._tick, args=(what, t0, done), daemon=True)
            ticker.start()
        try:
            yield
        finally:
            done.set()
            if ticker is not None:
                ticker.join()
            seconds = time.monotonic() - t0
            if self.enabled:
                self._draw(f"streamdit: {what}: {seconds:.1f} s\n")
            log.info("startup: %s: %.1f s", what, seconds)

    def _tick(self, what: str, t0: float, done: threading.Event) -> None:
        while not done.wait(TICK_S):
            self._draw(f"streamdit: {what} ... {time.monotonic() - t0:.0f} s")

    def _draw(self, text: str) -> None:
        with self._lock:
            self.stream.write("\r\033[K" + text)
            self.stream.flush()
