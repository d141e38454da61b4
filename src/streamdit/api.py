"""The public Python API: `Stream`, one video generated chunk by chunk, steered while it runs.

Owns: `Stream` and `Chunk`. A `Stream` is built from a `RunConfig` and runs the topology the
config names in this process (`single`, or this rank's part of a `tp` / `pp` job whose ranks a
launcher such as torchrun started); `streamdit run` and `streamdit serve` are built on it.

    from pathlib import Path
    import streamdit

    config = streamdit.RunConfig(chunks=4, out=Path("out/api.mp4"))
    with streamdit.Stream(config) as stream:
        for chunk in stream:  # rank0: each chunk once its frames are written, in order
            print(chunk.index, chunk.frames.shape)  # uint8 [T, H, W, 3]
            if chunk.index == 1:
                stream.set_prompt("a lighthouse at dusk", transition="soft")
    print(stream.summary.fps)

Two ways to drive it: `run()` generates on the calling thread until the stream ends and returns
its summary (what the CLI does; frames go to `config.out` only); iterating generates on a
background thread and hands every chunk to the caller as well. Iteration is lossless: a caller
slower than generation slows generation down (the writer's bounded queue fills), it never skips
a chunk. `set_prompt`, `pause`, `resume`, `stop` and `status` may be called from any thread.
Leaving the `with` block (or `close()`) stops the stream at the next chunk boundary and waits for
it: the video is closed whole, and an error of the stream is raised there if iteration did not
raise it already. Thread model: one generation thread (the caller's for `run()`); the writer
thread delivers chunks through a bounded queue of `DELIVERY_DEPTH`.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from streamdit.config import LaunchEnv, RunConfig
from streamdit.errors import ConfigError
from streamdit.runtime.driver import RunSummary
from streamdit.runtime.live import LiveFrames, LiveStream, keepalive_period
from streamdit.runtime.liveness import StopFlag
from streamdit.runtime.metrics import ChunkMetrics

__all__ = ["Chunk", "Stream"]
log = logging.getLogger(__name__)

DELIVERY_DEPTH = 2  # chunks written but not yet taken by the caller
STOPPED_BY_CALLER = "stopped by the caller"
_END = object()
_POLL_S = 0.1


@dataclass(frozen=True, slots=True)
class Chunk:
    """One written chunk: its frames (uint8 `[T, H, W, 3]`, the caller's to keep) and its metrics."""

    index: int
    frames: np.ndarray
    metrics: ChunkMetrics


class Stream:
    """A video generated chunk by chunk (see the module docstring)."""

    def __init__(
        self,
        config: RunConfig,
        *,
        until_stopped: bool = False,
        start_paused: bool = False,
        record_video: bool = True,
        stop: StopFlag | None = None,
        launch: LaunchEnv | None = None,
    ) -> None:
        """`until_stopped`: ignore `config.chunks` and run until `stop()` (or the input video's
        end); `record_video`: write `config.out`; `stop`: a flag the caller's signal handlers set
        (the CLI's); `launch`: this process's rank (default: read from the environment)."""
        self.config = config
        self.launch = launch if launch is not None else LaunchEnv.from_environ()
        self.live = LiveStream(
            config.prompt,
            stop if stop is not None else StopFlag(),
            keepalive_s=keepalive_period(config.dist_timeout_s),
            start_paused=start_paused,
            record_video=record_video,
            prompt_check=self._check_prompt,
            until_stopped=until_stopped,
            steerable=config.timeline is None,
            input_frames=LiveFrames(config.height, config.width) if config.browser_input else None,
        )
        self.summary: RunSummary | None = None
        """rank0's summary once the stream ended (None on a generator-only rank)."""
        self._chunks: queue.Queue[object] = queue.Queue(maxsize=DELIVERY_DEPTH)
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._raised = False
        self._closed = threading.Event()
        self._prompt_check: object = None  # loaded at the first prompt change (embeddings table)

    # ---- driving ----------------------------------------------------------------------------

    def run(self) -> RunSummary | None:
        """Generate on this thread until the stream ends; rank0's summary (None elsewhere)."""
        if self._thread is not None:
            raise RuntimeError("this stream is already being iterated")
        self.summary = self._run_topology()
        return self.summary

    def __iter__(self) -> Iterator[Chunk]:
        if self._thread is not None:
            raise RuntimeError("a stream is iterated once")
        self.live.sinks.append(self._deliver)
        self._thread = threading.Thread(target=self._generate, name="streamdit-stream", daemon=True)
        self._thread.start()
        try:
            while True:
                item = self._chunks.get()
                if item is _END:
                    break
                assert isinstance(item, Chunk)
                yield item
        finally:  # the caller left the loop early too (break, an exception): stop and wait
            self.close()

    def _generate(self) -> None:
        try:
            self.summary = self._run_topology()
        except BaseException as exc:  # noqa: BLE001 - handed to the iterating thread
            self._error = exc
        finally:
            self._put(_END, always=True)

    def _run_topology(self) -> RunSummary | None:
        cfg, launch, stop = self.config, self.launch, self.live.stop
        if cfg.topology != "single" and not launch.launched:
            raise ConfigError(
                f"--topology {cfg.topology} runs one rank per process: start the ranks with a "
                "launcher (torchrun, or `streamdit run --nproc N`) [field=topology]"
            )
        if cfg.topology == "tp":
            from streamdit.runtime.tp import run_tp

            return run_tp(cfg, launch, stop, self.live)
        if cfg.topology == "pp":
            from streamdit.runtime.pp import run_pp

            return run_pp(cfg, launch, stop, self.live)
        from streamdit.runtime.single import run_single

        return run_single(cfg, stop, self.live)

    def _deliver(self, frames: np.ndarray, record: ChunkMetrics) -> None:
        """On the writer thread: hand a written chunk to the caller (waits while it lags)."""
        self._put(Chunk(index=record.chunk_index, frames=frames, metrics=record))

    def _put(self, item: object, *, always: bool = False) -> None:
        while not self._closed.is_set() or always:
            try:
                self._chunks.put(item, timeout=_POLL_S)
                return
            except queue.Full:
                if always and self._closed.is_set():
                    self._drain()  # nobody takes chunks any more: make room for the end mark

    def _drain(self) -> None:
        while True:
            try:
                self._chunks.get_nowait()
            except queue.Empty:
                return

    # ---- steering (any thread) --------------------------------------------------------------

    def _check_prompt(self, prompt: str) -> None:
        """With precomputed embeddings, a new prompt must have one (ConfigError naming it)."""
        if self._prompt_check is None:
            from streamdit.runtime.build import live_prompt_check

            self._prompt_check = live_prompt_check(self.config) or (lambda _: None)
        self._prompt_check(prompt)  # type: ignore[operator]

    def set_prompt(
        self, prompt: str, transition: str = "soft", *, replace: bool = False
    ) -> dict[str, object]:
        """Change the prompt at the next chunk boundary: "soft" blends over the recipe's
        blend_chunks chunks, "hard" cuts (a new cache epoch). While one change waits for that
        boundary another is refused (`runtime.live.PendingChange`) unless `replace`."""
        return self.live.submit(prompt, transition, replace=replace)

    def cancel_prompt(self) -> str | None:
        """Withdraw the change waiting for the next boundary; its prompt, or None."""
        return self.live.cancel()["cancelled"]  # type: ignore[return-value]

    def pause(self) -> None:
        """Hold at the next chunk boundary (peers kept alive) until `resume()` or `stop()`."""
        self.live.pause()

    def resume(self) -> None:
        self.live.resume()

    def stop(self, reason: str = STOPPED_BY_CALLER) -> None:
        """Drain: the chunk in flight is finished and written, then the stream ends (idempotent)."""
        self.live.request_stop(reason)

    def status(self) -> dict[str, object]:
        """State, prompt (and a pending one), FPS and chunk period p50 / p99 (pauses excluded)."""
        return self.live.status()

    # ---- lifetime ---------------------------------------------------------------------------

    def close(self) -> None:
        """Stop (if still running), wait for the stream to end, raise its error if not raised."""
        if self._thread is not None and self._thread.is_alive():
            self.stop()
            self._closed.set()
            self._drain()
            self._thread.join()
        self._closed.set()
        if self._error is not None and not self._raised:
            self._raised = True
            raise self._error

    def __enter__(self) -> Stream:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc is None:
            self.close()
            return
        try:
            self.close()
        except BaseException as also:  # noqa: BLE001 - the caller's own error is the one raised
            log.warning("the stream failed too, while the caller's error ended it: %r", also)
