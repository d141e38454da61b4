"""Frame fan-out from the generation loop to browser clients, with per-client backpressure.

Owns: `FrameHub`. The rank0 loop hands every emitted chunk to `publish` (a sink of
`runtime.live.LiveStream`), which only enqueues: a bounded queue to one encoder thread that turns
each frame into JPEG bytes. The encoder offers every JPEG to every client's own bounded queue on
the server's event loop; a client whose queue is full loses that whole frame (counted for that
client only). Nothing a client does (reading slowly, reading nothing, vanishing) can block the
encoder, another client, or generation: the loop's cost is one `put_nowait` per chunk. A viewer
that connects gets the newest frame at once (a stream that is paused, or between two chunks,
is not a blank page).
"""

from __future__ import annotations

import asyncio
import io
import itertools
import json
import logging
import queue
import threading
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from streamdit.runtime.metrics import ChunkMetrics

log = logging.getLogger(__name__)

ENCODE_QUEUE_CHUNKS = 4  # chunks waiting for the encoder; beyond that the oldest is dropped
CLIENT_QUEUE_FRAMES = 48  # frames waiting for a client's window; beyond that it loses frames
CLIENT_WINDOW_FRAMES = 24  # frames sent to a client and not yet acknowledged by it
JPEG_QUALITY = 80


@dataclass
class Client:
    """One WebSocket viewer; its queue and credit live on the server's event loop.

    Flow control is the client's: it acknowledges the frames it received (a text message with
    its running count), and at most CLIENT_WINDOW_FRAMES go out unacknowledged. Kernel socket
    buffers alone would let a stalled viewer swallow megabytes of frames that it shows seconds
    late; with the window its backlog stays in its own bounded queue, where frames are dropped.
    """

    id: int
    # JPEG frames, and before each chunk's frames a text marker `{"chunk": k, "frames": n}`
    queue: asyncio.Queue[bytes | str] = field(default_factory=lambda: asyncio.Queue(CLIENT_QUEUE_FRAMES))
    credit: asyncio.Event = field(default_factory=asyncio.Event)
    sent: int = 0
    acked: int = 0
    dropped: int = 0
    input_frames: int = 0  # video-to-video frames it sent (--browser-input)
    input_rejected: int = 0

    def ack(self, count: int) -> None:
        if count > self.acked:
            self.acked = min(count, self.sent)
            self.credit.set()

    async def wait_for_window(self) -> None:
        while self.sent - self.acked >= CLIENT_WINDOW_FRAMES:
            self.credit.clear()
            await self.credit.wait()

    def offer(self, item: bytes | str) -> None:
        """On the event loop: enqueue, or drop this frame (or marker) for this client only."""
        try:
            self.queue.put_nowait(item)
        except asyncio.QueueFull:
            if isinstance(item, bytes):
                self.dropped += 1


class FrameHub:
    """Encodes emitted frames once and fans them out to every connected client."""

    def __init__(self, fps: int) -> None:
        self.fps = fps
        self._chunks: queue.Queue[tuple[np.ndarray, int] | None] = queue.Queue()
        self._clients: dict[int, Client] = {}
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread = threading.Thread(target=self._encode_loop, name="jpeg-encoder", daemon=True)
        self.last_jpeg: bytes | None = None  # what a new viewer sees first
        self.frames_encoded = 0
        self.chunks_dropped = 0  # the encoder fell behind generation (whole chunks, every client)

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._thread.start()

    def close(self) -> None:
        self._chunks.put(None)
        if self._thread.is_alive():
            self._thread.join(timeout=5.0)

    # ---- generation side -------------------------------------------------------------------

    def publish(self, frames: np.ndarray, record: ChunkMetrics) -> None:
        """The LiveStream sink: never blocks the generation loop."""
        while self._chunks.qsize() >= ENCODE_QUEUE_CHUNKS:
            try:
                self._chunks.get_nowait()
                self.chunks_dropped += 1
            except queue.Empty:
                break
        self._chunks.put((frames, record.chunk_index))

    # ---- clients (event loop side) -----------------------------------------------------------

    def connect(self) -> Client:
        """On the event loop: a new viewer, its queue already holding the newest frame."""
        client = Client(id=next(self._ids))
        with self._lock:
            self._clients[client.id] = client
            last = self.last_jpeg
        if last is not None:
            client.offer(last)
        return client

    def viewers(self) -> int:
        with self._lock:
            return len(self._clients)

    def disconnect(self, client: Client) -> None:
        with self._lock:
            self._clients.pop(client.id, None)

    def stats(self) -> dict[str, object]:
        with self._lock:
            clients = [
                {
                    "id": c.id,
                    "sent": c.sent,
                    "acked": c.acked,
                    "dropped": c.dropped,
                    "input_frames": c.input_frames,
                    "input_rejected": c.input_rejected,
                }
                for c in self._clients.values()
            ]
        return {
            "clients": clients,
            "frames_encoded": self.frames_encoded,
            "encoder_chunks_dropped": self.chunks_dropped,
        }

    # ---- encoder thread ---------------------------------------------------------------------

    def _encode_loop(self) -> None:
        while (item := self._chunks.get()) is not None:
            frames, chunk_index = item
            # the page paces playback to when chunks arrive (it sees generation's rate, not --fps)
            self._fan_out(json.dumps({"chunk": chunk_index, "frames": int(frames.shape[0])}))
            for frame in frames:
                jpeg = encode_jpeg(frame)
                self.frames_encoded += 1
                self._fan_out(jpeg)

    def _fan_out(self, item: bytes | str) -> None:
        with self._lock:
            if isinstance(item, bytes):
                self.last_jpeg = item
            clients = list(self._clients.values())
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        for client in clients:
            try:
                loop.call_soon_threadsafe(client.offer, item)
            except RuntimeError:  # the loop closed under us (server stopping)
                return


def decode_input_frame(data: bytes, *, height: int, width: int) -> np.ndarray:
    """A viewer's input frame (JPEG, PNG or WebP) as uint8 [height, width, 3], resized to the
    stream's geometry; ValueError when it is not an image."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            if image.format not in ("JPEG", "PNG", "WEBP"):
                raise ValueError(f"{image.format} images are not taken")
            rgb = image.convert("RGB")
            if rgb.size != (width, height):
                rgb = rgb.resize((width, height), Image.Resampling.BILINEAR)
            return np.asarray(rgb, dtype=np.uint8).copy()
    except (OSError, Image.DecompressionBombError) as exc:
        raise ValueError(f"not an image: {exc}") from exc


def encode_jpeg(frame: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(frame).save(buf, format="JPEG", quality=JPEG_QUALITY)
    return buf.getvalue()
