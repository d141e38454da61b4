"""Per-phase timings of the `single` pipeline (Phase A / B / C ms per chunk).

Runs `streamdit run` in-process with a metrics file, drops the first `--warmup` chunks, and
writes medians and p90s of every phase plus the exact command to a JSON file.

    python bench/bench_pipeline.py --out bench/results/pipeline_tiny_cpu.json -- \
        --preset tiny --height 128 --width 192 --chunks 12
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import statistics
import sys
import tempfile
from pathlib import Path

import torch

from streamdit.cli import main as streamdit_main
from streamdit.runtime.metrics import read_metrics


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def summarize(rows: list[dict], warmup: int) -> dict:
    steady = rows[warmup:] or rows
    out: dict = {"chunks_measured": len(steady), "chunks_total": len(rows)}
    for key in ("phase_a_ms", "phase_b_ms", "phase_c_ms"):
        vals = [r[key] for r in steady]
        out[key] = {"median": statistics.median(vals), "p90": _pct(vals, 0.9), "min": min(vals)}
    frames = sum(r["frames"] for r in steady)
    total_ms = sum(r["phase_a_ms"] + r["phase_b_ms"] + r["phase_c_ms"] for r in steady)
    out["frames"] = frames
    out["fps_sequential"] = frames / (total_ms / 1e3)
    calls = [r["generator_calls"] for r in steady]
    out["generator_calls_per_chunk"] = statistics.median(calls)
    out["generator_ms_per_call"] = statistics.median(r["phase_b_ms"] / r["generator_calls"] for r in steady)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("run_args", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    run_args = [a for a in args.run_args if a != "--"]
    with tempfile.TemporaryDirectory() as tmp:
        metrics = Path(tmp) / "m.jsonl"
        video = Path(tmp) / "v.npy"
        rc = streamdit_main(
            ["run", *run_args, "--metrics", str(metrics), "--out", str(video), "--no-progress"]
        )
        if rc != 0:
            return rc
        rows = read_metrics(metrics).chunks
    result = {
        "bench": "pipeline_phases",
        "command": shlex.join([sys.executable, *sys.argv]),
        "run_args": run_args,
        "torch": torch.__version__,
        "device_name": torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor(),
        "threads": torch.get_num_threads(),
        "summary": summarize(rows, args.warmup),
        "per_chunk": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["summary"], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
