"""`streamdit matrix` N times in a row: no hang, no flaky row, and how long each row takes.

Runs the real command (`python -m streamdit matrix --json runK.json`, extra flags after `--`)
`--runs` times back to back, each under its own outer timeout, and writes one JSON: the command,
the machine, every run's table, per-row statuses over the runs and the slowest time of each row.
Exits 1 if any run failed, timed out, or any row ever failed.

    python bench/matrix_runs.py --runs 5 --out bench/results/matrix_cpu_5runs.json
    python bench/matrix_runs.py --runs 2 --out bench/results/matrix_nccl.json -- --backend nccl
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch


def one_run(k: int, tmp: Path, extra: list[str], timeout_s: float) -> dict:
    out = tmp / f"run{k}.json"
    cmd = [sys.executable, "-m", "streamdit", "matrix", "--json", str(out), *extra]
    t0 = time.monotonic()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, start_new_session=True)
    except subprocess.TimeoutExpired:
        return {"run": k, "exit": None, "seconds": time.monotonic() - t0, "rows": [], "error": "timed out"}
    print(proc.stdout[-2500:], flush=True)
    rows = json.loads(out.read_text()) if out.exists() else []  # the matrix's JSON: a list of rows
    return {"run": k, "exit": proc.returncode, "seconds": time.monotonic() - t0, "rows": rows}


def summarize(runs: list[dict]) -> dict[str, dict]:
    summary: dict[str, dict] = {}
    for run in runs:
        for row in run["rows"]:
            entry = summary.setdefault(row["id"], {"statuses": [], "max_s": 0.0})
            if row["status"] not in entry["statuses"]:
                entry["statuses"].append(row["status"])
            entry["max_s"] = round(max(entry["max_s"], row["seconds"]), 1)
            if row["status"] == "skip":
                entry["skip_reason"] = row.get("detail", "")
    return summary


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--run-timeout", type=float, default=900.0, help="outer bound per matrix run (s)")
    p.add_argument("extra", nargs="*", help="flags for `streamdit matrix` (after --)")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        runs = [one_run(k, Path(tmp), args.extra, args.run_timeout) for k in range(1, args.runs + 1)]
    summary = summarize(runs)
    result = {
        "bench": f"operator_matrix_{args.runs}_runs",
        "command": shlex.join(["python", "bench/matrix_runs.py", *sys.argv[1:]]),
        "machine": f"{os.cpu_count()} cores, {platform.python_version()}",
        "gpus": torch.cuda.device_count(),
        "torch": torch.__version__,
        "totals_s": [round(r["seconds"], 1) for r in runs],
        "exits": [r["exit"] for r in runs],
        "rows_summary": summary,
        "runs": [r["rows"] for r in runs],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    bad = [r["run"] for r in runs if r["exit"] != 0]
    bad += [row for row, s in summary.items() if "fail" in s["statuses"]]
    print(f"totals {result['totals_s']} s; exits {result['exits']}; problems: {bad or 'none'}")
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
