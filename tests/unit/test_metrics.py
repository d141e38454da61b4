"""OverlapScore (docs/protocol.md §8) from per-chunk pp metrics; the delivery statistics of the
run summary; the metrics file's reader."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from streamdit.runtime.metrics import ChunkMetrics, MetricsWriter, delivery_stats, overlap_score, read_metrics


def _row(k: int, stage0: float | None, stage1: float | None, period: float | None) -> ChunkMetrics:
    return ChunkMetrics(
        chunk_index=k,
        cache_epoch=0,
        call_id=k,
        frames=12,
        generator_calls=4,
        phase_a_ms=1.0,
        phase_b_ms=stage1 or 0.0,
        phase_c_ms=1.0,
        transition="none",
        kv_recompute=False,
        stage0_ms=stage0,
        stage1_ms=stage1,
        period_ms=period,
    )


def test_overlap_score_is_one_when_hidden_and_zero_when_serialized() -> None:
    warm = [_row(0, 100, 200, None), _row(1, 100, 200, 999)]  # excluded (warm-up)
    overlapped = warm + [_row(k, 100, 200, 200) for k in range(2, 6)]
    serialized = warm + [_row(k, 100, 200, 300) for k in range(2, 6)]
    half = warm + [_row(k, 100, 200, 250) for k in range(2, 6)]
    assert overlap_score(overlapped) == 1.0
    assert overlap_score(serialized) == 0.0
    assert overlap_score(half) == 0.5
    # median: one outlier chunk does not move it
    assert overlap_score(overlapped + [_row(9, 100, 200, 900)]) == 1.0


def test_overlap_score_needs_pp_rows_after_warm_up() -> None:
    assert overlap_score([_row(k, None, None, None) for k in range(6)]) is None
    assert overlap_score([_row(k, 100, 200, 200) for k in range(3)]) is None  # one row after warm-up


def _emitted(k: int, emit_s: float, paused_ms: float = 0.0) -> ChunkMetrics:
    return dataclasses.replace(_row(k, None, None, None), emit_s=emit_s, paused_ms=paused_ms)


def test_delivery_stats_exclude_a_pause_and_the_first_chunks_warm_up() -> None:
    # chunk 0 written at 5 s (startup warm-up), then one chunk per 0.5 s, a 60 s pause before chunk 3
    records = [_emitted(0, 5.0), _emitted(1, 5.5), _emitted(2, 6.0), _emitted(3, 66.5, 60_000.0)]
    stats = delivery_stats(records)
    assert stats["first_frame_s"] == 5.0
    assert stats["period_ms_p50"] == pytest.approx(500.0)
    assert stats["period_ms_p99"] == pytest.approx(500.0)
    assert stats["fps"] == pytest.approx(36 / 1.5)  # 3 chunks of 12 frames over 1.5 s of generation
    unpaused = delivery_stats([*records[:3], _emitted(3, 66.5)])
    assert unpaused["period_ms_p99"] > 50_000  # the same gap, not marked as a pause, counts


def test_delivery_stats_of_too_few_chunks_are_none() -> None:
    assert delivery_stats([]) == {
        "fps": None,
        "first_frame_s": None,
        "period_ms_p50": None,
        "period_ms_p99": None,
    }
    one = delivery_stats([_emitted(0, 1.5)])
    assert (one["first_frame_s"], one["fps"], one["period_ms_p50"]) == (1.5, None, None)


def test_read_metrics_splits_the_summary_and_drops_a_torn_line(tmp_path: Path) -> None:
    path = tmp_path / "m.jsonl"
    writer = MetricsWriter(path)
    for k in range(3):
        writer.write(_emitted(k, float(k)))
    writer.write_summary({"chunks": 3, "frames": 36})
    writer.close()
    read = read_metrics(path)
    assert [r["chunk_index"] for r in read.chunks] == [0, 1, 2]
    assert all(r["record"] == "chunk" for r in read.chunks)
    assert read.summary == {"record": "summary", "chunks": 3, "frames": 36}
    text = path.read_text().splitlines(keepends=True)
    path.write_text("".join(text[:2]) + text[2][:-7])  # killed while writing chunk 2's line
    torn = read_metrics(path)
    assert ([r["chunk_index"] for r in torn.chunks], torn.summary) == ([0, 1], None)
