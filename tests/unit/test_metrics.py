"""OverlapScore (docs/protocol.md §8) from per-chunk pp metrics."""

from __future__ import annotations

from streamdit.runtime.metrics import ChunkMetrics, overlap_score


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
