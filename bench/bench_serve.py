"""`streamdit serve` under viewers: generation FPS alone, with healthy viewers, with a stalled one.

Starts one real `streamdit serve` (flags after `--`), waits for `--settle` chunks (compile
warm-up, pipeline filling), then measures the generation rate in three windows of `--window`
seconds each, read from the server's own /status (pixel frames emitted per second, chunk period
p50 / p99): no viewer; `--viewers` healthy WebSocket viewers that read and acknowledge every
frame; the same plus one viewer that completes the handshake and never reads. Per-viewer sent /
dropped counts are recorded, so the JSON shows who paid for the stalled viewer.

    python bench/bench_serve.py --out bench/results/serve_tiny_cpu.json -- --height 64 --width 96
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from websockets.sync.client import connect  # noqa: E402

from serve_proc import ServeProcess, raw_ws_connect  # noqa: E402


def window(server: ServeProcess, seconds: float) -> dict:
    a, t0 = server.status(), time.monotonic()
    time.sleep(seconds)
    b = server.status()
    dt = time.monotonic() - t0
    return {
        "seconds": dt,
        "chunks": b["chunk_index"] - a["chunk_index"],
        "fps_generated": (b["frames_total"] - a["frames_total"]) / dt,
        "period_ms_p50": b["period_ms_p50"],
        "period_ms_p99": b["period_ms_p99"],
        "clients": b["clients"],
        "encoder_chunks_dropped": b["encoder_chunks_dropped"],
    }


def viewer(url: str, stop: threading.Event, counts: list[int]) -> None:
    with connect(url.replace("http", "ws") + "frames", max_size=None) as ws:
        while not stop.is_set():
            try:
                msg = ws.recv(timeout=1)
            except TimeoutError:
                continue
            if isinstance(msg, bytes):
                counts[0] += 1
                ws.send(str(counts[0]))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--viewers", type=int, default=2)
    p.add_argument("--window", type=float, default=15.0)
    p.add_argument("--settle", type=int, default=4, help="chunks before measuring")
    p.add_argument("--start-timeout", type=float, default=300.0)
    p.add_argument("flags", nargs="*", help="streamdit serve flags (after --)")
    args = p.parse_args()
    work = Path("/tmp/bench_serve")
    work.mkdir(parents=True, exist_ok=True)
    import torch

    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    result: dict = {
        "bench": "serve_viewers",
        "command": shlex.join([sys.executable, *sys.argv]),
        "torch": torch.__version__,
        "gpus": gpus,
    }
    with ServeProcess(work, *args.flags, start_timeout=args.start_timeout) as server:
        server.wait_for(
            lambda s: (s["chunk_index"] or 0) >= args.settle, "settled", timeout=args.start_timeout
        )
        result["alone"] = window(server, args.window)
        stop, counts = threading.Event(), [[0] for _ in range(args.viewers)]
        threads = [threading.Thread(target=viewer, args=(server.url, stop, c), daemon=True) for c in counts]
        for t in threads:
            t.start()
        result["healthy_viewers"] = window(server, args.window)
        stalled = raw_ws_connect(server.url)
        result["plus_stalled_viewer"] = window(server, args.window)
        stalled.close()
        stop.set()
        for t in threads:
            t.join(timeout=5)
        result["frames_received_by_healthy_viewers"] = [c[0] for c in counts]
        result["exit_code"] = server.stop()
    alone = result["alone"]["fps_generated"]
    result["fps_ratio_healthy"] = result["healthy_viewers"]["fps_generated"] / alone
    result["fps_ratio_stalled"] = result["plus_stalled_viewer"]["fps_generated"] / alone
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k.startswith(("fps", "exit"))}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
