"""rank0 of `streamdit serve`: the HTTP server around one live `Stream` (streamdit.api).

Owns: `serve_rank0(...)`. It binds the port first (a taken port is a clear error before any model
work), starts the server thread, then runs the stream on this thread until stopped (live
prompts, pause with peer keepalives, frames to the hub). A stop from the page, the API or
SIGTERM drains the stream and shuts every rank down; the server is closed on every exit path.
"""

from __future__ import annotations

import logging
import sys

from streamdit.api import Stream
from streamdit.config import LaunchEnv, RunConfig
from streamdit.errors import ConfigError
from streamdit.runtime.driver import RunSummary
from streamdit.runtime.liveness import StopFlag
from streamdit.serve.access import Access
from streamdit.serve.app import MAX_INPUT_FRAME, MAX_WS_MESSAGE, ServerThread, build_app
from streamdit.serve.hub import FrameHub

log = logging.getLogger(__name__)


def serve_rank0(
    cfg: RunConfig, stop: StopFlag, launch: LaunchEnv, *, record_video: bool
) -> RunSummary | None:
    stream = Stream(
        cfg,
        until_stopped=True,
        start_paused=cfg.start_paused,
        record_video=record_video,
        stop=stop,
        launch=launch,
    )
    live = stream.live
    hub = FrameHub(cfg.fps)
    live.sinks.append(hub.publish)
    access = Access(bind_host=cfg.host, port=cfg.port)
    try:
        app = build_app(live, hub, access, height=cfg.height, width=cfg.width)
        limit = MAX_INPUT_FRAME if cfg.browser_input else MAX_WS_MESSAGE
        server = ServerThread(app, hub, host=cfg.host, port=cfg.port, max_message=limit)
    except OSError as exc:
        raise ConfigError(f"cannot listen on {cfg.host}:{cfg.port}: {exc.strerror} [field=port]") from exc
    access.port = server.port  # port 0: the one the kernel chose
    server.start()
    print(f"streamdit serve: {server.url}?token={access.token}", file=sys.stderr, flush=True)
    try:
        return stream.run()
    except BaseException as exc:
        live.failure = f"{type(exc).__name__}: {exc}"[:300]
        raise
    finally:
        server.stop()
