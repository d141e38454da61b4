"""A live stream's controls on rank0 (`streamdit serve`): steering, pause, and what a server reads.

Owns:
- `LiveTimeline`: a prompt source steered while the stream runs. A submitted prompt takes effect
  at the next chunk boundary: the first chunk Phase A prepares after the submission. A "hard"
  change is an immediate cut (a live user's cut: the old scene still in flight under pp is
  dropped); "soft" blends over the run's `blend_chunks` chunks. One change waits at a time: a
  second submission before the boundary is refused (`PendingChange`) unless it says `replace`,
  and `cancel` withdraws the waiting one, so a cut is never silently overwritten.
- `LiveStream`: run state (running / paused / stopping), the chunk boundary the rank0 loop waits
  at while paused (calling a keepalive so peers blocked on the next message do not time out), the
  per-chunk record of what was emitted (FPS, chunk period percentiles, epoch, queue depths) and
  the frame sink a server attaches.

Thread model: the server thread calls `submit`, `pause`, `resume`, `request_stop`, `status`; the
rank0 loop calls `boundary` and `emitted`. Every shared field is guarded by one lock; the sink is
called on the loop's thread and must not block (the server's hub only enqueues).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from streamdit.errors import ConfigError
from streamdit.runtime.liveness import StopFlag
from streamdit.runtime.metrics import ChunkMetrics, percentile, periods_ms
from streamdit.runtime.timeline import PromptState, TimelineEntry, state_at

LIVE_TRANSITIONS = {"hard": "cut", "soft": "soft"}  # page / API name -> timeline transition
LIVE_KINDS = {v: k for k, v in LIVE_TRANSITIONS.items()}  # and back
MAX_PROMPT_CHARS = 2000
STOP_OVER_HTTP = "stop requested over HTTP"  # the drain reason of serve's stop (exit 0, like SIGTERM)
PERIOD_WINDOW = 200  # chunk periods kept for p50 / p99
FPS_WINDOW = 8  # chunks the FPS is measured over
IDLE_POLL_S = 0.25


def keepalive_period(dist_timeout_s: float) -> float:
    """NOOPs while paused: well inside the process-group timeout a blocked peer waits under."""
    return max(0.2, dist_timeout_s / 4)


Sink = Callable[[np.ndarray, ChunkMetrics], None]


def check_prompt(prompt: object, transition: object) -> tuple[str, str]:
    """The boundary check of a steering request; raises ConfigError naming the field."""
    if not isinstance(prompt, str):
        raise ConfigError(f"prompt must be a string, got {type(prompt).__name__} [field=prompt]")
    text = prompt.strip()
    if not text:
        raise ConfigError("prompt must not be empty [field=prompt]")
    if len(text) > MAX_PROMPT_CHARS:
        raise ConfigError(f"prompt has {len(text)} characters, at most {MAX_PROMPT_CHARS} [field=prompt]")
    if not isinstance(transition, str) or transition not in LIVE_TRANSITIONS:
        raise ConfigError(
            f"unknown transition {transition!r}: use one of {sorted(LIVE_TRANSITIONS)} [field=transition]"
        )
    return text, transition


class PendingChange(ConfigError):
    """A change is already waiting for the next chunk boundary (replace it explicitly)."""


class LiveTimeline:
    """A timeline that grows while the stream runs (see the module docstring)."""

    def __init__(self, prompt: str, check: Callable[[str], None] | None = None) -> None:
        self._check = check  # precomputed embeddings: a prompt without one is refused at submit
        self._lock = threading.Lock()
        # the last two entries are all a state needs (the current one and, for a blend, its predecessor)
        self._entries: list[TimelineEntry] = [TimelineEntry(chunk=0, prompt=prompt)]
        self._pending: tuple[str, str] | None = None

    def submit(self, prompt: str, transition: str, *, replace: bool = False) -> None:
        """Queue a change for the next chunk boundary; one waiting already is replaced only when
        `replace` says so (else PendingChange naming it)."""
        text, kind = check_prompt(prompt, transition)
        if self._check is not None:
            self._check(text)
        with self._lock:
            if self._pending is not None and not replace:
                waiting, how = self._pending
                raise PendingChange(
                    f"a change is already waiting for the next chunk boundary ({how}: {waiting!r}): "
                    "send it again with replace, or cancel it [field=replace]"
                )
            self._pending = (text, LIVE_TRANSITIONS[kind])

    def cancel(self) -> str | None:
        """Withdraw the waiting change; returns its prompt (None when nothing waited)."""
        with self._lock:
            withdrawn, self._pending = self._pending, None
        return withdrawn[0] if withdrawn else None

    def state(self, chunk: int, blend_chunks: int = 2) -> PromptState:
        with self._lock:
            if self._pending is not None and chunk > self._entries[-1].chunk:
                prompt, transition = self._pending
                self._pending = None
                entry = TimelineEntry(chunk=chunk, prompt=prompt, transition=transition)
                self._entries = [*self._entries[-1:], entry]
            return state_at(self._entries, chunk, blend_chunks)

    def current(self) -> tuple[str, tuple[str, str] | None]:
        """(the prompt in effect, the waiting (prompt, transition) or None)."""
        with self._lock:
            return self._entries[-1].prompt, self._pending


class LiveFrames:
    """Video-to-video input that arrives while the stream runs (serve's browser input): the server
    pushes decoded frames, Phase A reads a chunk's worth at its boundary (a `media.FrameSource`).

    Never blocks generation: `read(n)` takes the newest `n` frames pushed since the last read
    (a live input is shown with the least delay; older ones are dropped), repeats the last one
    when fewer arrived, and is mid-gray before the first. Bounded: at most `KEPT` frames wait.
    """

    KEPT = 64

    def __init__(self, height: int, width: int) -> None:
        self.height, self.width = height, width
        self._lock = threading.Lock()
        self._frames: deque[np.ndarray] = deque(maxlen=self.KEPT)
        self._last = np.full((height, width, 3), 128, dtype=np.uint8)
        self.received = 0  # frames pushed
        self.used = 0  # frames Phase A took (repeats not counted)

    def push(self, frame: np.ndarray) -> None:
        if frame.shape != (self.height, self.width, 3) or frame.dtype != np.uint8:
            raise ValueError(
                f"input frame {frame.shape} {frame.dtype}, expected ({self.height}, {self.width}, 3) uint8"
            )
        with self._lock:
            self._frames.append(frame)
            self.received += 1

    def read(self, n: int) -> np.ndarray:
        with self._lock:
            taken = list(self._frames)[-n:]
            self._frames.clear()
            self.used += len(taken)
            if taken:
                self._last = taken[-1]
            last = self._last
        return np.stack([*taken, *[last] * (n - len(taken))])

    def fresh(self) -> LiveFrames:
        return LiveFrames(self.height, self.width)  # a rehearsal reads gray, never the viewer's frames

    def close(self) -> None:
        pass

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {"received": self.received, "used": self.used, "waiting": len(self._frames)}


@dataclass(frozen=True, kw_only=True, slots=True)
class Emitted:
    """What the loop reports per chunk (the status reads the latest and a window of them)."""

    t: float
    record: ChunkMetrics


class LiveStream:
    """rank0's live controls and status (see the module docstring)."""

    def __init__(
        self,
        prompt: str,
        stop: StopFlag,
        *,
        keepalive_s: float,
        start_paused: bool = False,
        record_video: bool = False,
        prompt_check: Callable[[str], None] | None = None,
        until_stopped: bool = True,
        steerable: bool = True,
        input_frames: LiveFrames | None = None,
    ) -> None:
        # not steerable: the run follows its own timeline file (prompt changes are refused)
        self.timeline = LiveTimeline(prompt, prompt_check) if steerable else None
        self.stop = stop
        self.keepalive_s = keepalive_s
        self.record_video = record_video
        self.until_stopped = until_stopped  # no chunk count: the stream ends at a stop (or its input's end)
        self.input_frames = input_frames  # browser input: Phase A reads these
        self.sinks: list[Sink] = []
        self.liveness: Callable[[], list[dict[str, object]]] = lambda: [
            {"rank": 0, "state": "alive", "silent_s": 0.0}
        ]
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._paused = start_paused
        self._idle = False  # the loop is waiting at a boundary
        self._emitted: deque[Emitted] = deque(maxlen=PERIOD_WINDOW + 1)
        self._frames_total = 0
        self._t_start = time.monotonic()
        self.failure: str | None = None

    # ---- server side -----------------------------------------------------------------------

    def submit(self, prompt: object, transition: object, *, replace: bool = False) -> dict[str, object]:
        text, kind = check_prompt(prompt, transition)
        self._steerable().submit(text, kind, replace=replace)
        with self._lock:
            last = self._emitted[-1].record if self._emitted else None
        return {
            "accepted": True,
            "prompt": text,
            "transition": kind,
            "after_chunk": last.chunk_index if last else None,
        }

    def cancel(self) -> dict[str, object]:
        return {"cancelled": self._steerable().cancel()}

    def _steerable(self) -> LiveTimeline:
        if self.timeline is None:
            raise ConfigError(
                "this stream follows its --timeline file: prompts cannot change live [field=prompt]"
            )
        return self.timeline

    def pause(self) -> None:
        with self._lock:
            self._paused = True

    def resume(self) -> None:
        with self._wake:
            self._paused = False
            self._wake.notify_all()

    def request_stop(self, reason: str) -> None:
        """Drain the stream; idempotent (a second stop asks for what is already under way)."""
        if not self.stop.requested:
            self.stop.request(reason)
        with self._wake:
            self._wake.notify_all()

    @property
    def paused(self) -> bool:
        with self._lock:
            return self._paused

    # ---- loop side -------------------------------------------------------------------------

    def boundary(
        self, keepalive: Callable[[], None] | None, before_idle: Callable[[], None] | None = None
    ) -> float:
        """Block while paused (until resumed or stopped), calling `keepalive` every keepalive_s;
        returns the seconds spent idle (the chunk's `paused_ms`)."""
        if not self.paused or self.stop.requested:
            return 0.0
        t0 = time.monotonic()
        if before_idle is not None:
            before_idle()  # pp: show every chunk in flight before going idle
        with self._wake:
            self._idle = True
            due = time.monotonic() + self.keepalive_s
            try:
                # short waits: a stop from a signal handler (which cannot notify) is seen quickly
                while self._paused and not self.stop.requested:
                    self._wake.wait(timeout=min(IDLE_POLL_S, self.keepalive_s))
                    if keepalive is not None and time.monotonic() >= due:
                        self._wake.release()  # a keepalive is a send: never under the lock
                        try:
                            keepalive()
                        finally:
                            self._wake.acquire()
                        due = time.monotonic() + self.keepalive_s
            finally:
                self._idle = False
        return time.monotonic() - t0

    def emitted(self, frames: np.ndarray, record: ChunkMetrics) -> None:
        with self._lock:
            self._emitted.append(Emitted(t=time.monotonic(), record=record))
            self._frames_total += int(frames.shape[0])
        for sink in self.sinks:
            sink(frames, record)

    # ---- status ----------------------------------------------------------------------------

    def status(self) -> dict[str, object]:
        with self._lock:
            emitted = list(self._emitted)
            state = (
                "stopping"
                if self.stop.requested
                else "paused"
                if self._paused
                else "running"
                if emitted
                else "starting"
            )
            frames_total, idle = self._frames_total, self._idle
        prompt, pending = self.timeline.current() if self.timeline is not None else (None, None)
        last = emitted[-1].record if emitted else None
        periods = periods_ms([(e.t, e.record) for e in emitted])
        recent = periods[-FPS_WINDOW:]
        span_s = sum(recent) / 1e3
        fps = sum(e.record.frames for e in emitted[-len(recent) :]) / span_s if span_s > 0 else None
        return {
            "state": state,
            "idle": idle,
            "prompt": prompt,
            "pending_prompt": pending[0] if pending else None,
            "pending_transition": LIVE_KINDS[pending[1]] if pending else None,
            "frames_per_chunk": last.frames if last else None,
            "chunk_index": last.chunk_index if last else None,
            "cache_epoch": last.cache_epoch if last else None,
            "transition": last.transition if last else None,
            "frames_total": frames_total,
            "fps": fps,
            "period_ms_p50": percentile(periods, 50),
            "period_ms_p99": percentile(periods, 99),
            "queue": {"in_flight": last.in_flight, "d_in": last.d_in, "d_out": last.d_out} if last else None,
            "ranks": self.liveness(),
            "uptime_s": time.monotonic() - self._t_start,
            "input": None if self.input_frames is None else self.input_frames.stats(),
            "failure": self.failure,
        }
