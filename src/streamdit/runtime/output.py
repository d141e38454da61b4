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
  once its frames are *durable* in the video (`VideoWriter.durable_frames`: at once for .npy;
  for .mp4 when the next chunk's keyframe closes its fragment, or at close), so the frames a
  reader finds == sum of the metrics lines' frames at every moment, also after a SIGKILL, a
  crash, a signal or a full disk (a failed write cuts the file back to its durable part).
  Viewers and the progress bar hear of a chunk as soon as it is written.
- A watchdog verdict (which ends the process from another thread) takes the `OutputGuard`
  between two chunks and lets the worker finish: the writer closes (its last fragment
  included) and the remaining lines are claimed, before the process exits.
- `close()` (called on every exit of the stream, crash or signal included) drains the queue:
  every chunk already generated is written before the files close.
- Bounded: at most `depth` chunks wait. A disk slower than generation for longer than that makes
  `submit` wait (backpressure: the total wait is logged at close) rather than grow memory.
- A write that fails (disk full, a closed pipe) stops the thread; the next `submit` or `close`
  raises `OutputError` naming the file, the chunks and frames safely written, and the cause.
  Chunks queued behind a failed write are not written and not counted.

One owner: only the writer thread touches the video writer, the metrics file, the live sinks and
the progress bar once the worker started (the thread holding the guard, for each chunk); the
loop thread only submits; `close` and a verdict's finish run once that thread is done or held.
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


class OutputGuard:
    """rank0's outputs vs a watchdog verdict that ends the process from another thread.

    The writer thread holds it while it writes and claims one chunk; `take_for_exit` (the
    verdict) takes it for good, so no write is cut in half, then runs the finish the outputs
    registered (close the video, claim what it holds) before the process ends.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._finish: Callable[[], None] | None = None

    def __enter__(self) -> OutputGuard:
        self._lock.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self._lock.release()

    def on_exit(self, finish: Callable[[], None] | None) -> None:
        self._finish = finish

    def take_for_exit(self, timeout_s: float) -> None:
        """Never released: nothing writes after this. Bounded: a write stuck on a dead disk
        cannot keep the process alive past `timeout_s` (its chunk is then not claimed)."""
        if self._lock.acquire(timeout=timeout_s) and self._finish is not None:
            try:
                self._finish()
            except Exception:  # noqa: BLE001 - the exit must happen
                log.exception("output: finishing the files on exit failed")


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
        guard: OutputGuard | None = None,
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
        self._unclaimed: list[ChunkMetrics] = []  # written, not yet durable: no line yet
        self._claimed_frames = 0
        self._chunks_written = 0
        if guard is not None:
            guard.on_exit(self.finish_files)

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
        """Write every queued chunk, stop the thread, close the video and claim what it holds;
        raises OutputError if a write failed."""
        if self._started:
            self._put(_STOP)
            self._thread.join()
            self._started = False
        with self.guard or nullcontext():
            self.finish_files()
        if self._wait_s > 0.05:
            log.info("writer: generation waited %.0f ms in all for the output queue", self._wait_s * 1e3)
        self._raise_if_failed()

    def finish_files(self) -> None:
        """Close the video (its last fragment goes to disk) and claim every durable chunk."""
        if self._failure is None:
            try:
                self.writer.close()
            except BaseException as exc:  # noqa: BLE001 - reported by close() like a write failure
                self._fail(exc, "the video's last fragment not written")
        self._claim()

    def _put(self, item: object) -> None:
        while True:  # a failed thread takes nothing more: never block on its full queue
            try:
                self._queue.put(item, timeout=0.1)
                return
            except queue.Full:
                self._raise_if_failed()

    def _raise_if_failed(self) -> None:
        if self._failure is not None:
            written = f"{self.metrics.count} chunks ({self._claimed_frames} frames) written and valid"
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
                self._fail(exc, f"chunk {item.record.chunk_index} not written")

    def _fail(self, exc: BaseException, what: str) -> None:
        log.error("writer: %s: %s", what, exc)
        self._failure = exc
        self.writer.abort()  # the file back to its durable part: no torn tail
        self._claim()
        self._unclaimed.clear()  # not in the file: never claimed

    def _write(self, chunk: _Chunk) -> None:
        if chunk.copied is not None:
            chunk.copied.synchronize()
        frames = chunk.host.numpy()
        record = dataclasses.replace(chunk.record, emit_s=time.monotonic() - self.t_start)
        if chunk.marks is not None:
            a, b, c = chunk.marks.phase_ms()
            record = dataclasses.replace(record, phase_a_ms=a, phase_b_ms=b, phase_c_ms=c)
        with self.guard or nullcontext():
            self.writer.write(frames)
            self._unclaimed.append(record)
            self._chunks_written += 1
            self._claim()
        if self.emitted is not None:
            self.emitted(frames, record)
        self.progress.update(self._chunks_written, self.writer.frames_written)

    def _claim(self) -> None:
        """A metrics line for every written chunk whose frames are durable, in order."""
        durable = self.writer.durable_frames
        while self._unclaimed and self._claimed_frames + self._unclaimed[0].frames <= durable:
            record = self._unclaimed.pop(0)
            self.metrics.write(record)
            self._claimed_frames += record.frames
