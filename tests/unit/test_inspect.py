"""`streamdit inspect` on records it must not trust: another job's, truncated, absurd.

Records are written here by a real `FlightRecorder` (the format the runtime dumps), then
damaged or mixed the way a reused output folder or a full disk would leave them.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from streamdit.errors import ConfigError
from streamdit.runtime.flight import FlightRecorder
from streamdit.runtime.inspect import format_report, inspect_records, rotate_record

pytestmark = pytest.mark.timeout(60)


def _record(
    folder: Path, rank: int, run_id: str, fatal: str | None, *, world: int = 2, age_s: float = 0
) -> Path:
    rec = FlightRecorder(label=f"rank{rank}")
    rec.run_id = run_id
    rec.record({"name": "start", "detail": f"topology=tp world_size={world} run_id={run_id}"})
    if fatal is not None:
        rec.record({"name": "fatal", "detail": fatal})
    path = rec.dump(folder / "flight" / f"rank{rank}.json")
    t = time.time() - age_s
    os.utime(path, (t, t))
    return path


def test_an_earlier_jobs_records_are_ignored_not_blamed(tmp_path: Path) -> None:
    """rank1's record is from a job an hour ago; today's job failed on rank0 with a cause."""
    _record(tmp_path, 1, "old0000000001", "PlanError: stale cause", age_s=3600)
    _record(tmp_path, 0, "new0000000002", "DriftError: rank digests differ")
    report = inspect_records(tmp_path)
    assert report.run_id == "new0000000002"
    assert [r.rank for r in report.ranks] == [0] and report.missing == [1]
    assert report.first_failing == 0 and "DriftError" in report.why
    assert "rank1.json: an earlier job's (run id old0000000001)" in format_report(report)


def test_rotation_at_start_leaves_a_successful_job_with_no_record(tmp_path: Path) -> None:
    path = _record(tmp_path, 0, "old0000000001", "PlanError: yesterday")
    rotate_record(path)  # what each rank does when it starts
    assert not path.exists() and (path.parent / "previous" / "rank0.json").exists()
    with pytest.raises(ConfigError, match="no flight records"):
        inspect_records(tmp_path)


def test_truncated_and_foreign_files_are_reported_not_fatal(tmp_path: Path) -> None:
    good = _record(tmp_path, 0, "job000000001", "DriftError: x")
    bad = good.parent / "rank1.json"
    bad.write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])  # torn
    (good.parent / "rank2.json").write_text('{"events": 5}')
    (good.parent / "rank.json").write_text("{}")  # not a rank file at all
    report = inspect_records(tmp_path)
    assert report.first_failing == 0
    text = format_report(report)
    assert "rank1.json: unreadable" in text and "rank2.json: not a flight record" in text


def test_an_absurd_world_size_is_not_believed(tmp_path: Path) -> None:
    _record(tmp_path, 0, "job000000001", "DriftError: x", world=10**12)
    t0 = time.monotonic()
    report = inspect_records(tmp_path)
    assert time.monotonic() - t0 < 5
    assert report.world_size is None and report.missing == []


def test_inspect_cli_on_only_damaged_records_exits_2(tmp_path: Path) -> None:
    folder = tmp_path / "flight"
    folder.mkdir()
    (folder / "rank0.json").write_text('{"events": [')
    proc = subprocess.run(
        [sys.executable, "-m", "streamdit", "inspect", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2, proc.stderr
    assert "rank0.json: unreadable" in proc.stderr and "Traceback" not in proc.stderr
