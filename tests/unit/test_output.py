"""The writer thread (runtime/output.py): frames written == frames the metrics claim, always.

- In order, all of it: every submitted chunk is in the video and the metrics, in order, after
  `close()`, also when the disk is slower than the producer (backpressure, nothing dropped).
- A failing write (disk full) stops the writer: the loop gets `OutputError` naming the cause and
  what was written; the video holds exactly the chunks the metrics list.
- End to end, on a real process: `streamdit run` whose output file hits a size limit (the kernel's
  RLIMIT_FSIZE: writes fail with EFBIG, as they would with ENOSPC on a full disk) exits 1 with
  that message, the .npy loads, and its frames equal the metrics' sum; a crash mid-stream keeps
  every chunk emitted before it, in the video and in the metrics alike.
"""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from streamdit.media import NpyWriter, count_mp4_frames, strict_frames
from streamdit.runtime.metrics import ChunkMetrics, MetricsWriter, Progress, read_metrics
from streamdit.runtime.output import OutputError, OutputWorker

H, W = 8, 12
pytestmark = pytest.mark.timeout(120)


def _record(k: int, frames: int) -> ChunkMetrics:
    return ChunkMetrics(
        chunk_index=k,
        cache_epoch=0,
        call_id=k,
        frames=frames,
        generator_calls=1,
        phase_a_ms=1.0,
        phase_b_ms=2.0,
        phase_c_ms=3.0,
        transition="none",
        kv_recompute=False,
    )


def _chunk(k: int, frames: int = 3) -> torch.Tensor:
    return torch.full((frames, H, W, 3), k, dtype=torch.uint8)


class _SlowWriter(NpyWriter):
    """A disk that takes `delay` s per write and fails with ENOSPC from write `fail_at` on."""

    def __init__(self, path: Path, *, delay: float = 0.0, fail_at: int | None = None) -> None:
        super().__init__(path, H, W)
        self.delay, self.fail_at, self.writes = delay, fail_at, 0

    def write(self, frames: np.ndarray) -> None:
        time.sleep(self.delay)
        self.writes += 1
        if self.fail_at is not None and self.writes >= self.fail_at:
            raise OSError(28, "No space left on device")
        super().write(frames)


def _worker(writer: NpyWriter, metrics: MetricsWriter, depth: int = 2) -> OutputWorker:
    return OutputWorker(writer, metrics, Progress(1, enabled=False), t_start=time.monotonic(), depth=depth)


def test_every_chunk_is_written_in_order_even_behind_a_slow_disk(tmp_path: Path) -> None:
    writer = _SlowWriter(tmp_path / "v.npy", delay=0.05)
    metrics = MetricsWriter(tmp_path / "m.jsonl")
    worker = _worker(writer, metrics, depth=1)
    t0 = time.monotonic()
    for k in range(6):
        worker.submit(_chunk(k), _record(k, 3))
    worker.close()
    writer.close()
    metrics.close()
    assert time.monotonic() - t0 >= 0.25  # the producer waited for the disk instead of dropping
    video = np.load(tmp_path / "v.npy")
    assert video.shape == (18, H, W, 3)
    assert [int(video[3 * k, 0, 0, 0]) for k in range(6)] == list(range(6))
    rows = read_metrics(tmp_path / "m.jsonl").chunks
    assert [r["chunk_index"] for r in rows] == list(range(6))
    emits = [r["emit_s"] for r in rows]
    assert emits == sorted(emits) and emits[0] > 0


def test_a_failed_write_stops_the_writer_and_says_what_is_safe(tmp_path: Path) -> None:
    writer = _SlowWriter(tmp_path / "v.npy", fail_at=3)
    metrics = MetricsWriter(tmp_path / "m.jsonl")
    worker = _worker(writer, metrics)
    with pytest.raises(
        OutputError, match=r"No space left on device; 2 chunks \(6 frames\) written and valid"
    ):
        for k in range(50):  # the loop learns of the failure at a later submit, or at close
            worker.submit(_chunk(k), _record(k, 3))
        worker.close()
    with pytest.raises(OutputError):
        worker.close()  # still failed: a second close does not pretend otherwise
    writer.close()
    metrics.close()
    assert np.load(tmp_path / "v.npy").shape[0] == 6 == sum(r.frames for r in metrics.records)


def _limit_file_size(limit: int) -> None:
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))


def _run(tmp_path: Path, suffix: str, *, env: dict[str, str] | None = None, limit: int | None = None):
    out, metrics = tmp_path / f"v.{suffix}", tmp_path / "m.jsonl"
    cmd = [sys.executable, "-m", "streamdit", "run", "--height", "32", "--width", "48", "--chunks", "6"]
    cmd += ["--out", str(out), "--metrics", str(metrics)]
    preexec = None if limit is None else (lambda: _limit_file_size(limit))
    proc = subprocess.run(
        cmd,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=100,
        preexec_fn=preexec,
    )
    rows = read_metrics(metrics).chunks if metrics.exists() else []
    return proc, out, rows


