"""`streamdit serve` refuses what other pages, other hosts' names and greedy clients send.

One server (paused: no generation load) per module. Every request here is real HTTP / WebSocket
against the real process; each refusal asserts its status and the field it names.
- no or a wrong token: 401 on the API and the WebSocket; the printed URL's token sets a
  `SameSite=Strict; HttpOnly` cookie that then authorizes the page's own requests;
- a foreign Origin on a POST or the WebSocket: 403 / closed; a foreign Host (DNS rebinding): 421;
- a JSON body sent as text/plain (what a cross-origin form or no-cors fetch can send): 415;
- limits: a WebSocket message over 4 KiB closes that connection, a 17th viewer is refused
  (1013), 100 connections that never send a request leave the API answering;
- `POST /stop` twice: both 202, the process exits 0.
"""

from __future__ import annotations

import contextlib
import socket
import time
from pathlib import Path

import httpx
import pytest
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import connect

from serve_proc import ServeProcess

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    with ServeProcess(tmp_path_factory.mktemp("serve-sec"), "--start-paused") as s:
        yield s


def _bare(server: ServeProcess, **headers: str) -> httpx.Client:
    return httpx.Client(base_url=server.url, timeout=10.0, headers=headers)


def test_no_token_no_access(server: ServeProcess) -> None:
    with _bare(server) as c:
        for method, path in (("GET", "/status"), ("GET", "/"), ("POST", "/pause"), ("POST", "/stop")):
            r = c.request(method, path)
            assert r.status_code == 401 and "[field=token]" in r.json()["error"], (path, r.text)
    with _bare(server, Authorization="Bearer not-the-token") as c:
        assert c.get("/status").status_code == 401
    with (
        pytest.raises((InvalidStatus, ConnectionClosed)),
        connect(server.url.replace("http", "ws") + "frames") as ws,
    ):
        ws.recv(timeout=5)
    assert server.status()["state"] == "paused"  # nothing reached the stream


def test_the_printed_url_sets_a_strict_cookie_that_authorizes_the_page(server: ServeProcess) -> None:
    with _bare(server) as c:
        r = c.get(f"/?token={server.token}")
        assert r.status_code == 200 and 'id="frame"' in r.text
        cookie = r.headers["set-cookie"]
        assert "SameSite=Strict" in cookie and "HttpOnly" in cookie and server.token in cookie
        assert c.get("/status").status_code == 200  # the cookie jar now carries it


def test_cross_origin_and_rebinding_are_refused(server: ServeProcess) -> None:
    port = server.url.rstrip("/").rsplit(":", 1)[1]
    evil = {"Origin": "http://127.0.0.1:1", "Content-Type": "application/json"}
    r = server.http.post("/prompt", content='{"prompt": "pwned"}', headers=evil)
    assert r.status_code == 403 and "[field=origin]" in r.json()["error"], r.text
    r = server.http.get("/status", headers={"Host": f"attacker.example:{port}"})
    assert r.status_code == 421 and "[field=host]" in r.json()["error"], r.text
    with (
        pytest.raises((InvalidStatus, ConnectionClosed)),
        connect(
            server.url.replace("http", "ws") + "frames",
            additional_headers={**server.auth, "Origin": "http://evil.example"},
        ) as ws,
    ):
        ws.recv(timeout=5)
    same = {"Origin": server.url.rstrip("/"), "Content-Type": "application/json"}
    assert server.http.post("/prompt", content='{"prompt": "a fox"}', headers=same).status_code == 202


def test_json_only_as_json(server: ServeProcess) -> None:
    r = server.http.post("/prompt", content='{"prompt": "a fox"}', headers={"Content-Type": "text/plain"})
    assert r.status_code == 415 and "[field=content-type]" in r.json()["error"], r.text
    r = server.http.post("/prompt", content='{"prompt": "a fox"}', headers={"Content-Type": ""})
    assert r.status_code == 415


def test_an_oversized_websocket_message_closes_that_viewer(server: ServeProcess) -> None:
    with server.ws_connect() as ws:
        ws.recv(timeout=10)  # the hello
        ws.send("1" * 10_000)
        with pytest.raises(ConnectionClosed) as info:
            for _ in range(50):
                ws.recv(timeout=5)
        assert info.value.rcvd is not None and info.value.rcvd.code == 1009
    assert server.status()["state"] == "paused"


def test_viewers_are_limited(server: ServeProcess) -> None:
    viewers = [server.ws_connect() for _ in range(16)]
    try:
        for ws in viewers:
            ws.recv(timeout=10)
        with pytest.raises(ConnectionClosed) as info, server.ws_connect() as extra:
            extra.recv(timeout=10)
        assert info.value.rcvd is not None and info.value.rcvd.code == 1013
    finally:
        for ws in viewers:
            ws.close()


def test_idle_connections_cannot_take_the_server(server: ServeProcess) -> None:
    host, port = server.url.removeprefix("http://").rstrip("/").split(":")
    idle = [socket.create_connection((host, int(port))) for _ in range(100)]
    try:
        time.sleep(8)  # past the idle timeout (5 s): the server closes what never sent a request
        closed = 0
        for s in idle:
            s.settimeout(0.5)
            with contextlib.suppress(TimeoutError, ConnectionError):
                closed += s.recv(1) == b""
        assert closed >= 90, f"only {closed} of 100 idle connections were closed"
        assert server.status()["state"] == "paused"
    finally:
        for s in idle:
            s.close()


def test_stop_is_idempotent(tmp_path: Path) -> None:
    with ServeProcess(tmp_path, "--start-paused") as s:
        first, second = s.post("/stop"), s.post("/stop")
        assert (first.status_code, second.status_code) == (202, 202), (first.text, second.text)
        assert s.proc.wait(timeout=60) == 0, s.log()
