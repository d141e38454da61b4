"""A `streamdit run` and a `streamdit serve` on whatever is installed (the floors venv of `.ci/run`).

run: two chunks to an .mp4 that decodes. serve: listening, `/health` healthy without a token,
`/status` running with it, one frame over the WebSocket, `/stop` drains and the process exits 0.
Every step is bounded; the server's process group is killed on any failure.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from websockets.sync.client import connect

TINY = ["--height", "32", "--width", "48", "--no-progress"]


def _request(url: str, token: str | None = None, method: str = "GET") -> tuple[int, bytes]:
    req = urllib.request.Request(url, method=method, data=b"" if method == "POST" else None)
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def smoke_run(tmp: Path) -> None:
    out = tmp / "smoke.mp4"
    proc = subprocess.run(
        [sys.executable, "-m", "streamdit", "run", *TINY, "--chunks", "2", "--out", str(out)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    import av

    with av.open(str(out)) as container:
        frames = sum(1 for _ in container.decode(video=0))
    assert frames == 21, frames
    print(f"smoke: run wrote {frames} frames")


def smoke_serve(tmp: Path) -> None:
    log = tmp / "serve.log"
    with open(log, "w") as sink:
        proc = subprocess.Popen(
            [sys.executable, "-m", "streamdit", "serve", "--port", "0", *TINY],
            stdout=sink, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while not (match := re.search(r"streamdit serve: (http://\S+/)\?token=(\S+)", log.read_text())):
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.1)
        url, token = match.groups()
        status, body = _request(url + "health")
        assert status == 200 and json.loads(body)["healthy"], (status, body)
        while json.loads(_request(url + "status", token)[1])["state"] != "running":
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.1)
        ws_url = url.replace("http", "ws") + "frames"
        with connect(ws_url, additional_headers={"Authorization": f"Bearer {token}"}, open_timeout=10) as ws:
            hello = json.loads(ws.recv(timeout=10))
            frame = ws.recv(timeout=60)
            while isinstance(frame, str):  # chunk markers ({"chunk": k, "frames": n}) come first
                frame = ws.recv(timeout=60)
            assert "client" in hello and frame[:2] == b"\xff\xd8", hello
        assert _request(url + "stop", token, method="POST")[0] == 202
        assert proc.wait(timeout=60) == 0, log.read_text()[-3000:]
        print("smoke: serve answered, streamed a JPEG frame and stopped with exit 0")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as scratch:
        smoke_run(Path(scratch))
        smoke_serve(Path(scratch))
