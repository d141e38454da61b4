"""Start `streamdit serve` as a real process for the serve tests, and always end it.

Owns: `ServeProcess` (a context manager: starts the server on 127.0.0.1 with port 0, reads the
URL it prints, offers `get` / `post` / `status` / `wait_for`, and on exit stops it over HTTP,
then kills its whole process group if it did not leave in time), `raw_ws_connect` (a WebSocket
client that completes the handshake and then never reads: the slow client).
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx
from websockets.sync.client import ClientConnection, connect

from ranks import env

URL_RE = re.compile(r"streamdit serve: (http://\S+/)\?token=(\S+)")
TINY = ["--height", "64", "--width", "96", "--no-progress"]


class ServeProcess:
    def __init__(
        self, tmp: Path, *args: str, start_timeout: float = 60.0, hooks: dict[str, str] | None = None
    ) -> None:
        self.tmp = tmp
        self.log_path = tmp / "serve.log"
        cmd = [sys.executable, "-m", "streamdit", "serve", "--port", "0", *TINY, *args]
        self._log = open(self.log_path, "w")  # noqa: SIM115 - closed in __exit__
        environment = env(PYTHONUNBUFFERED="1", **(hooks or {}))
        self.proc = subprocess.Popen(
            cmd, cwd=tmp, env=environment, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True
        )
        self.url, self.token = self._await_url(start_timeout)
        self.page_url = f"{self.url}?token={self.token}"  # what a person opens: sets the cookie
        self.auth = {"Authorization": f"Bearer {self.token}"}
        self.http = httpx.Client(base_url=self.url, timeout=10.0, headers=self.auth)
        self.code: int | None = None

    def _await_url(self, timeout: float) -> tuple[str, str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            match = URL_RE.search(self.log_path.read_text())
            if match:
                return match.group(1), match.group(2)
            if self.proc.poll() is not None:
                raise AssertionError(f"serve exited {self.proc.returncode} before listening:\n{self.log()}")
            time.sleep(0.05)
        raise AssertionError(f"serve printed no URL within {timeout} s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text()[-6000:]

    def status(self) -> dict:
        r = self.http.get("/status")
        assert r.status_code == 200, r.text
        return r.json()

    def post(self, path: str, body: object = None, **kw: object) -> httpx.Response:
        if body is None:
            return self.http.post(path, **kw)
        kw.setdefault("headers", {"Content-Type": "application/json"})
        return self.http.post(path, content=body if isinstance(body, bytes | str) else json.dumps(body), **kw)

    def wait_for(self, pred: Callable[[dict], bool], what: str, timeout: float = 60.0) -> dict:
        deadline = time.monotonic() + timeout
        s = self.status()
        while not pred(s):
            if time.monotonic() > deadline:
                raise AssertionError(f"no {what} within {timeout} s; last status {s}\n{self.log()}")
            time.sleep(0.1)
            s = self.status()
        return s

    def stop(self, timeout: float = 60.0) -> int:
        """Stop over HTTP; the exit code (the process group is killed if it overstays)."""
        if self.proc.poll() is None:
            with contextlib.suppress(httpx.HTTPError):  # it may be leaving already
                self.post("/stop")
        try:
            self.code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
            raise AssertionError(f"serve did not exit within {timeout} s after stop:\n{self.log()}") from None
        return self.code

    def ws_connect(self, **kw: object) -> ClientConnection:
        """The frame WebSocket, authorized with the run's token."""
        return connect(self.url.replace("http", "ws") + "frames", additional_headers=self.auth, **kw)

    def __enter__(self) -> ServeProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            if self.proc.poll() is None:
                self.stop()
        finally:
            if self.proc.poll() is None:
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.http.close()
            self._log.close()


def raw_ws_connect(url: str, token: str, path: str = "/frames", rcvbuf: int = 4096) -> socket.socket:
    """A WebSocket client that does the handshake and then never reads (a stalled viewer)."""
    host, port = url.removeprefix("http://").rstrip("/").split(":")
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)  # before connect: a small window
    sock.connect((host, int(port)))
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall(
        (
            f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
            f"Authorization: Bearer {token}\r\n\r\n"
        ).encode()
    )
    head = b""
    while b"\r\n\r\n" not in head:
        head += sock.recv(1)
    assert head.startswith(b"HTTP/1.1 101"), head
    return sock
