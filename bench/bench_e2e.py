"""End-to-end `streamdit run` jobs side by side: FPS, per-phase medians, compile health.

Each `--job NAME=FLAGS` is one real job (`python -m streamdit run FLAGS --metrics ...`), run one
after the other in this process's environment; its per-chunk metrics are read back and the
first `--skip` chunks (pipeline filling) left out. Reported per job: FPS = frames delivered per
wall second at steady state (the writer thread's `emit_s` clock), p50 / p99 chunk period (gaps
between deliveries), time to first frame (from the stream's start) and startup seconds, median
phase A/B/C ms, job wall time, and the compile-health counters a `--compile` job logs at
startup (warm-up seconds, graphs and graph breaks per generator call).

    python bench/bench_e2e.py --out bench/results/e2e.json \\
        --job "eager=--preset wan-14b --device cuda --dtype bfloat16 --height 320 --width 576" \\
        --job "compiled=--preset wan-14b --device cuda --dtype bfloat16 --height 320 --width 576 --compile"
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

from streamdit.runtime.metrics import read_metrics

HEALTH = re.compile(r"compile warm-up ([\d.]+) s: CompileCounters\((.*)\)")
# what the job loaded (weights, text source): the evidence of what was measured
LOADED = re.compile(
    r"streamdit\.runtime\.build: "
    r"((?:DiT weights|VAE weights|VAE latent|VAE decoder|text encoder|text emb|text:).*)"
)


def run_job(name: str, flags: str, args: argparse.Namespace) -> dict:
    work = args.work / name
    work.mkdir(parents=True, exist_ok=True)
    metrics = work / "m.jsonl"
    cmd = [sys.executable, "-m", "streamdit", "run", *shlex.split(flags)]
    video = work / f"v{args.video_suffix}"
    cmd += ["--out", str(video), "--metrics", str(metrics), "--no-progress", "--log-level", "INFO"]
    env = dict(os.environ)
    src = args.src.get(name)
    if src is not None:  # this job runs another checkout's code (the landed baseline)
        env["PYTHONPATH"] = os.pathsep.join([str(src), env.get("PYTHONPATH", "")])
    t0 = time.monotonic()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.job_timeout, env=env)
    except subprocess.TimeoutExpired as exc:
        tail = (exc.stderr or b"")[-3000:]
        return {"job": name, "error": f"timed out after {args.job_timeout} s", "tail": str(tail)}
    row: dict = {
        "job": name,
        "command": shlex.join(cmd),
        "wall_s": time.monotonic() - t0,
        "video": str(video),
    }
    if src is not None:
        row["src"] = str(src)
    health = [{"warmup_s": float(m.group(1)), **_counters(m.group(2))} for m in HEALTH.finditer(proc.stderr)]
    if health:
        row["compile_health"] = health
    row["loaded"] = LOADED.findall(proc.stderr)
    if proc.returncode != 0:
        return {**row, "error": f"exit {proc.returncode}", "tail": proc.stderr[-3000:]}
    every = read_metrics(metrics).chunks
    if "emit_s" not in every[0]:  # a baseline without the writer thread: a serial loop
        return {**row, **summarize_serial(every[args.skip :])}
    summary = summarize(every[args.skip :], every)
    # process start to the stream's start (build, load, compile, warm-up), teardown included
    summary["startup_s"] = row["wall_s"] - every[-1]["emit_s"]
    return {**row, **summary}


def summarize_serial(rows: list[dict]) -> dict:
    """A loop with no writer thread (the landed baseline): period = A + B + C of each chunk."""
    periods = sorted(_period(r, False) for r in rows)
    frames = statistics.median(r["frames"] for r in rows)
    return {
        "chunks_measured": len(rows),
        "frames_per_chunk": frames,
        "fps": sum(r["frames"] for r in rows) / (sum(periods) / 1e3),
        "fps_clock": "phase sums (serial loop, no emit_s)",
        "period_p50_ms": _pct(periods, 50),
        "period_p99_ms": _pct(periods, 99),
        **{k: statistics.median(r[k] for r in rows) for k in ("phase_a_ms", "phase_b_ms", "phase_c_ms")},
    }


def compare_videos(a: Path, b: Path) -> dict:
    """Deviation of video `b` from `a` (.npy, uint8): relative error and PSNR per chunk-aligned
    frame set, over the whole stream."""
    import numpy as np

    x, y = np.load(a).astype(np.float64), np.load(b).astype(np.float64)
    n = min(len(x), len(y))
    x, y = x[:n], y[:n]
    mse = float(((x - y) ** 2).mean())
    per_frame = ((x - y) ** 2).reshape(n, -1).mean(axis=1)
    psnr = [float(10 * np.log10(255**2 / m)) if m > 0 else float("inf") for m in per_frame]
    return {
        "frames": n,
        "relative_error": float(np.linalg.norm(x - y) / np.linalg.norm(x)),
        "psnr_db": float(10 * np.log10(255**2 / mse)) if mse > 0 else float("inf"),
        "psnr_db_min_frame": min(psnr),
        "max_abs_levels": float(np.abs(x - y).max()),
    }


def _counters(text: str) -> dict[str, int]:
    return {k: int(v) for k, v in re.findall(r"(\w+)=(-?\d+)", text)}


def summarize(rows: list[dict], every: list[dict] | None = None) -> dict:
    """`rows`: the measured chunks (after `--skip`); `every`: all chunks (time to first frame).

    FPS is frames delivered per wall second at steady state: the frames of the measured chunks
    after the first, over the writer's clock (`emit_s`) from the first measured chunk's
    delivery to the last's. The chunk period is the gap between successive deliveries (p50,
    p99). The phase medians say where a chunk's time goes on rank0's loop thread; with the
    writer thread they no longer add up to the period.
    """

    def med(key: str) -> float:
        return statistics.median(r[key] for r in rows)

    pp = rows[0].get("period_ms") is not None
    emits = [r["emit_s"] for r in rows]
    periods = sorted((b - a) * 1e3 for a, b in zip(emits, emits[1:], strict=False))
    frames = statistics.median(r["frames"] for r in rows)
    delivered = sum(r["frames"] for r in rows[1:])
    out = {
        "chunks_measured": len(rows),
        "frames_per_chunk": frames,
        "fps": delivered / (emits[-1] - emits[0]),
        "period_p50_ms": _pct(periods, 50),
        "period_p99_ms": _pct(periods, 99),
        "ttff_s": (every or rows)[0]["emit_s"],
        "phase_a_ms": med("phase_a_ms"),
        "phase_b_ms": med("phase_b_ms"),
        "phase_c_ms": med("phase_c_ms"),
        "fps_from_phase_sums": frames / (statistics.median(_period(r, pp) for r in rows) / 1e3),
    }
    if pp:
        out.update({"stage0_ms": med("stage0_ms"), "stage1_ms": med("stage1_ms")})
    # chunks whose phase A ran the text encoder (a new prompt) vs every other chunk
    changes = [r for r in rows if r.get("text_ms")]
    steady = [r for r in rows if not r.get("text_ms")]
    if changes and steady:
        steady_period = statistics.median(_period(r, pp) for r in steady)
        out["fps_without_prompt_change"] = frames / (steady_period / 1e3)
        out["prompt_changes"] = [
            {"chunk_index": r["chunk_index"], "text_ms": r["text_ms"], "period_ms": _period(r, pp)}
            for r in changes
        ]
    return out


def _pct(sorted_values: list[float], q: float) -> float | None:
    if not sorted_values:
        return None
    return sorted_values[min(len(sorted_values) - 1, round(q / 100 * (len(sorted_values) - 1)))]


def _period(row: dict, pp: bool) -> float:
    return row["period_ms"] if pp else row["phase_a_ms"] + row["phase_b_ms"] + row["phase_c_ms"]


def _host() -> dict:
    import torch

    cuda = torch.cuda.is_available()
    return {
        "torch": torch.__version__,
        "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if cuda else [],
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--job", action="append", required=True, help="NAME=FLAGS of one streamdit run")
    p.add_argument("--skip", type=int, default=2, help="first chunks left out of the medians")
    p.add_argument("--job-timeout", type=float, default=600)
    p.add_argument("--work", type=Path, default=Path("/tmp/bench_e2e"))
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--video-suffix", default=".mp4", help=".mp4 or .npy (lossless: --compare needs it)")
    p.add_argument("--src", action="append", default=[], help="NAME=DIR: job NAME runs the code in DIR")
    p.add_argument("--compare", action="append", default=[], help="A,B: deviation of job B's video from A's")
    args = p.parse_args()
    args.src = dict(spec.split("=", 1) for spec in args.src)
    result: dict = {"bench": "e2e", "command": shlex.join([sys.executable, *sys.argv]), **_host(), "jobs": []}
    for spec in args.job:
        name, sep, flags = spec.partition("=")
        if not sep:
            p.error(f"--job {spec!r}: expected NAME=FLAGS")
        row = run_job(name, flags, args)
        print(json.dumps({k: v for k, v in row.items() if k not in ("command", "tail")}), flush=True)
        result["jobs"].append(row)
        args.out.write_text(json.dumps(result, indent=2) + "\n")  # partial results survive a cut
    videos = {row["job"]: Path(row["video"]) for row in result["jobs"] if "error" not in row}
    for pair in args.compare:
        a, b = pair.split(",")
        result.setdefault("deviation", []).append(
            {"reference": a, "job": b, **compare_videos(videos[a], videos[b])}
        )
        print(json.dumps(result["deviation"][-1]), flush=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
