"""Per-chunk metrics: the JSON-lines record every topology writes, and a terminal progress bar.

Owns: `ChunkMetrics` (one line per chunk), `MetricsWriter` (append + flush per line, so a crash
keeps every finished chunk's line), the run summary (`delivery_stats`, one last line with
`"record": "summary"`), `read_metrics` (what every reader of the file uses), `overlap_score`
(docs/protocol.md §8) and `Progress` (a one-line bar on a TTY, silent otherwise).

File layout: one JSON object per line, each with a `record` key: `"chunk"` lines in emit order,
then at most one `"summary"` line, written when the stream ended (also on a drain or a crash;
not after a SIGKILL). A line without its newline is a torn write and is not a record.

pp fields (None elsewhere): `stage0_ms` = Phase A + C wall time of the chunk on rank0,
`stage1_ms` and `mesh_idle_ms` as the leader measured them (its clock, no sync needed),
`period_ms` between successive emits, `d_in` / `d_out` queue depths and `in_flight` when the
chunk was emitted.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TextIO


@dataclass(frozen=True, kw_only=True, slots=True)
class ChunkMetrics:
    chunk_index: int
    cache_epoch: int
    call_id: int
    frames: int
    generator_calls: int
    phase_a_ms: float
    phase_b_ms: float
    phase_c_ms: float
    transition: str
    kv_recompute: bool
    text_ms: float = 0.0
    """Text-encoder time inside phase A (a new prompt; 0 when every conditioning was cached)."""
    paused_ms: float = 0.0
    """Time the loop waited at this chunk's boundary while paused (serve): not part of its
    period, so a pause does not count as slow generation."""
    emit_s: float | None = None
    """Seconds from the stream's start to when the writer thread had written this chunk's
    frames (the delivery clock: FPS, chunk periods and time to first frame are read from it)."""
    stage0_ms: float | None = None
    stage1_ms: float | None = None
    period_ms: float | None = None
    mesh_idle_ms: float | None = None
    in_flight: int | None = None
    d_in: int | None = None
    d_out: int | None = None


WARMUP_CHUNKS = 2  # first chunks excluded from overlap statistics (pipeline filling)
CHUNK_RECORD = "chunk"
SUMMARY_RECORD = "summary"


def periods_ms(timed: Sequence[tuple[float, ChunkMetrics]]) -> list[float]:
    """Periods between successive chunks given as (seconds, record), each less the time the
    loop was paused before its chunk: a pause is not slow generation."""
    return [
        max(0.0, (tb - ta) * 1e3 - b.paused_ms) for (ta, _), (tb, b) in zip(timed, timed[1:], strict=False)
    ]


def chunk_periods_ms(records: Sequence[ChunkMetrics]) -> list[float]:
    """Delivery periods between successive written chunks, on their `emit_s` clock."""
    return periods_ms([(r.emit_s, r) for r in records if r.emit_s is not None])


def percentile(values: Sequence[float], q: int) -> float | None:
    if not values:
        return None
    if len(values) == 1:
        return float(values[0])
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


def delivery_stats(records: Sequence[ChunkMetrics]) -> dict[str, float | None]:
    """The delivery clock of a stream: `fps` = frames written per second from the first written
    chunk to the last, pauses excluded (so the first chunk's warm-up is not in it); `first_frame_s`
    = stream start to the first chunk written; chunk period p50 / p99. None where undefined."""
    periods = chunk_periods_ms(records)
    first = records[0].emit_s if records else None
    fps = None
    if periods and sum(periods) > 0:
        fps = sum(r.frames for r in records[1:]) / (sum(periods) / 1e3)
    return {
        "fps": fps,
        "first_frame_s": first,
        "period_ms_p50": percentile(periods, 50),
        "period_ms_p99": percentile(periods, 99),
    }


def overlap_score(records: list[ChunkMetrics], warmup: int = WARMUP_CHUNKS) -> float | None:
    """median over chunks of hidden_k / min(stage0_k, stage1_k), hidden_k = max(0, stage0_k +
    stage1_k - period_k): 1 = the shorter stage fully hidden behind the longer, 0 = serialized.
    None when fewer than 2 chunks after warm-up carry the pp fields."""
    ratios = []
    for r in records[warmup:]:
        if r.stage0_ms is None or r.stage1_ms is None or r.period_ms is None:
            continue
        shorter = min(r.stage0_ms, r.stage1_ms)
        if shorter > 0:
            hidden = max(0.0, r.stage0_ms + r.stage1_ms - r.period_ms)
            ratios.append(min(1.0, hidden / shorter))
    return statistics.median(ratios) if len(ratios) >= 2 else None


class MetricsWriter:
    """JSON lines, one per chunk; None path = keep in memory only.

    Memory stays bounded however long the stream (serve runs for hours): `records` keeps the
    last `KEPT_RECORDS` chunks (what summaries read), `count` and `frames` every chunk's."""

    KEPT_RECORDS = 4096

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.records: deque[ChunkMetrics] = deque(maxlen=self.KEPT_RECORDS)
        self.count = 0
        self.frames = 0
        self._fh: TextIO | None = None
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._fh = open(path, "w", encoding="utf-8")  # noqa: SIM115 - closed in close()

    def write(self, record: ChunkMetrics) -> None:
        self.records.append(record)
        self.count += 1
        self.frames += record.frames
        self._line({"record": CHUNK_RECORD, **asdict(record)})

    def write_summary(self, summary: Mapping[str, object]) -> None:
        """The stream's last line (`read_metrics` returns it apart from the chunks)."""
        self._line({"record": SUMMARY_RECORD, **summary})

    def _line(self, obj: Mapping[str, object]) -> None:
        if self._fh is not None:
            self._fh.write(json.dumps(obj, sort_keys=True) + "\n")
            self._fh.flush()

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None


def process_age_s() -> float | None:
    """Seconds since this process started (interpreter and imports included); None where the
    kernel does not say (not Linux)."""
    try:
        stat = Path("/proc/self/stat").read_text()
        start_ticks = int(stat.rsplit(")", 1)[1].split()[19])  # field 22: starttime
        uptime_s = float(Path("/proc/uptime").read_text().split()[0])
        return max(0.0, uptime_s - start_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return None


def write_json_atomic(path: Path, obj: Mapping[str, object]) -> None:
    """One JSON object, replaced whole (a reader never sees half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, path)


@dataclass(frozen=True, slots=True)
class MetricsFile:
    chunks: list[dict[str, Any]]
    summary: dict[str, Any] | None


def read_metrics(path: Path) -> MetricsFile:
    """A metrics file's chunk lines and its summary line (None until the stream ended); a torn
    last line (no newline: the process died mid-write) is dropped."""
    chunks: list[dict[str, Any]] = []
    summary = None
    for line in path.read_text(encoding="utf-8").splitlines(keepends=True):
        if not line.endswith("\n"):
            break
        obj = json.loads(line)
        if obj.get("record") == SUMMARY_RECORD:
            summary = obj
        else:
            chunks.append(obj)
    return MetricsFile(chunks=chunks, summary=summary)


class Progress:
    """`chunk 3/8 | 36 frames | 412 ms/chunk` redrawn in place on a terminal; nothing otherwise."""

    def __init__(self, total: int, *, enabled: bool, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stderr
        self.enabled = enabled and self.stream.isatty()
        self.total = total
        self.t0 = time.monotonic()

    def update(self, done: int, frames: int) -> None:
        if not self.enabled:
            return
        per = (time.monotonic() - self.t0) * 1000 / max(done, 1)
        width = 24
        bar = "#" * (width * done // self.total) + "-" * (width - width * done // self.total)
        self.stream.write(f"\r[{bar}] chunk {done}/{self.total} | {frames} frames | {per:.0f} ms/chunk")
        self.stream.flush()

    def close(self) -> None:
        if self.enabled:
            self.stream.write("\n")
            self.stream.flush()
