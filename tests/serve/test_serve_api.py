"""`streamdit serve` API against a real server process on 127.0.0.1 (tiny preset, CPU).

Every endpoint; every bad input (empty / whitespace / huge prompt, malformed JSON, a non-object,
unknown keys, wrong types, unknown transition, an oversized body) is a 4xx naming the field while
generation goes on; a hard cut bumps the epoch at the next chunk; pause holds the chunk index
and resume continues it; frames arrive over the WebSocket as JPEG; a viewer that vanishes costs
nothing; a viewer that reads nothing loses frames itself while generation keeps its pace; stop
drains and exits 0.
"""

from __future__ import annotations

import io
import json
import signal
import threading
import time
from pathlib import Path

import pytest
from PIL import Image

from serve_proc import ServeProcess, raw_ws_connect

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    with ServeProcess(tmp_path_factory.mktemp("serve")) as s:
        s.wait_for(lambda st: (st["chunk_index"] or 0) >= 2, "first chunks")
        yield s


def _advancing(server: ServeProcess, by: int = 2) -> None:
    start = server.status()["chunk_index"]
    server.wait_for(lambda st: st["chunk_index"] >= start + by, f"{by} more chunks")


def test_status_reports_the_running_stream(server: ServeProcess) -> None:
    st = server.status()
    assert st["state"] == "running" and st["cache_epoch"] == 0
    assert st["fps"] > 0 and st["period_ms_p50"] > 0 and st["period_ms_p99"] >= st["period_ms_p50"]
    assert st["ranks"][0]["rank"] == 0 and st["frames_total"] >= 24
    assert server.http.get("/").text.count('id="frame"') == 1


@pytest.mark.parametrize(
    ("body", "code", "needle"),
    [
        ({"prompt": "", "transition": "hard"}, 422, "must not be empty [field=prompt]"),
        ({"prompt": "   \n ", "transition": "soft"}, 422, "must not be empty"),
        ({"prompt": "x" * 2001, "transition": "hard"}, 413, "2001 characters, at most 2000"),
        ({"prompt": "a cat", "transition": "dissolve"}, 422, "unknown transition 'dissolve'"),
        ({"prompt": 7, "transition": "hard"}, 422, "prompt must be a string, got int"),
        ({"prompt": "a cat", "speed": 2}, 422, "unknown keys ['speed']"),
        ({"transition": "hard"}, 422, "missing prompt"),
        ('{"prompt": "a cat"', 400, "malformed JSON"),
        ("[1, 2]", 400, "expected a JSON object, got list"),
        (b"\xff\xfe", 400, "malformed JSON"),
        ("{" + '"prompt": "' + "y" * 20000 + '"}', 413, "exceeds 16384"),
    ],
    ids=["empty", "blank", "too-long", "transition", "type", "extra-key", "missing", "json", "array",
         "bytes", "body-size"],
)  # fmt: skip
def test_bad_prompts_are_4xx_naming_the_field_and_generation_goes_on(
    server: ServeProcess, body: object, code: int, needle: str
) -> None:
    before = server.status()
    r = server.post("/prompt", body)
    assert r.status_code == code, r.text
    assert needle in r.json()["error"], r.json()
    _advancing(server)
    after = server.status()
    assert after["cache_epoch"] == before["cache_epoch"] and after["prompt"] == before["prompt"]


def test_hard_cut_bumps_the_epoch_and_soft_keeps_it(server: ServeProcess) -> None:
    epoch = server.status()["cache_epoch"]
    r = server.post("/prompt", {"prompt": "a harbour at dawn", "transition": "hard"})
    assert r.status_code == 202 and r.json()["accepted"] is True
    st = server.wait_for(lambda s: s["cache_epoch"] == epoch + 1, "the epoch bump")
    assert st["prompt"] == "a harbour at dawn"
    r = server.post("/prompt", {"prompt": "a harbour at night", "transition": "soft"})
    assert r.status_code == 202
    st = server.wait_for(lambda s: s["prompt"] == "a harbour at night", "the soft change")
    _advancing(server)
    assert server.status()["cache_epoch"] == epoch + 1


