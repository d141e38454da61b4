"""The rank0 chunk loop shared by every topology: Phase A → (publish) → Phase B → (check) → Phase C.

Owns: `StreamOutputs` (the output files, their writer thread and the summary every rank0 loop
shares) and `drive()`, which runs one stream's chunks, honours drain requests between chunks,
and leaves through `StreamOutputs.__exit__`, so a crash or a signal leaves a valid video holding
every chunk emitted. On a GPU the loop never waits for the device to time a phase (CUDA-event
`PhaseMarks`) and runs at most one chunk ahead of it. Phase B is the rank's `PhaseB` unit (its
digests included); topologies plug in one hook: `publish` (TP: broadcast the chunk's envelope to
the workers before rank0 runs its own shard). `single` passes none. Each phase is a profiler
range (`streamdit.phase_a` / `_b` / `_c`): `bench/profile_stream.py` reads a stream's device
timeline by them.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.profiler import record_function

from streamdit.config import RunConfig
from streamdit.media import NullWriter, VideoWriter, open_writer
from streamdit.protocol.header import Ids
from streamdit.runtime.faults import FaultPlan
from streamdit.runtime.live import LiveStream
from streamdit.runtime.liveness import StopFlag
from streamdit.runtime.metrics import (
    ChunkMetrics,
    MetricsWriter,
    Progress,
    delivery_stats,
    overlap_score,
    process_age_s,
    write_json_atomic,
)
from streamdit.runtime.output import OutputError, OutputGuard, OutputWorker, PhaseMarks
from streamdit.runtime.phase_b import PhaseB
from streamdit.runtime.plan import GeneratorInputs
from streamdit.runtime.profiling import ChunkProfiler
from streamdit.runtime.stage0 import Stage0

log = logging.getLogger(__name__)

Publish = Callable[[Ids, GeneratorInputs], None]


@dataclass(frozen=True, kw_only=True, slots=True)
class RunSummary:
    """How a stream ended and how it ran: the metrics file's summary line (`record()`), also
    written by `--summary`, and what the CLI prints."""

    chunks: int
    frames: int
    out: Path | None  # None: nothing recorded (serve without --out)
    seconds: float  # the stream: its start (model built, warmed up) to its end
    stopped_early: str = ""  # the drain reason when a stop request ended the stream
    dropped_stale: int = 0  # pp: old-epoch results dropped after an immediate cut (never decoded)
    overlap_score: float | None = None  # pp: docs/protocol.md §8
    outcome: str = "completed"  # completed | drained | failed
    failure: str = ""  # failed: the error type and message
    startup_s: float | None = None  # process start to the stream's start (None: unknown)
    fps: float | None = None  # frames delivered per second, first written chunk to the last
    first_frame_s: float | None = None  # the stream's start to its first chunk written
    period_ms_p50: float | None = None
    period_ms_p99: float | None = None
    topology: str = "single"

    def record(self) -> dict[str, object]:
        fields = {f: getattr(self, f) for f in self.__dataclass_fields__}
        fields["out"] = None if self.out is None else str(self.out)
        fields["wall_s"] = None if self.startup_s is None else self.startup_s + self.seconds
        return fields


def _failure(exc: object) -> str:
    """A stream's failure as the summary states it ("" for a clean end)."""
    if not isinstance(exc, BaseException):
        return ""
    return f"{type(exc).__name__}: {exc}"[:500]


def sync(device: torch.device) -> None:
    """Phase timings must include the device work they launched: this thread's stream only.

    Never a device-wide sync: under pp, rank0's comm threads keep NCCL transfers pending on
    their own streams (the next result's recv), and waiting for those would tie Stage 0 to the
    mesh (no overlap left) while measuring the mesh's time as Stage 0's.
    """
    if device.type == "cuda":
        torch.cuda.current_stream(device).synchronize()


