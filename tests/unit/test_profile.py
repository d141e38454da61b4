"""`--profile`: a trace of exactly the chunks asked for, with the loop's ranges; and
bench/profile_stream.py's reading of a device timeline (busy, idle, glue, gaps), checked on a
trace whose kernels are placed by hand, so every number it reports is known beforehand."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from streamdit.runtime.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.timeout(180)


def _bench() -> object:
    sys.path.insert(0, str(ROOT / "bench"))
    spec = importlib.util.spec_from_file_location("profile_stream", ROOT / "bench" / "profile_stream.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_profile_records_the_window_of_chunks_with_the_loops_ranges(tmp_path: Path) -> None:
    trace, metrics = tmp_path / "t.json", tmp_path / "m.jsonl"
    cmd = [sys.executable, "-m", "streamdit", "run", "--chunks", "5", "--height", "32", "--width", "48"]
    cmd += ["--out", str(tmp_path / "v.npy"), "--metrics", str(metrics), "--no-progress"]
    cmd += ["--profile", str(trace), "--profile-from", "1", "--profile-chunks", "2"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=150)
    assert proc.returncode == 0, proc.stderr[-3000:]
    events = json.loads(trace.read_text())["traceEvents"]
    ranges = Counter(e["name"] for e in events if e.get("cat") == "user_annotation")
    calls = sum(c["generator_calls"] for c in read_metrics(metrics).chunks[1:3])
    expected = {"streamdit.phase_a": 2, "streamdit.phase_b": 2, "streamdit.phase_c": 2}
    assert ranges == {**expected, "streamdit.generator_call": calls}


def test_a_profile_under_pp_is_refused_naming_the_flag(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "streamdit", "run", "--topology", "pp", "--nproc", "3"]
    cmd += ["--profile", str(tmp_path / "t.json"), "--out", str(tmp_path / "v.npy")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "--profile has no effect here" in proc.stderr and "field=profile" in proc.stderr
    assert not (tmp_path / "t.json").exists()


def _span(name: str, ts: float, dur: float, cat: str = "user_annotation") -> dict:
    return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur, "tid": 1, "pid": 1}


def _kernel(name: str, launch_ts: float, start: float, dur: float, corr: int) -> list[dict]:
    launch = {**_span("cudaLaunchKernel", launch_ts, 1.0, "cuda_runtime"), "args": {"correlation": corr}}
    kernel = {"ph": "X", "cat": "kernel", "name": name, "ts": start, "dur": dur, "tid": 7, "pid": 0}
    return [launch, {**kernel, "args": {"correlation": corr}}]


def test_the_reader_splits_a_chunk_into_busy_idle_glue_and_gaps() -> None:
    # one chunk: A [0, 100) launches a 50 us kernel; B [100, 2000) holds two calls of two kernels
    # each and one glue kernel between them; C [2000, 2500) one kernel; a host sync covers the
    # 400 us device gap before the second call
    events = [
        _span("streamdit.phase_a", 0, 100),
        _span("streamdit.phase_b", 100, 1900),
        _span("streamdit.generator_call", 110, 200),
        _span("streamdit.generator_call", 900, 200),
        _span("streamdit.phase_c", 2000, 500),
        _span("cudaStreamSynchronize", 420, 470, "cuda_runtime"),
    ]
    kernels = [
        ("noise", 10, 10, 50),
        ("block_a", 120, 120, 100),
        ("block_b", 130, 220, 100),  # back to back: no gap
        ("renoise", 400, 350, 20),  # glue, after a 30 us gap (under the 100 us floor)
        ("block_a", 910, 770, 100),  # 400 us after the glue kernel
        ("block_b", 920, 870, 130),
        ("decode", 2010, 2010, 300),
    ]
    for i, (name, launch, start, dur) in enumerate(kernels):
        events += _kernel(name, launch, start, dur, corr=i)
    report = _bench().analyze({"traceEvents": events})
    (chunk,) = report["chunks"]
    assert chunk["phase_a"] == {"span_ms": 0.05, "busy_ms": 0.05, "idle_ms": 0.0, "kernels": 1}
    b = chunk["phase_b"]
    assert (b["kernels"], b["span_ms"], b["busy_ms"]) == (5, pytest.approx(0.88), pytest.approx(0.45))
    assert b["idle_ms"] == pytest.approx(0.43)
    assert report["generator_calls"] == [
        {"span_ms": pytest.approx(0.2), "busy_ms": pytest.approx(0.2)},
        {"span_ms": pytest.approx(0.23), "busy_ms": pytest.approx(0.23)},
    ]
    assert report["between_calls"] == [
        {"between_ms": pytest.approx(0.45), "between_busy_ms": pytest.approx(0.02)}
    ]
    assert report["phase_b_glue_kernels_ms"] == {"renoise": pytest.approx(0.02)}
    gaps = {(g["after"], g["before"]): g for g in report["gaps"]}
    assert set(gaps) == {("renoise", "block_a"), ("block_b", "decode")}  # 60 us after noise: under the floor
    wait = gaps[("renoise", "block_a")]
    assert wait["ms"] == pytest.approx(0.4) and wait["in_call"] and wait["next_phase"] == "streamdit.phase_b"
    assert wait["host_was_in"] == ["cudaStreamSynchronize (0.47 ms)"]
