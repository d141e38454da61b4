"""Flight recorder: the last N protocol events of this process, with their ids.

Owns: `FlightRecorder`, a bounded, thread-safe ring usable directly as a channel observer
(`observer=recorder`). On any fatal error the runtime calls `dump(path)`, so the first failing rank
can be told from the ranks that merely timed out (docs/architecture.md, "Observability").
Timestamps are this process's monotonic clock; no cross-rank clock sync is assumed.
May import protocol; must not be imported by protocol.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Protocol

log = logging.getLogger(__name__)


class _Event(Protocol):
    def as_dict(self) -> dict[str, object]: ...


class FlightRecorder:
    """Bounded ring of events (dicts). Recording never raises into the caller."""

    def __init__(self, capacity: int = 256, *, label: str = "") -> None:
        if capacity <= 0:
            raise ValueError(f"capacity must be positive, got {capacity}")
        self.capacity = capacity
        self.label = label
        self.run_id = ""  # the job's run id, once its ranks agreed on one (session.agree_run_id)
        self._ring: deque[dict[str, object]] = deque(maxlen=capacity)
        self._counts: Counter[str] = Counter()  # totals survive ring eviction
        self._lock = threading.Lock()

    def __call__(self, event: _Event | Mapping[str, object]) -> None:
        """Observer entry point: takes a ChannelEvent (anything with `as_dict`) or a mapping."""
        record = dict(event) if isinstance(event, Mapping) else event.as_dict()
        record.setdefault("t_mono", time.monotonic())
        record.setdefault("t_wall", time.time())  # comparable across the ranks of one host
        with self._lock:
            self._ring.append(record)
            self._counts[str(record.get("name", "?"))] += 1

    record = __call__

    def events(self, name: str | None = None) -> list[dict[str, object]]:
        with self._lock:
            return [dict(e) for e in self._ring if name is None or e.get("name") == name]

    def count(self, name: str) -> int:
        """How many events of this name were ever recorded (not only those still in the ring)."""
        with self._lock:
            return self._counts[name]

    def snapshot(self) -> dict[str, object]:
        with self._lock:
            return {
                "label": self.label,
                "run_id": self.run_id,
                "pid": os.getpid(),
                "capacity": self.capacity,
                "counts": dict(self._counts),
                "events": [dict(e) for e in self._ring],
            }

    def exit_after_dump(
        self, path: str | os.PathLike[str], exit_fn: Callable[[int], object] = os._exit
    ) -> Callable[[int], None]:
        """An `exit_fn` for channels: write the flight record, then exit with the poison code."""

        def _exit(code: int) -> None:
            try:
                self.dump(path)
            except Exception:  # the exit must happen even if the disk is full
                log.exception("flight record dump to %s failed", path)
            finally:
                exit_fn(code)

        return _exit

    def dump(self, path: str | os.PathLike[str]) -> Path:
        """Write the ring as JSON (atomically: a reader never sees half a file)."""
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(self.snapshot(), indent=1, default=str), encoding="utf-8")
        tmp.replace(target)
        return target
