"""PP0 overlap sweep on two GPUs: period, stage0, stage1 and OverlapScore for queue depths D.

Each configuration is one real `streamdit run --topology pp --nproc 2` job (torch's elastic
launcher, NCCL): rank0 = Stage 0 on GPU 0 (text encoder, `wan` VAE encode/decode), rank1 = the
generator (default `wan-14b`) on GPU 1. The job's own per-chunk metrics are read back; chunks
before `--skip` (compile warm-up, pipeline filling) are left out of the medians.

    python bench/bench_pp.py --out bench/results/pp0_wan14b_h200x2.json

Reported per configuration: median period_ms, stage0_ms, stage1_ms, mesh_idle_ms, the
OverlapScore of docs/protocol.md §8 over the same chunks, FPS = pixel frames per median period,
and the two targets of the PP issue at D=2 (period <= 1.05 x max(stage0, stage1), score >= 0.9).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

from streamdit.runtime.metrics import read_metrics


def run_job(args: argparse.Namespace, depth: int, recompute: str, work: Path) -> dict:
    metrics = work / f"m_d{depth}_{recompute}.jsonl"
    cmd = [
        sys.executable, "-m", "streamdit", "run", "--topology", "pp", "--nproc", "2",
        "--device", args.device, "--dtype", args.dtype, "--preset", args.preset, "--vae", args.vae,
        "--height", str(args.height), "--width", str(args.width), "--steps", str(args.steps),
        "--chunks", str(args.chunks), "--queue-depth", str(depth), "--recompute", recompute,
        "--out", str(work / f"v_d{depth}_{recompute}.npy"), "--metrics", str(metrics),
        "--no-progress", "--dist-timeout", "300",
    ]  # fmt: skip
    if args.compile:
        cmd.append("--compile")
    t0 = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.job_timeout)
    wall = time.monotonic() - t0
    if proc.returncode != 0:
        return {"depth": depth, "recompute": recompute, "error": proc.stderr[-3000:], "wall_s": wall}
    rows = read_metrics(metrics).chunks[args.skip :]
    return {
        "depth": depth,
        "recompute": recompute,
        "wall_s": wall,
        **summarize(rows),
        "command": shlex.join(cmd),
    }


def summarize(rows: list[dict]) -> dict:
    def med(key: str) -> float:
        return statistics.median(r[key] for r in rows)

    ratios = []
    for r in rows:
        shorter = min(r["stage0_ms"], r["stage1_ms"])
        hidden = max(0.0, r["stage0_ms"] + r["stage1_ms"] - r["period_ms"])
        ratios.append(min(1.0, hidden / shorter) if shorter > 0 else 0.0)
    period, s0, s1 = med("period_ms"), med("stage0_ms"), med("stage1_ms")
    frames = statistics.median(r["frames"] for r in rows)
    return {
        "chunks_measured": len(rows),
        "period_ms": period,
        "stage0_ms": s0,
        "stage1_ms": s1,
        "phase_a_ms": med("phase_a_ms"),
        "phase_c_ms": med("phase_c_ms"),
        "mesh_idle_ms": med("mesh_idle_ms"),
        "overlap_score": statistics.median(ratios),
        "period_over_max": period / max(s0, s1),
        "period_over_sum": period / (s0 + s1),
        "fps": frames / (period / 1e3),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="wan-14b")
    p.add_argument("--vae", default="wan", choices=["wan", "tiny"], help="Phase C decoder (streamdit --vae)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--height", type=int, default=320)
    p.add_argument("--width", type=int, default=576)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--chunks", type=int, default=14)
    p.add_argument("--skip", type=int, default=4, help="first chunks left out (warm-up)")
    p.add_argument("--depths", default="1,2,3,4")
    p.add_argument("--r0a-depth", type=int, default=2, help="also run recompute r0a at this D (0 = no)")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--job-timeout", type=float, default=240)
    p.add_argument("--work", type=Path, default=Path("/tmp/bench_pp"))
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    configs = [(int(d), "off") for d in args.depths.split(",")]
    if args.r0a_depth:
        configs.append((args.r0a_depth, "r0a"))
    result: dict = {
        "bench": "pp0_overlap",
        "command": shlex.join([sys.executable, *sys.argv]),
        "preset": args.preset,
        "geometry": [args.height, args.width],
        "steps": args.steps,
        "compile": args.compile,
        "nccl_env": {k: os.environ.get(k) for k in ("NCCL_NVLS_ENABLE", "TORCH_SYMM_MEM_DISABLE_MULTICAST")},
        "runs": [],
    }
    for depth, recompute in configs:
        row = run_job(args, depth, recompute, args.work)
        print(json.dumps({k: v for k, v in row.items() if k != "command"}), flush=True)
        result["runs"].append(row)
        args.out.write_text(json.dumps(result, indent=2) + "\n")  # partial results survive a cut
    d2 = next(
        (r for r in result["runs"] if r["depth"] == 2 and r["recompute"] == "off" and "error" not in r), None
    )
    if d2 is not None:
        result["targets_at_d2"] = {
            "period_le_1.05_max": d2["period_over_max"] <= 1.05,
            "overlap_score_ge_0.9": d2["overlap_score"] >= 0.9,
        }
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