class StreamOutputs:
    """rank0's output files of one stream: video, metrics, progress bar, and its summary.

    Used as a context manager by every loop (`drive`, the pp pipelined loop). `emit` hands a
    chunk to the writer thread (runtime/output.py); on any exit the queue is drained, the files
    are closed and the summary is written (the metrics file's last line, and `--summary`), so a
    crash or a signal leaves a valid video holding every chunk emitted. `guard` (tp / pp): held
    around every frame write; a watchdog verdict taking it finishes the files the same way.
    `result` is the summary once the stream ended.
    """

    def __init__(
        self,
        cfg: RunConfig,
        chunks: int,
        live: LiveStream | None = None,
        guard: OutputGuard | None = None,
        stop: StopFlag | None = None,
    ) -> None:
        self.cfg = cfg
        self.stop = stop or StopFlag()
        self.t_start = time.monotonic()
        self.startup_s = process_age_s()
        self.guard = guard
        self.dropped_stale = 0  # pp: counted by its loop
        self.result: RunSummary | None = None
        self.writer: VideoWriter = (
            open_writer(cfg.out, height=cfg.height, width=cfg.width, fps=cfg.fps)
            if live is None or live.record_video
            else NullWriter()
        )
        self.metrics = MetricsWriter(cfg.metrics)
        # a stream that runs until stopped has no total to draw a bar against
        self.progress = Progress(
            chunks, enabled=cfg.progress and not (live is not None and live.until_stopped)
        )
        emitted = None if live is None else live.emitted
        self.worker = OutputWorker(
            self.writer, self.metrics, self.progress, t_start=self.t_start, emitted=emitted, guard=guard
        )
        if guard is not None:  # a verdict ends the process from another thread: finish first
            guard.on_exit(self._finish_on_verdict)

    def emit(self, frames: torch.Tensor, record: ChunkMetrics, marks: PhaseMarks | None = None) -> None:
        """One chunk's uint8 `[T, H, W, 3]` frames (any device) and its record, in order."""
        self.worker.submit(frames, record, marks)

    def __enter__(self) -> StreamOutputs:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        try:
            self.worker.close()
        except OutputError as failed:
            with self.guard or nullcontext():
                self._conclude(_failure(exc) or _failure(failed))
            if exc is None:
                raise
            if not isinstance(exc, OutputError):  # the stream's own error stays the one raised
                log.exception("the output failed too, while the stream ended on %r", exc)
        else:
            with self.guard or nullcontext():  # a verdict's own conclusion waits, or went first
                self._conclude(_failure(exc))
        finally:
            self.progress.close()
            self.writer.close()  # closed by the worker already; idempotent
            self.metrics.close()

    def _finish_on_verdict(self) -> None:
        self.worker.finish_files()
        self._conclude("the job's watchdog ended it (its log and `streamdit inspect` say why)")
        self.metrics.close()

    def _conclude(self, failure: str) -> None:
        """The summary, once the writer thread is done or held (this thread owns the files)."""
        if self.result is not None:
            return
        records = list(self.metrics.records)
        outcome = "failed" if failure else "drained" if self.stop.requested else "completed"
        self.result = RunSummary(
            chunks=self.metrics.count,
            frames=self.metrics.frames,
            out=None if isinstance(self.writer, NullWriter) else self.cfg.out,
            seconds=time.monotonic() - self.t_start,
            stopped_early=self.stop.reason if self.stop.requested else "",
            dropped_stale=self.dropped_stale,
            overlap_score=overlap_score(records),
            outcome=outcome,
            failure=failure,
            startup_s=self.startup_s,
            topology=self.cfg.topology,
            **delivery_stats(records),  # type: ignore[arg-type]
        )
        summary = self.result.record()
        try:
            self.metrics.write_summary(summary)
            if self.cfg.summary is not None:
                write_json_atomic(self.cfg.summary, summary)
        except OSError as write_failed:  # a full disk: the video and chunk lines stay valid
            log.error("summary not written: %s", write_failed)

    def summary(self) -> RunSummary:
        assert self.result is not None, "summary() is read once the stream's outputs are closed"
        return self.result


def drive(
    cfg: RunConfig,
    *,
    chunks: int,
    stage0: Stage0,
    phase_b: PhaseB,
    device: torch.device,
    faults: FaultPlan,
    stop: StopFlag,
    publish: Publish | None = None,
    guard: OutputGuard | None = None,
    live: LiveStream | None = None,
    keepalive: Callable[[], None] | None = None,
) -> RunSummary:
    """`guard` (tp): held around every frame write, so a watchdog verdict that ends the process
    from another thread never cuts a write in half. `live` (serve): the chunk boundary waits
    there while paused, calling `keepalive` (tp: a NOOP to the workers), and every emitted chunk
    is reported to it."""
    profiler = ChunkProfiler(cfg.profile, first=cfg.profile_from, count=cfg.profile_chunks, device=device)
    with StreamOutputs(cfg, chunks, live, guard, stop) as outputs, profiler:
        previous: PhaseMarks | None = None
        for k in range(chunks):
            paused_s = live.boundary(keepalive) if live is not None else 0.0
            if stop.requested:
                log.warning("draining after %d chunks (%s)", k, stop.reason)
                break
            profiler.at_chunk(k)
            marks = PhaseMarks(device)
            with record_function("streamdit.phase_a"):
                ids, inputs, notes = stage0.prepare(k)
                if publish is not None:
                    publish(ids, inputs)
            marks.mark()
            if previous is not None:
                # one chunk ahead of the device at most: Phase A of chunk k overlaps the decode
                # of chunk k-1 (no idle gap), and nothing later is queued behind a live change
                previous.wait()
            calls_before = phase_b.runner.calls_made
            with record_function("streamdit.phase_b"):
                latents = phase_b.infer(ids, inputs)
            faults.received(k, latents)
            marks.mark()
            with record_function("streamdit.phase_c"):
                frames = stage0.finish(latents)
            marks.mark()
            record = ChunkMetrics(
                chunk_index=ids.chunk_index,
                cache_epoch=ids.cache_epoch,
                call_id=ids.call_id,
                frames=int(frames.shape[0]),
                generator_calls=phase_b.runner.calls_made - calls_before,
                phase_a_ms=0.0,  # the writer thread reads the three from `marks`
                phase_b_ms=0.0,
                phase_c_ms=0.0,
                transition=notes.transition,
                text_ms=notes.text_ms,
                paused_ms=paused_s * 1e3,
                kv_recompute=inputs.do_kv_recompute,
            )
            outputs.emit(frames, record, marks)
            previous = marks
            if faults.slow_chunk_ms:
                time.sleep(faults.slow_chunk_ms / 1e3)
    return outputs.summary()
