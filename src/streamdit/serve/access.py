"""Who may talk to `streamdit serve`: a per-run token, same-origin checks, JSON-only bodies.

Owns: `Access` (the rules) and `AccessMiddleware` (an ASGI middleware applying them to every
HTTP request and WebSocket upgrade before any route runs). The threats are other web pages in
the operator's own browser (CSRF: a page of another origin POSTing to localhost; DNS
rebinding: a hostile name resolving to 127.0.0.1) and other users of a shared host.

| check   | rule                                                                          | refusal |
|---------|-------------------------------------------------------------------------------|---------|
| Host    | when bound to loopback: the Host header names a loopback host and our port     | 421     |
| token   | `GET /?token=T` sets a `SameSite=Strict; HttpOnly` cookie; every other request | 401     |
|         | carries that cookie or `Authorization: Bearer T` (compared in constant time),  |         |
|         | but `GET /health` (it tells a probe only healthy or not)                      |         |
| Origin  | POST and WebSocket: an Origin header, when present, is this very host          | 403     |
| body    | a POST with a body declares `Content-Type: application/json`                   | 415     |

A WebSocket that fails a check is closed before it is accepted (code 1008). The token is made
per run (`secrets`, 128 bits) and printed in the URL only: `/?token=...`.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import secrets
from collections.abc import Awaitable, Callable, MutableMapping
from http.cookies import SimpleCookie
from typing import Any
from urllib.parse import parse_qs, urlsplit

Scope = MutableMapping[str, Any]
ASGIApp = Callable[[Scope, Callable[[], Awaitable[Any]], Callable[[Any], Awaitable[None]]], Awaitable[None]]
COOKIE = "streamdit_token"
OPEN_PATHS = ("/health",)  # GET without a token (a load balancer's probe); Host still checked
LOOPBACK_NAMES = ("localhost",)


def is_loopback_host(host: str) -> bool:
    name = host.strip("[]")
    if name in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


class Access:
    """The rules of the module docstring for a server bound to `bind_host`:`port`."""

    def __init__(self, *, bind_host: str, port: int, token: str | None = None) -> None:
        self.token = token or secrets.token_urlsafe(16)
        self.port = port
        self.loopback_only = is_loopback_host(bind_host)

    def cookie_header(self) -> tuple[bytes, bytes]:
        value = f"{COOKIE}={self.token}; Path=/; HttpOnly; SameSite=Strict"
        return b"set-cookie", value.encode("latin-1")

    def refusal(self, scope: Scope) -> tuple[int, str] | None:
        """(status, reason) when `scope` must be refused, else None."""
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        host = headers.get("host", "")
        if self.loopback_only and not self._our_loopback(host):
            return 421, f"Host {host!r} is not this server (loopback only) [field=host]"
        is_open = scope["type"] == "http" and scope.get("method") == "GET" and scope.get("path") in OPEN_PATHS
        if not is_open and not self._authorized(scope, headers):
            return 401, "missing or wrong token: open the URL streamdit serve printed [field=token]"
        is_post = scope["type"] == "http" and scope.get("method") == "POST"
        if is_post or scope["type"] == "websocket":
            origin = headers.get("origin")
            if origin is not None and urlsplit(origin).netloc != host:
                return 403, f"Origin {origin!r} is not this server [field=origin]"
        if is_post and _has_body(headers):
            kind = headers.get("content-type", "").split(";")[0].strip().lower()
            if kind != "application/json":
                return 415, f"Content-Type {kind or 'none'!r}: JSON bodies only [field=content-type]"
        return None

    def grants_cookie(self, scope: Scope) -> bool:
        """`GET /?token=T` with the right token: the page response sets the cookie."""
        query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
        return (
            scope["type"] == "http" and scope.get("path") == "/" and self._same(query.get("token", [""])[0])
        )

    def _authorized(self, scope: Scope, headers: dict[str, str]) -> bool:
        if self.grants_cookie(scope):
            return True
        auth = headers.get("authorization", "")
        if auth.lower().startswith("bearer ") and self._same(auth[7:].strip()):
            return True
        jar = SimpleCookie()
        try:
            jar.load(headers.get("cookie", ""))
        except Exception:  # noqa: BLE001 - a malformed cookie is no token
            return False
        return COOKIE in jar and self._same(jar[COOKIE].value)

    def _same(self, given: str) -> bool:
        return hmac.compare_digest(given.encode(), self.token.encode())

    def _our_loopback(self, host: str) -> bool:
        name, _, port = host.rpartition(":")
        return port == str(self.port) and is_loopback_host(name)


def _has_body(headers: dict[str, str]) -> bool:
    length = headers.get("content-length", "0").strip()
    return "transfer-encoding" in headers or (length != "0" and length != "")


class AccessMiddleware:
    """Applies `Access` to every request and upgrade; the page response also sets the cookie."""

    def __init__(self, app: ASGIApp, access: Access) -> None:
        self.app = app
        self.access = access

    async def __call__(
        self, scope: Scope, receive: Callable[[], Awaitable[Any]], send: Callable[[Any], Awaitable[None]]
    ) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        refused = self.access.refusal(scope)
        if refused is not None:
            await _refuse(scope, send, *refused)
            return
        if not self.access.grants_cookie(scope):
            await self.app(scope, receive, send)
            return

        async def send_with_cookie(message: Any) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), self.access.cookie_header()]}
            await send(message)

        await self.app(scope, receive, send_with_cookie)


async def _refuse(scope: Scope, send: Callable[[Any], Awaitable[None]], status: int, reason: str) -> None:
    if scope["type"] == "websocket":
        await send({"type": "websocket.close", "code": 1008, "reason": reason[:120]})
        return
    body = json.dumps({"error": reason}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})
