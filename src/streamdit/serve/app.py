"""The HTTP side of `streamdit serve`: one page, a frame WebSocket and a small JSON API.

Owns: `build_app(live, hub)` (Starlette routes) and `ServerThread` (uvicorn on its own thread and
event loop, bound before the stream starts so the page can show start-up). Routes:

| route            | what                                                                     |
|------------------|--------------------------------------------------------------------------|
| `GET /`          | the page: live frames, prompt box (hard cut / soft), start/pause/stop      |
| `GET /status`    | JSON: state, chunk, epoch, FPS, period p50/p99, queues, ranks, clients     |
| `POST /prompt`   | `{"prompt": str, "transition": "hard"|"soft", "replace": bool}` -> 202 at  |
|                  | the next chunk boundary; 409 while another change waits, unless replace   |
| `POST /prompt/cancel` | withdraw the waiting change: `{"cancelled": prompt or null}`         |
| `GET /health`    | 200 `{"healthy": true, ...}`, or 503 once the stream failed or a rank is   |
|                  | lost (no token needed: for load balancers and orchestrators)              |
| `GET /metrics`   | Prometheus text format: frames, chunks, FPS, periods, epoch, viewers, ranks |
| `POST /pause`    | pause at the next chunk boundary (peers kept alive)                       |
| `POST /start`    | resume                                                                    |
| `POST /stop`     | drain and shut every rank down (the process then exits 0)                 |
| `WS /frames`     | `{"client": id}` first, then one binary message per frame (JPEG); the     |
|                  | a text marker `{"chunk": k, "frames": n}` ahead of each chunk's frames; the |
|                  | client acknowledges with its                                              |
|                  | running frame count as text (at most 24 frames go out unacknowledged);    |
|                  | with `--browser-input` it may send JPEG input frames (binary, <= 1 MiB),   |
|                  | which Phase A reads (runtime.live.LiveFrames)                             |

Bad input never reaches the stream: a body over 16 KiB is 413, malformed JSON or a non-object is
400, an unknown key, an empty or over-long prompt or an unknown transition is 422; every error
is `{"error": message}` naming the field. Before any route, `access.AccessMiddleware` checks
the token, Host, Origin and content type. Limits: `MAX_CONNECTIONS` at once (uvicorn answers
503 beyond, so idle or half-sent connections cannot exhaust the process's files), idle
keep-alive connections closed after 5 s, WebSocket messages from a viewer at most 4 KiB
(acknowledgements; 1 MiB for input frames under `--browser-input`), at most `MAX_VIEWERS`
viewers (another is closed with 1013, try again later).
`POST /stop` is idempotent.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import threading
from importlib.resources import files

import uvicorn
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket
from uvicorn.protocols.http.h11_impl import H11Protocol

from streamdit.errors import ConfigError
from streamdit.runtime.live import MAX_PROMPT_CHARS, STOP_OVER_HTTP, LiveFrames, LiveStream, PendingChange
from streamdit.serve.access import Access, AccessMiddleware
from streamdit.serve.hub import Client, FrameHub, decode_input_frame
from streamdit.serve.telemetry import health_report, prometheus_text

log = logging.getLogger(__name__)

MAX_BODY = 16 * 1024
PROMPT_KEYS = {"prompt", "transition", "replace"}
MAX_CONNECTIONS = 64
MAX_VIEWERS = 16
MAX_WS_MESSAGE = 4096
MAX_INPUT_FRAME = 1 << 20  # a viewer's JPEG input frame (--browser-input only)
HEAD_TIMEOUT_S = 5.0


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


async def _read_json(request: Request) -> dict[str, object] | JSONResponse:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > MAX_BODY:
        return _error(413, f"body of {declared} bytes exceeds {MAX_BODY} [field=body]")
    body = b""
    async for part in request.stream():
        body += part
        if len(body) > MAX_BODY:
            return _error(413, f"body exceeds {MAX_BODY} bytes [field=body]")
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        return _error(400, f"malformed JSON: {exc} [field=body]")
    if not isinstance(data, dict):
        return _error(400, f"expected a JSON object, got {type(data).__name__} [field=body]")
    return data


def build_app(live: LiveStream, hub: FrameHub, access: Access, *, height: int, width: int) -> Starlette:
    page = files("streamdit.serve").joinpath("page.html").read_text(encoding="utf-8")
    for key, value in {
        "FPS": hub.fps,
        "MAX_PROMPT": MAX_PROMPT_CHARS,
        "HEIGHT": height,
        "WIDTH": width,
    }.items():
        page = page.replace("{{" + key + "}}", str(value))

    async def index(_: Request) -> Response:
        return HTMLResponse(page)

    async def status(_: Request) -> Response:
        return JSONResponse({**live.status(), **hub.stats()})

    async def prompt(request: Request) -> Response:
        data = await _read_json(request)
        if isinstance(data, JSONResponse):
            return data
        unknown = sorted(set(data) - PROMPT_KEYS)
        if unknown:
            return _error(422, f"unknown keys {unknown}: expected {sorted(PROMPT_KEYS)} [field={unknown[0]}]")
        if "prompt" not in data:
            return _error(422, "missing prompt [field=prompt]")
        replace = data.get("replace", False)
        if not isinstance(replace, bool):
            return _error(422, f"replace must be true or false, got {replace!r} [field=replace]")
        try:
            accepted = live.submit(data["prompt"], data.get("transition", "soft"), replace=replace)
        except PendingChange as exc:
            return _error(409, str(exc))
        except ConfigError as exc:
            too_long = isinstance(data["prompt"], str) and len(data["prompt"].strip()) > MAX_PROMPT_CHARS
            return _error(413 if too_long else 422, str(exc))
        return JSONResponse(accepted, status_code=202)

    async def cancel(_: Request) -> Response:
        try:
            return JSONResponse(live.cancel())
        except ConfigError as exc:
            return _error(422, str(exc))

    async def health(_: Request) -> Response:
        report = health_report(live.status())
        return JSONResponse(report, status_code=200 if report["healthy"] else 503)

    async def metrics(_: Request) -> Response:
        text = prometheus_text(live.status(), hub.stats())
        return Response(text, media_type="text/plain; version=0.0.4; charset=utf-8")

    async def pause(_: Request) -> Response:
        live.pause()
        return JSONResponse({"state": "paused"})

    async def start(_: Request) -> Response:
        live.resume()
        return JSONResponse({"state": "running"})

    async def stop(_: Request) -> Response:
        live.request_stop(STOP_OVER_HTTP)
        return JSONResponse({"state": "stopping"}, status_code=202)

    async def frames(ws: WebSocket) -> None:
        await ws.accept()
        if hub.viewers() >= MAX_VIEWERS:  # accepted, then closed: "try again later", not a 403
            await ws.close(code=1013, reason=f"{MAX_VIEWERS} viewers already")
            return
        client = hub.connect()
        try:
            hello = {"client": client.id, "input": live.input_frames is not None}  # finds itself in /status
            await ws.send_text(json.dumps(hello))
            await _pump(ws, client, live.input_frames, height=height, width=width)
        finally:
            hub.disconnect(client)

    return Starlette(
        routes=[
            Route("/", index),
            Route("/status", status),
            Route("/prompt", prompt, methods=["POST"]),
            Route("/prompt/cancel", cancel, methods=["POST"]),
            Route("/health", health),
            Route("/metrics", metrics),
            Route("/pause", pause, methods=["POST"]),
            Route("/start", start, methods=["POST"]),
            Route("/stop", stop, methods=["POST"]),
            WebSocketRoute("/frames", frames),
        ],
        middleware=[Middleware(AccessMiddleware, access=access)],
    )


async def _pump(ws: WebSocket, client: Client, inputs: LiveFrames | None, *, height: int, width: int) -> None:
    """Send the client's frames within its window until it goes away (see hub.Client); take its
    acknowledgements (text) and, with browser input, its input frames (binary JPEG)."""

    async def send() -> None:
        while True:
            await client.wait_for_window()
            item = await client.queue.get()
            if isinstance(item, str):  # a chunk marker: outside the frame window
                await ws.send_text(item)
                continue
            await ws.send_bytes(item)
            client.sent += 1

    async def watch() -> None:
        while True:
            message = await ws.receive()
            if message["type"] == "websocket.disconnect":
                return
            text, data = message.get("text"), message.get("bytes")
            if text is not None:
                if len(text) > MAX_WS_MESSAGE:
                    await ws.close(code=1009, reason="acknowledgements are short")
                    return
                if text.strip().isdigit():
                    client.ack(int(text))
            elif data is not None:
                if inputs is None:
                    await ws.close(code=1003, reason="this stream takes no input (serve --browser-input)")
                    return
                try:
                    frame = await asyncio.to_thread(decode_input_frame, data, height=height, width=width)
                except ValueError as exc:
                    client.input_rejected += 1
                    log.warning("viewer %d: an input frame was refused: %s", client.id, exc)
                    continue
                inputs.push(frame)
                client.input_frames += 1

    tasks = [asyncio.create_task(send()), asyncio.create_task(watch())]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


class _BoundedH11(H11Protocol):
    """uvicorn's h11 protocol, plus a deadline for each request head: a connection that has not
    started a request within `HEAD_TIMEOUT_S` of opening (or of its last response) is closed,
    so connections that never send, or send a head byte by byte, cannot pile up. A connection
    upgraded to a WebSocket belongs to the WebSocket protocol and is left alone."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_head_deadline()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._arm_head_deadline()

    def _arm_head_deadline(self) -> None:
        waiting_for = self.cycle
        self.loop.call_later(HEAD_TIMEOUT_S, self._head_deadline, waiting_for)

    def _head_deadline(self, waiting_for: object) -> None:
        idle = self.cycle is waiting_for and self.transport.get_protocol() is self
        if idle and not self.transport.is_closing():
            self.transport.close()