def test_a_second_change_before_the_boundary_is_409_until_replaced_and_cancel_withdraws(
    server: ServeProcess,
) -> None:
    assert server.post("/pause").status_code == 200
    server.wait_for(lambda s: s["idle"], "the loop idling at a boundary")
    try:
        assert server.post("/prompt", {"prompt": "a city at night", "transition": "hard"}).status_code == 202
        r = server.post("/prompt", {"prompt": "a quiet lake"})
        assert r.status_code == 409 and "a change is already waiting" in r.json()["error"], r.text
        assert "[field=replace]" in r.json()["error"]
        st = server.status()
        assert (st["pending_prompt"], st["pending_transition"]) == ("a city at night", "hard")
        r = server.post("/prompt", {"prompt": "a quiet lake", "replace": "yes"})
        assert r.status_code == 422 and "replace must be true or false" in r.json()["error"]
        assert server.post("/prompt", {"prompt": "a quiet lake", "replace": True}).status_code == 202
        assert server.status()["pending_prompt"] == "a quiet lake"
        assert server.post("/prompt/cancel").json() == {"cancelled": "a quiet lake"}
        assert server.post("/prompt/cancel").json() == {"cancelled": None}
        assert server.status()["pending_prompt"] is None
    finally:
        server.post("/start")


def test_health_needs_no_token_and_metrics_speak_prometheus(server: ServeProcess) -> None:
    import httpx

    r = httpx.get(server.url + "health", timeout=10)  # no cookie, no bearer: a load balancer's probe
    assert r.status_code == 200, r.text
    assert r.json()["healthy"] is True and r.json()["state"] in ("running", "paused")
    assert httpx.get(server.url + "metrics", timeout=10).status_code == 401  # the rest keeps its token
    r = server.http.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain; version=0.0.4")
    samples = {}
    for line in r.text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            samples[name] = float(value)
    assert samples["streamdit_up"] == 1.0 and samples['streamdit_rank_up{rank="0"}'] == 1.0
    assert samples["streamdit_frames_total"] >= 24 and samples["streamdit_fps"] > 0
    assert (
        samples['streamdit_chunk_period_milliseconds{quantile="0.99"}']
        >= samples['streamdit_chunk_period_milliseconds{quantile="0.5"}']
    )
    assert "# TYPE streamdit_frames_total counter" in r.text


def test_pause_holds_the_stream_and_start_resumes_it(server: ServeProcess) -> None:
    assert server.post("/pause").json() == {"state": "paused"}
    st = server.wait_for(lambda s: s["idle"], "the loop idling at a boundary")
    held = st["chunk_index"]
    time.sleep(1.5)
    st = server.status()
    assert st["state"] == "paused" and st["chunk_index"] == held
    assert server.post("/start").json() == {"state": "running"}
    server.wait_for(lambda s: s["chunk_index"] >= held + 2, "chunks after resume")


def test_frames_arrive_as_jpeg_and_change(server: ServeProcess) -> None:
    frames = []
    with server.ws_connect() as ws:
        hello = json.loads(ws.recv(timeout=30))  # the client's id, to find itself in /status
        assert hello["client"] in {c["id"] for c in server.status()["clients"]}
        markers = []
        while len(frames) < 30:
            message = ws.recv(timeout=30)
            if isinstance(message, str):  # the next chunk's marker: its index and frame count
                markers.append(json.loads(message))
                continue
            frames.append(message)
            ws.send(str(len(frames)))
    images = [Image.open(io.BytesIO(f)) for f in frames]
    assert all(im.format == "JPEG" and im.size == (96, 64) for im in images)
    assert len({f for f in frames}) > 1  # the stream moves
    assert len(markers) >= 2 and all(m["frames"] == 12 for m in markers[1:]), markers
    indices = [m["chunk"] for m in markers]
    assert indices == list(range(indices[0], indices[0] + len(indices)))  # in order, none skipped


