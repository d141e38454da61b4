"""Where a stream's chunk period goes on the device: a `streamdit run --profile` trace, read back.

Runs one real job (`python -m streamdit run FLAGS --profile TRACE`), or reads an existing trace
(`--trace`), and reports per profiled chunk, from the device timeline:

- each phase's span (first to last kernel it launched), busy time (the union of its kernels)
  and idle time (span - busy: the device waited for the host);
- Phase B's generator calls (`streamdit.generator_call`): their spans, and the *glue* between
  them (kernels Phase B launched outside a call, and the idle time between calls);
- the longest device gaps, each with the kernel before and after it and the host ops that ran
  while the device waited (a synchronization, a host-side draw, a slow launch);
- the kernels by kind (bench_generator's classifier), as ms per generator call.

    python bench/profile_stream.py --out bench/results/profile_wan14b_bf16_h200.json \\
        --flags "--preset wan-14b --device cuda --dtype bfloat16 --height 320 --width 576 --compile"

Kineto's Chrome trace: host events carry `ts`/`dur` in µs on their thread; a kernel's launch
(`cuda_runtime` / `cuda_driver`) and the kernel share `args.correlation`, which is how each kernel
is attributed to the innermost `streamdit.*` range open on the host when it was launched.
"""

from __future__ import annotations

import argparse
import bisect
import json
import os
import shlex
import subprocess
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_generator import _kind  # noqa: E402  (one kernel classifier for every bench)

DEVICE_CATS = {"kernel", "gpu_memcpy", "gpu_memset"}
LAUNCH_CATS = {"cuda_runtime", "cuda_driver"}
PHASES = ("streamdit.phase_a", "streamdit.phase_b", "streamdit.phase_c")
CALL = "streamdit.generator_call"


@dataclass
class Range:
    name: str
    tid: object
    start: float
    end: float
    kernels: list[dict] = field(default_factory=list)


def load_trace(path: Path) -> dict:
    with path.open() as f:
        return json.load(f)


def _ranges(events: list[dict]) -> list[Range]:
    ranges = [
        Range(e["name"], e["tid"], e["ts"], e["ts"] + e.get("dur", 0))
        for e in events
        if e.get("cat") == "user_annotation" and e["name"].startswith("streamdit.")
    ]
    return sorted(ranges, key=lambda r: r.start)


def _attribute(events: list[dict], ranges: list[Range]) -> list[dict]:
    """Each device event, with `range` (innermost phase) and `call` (the generator call or None)."""
    launch_at = {
        e["args"]["correlation"]: (e["ts"], e["tid"])
        for e in events
        if e.get("cat") in LAUNCH_CATS and "correlation" in e.get("args", {})
    }
    phases = [r for r in ranges if r.name in PHASES]
    calls = [r for r in ranges if r.name == CALL]
    starts_p, starts_c = [r.start for r in phases], [r.start for r in calls]
    device = []
    for e in events:
        if e.get("cat") not in DEVICE_CATS:
            continue
        launch = launch_at.get(e.get("args", {}).get("correlation"))
        if launch is None:
            continue
        ts, tid = launch
        k = {"name": e["name"], "start": e["ts"], "end": e["ts"] + e.get("dur", 0), "launch": ts, "tid": tid}
        k["phase"] = _containing(phases, starts_p, ts, tid)
        k["call"] = _containing(calls, starts_c, ts, tid)
        if k["phase"] is not None:
            k["phase"].kernels.append(k)
            if k["call"] is not None:
                k["call"].kernels.append(k)
            device.append(k)
    return sorted(device, key=lambda k: k["start"])


def _containing(ranges: list[Range], starts: list[float], ts: float, tid: object) -> Range | None:
    i = bisect.bisect_right(starts, ts) - 1
    while i >= 0:
        r = ranges[i]
        if r.start <= ts <= r.end and r.tid == tid:
            return r
        if ts - r.start > 60e6:  # no range lasts a minute
            return None
        i -= 1
    return None


def _busy(kernels: list[dict]) -> float:
    """Union of the kernels' intervals, µs (overlapping streams counted once)."""
    total, end = 0.0, float("-inf")
    for k in sorted(kernels, key=lambda k: k["start"]):
        if k["end"] > end:
            total += k["end"] - max(k["start"], end)
            end = k["end"]
    return total


def _span(kernels: list[dict]) -> tuple[float, float]:
    return min(k["start"] for k in kernels), max(k["end"] for k in kernels)


def _host_ops_during(events_by_tid: dict, tid: object, start: float, end: float) -> list[str]:
    """Host ops of the launching thread that cover most of a device gap (what it waited on)."""
    gap = end - start
    found = []
    for e in events_by_tid.get(tid, ()):
        e_end = e["ts"] + e.get("dur", 0)
        overlap = min(e_end, end) - max(e["ts"], start)
        if overlap > 0.5 * gap and not e["name"].startswith("streamdit."):
            found.append((e.get("dur", 0), e["name"]))
    found.sort()
    return [f"{name} ({dur / 1e3:.2f} ms)" for dur, name in found[:4]]


