"""Phase C's tail off the critical path: one writer thread per stream, fed by a bounded queue.

Owns: `OutputWorker`. The chunk loop hands it each chunk's frames as a uint8 tensor (still on
the GPU) with its metrics record; `submit` starts the device-to-host copy into pinned memory
(asynchronous, ordered after the decode on the loop's stream) and returns. The writer thread
waits for that copy, then per chunk and in order: writes the frames to the video, appends the
metrics line (with `emit_s`, when the frames were written), tells the live stream (serve's
viewers encode there) and redraws the progress bar. So H.264 / JPEG encoding and disk writes
overlap the next chunk's generation.

Invariants:
- Nothing is lost and nothing is claimed unwritten: a chunk's metrics line is appended only
  after its frames are in the video, so frames written == sum of the metrics lines' frames at
  every moment, also after a crash, a signal or a full disk.
- `close()` (called on every exit of the stream, crash or signal included) drains the queue:
  every chunk already generated is written before the files close.
- Bounded: at most `depth` chunks wait. A disk slower than generation for longer than that makes
  `submit` wait (backpressure: the total wait is logged at close) rather than grow memory.
- A write that fails (disk full, a closed pipe) stops the thread; the next `submit` or `close`
  raises `OutputError` naming the file, the chunks and frames safely written, and the cause.
  Chunks queued behind a failed write are not written and not counted.

One owner: only the writer thread touches the video writer, the metrics file, the live sinks and
the progress bar once the worker started; the loop thread only submits.
"""

from __future__ import annotations

import dataclasses
import logging
import queue
import threading
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch

from streamdit.errors import StreamditError
from streamdit.media import VideoWriter
from streamdit.runtime.metrics import ChunkMetrics, MetricsWriter, Progress

log = logging.getLogger(__name__)

WRITER_DEPTH = 4  # chunks waiting for the disk: ~27 MB of frames at 320x576
Emitted = Callable[[np.ndarray, ChunkMetrics], None]


class OutputError(StreamditError):
    """Writing the stream's output failed; what was written before stays valid."""


class PhaseMarks:
    """The boundaries of one chunk's phases on the loop thread, read without stalling it.

    On a GPU each mark is a CUDA event, so the loop never waits for the device to time a
    phase: the times are device time between marks, read by the writer thread once the chunk's
    last mark has passed. On the CPU (synchronous) they are `perf_counter` readings.
    """

    def __init__(self, device: torch.device) -> None:
        self._cuda = device.type == "cuda"
        self._marks: list[torch.cuda.Event | float] = []
        self.mark()

    def mark(self) -> None:
        if self._cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self._marks.append(event)
        else:
            self._marks.append(time.perf_counter())

    def wait(self) -> None:
        """Block until the device has passed the last mark."""
        last = self._marks[-1]
        if isinstance(last, torch.cuda.Event):
            last.synchronize()

    def phase_ms(self) -> list[float]:
        """Milliseconds between successive marks (waits for the last one)."""
        self.wait()
        pairs = zip(self._marks, self._marks[1:], strict=False)
        if self._cuda:
            return [a.elapsed_time(b) for a, b in pairs]  # type: ignore[union-attr]
        return [(b - a) * 1e3 for a, b in pairs]  # type: ignore[operator]


@dataclass(frozen=True, slots=True)
class _Chunk:
    host: torch.Tensor  # uint8 [T, H, W, 3] on the host (pinned when the frames came from a GPU)
    copied: torch.cuda.Event | None  # the device-to-host copy; None on the CPU
    record: ChunkMetrics
    marks: PhaseMarks | None  # phases A, B, C: their times replace the record's


_STOP = object()


class OutputWorker:
    """The writer thread of one stream (see the module docstring)."""

    def __init__(
        self,
        writer: VideoWriter,
        metrics: MetricsWriter,
        progress: Progress,
        *,
        t_start: float,
        emitted: Emitted | None = None,
        guard: threading.Lock | None = None,
        depth: int = WRITER_DEPTH,
    ) -> None:
        self.writer = writer
        self.metrics = metrics
        self.progress = progress
        self.t_start = t_start
        self.emitted = emitted
        self.guard = guard
        self._queue: queue.Queue[object] = queue.Queue(maxsize=depth)
        self._failure: BaseException | None = None
        self._wait_s = 0.0
        self._thread = threading.Thread(target=self._run, name="streamdit-writer", daemon=True)
        self._started = False

    def submit(self, frames: torch.Tensor, record: ChunkMetrics, marks: PhaseMarks | None = None) -> None:
        """Queue one chunk: `frames` uint8 `[T, H, W, 3]` on any device; `record.frames` == T.
        `marks` (A, B and C's boundaries): the phase times are read from them."""
        self._raise_if_failed()
        if not self._started:
            self._thread.start()
            self._started = True
        if frames.device.type == "cuda":
            host = torch.empty(frames.shape, dtype=torch.uint8, pin_memory=True)
            host.copy_(frames, non_blocking=True)
            copied = torch.cuda.Event()
            copied.record(torch.cuda.current_stream(frames.device))
        else:
            host, copied = frames.contiguous(), None
        t0 = time.perf_counter()
        self._put(_Chunk(host=host, copied=copied, record=record, marks=marks))
        self._wait_s += time.perf_counter() - t0

    def close(self) -> None:
        """Write every queued chunk, then stop the thread; raises OutputError if a write failed."""
        if self._started:
            self._put(_STOP)
            self._thread.join()
            self._started = False
        if self._wait_s > 0.05:
            log.info("writer: generation waited %.0f ms in all for the output queue", self._wait_s * 1e3)
        self._raise_if_failed()

    def _put(self, item: object) -> None:
        while True:  # a failed thread takes nothing more: never block on its full queue
            try:
                self._queue.put(item, timeout=0.1)
                return
            except queue.Full:
                self._raise_if_failed()

    def _raise_if_failed(self) -> None:
        if self._failure is not None:
            written = (
                f"{len(self.metrics.records)} chunks ({self.writer.frames_written} frames) written and valid"
            )
            raise OutputError(f"output: writing failed: {self._failure}; {written}") from self._failure

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is _STOP:
                return
            if self._failure is not None:
                continue  # drained, not written: the loop raises at its next submit / close
            assert isinstance(item, _Chunk)
            try:
                self._write(item)
            except BaseException as exc:  # noqa: BLE001 - handed to the loop thread, not lost
                log.error("writer: chunk %d not written: %s", item.record.chunk_index, exc)
                self._failure = exc

    def _write(self, chunk: _Chunk) -> None:
        if chunk.copied is not None:
            chunk.copied.synchronize()
        frames = chunk.host.numpy()
        with self.guard or nullcontext():
            self.writer.write(frames)
        record = dataclasses.replace(chunk.record, emit_s=time.monotonic() - self.t_start)
        if chunk.marks is not None:
            a, b, c = chunk.marks.phase_ms()
            record = dataclasses.replace(record, phase_a_ms=a, phase_b_ms=b, phase_c_ms=c)
        self.metrics.write(record)
        if self.emitted is not None:
            self.emitted(frames, record)
        self.progress.update(len(self.metrics.records), self.writer.frames_written)
