"""Per-chunk metrics: the JSON-lines record every topology writes, and a terminal progress bar.

Owns: `ChunkMetrics` (one line per chunk), `MetricsWriter` (append + flush per line, so a crash
keeps every finished chunk's line), `overlap_score` (docs/protocol.md §8) and `Progress` (a one-line
bar on a TTY, silent otherwise).

pp fields (None elsewhere): `stage0_ms` = Phase A + C wall time of the chunk on rank0,
`stage1_ms` and `mesh_idle_ms` as the leader measured them (its clock, no sync needed),
`period_ms` between successive emits, `d_in` / `d_out` queue depths and `in_flight` when the
chunk was emitted.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from collections import deque
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TextIO


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
        if self._fh is not None:
            self._fh.write(json.dumps(asdict(record), sort_keys=True) + "\n")
            self._fh.flush()

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None


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