def _gaps(device: list[dict], events_by_tid: dict, top: int, min_us: float = 100.0) -> list[dict]:
    gaps = []
    end, prev = float("-inf"), None
    for k in device:
        if prev is not None and k["start"] - end > min_us:
            gaps.append(
                {
                    "ms": (k["start"] - end) / 1e3,
                    "after": prev["name"][:100],
                    "before": k["name"][:100],
                    "next_phase": k["phase"].name,
                    "in_call": k["call"] is not None,
                    "host_was_in": _host_ops_during(events_by_tid, k["tid"], end, k["start"]),
                }
            )
        if k["end"] > end:
            end, prev = k["end"], k
    gaps.sort(key=lambda g: -g["ms"])
    return gaps[:top]


def analyze(trace: dict, top: int = 15) -> dict:
    events = [e for e in trace["traceEvents"] if e.get("ph") == "X"]
    ranges = _ranges(events)
    device = _attribute(events, ranges)
    events_by_tid: dict = defaultdict(list)
    for e in events:
        if e.get("cat") in ("cpu_op", "cuda_runtime", "cuda_driver", "user_annotation"):
            events_by_tid[e["tid"]].append(e)
    chunks: list[dict] = []
    for r in ranges:
        if r.name == PHASES[0]:
            chunks.append({})
        if r.name in PHASES and chunks and r.kernels:
            start, end = _span(r.kernels)
            busy = _busy(r.kernels)
            chunks[-1][r.name.split(".")[1]] = {
                "span_ms": (end - start) / 1e3,
                "busy_ms": busy / 1e3,
                "idle_ms": (end - start - busy) / 1e3,
                "kernels": len(r.kernels),
            }
    calls = [r for r in ranges if r.name == CALL and r.kernels]
    call_rows = []
    for a, b in zip(calls, calls[1:], strict=False):
        a_end, b_start = _span(a.kernels)[1], _span(b.kernels)[0]
        between = [k for k in device if a_end <= k["start"] < b_start]
        call_rows.append({"between_ms": (b_start - a_end) / 1e3, "between_busy_ms": _busy(between) / 1e3})
    glue = [k for k in device if k["phase"].name == PHASES[1] and k["call"] is None]
    glue_by_name: dict[str, float] = defaultdict(float)
    for k in glue:
        glue_by_name[k["name"][:100]] += (k["end"] - k["start"]) / 1e3
    kinds: dict[str, float] = defaultdict(float)
    for c in calls:
        for k in c.kernels:
            kinds[_kind(k["name"])] += (k["end"] - k["start"]) / 1e3
    per_call = [
        {"span_ms": (_span(c.kernels)[1] - _span(c.kernels)[0]) / 1e3, "busy_ms": _busy(c.kernels) / 1e3}
        for c in calls
    ]
    whole = [c for c in chunks if all(p in c for p in ("phase_a", "phase_b", "phase_c"))]
    return {
        "chunks": chunks,
        "whole_chunks": len(whole),
        "generator_calls": per_call,
        "between_calls": call_rows,
        "phase_b_glue_kernels_ms": dict(sorted(glue_by_name.items(), key=lambda kv: -kv[1])[:top]),
        "call_kernels_ms_per_call_by_kind": {k: v / max(1, len(calls)) for k, v in kinds.items()},
        "gaps": _gaps(device, events_by_tid, top),
    }


def run_job(flags: str, work: Path, timeout: float) -> tuple[Path, dict]:
    work.mkdir(parents=True, exist_ok=True)
    trace = work / "trace.json"
    cmd = [sys.executable, "-m", "streamdit", "run", *shlex.split(flags)]
    cmd += ["--out", str(work / "v.mp4"), "--metrics", str(work / "m.jsonl"), "--profile", str(trace)]
    cmd += ["--no-progress"]
    t0 = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=dict(os.environ))
    row = {"command": shlex.join(cmd), "wall_s": time.monotonic() - t0, "exit": proc.returncode}
    if proc.returncode != 0:
        row["tail"] = proc.stderr[-3000:]
    return trace, row


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--flags", help="`streamdit run` flags of the job to profile")
    p.add_argument("--trace", type=Path, help="analyze this trace instead of running a job")
    p.add_argument("--work", type=Path, default=Path("out/profile_stream"))
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--timeout", type=float, default=900.0)
    p.add_argument("--keep-trace", action="store_true", help="leave the trace in --work")
    args = p.parse_args()
    if (args.flags is None) == (args.trace is None):
        p.error("give --flags or --trace")
    row: dict = {"bench": "profile_stream", "argv": shlex.join(sys.argv)}
    trace = args.trace
    if trace is None:
        trace, job = run_job(args.flags, args.work, args.timeout)
        row["job"] = job
        if job["exit"] != 0:
            print(job.get("tail", ""), file=sys.stderr)
            args.out.write_text(json.dumps(row, indent=2))
            return 1
    row.update(analyze(load_trace(trace)))
    if args.trace is None and not args.keep_trace:
        trace.unlink()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(row, indent=2))
    print(json.dumps({k: row[k] for k in ("chunks", "between_calls", "phase_b_glue_kernels_ms")}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
