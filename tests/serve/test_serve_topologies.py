"""`streamdit serve` with generator workers on CPU/gloo: `--topology tp --nproc 2` and `pp`.

Frames reach a viewer, a hard cut bumps the epoch, a pause longer than the process-group
timeout survives (rank0 keeps every peer's blocking receive alive with NOOPs; without them the
workers would time out), resume continues, and stop shuts every rank down with exit 0.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from serve_proc import ServeProcess

pytestmark = pytest.mark.timeout(240)


@pytest.mark.parametrize("topology", ["tp", "pp"])
def test_serve_with_workers_steers_pauses_past_the_timeout_and_stops_cleanly(
    tmp_path: Path, topology: str
) -> None:
    args = ["--topology", topology, "--nproc", "2", "--dist-timeout", "3", "--watchdog-window", "3"]
    with ServeProcess(tmp_path, *args) as server:
        st = server.wait_for(lambda s: (s["chunk_index"] or 0) >= 2, "first chunks")
        assert [r["rank"] for r in st["ranks"]] == [0, 1] and all(r["state"] == "alive" for r in st["ranks"])
        with server.ws_connect() as ws:
            ws.recv(timeout=30)  # hello
            assert isinstance(ws.recv(timeout=30), bytes)

        assert server.post("/prompt", {"prompt": "a desert road", "transition": "hard"}).status_code == 202
        server.wait_for(lambda s: s["cache_epoch"] == 1, "the epoch bump")

        server.post("/pause")
        held = server.wait_for(lambda s: s["idle"], "the loop idling")["chunk_index"]
        time.sleep(3 * 3)  # three process-group timeouts: only the keepalives keep the workers waiting
        st = server.status()
        assert st["chunk_index"] == held and all(r["state"] == "alive" for r in st["ranks"]), st
        server.post("/start")
        server.wait_for(lambda s: s["chunk_index"] >= held + 2, "chunks after resume")
        assert server.stop() == 0, server.log()
    log = server.log()
    assert "Traceback" not in log and "error" not in log.lower(), log