class ServerThread:
    """uvicorn on its own thread and event loop, serving `app` on host:port (0 = any free port)."""

    def __init__(
        self, app: Starlette, hub: FrameHub, *, host: str, port: int, max_message: int = MAX_WS_MESSAGE
    ) -> None:
        self.hub = hub
        self.sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))  # bound here: a taken port is a clear error before any model work
        self.host, self.port = host, self.sock.getsockname()[1]
        config = uvicorn.Config(
            app,
            log_level="warning",
            lifespan="off",
            ws="websockets-sansio",
            timeout_graceful_shutdown=2,
            http=_BoundedH11,
            limit_concurrency=MAX_CONNECTIONS,
            timeout_keep_alive=5,
            ws_max_size=max_message,
            h11_max_incomplete_event_size=MAX_BODY,
        )
        self.server = uvicorn.Server(config)
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="http-server", daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/"

    def start(self, timeout_s: float = 10.0) -> None:
        self._thread.start()
        deadline = threading.Event()
        for _ in range(int(timeout_s / 0.02)):
            if self.server.started or self.error is not None or not self._thread.is_alive():
                break
            deadline.wait(0.02)
        if not self.server.started:
            raise RuntimeError(f"HTTP server did not start on {self.url}: {self.error}")

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        self.hub.start(loop)
        try:
            loop.run_until_complete(self.server.serve(sockets=[self.sock]))
        except BaseException as exc:  # noqa: BLE001 - reported by start() / stop()
            self.error = exc
            log.error("HTTP server failed: %s", exc)
        finally:
            loop.close()

    def stop(self) -> None:
        self.server.should_exit = True
        self._thread.join(timeout=10.0)
        self.hub.close()
        self.sock.close()