def test_a_viewer_that_vanishes_costs_nothing(server: ServeProcess) -> None:
    sock = raw_ws_connect(server.url, server.token)
    server.wait_for(lambda s: len(s["clients"]) == 1, "the client registered")
    sock.close()  # no close handshake: the TCP connection just goes away
    server.wait_for(lambda s: len(s["clients"]) == 0, "the client removed")
    _advancing(server)


def test_a_viewer_that_reads_nothing_loses_frames_itself_and_generation_keeps_pace(
    server: ServeProcess,
) -> None:
    """Counted, not timed (load-insensitive): once the stalled viewer's window is full and it
    drops frames, generation must still advance 5 more chunks; a loop that waited for that
    viewer would stand still (the wait is bounded by the test's own timeout)."""
    stalled = raw_ws_connect(server.url, server.token)  # handshake, then never a read and never an ack
    got = []

    def reader() -> None:  # a healthy viewer beside it: reads and acknowledges every frame
        with server.ws_connect() as ws:
            while not done.is_set():
                try:
                    msg = ws.recv(timeout=1)
                    if isinstance(msg, bytes):
                        got.append(msg)
                        ws.send(str(len(got)))
                except TimeoutError:
                    continue

    done = threading.Event()
    thread = threading.Thread(target=reader, daemon=True)
    thread.start()
    try:
        # the stalled viewer connected first: the lowest id among the viewers
        dropping = server.wait_for(
            lambda s: bool(s["clients"]) and min(s["clients"], key=lambda c: c["id"])["dropped"] > 0,
            "the stalled viewer dropping frames",
            timeout=90,
        )
        stalled_id, start = min(c["id"] for c in dropping["clients"]), dropping["chunk_index"]
        last: dict = {}  # its latest stats (the server may also close it: it never answers pings)

        def past_it(s: dict) -> bool:
            last.update(next((c for c in s["clients"] if c["id"] == stalled_id), {}))
            return s["chunk_index"] >= start + 5

        server.wait_for(past_it, "chunks past the stalled viewer", timeout=90)
    finally:
        done.set()
        thread.join(timeout=10)
        stalled.close()
    assert last["sent"] <= 24 and last["dropped"] > 0, last
    assert got, "the healthy viewer received nothing"


def test_stop_drains_and_exits_zero(tmp_path: Path) -> None:
    with ServeProcess(tmp_path) as s:
        s.wait_for(lambda st: (st["chunk_index"] or 0) >= 1, "a chunk")
        assert s.post("/stop").status_code == 202
        assert s.stop() == 0, s.log()
    assert "drained after" in s.log() and "frames served" in s.log()
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").rglob("*.mp4"))  # no --out: no file


def test_sigterm_while_paused_drains_and_exits_zero(tmp_path: Path) -> None:
    with ServeProcess(tmp_path, "--start-paused") as s:
        st = s.wait_for(lambda st: st["idle"], "the paused loop")
        assert st["state"] == "paused" and st["chunk_index"] is None  # nothing generated yet
        t0 = time.monotonic()
        s.proc.send_signal(signal.SIGTERM)
        assert s.proc.wait(timeout=30) == 0, s.log()
        assert time.monotonic() - t0 < 10, s.log()


def test_serve_outlives_its_input_file_which_starts_over(tmp_path: Path) -> None:
    import numpy as np

    from streamdit.media import open_writer

    clip = tmp_path / "short.mp4"
    writer = open_writer(clip, height=64, width=96, fps=16)
    writer.write(np.random.default_rng(0).integers(0, 256, (21, 64, 96, 3), dtype=np.uint8))
    writer.close()  # 21 frames: exactly the first two chunks of a run
    with ServeProcess(tmp_path, "--input-video", str(clip)) as server:
        st = server.wait_for(lambda s: (s["chunk_index"] or 0) >= 4, "chunks past the file's end")
        assert st["state"] == "running" and server.proc.poll() is None
        assert server.stop() == 0, server.log()