def test_a_full_disk_ends_the_run_with_every_claimed_frame_on_disk(tmp_path: Path) -> None:
    frame = 32 * 48 * 3
    limit = 128 + frame * (9 + 12) + frame * 5  # room for chunks 0 and 1, not for chunk 2
    proc, out, rows = _run(tmp_path, "npy", limit=limit)
    assert proc.returncode == 1, proc.stderr
    assert "output: writing failed: [Errno 27] File too large" in proc.stderr
    assert "2 chunks (21 frames) written and valid" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert np.load(out).shape[0] == 21 == sum(r["frames"] for r in rows)


@pytest.mark.parametrize("suffix", ["npy", "mp4"])
def test_a_crash_keeps_video_and_metrics_equal(tmp_path: Path, suffix: str) -> None:
    proc, out, rows = _run(tmp_path, suffix, env={"STREAMDIT_TEST_CRASH_AT_CHUNK": "3"})
    assert proc.returncode == 1 and "injected crash at chunk 3" in proc.stderr
    frames = np.load(out).shape[0] if suffix == "npy" else count_mp4_frames(out)
    assert [r["chunk_index"] for r in rows] == [0, 1, 2]
    assert frames == sum(r["frames"] for r in rows) == 9 + 2 * 12


def test_a_full_disk_leaves_an_mp4_of_whole_fragments_equal_to_the_metrics(tmp_path: Path) -> None:
    """The .mp4 under a size limit half way: the failed fragment is cut off (the file is whole
    boxes and decodes), and the metrics claim exactly the frames it holds."""
    full, _, _ = _run(tmp_path / "full", "mp4")
    assert full.returncode == 0, full.stderr
    size = (tmp_path / "full" / "v.mp4").stat().st_size
    proc, out, rows = _run(tmp_path, "mp4", limit=size // 2)
    assert proc.returncode == 1, proc.stderr
    assert "output: writing failed:" in proc.stderr and "written and valid" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert 0 < strict_frames(out) == sum(r["frames"] for r in rows) < 9 + 5 * 12


def _start(tmp_path: Path, suffix: str, chunks: int = 40) -> tuple[subprocess.Popen, Path, Path]:
    out, metrics = tmp_path / f"v.{suffix}", tmp_path / "m.jsonl"
    cmd = [sys.executable, "-m", "streamdit", "run", "--height", "32", "--width", "48"]
    cmd += ["--chunks", str(chunks), "--out", str(out), "--metrics", str(metrics), "--no-progress"]
    env = {**os.environ, "STREAMDIT_TEST_SLOW_CHUNK_MS": "300"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return proc, out, metrics


def _lines(metrics: Path) -> list[dict]:
    return read_metrics(metrics).chunks if metrics.exists() else []


def _wait_lines(proc: subprocess.Popen, metrics: Path, n: int) -> None:
    deadline = time.monotonic() + 90
    while len(_lines(metrics)) < n:
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        assert time.monotonic() < deadline, "no progress"
        time.sleep(0.02)


@pytest.mark.parametrize("suffix", ["npy", "mp4"])
def test_sigkill_leaves_exactly_the_claimed_frames(tmp_path: Path, suffix: str) -> None:
    """Nothing can run on SIGKILL: the metrics must never have claimed what the file lacks
    (.mp4: a chunk is claimed once the next keyframe closed its fragment)."""
    proc, out, metrics = _start(tmp_path, suffix)
    try:
        _wait_lines(proc, metrics, 3)
        proc.kill()
    finally:
        proc.kill()
        proc.communicate(timeout=30)
    claimed = sum(r["frames"] for r in _lines(metrics))
    frames = np.load(out).shape[0] if suffix == "npy" else strict_frames(out)
    assert frames == claimed >= 9 + 2 * 12


@pytest.mark.parametrize("suffix", ["npy", "mp4"])
def test_sighup_drains_like_sigterm(tmp_path: Path, suffix: str) -> None:
    """A closed terminal (SIGHUP) drains: exit 0, every generated chunk in the file and claimed."""
    proc, out, metrics = _start(tmp_path, suffix)
    try:
        _wait_lines(proc, metrics, 3)
        proc.send_signal(signal.SIGHUP)
        log = proc.communicate(timeout=60)[0]
    finally:
        proc.kill()
    assert proc.returncode == 0, log[-3000:]
    assert "interrupted (SIGHUP)" in log, log[-3000:]
    rows = _lines(metrics)
    assert 3 <= len(rows) < 40 and [r["chunk_index"] for r in rows] == list(range(len(rows)))
    frames = np.load(out).shape[0] if suffix == "npy" else strict_frames(out)
    assert frames == sum(r["frames"] for r in rows)


def test_metrics_memory_is_bounded_however_long_the_stream(tmp_path: Path) -> None:
    metrics = MetricsWriter(None)  # serve without --metrics: memory only
    for k in range(3 * MetricsWriter.KEPT_RECORDS):
        metrics.write(_record(k, 12))
    assert len(metrics.records) == MetricsWriter.KEPT_RECORDS
    assert metrics.count == 3 * MetricsWriter.KEPT_RECORDS and metrics.frames == 12 * metrics.count
    assert metrics.records[-1].chunk_index == metrics.count - 1
