"""rank0 of `streamdit serve`: the HTTP server around one live stream.

Owns: `serve_rank0(...)`. It binds the port first (a taken port is a clear error before any model
work), starts the server thread, then runs the topology's rank0 with a `LiveStream` (live
prompts, pause with peer keepalives, frames to the hub). A stop from the page, the API or
SIGTERM drains the stream and shuts every rank down; the server is closed on every exit path.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable

from streamdit.config import RunConfig
from streamdit.errors import ConfigError
from streamdit.runtime.build import live_prompt_check
from streamdit.runtime.driver import RunSummary
from streamdit.runtime.live import LiveStream
from streamdit.runtime.liveness import StopFlag
from streamdit.serve.access import Access
from streamdit.serve.app import ServerThread, build_app
from streamdit.serve.hub import FrameHub

log = logging.getLogger(__name__)


def keepalive_period(cfg: RunConfig) -> float:
    """NOOPs while paused: well inside the process-group timeout a blocked peer waits under."""
    return max(0.2, cfg.dist_timeout_s / 4)


def serve_rank0(
    cfg: RunConfig,
    stop: StopFlag,
    run: Callable[[LiveStream], RunSummary | None],
    *,
    host: str,
    port: int,
    start_paused: bool,
    record_video: bool,
) -> RunSummary | None:
    live = LiveStream(
        cfg.prompt,
        stop,
        keepalive_s=keepalive_period(cfg),
        start_paused=start_paused,
        record_video=record_video,
        prompt_check=live_prompt_check(cfg),
    )
    hub = FrameHub(cfg.fps)
    live.sinks.append(hub.publish)
    access = Access(bind_host=host, port=port)
    try:
        server = ServerThread(
            build_app(live, hub, access, height=cfg.height, width=cfg.width), hub, host=host, port=port
        )
    except OSError as exc:
        raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror} [field=port]") from exc
    access.port = server.port  # port 0: the one the kernel chose
    server.start()
    print(f"streamdit serve: {server.url}?token={access.token}", file=sys.stderr, flush=True)
    try:
        return run(live)
    except BaseException as exc:
        live.failure = f"{type(exc).__name__}: {exc}"[:300]
        raise
    finally:
        server.stop()
