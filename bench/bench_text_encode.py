"""Prompt-change latency of a text source alone: ms per new prompt, p50 / p99 over N prompts.

Encodes N distinct prompts one at a time (as Phase A does on a prompt change), each timed from
the call to the embeddings being ready on the device, after one warm-up prompt.

    PYTHONPATH=src python bench/bench_text_encode.py --text-encoder /tmp/umt5-xxl --device cuda \\
        --out bench/results/text_encode.json
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

from streamdit.config import RunConfig
from streamdit.runtime.build import build_text_encoder, validate_run


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--text-encoder", type=Path, default=None, help="umT5 folder (default: the hash stand-in)")
    p.add_argument("--preset", default="wan-14b")
    p.add_argument("--device", default="cuda")
    p.add_argument("--prompts", type=int, default=20)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    run = validate_run(RunConfig(preset=args.preset, device=args.device, text_encoder=args.text_encoder))
    encoder = build_text_encoder(run)
    device = run.device
    times = []
    for i in range(args.prompts + 1):
        prompt = " ".join(f"w{(7 * i + j) % 3000}" for j in range(8 + i % 20))
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        out = encoder.encode([prompt])
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i:  # the first prompt is the warm-up
            times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    result = {
        "bench": "text_encode",
        "command": shlex.join([sys.executable, *sys.argv]),
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "encoder": type(encoder).__name__,
        "shape": list(out.shape),
        "dtype": str(out.dtype),
        "prompts": len(times),
        "ms_p50": statistics.median(times),
        "ms_p99": times[min(len(times) - 1, round(0.99 * (len(times) - 1)))],
        "ms_min": times[0],
    }
    print(json.dumps(result))
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
