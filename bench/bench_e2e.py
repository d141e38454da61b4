"""End-to-end `streamdit run` jobs side by side: FPS, per-phase medians, compile health.

Each `--job NAME=FLAGS` is one real job (`python -m streamdit run FLAGS --metrics ...`), run one
after the other in this process's environment; its per-chunk metrics are read back and the
first `--skip` chunks (pipeline filling) left out. Reported per job: median phase A/B/C ms, the
chunk period (pp: the measured `period_ms`; single / tp: A + B + C, the loop is serial), FPS =
pixel frames per period, job wall time, and the compile-health counters a `--compile` job logs
at startup (warm-up seconds, graphs and graph breaks per generator call).

    python bench/bench_e2e.py --out bench/results/e2e.json \\
        --job "eager=--preset wan-14b --device cuda --dtype bfloat16 --height 320 --width 576" \\
        --job "compiled=--preset wan-14b --device cuda --dtype bfloat16 --height 320 --width 576 --compile"
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

HEALTH = re.compile(r"compile warm-up ([\d.]+) s: CompileCounters\((.*)\)")
# what the job loaded (weights, text source): the evidence of what was measured
LOADED = re.compile(
    r"streamdit\.runtime\.build: ((?:DiT weights|VAE weights|VAE latent|text encoder|text emb|text:).*)"
)


def run_job(name: str, flags: str, args: argparse.Namespace) -> dict:
    work = args.work / name
    work.mkdir(parents=True, exist_ok=True)
    metrics = work / "m.jsonl"
    cmd = [sys.executable, "-m", "streamdit", "run", *shlex.split(flags)]
    cmd += ["--out", str(work / "v.mp4"), "--metrics", str(metrics), "--no-progress", "--log-level", "INFO"]
    t0 = time.monotonic()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.job_timeout)
    except subprocess.TimeoutExpired as exc:
        tail = (exc.stderr or b"")[-3000:]
        return {"job": name, "error": f"timed out after {args.job_timeout} s", "tail": str(tail)}
    row: dict = {"job": name, "command": shlex.join(cmd), "wall_s": time.monotonic() - t0}
    health = [{"warmup_s": float(m.group(1)), **_counters(m.group(2))} for m in HEALTH.finditer(proc.stderr)]
    if health:
        row["compile_health"] = health
    row["loaded"] = LOADED.findall(proc.stderr)
    if proc.returncode != 0:
        return {**row, "error": f"exit {proc.returncode}", "tail": proc.stderr[-3000:]}
    rows = [json.loads(line) for line in metrics.read_text().splitlines()][args.skip :]
    return {**row, **summarize(rows)}


def _counters(text: str) -> dict[str, int]:
    return {k: int(v) for k, v in re.findall(r"(\w+)=(-?\d+)", text)}


def summarize(rows: list[dict]) -> dict:
    def med(key: str) -> float:
        return statistics.median(r[key] for r in rows)

    pp = rows[0].get("period_ms") is not None
    period = (
        med("period_ms")
        if pp
        else statistics.median(r["phase_a_ms"] + r["phase_b_ms"] + r["phase_c_ms"] for r in rows)
    )
    frames = statistics.median(r["frames"] for r in rows)
    out = {
        "chunks_measured": len(rows),
        "frames_per_chunk": frames,
        "phase_a_ms": med("phase_a_ms"),
        "phase_b_ms": med("phase_b_ms"),
        "phase_c_ms": med("phase_c_ms"),
        "period_ms": period,
        "fps": frames / (period / 1e3),
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
    args = p.parse_args()
    result: dict = {"bench": "e2e", "command": shlex.join([sys.executable, *sys.argv]), **_host(), "jobs": []}
    for spec in args.job:
        name, sep, flags = spec.partition("=")
        if not sep:
            p.error(f"--job {spec!r}: expected NAME=FLAGS")
        row = run_job(name, flags, args)
        print(json.dumps({k: v for k, v in row.items() if k not in ("command", "tail")}), flush=True)
        result["jobs"].append(row)
        args.out.write_text(json.dumps(result, indent=2) + "\n")  # partial results survive a cut
    return 0


if __name__ == "__main__":
    sys.exit(main())
