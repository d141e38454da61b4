"""Drain requests: how a signal turns into a clean stop at the next chunk boundary.

Owns: `StopFlag`. The first Ctrl-C / SIGTERM asks the loop to drain (finish the chunk in flight,
write it, close the video); a second one escalates to KeyboardInterrupt, which still unwinds
through `finally` and closes the file. Heartbeats and watchdogs of the distributed topologies
will live here too.
"""

from __future__ import annotations

import threading


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
