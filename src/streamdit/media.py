"""Video in and out: PyAV for .mp4, a streaming lossless .npy writer, input-video reading.

Owns: `open_writer(path, ...)` returning a writer whose file is a valid video after every
`write()` returns — so Ctrl-C or a crash mid-stream (which reach `close()`) leaves every frame
written so far readable. The .mp4 is fragmented (a fragment per chunk: `empty_moov` +
`frag_keyframe`, a keyframe on each chunk's first frame, packets flushed as they are muxed), so
even a SIGKILL leaves a playable file holding every chunk but the newest, whose fragment closes
at the next chunk's keyframe. The .npy header is rewritten after each append.

`durable_frames` is what a reader of the file would find if the process died now (SIGKILL
included): every frame for .npy, every closed fragment's for .mp4 (all of them after
`close()`). What a stream claims (its metrics lines) follows it, never `frames_written`.
`abort()` (after a failed write) cuts the file back to its durable part, so a full disk leaves
no torn tail: the file decodes strictly.
`strict_frames` is the reader's side of that promise (tests, `streamdit matrix --chaos`): an
.npy must load whole; an .mp4 must be whole top-level boxes (ftyp, moov, then moof + mdat per
fragment, tiling the file exactly: a torn tail fails) whose every frame decodes.
Also `probe_video`, `count_video_frames` and `VideoSource` (decoded a chunk at a time) for
video-to-video input. Imports no other streamdit
layer besides errors.
"""

from __future__ import annotations

import ast
import contextlib
import itertools
import logging
import os
import struct
from collections.abc import Iterator
from fractions import Fraction
from pathlib import Path
from typing import Protocol

import av
import numpy as np

from streamdit.errors import ConfigError

log = logging.getLogger(__name__)

NPY_HEADER_LEN = 128  # fixed so the shape can be rewritten in place as frames are appended


class VideoWriter(Protocol):
    frames_written: int

    @property
    def durable_frames(self) -> int: ...

    def write(self, frames: np.ndarray) -> None: ...  # uint8 [T, H, W, 3]

    def close(self) -> None: ...

    def abort(self) -> None: ...


class NullWriter:
    """Counts frames and writes nothing (`serve` without `--out`: the browser is the output)."""

    def __init__(self) -> None:
        self.frames_written = 0

    @property
    def durable_frames(self) -> int:
        return self.frames_written

    def write(self, frames: np.ndarray) -> None:
        self.frames_written += int(frames.shape[0])

    def close(self) -> None:
        pass

    def abort(self) -> None:
        pass


class NpyWriter:
    """Lossless uint8 [T, H, W, 3] frames; the header always describes whole frames on disk."""

    def __init__(self, path: Path, height: int, width: int) -> None:
        self.path = path
        self.height = height
        self.width = width
        self.frames_written = 0
        self._fh = open(path, "wb")  # noqa: SIM115 - kept open across writes, closed in close()
        self._write_header()

    def _write_header(self) -> None:
        shape = (self.frames_written, self.height, self.width, 3)
        desc = f"{{'descr': '|u1', 'fortran_order': False, 'shape': {shape}, }}"
        prefix = b"\x93NUMPY\x01\x00"
        body_len = NPY_HEADER_LEN - len(prefix) - 2
        body = desc.ljust(body_len - 1).encode("latin1") + b"\n"
        self._fh.seek(0)
        self._fh.write(prefix + body_len.to_bytes(2, "little") + body)

    @property
    def durable_frames(self) -> int:
        return self.frames_written

    def write(self, frames: np.ndarray) -> None:
        _check_frames(frames, self.height, self.width)
        self._fh.seek(0, 2)
        self._fh.write(np.ascontiguousarray(frames).tobytes())
        self._fh.flush()  # the bytes first: the header never claims frames not in the file
        self.frames_written += frames.shape[0]
        self._write_header()
        self._fh.flush()

    def close(self) -> None:
        if not self._fh.closed:
            self._fh.close()

    def abort(self) -> None:
        """Drop a torn append: the file ends where its header's frames end."""
        size = NPY_HEADER_LEN + self.frames_written * self.height * self.width * 3
        with contextlib.suppress(OSError):  # its buffered bytes were the torn append
            self._fh.close()
        _truncate(self.path, size)


class Mp4Writer:
    """H.264 in a fragmented MP4: each chunk closes a fragment, so the file stays playable."""

    def __init__(self, path: Path, height: int, width: int, fps: int) -> None:
        self.path = path
        self.height = height
        self.width = width
        self.frames_written = 0
        self._container = av.open(
            str(path),
            mode="w",
            format="mp4",
            options={
                "movflags": "frag_keyframe+empty_moov+default_base_moof",
                "flush_packets": "1",
            },
        )
        stream = self._container.add_stream("libx264", rate=Fraction(fps, 1))
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        # zerolatency: no lookahead/B-frames, so packets leave the encoder as frames go in.
        stream.options = {"tune": "zerolatency", "crf": "18", "preset": "veryfast"}
        self._stream = stream
        self._muxed = 0  # packets (= frames) handed to the muxer
        self._durable = 0  # frames in closed fragments
        self._durable_bytes = 0  # the file's size when the last fragment closed

    @property
    def durable_frames(self) -> int:
        return self._durable

    def write(self, frames: np.ndarray) -> None:
        _check_frames(frames, self.height, self.width)
        for i, img in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(img), format="rgb24")
            frame.pict_type = av.video.frame.PictureType.I if i == 0 else av.video.frame.PictureType.NONE
            self._mux(self._stream.encode(frame))
        self.frames_written += frames.shape[0]

    def _mux(self, packets: list[av.Packet]) -> None:
        for packet in packets:
            keyframe = packet.is_keyframe
            self._container.mux(packet)
            if keyframe and self._muxed > 0:
                # the muxer wrote the fragment this keyframe closed, and flushed it (flush_packets)
                self._durable, self._durable_bytes = self._muxed, self.path.stat().st_size
            self._muxed += 1

    def close(self) -> None:
        if self._container is None:
            return
        try:
            self._mux(self._stream.encode(None))
        finally:
            self._container.close()
            self._container = None
        self._durable = self._muxed

    def abort(self) -> None:
        """After a failed write: close what can be closed and cut the file back to its last
        closed fragment (a torn fragment would fail a strict decode)."""
        if self._container is not None:
            with contextlib.suppress(av.FFmpegError, OSError):  # the full disk may fail this too
                self._container.close()
            self._container = None
        _truncate(self.path, self._durable_bytes)
        self.frames_written = self._durable


def check_output_path(path: Path, field: str) -> None:
    """Refuse, before any model work, an output file that cannot be written: a directory, or a
    folder that cannot be created or written to (a file is created there and removed)."""
    if path.is_dir():
        raise ConfigError(f"{field} {path} is a directory, not a file [field={field}]")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        probe = path.parent / f".streamdit-write-probe-{os.getpid()}"
        probe.touch()
        probe.unlink()
    except OSError as exc:
        raise ConfigError(
            f"{field} {path}: its folder cannot be written: {exc.strerror or exc} [field={field}]"
        ) from exc


def open_writer(path: Path, *, height: int, width: int, fps: int) -> VideoWriter:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".npy":
        return NpyWriter(path, height, width)
    return Mp4Writer(path, height, width, fps)


def _truncate(path: Path, size: int) -> None:
    try:
        os.truncate(path, size)
    except OSError as exc:  # never hide the write's own error behind this one
        log.error("could not cut %s back to %d bytes: %s", path, size, exc)


def _check_frames(frames: np.ndarray, height: int, width: int) -> None:
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[1:] != (height, width, 3):
        raise ValueError(f"frames must be uint8 [T, {height}, {width}, 3], got {frames.dtype} {frames.shape}")


def read_npy_header_shape(path: Path) -> tuple[int, ...]:
    """Shape recorded in a .npy header (used by tests and tools without loading the data)."""
    with open(path, "rb") as fh:
        head = fh.read(NPY_HEADER_LEN)
    return tuple(ast.literal_eval(head[10:].decode("latin1").strip())["shape"])


def probe_video(path: Path) -> int:
    """Open the input video and decode its first frame; returns the frame count if known.

    Raises ConfigError naming the file before any model work when it is missing or unreadable.
    """
    if not path.is_file():
        raise ConfigError(f"input video {path} does not exist [field=input_video]")
    try:
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            next(container.decode(stream))
            return int(stream.frames or 0)
    except (av.FFmpegError, IndexError, StopIteration, UnicodeDecodeError) as exc:
        raise ConfigError(f"input video {path} is not a readable video: {exc} [field=input_video]") from exc


def count_video_frames(path: Path) -> int:
    """How many frames the input video holds, from its packets (demuxed, not decoded)."""
    try:
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            return sum(1 for packet in container.demux(stream) if packet.size)
    except (av.FFmpegError, IndexError) as exc:
        raise ConfigError(f"input video {path} failed to read: {exc} [field=input_video]") from exc


class FrameSource(Protocol):
    """Where Phase A's video-to-video frames come from: a file (`VideoSource`) or frames that
    arrive while the stream runs (`runtime.live.LiveFrames`)."""

    def read(self, n: int) -> np.ndarray: ...  # the next n frames, uint8 [n, H, W, 3]

    def fresh(self) -> FrameSource: ...  # the same source from its start (a rehearsal's copy)

    def close(self) -> None: ...


class VideoSource:
    """An input video's frames decoded on demand, resized to height x width, as uint8
    [T, H, W, 3]: a stream holds one chunk's frames at a time, never the whole file.

    The file is opened at the first `read` (the constructor only records what to open) and
    closed at its end or by `close()`; `fresh()` is the same video from its first frame (a
    rehearsal must not consume the stream's frames). `loop` (serve): at its end the file starts
    over, so a live stream outlives its input file.
    """

    def __init__(self, path: Path, *, height: int, width: int, frames: int, loop: bool = False) -> None:
        self.path, self.height, self.width = path, height, width
        self.frames = frames  # counted at validation (`count_video_frames`)
        self.loop = loop
        self.position = 0
        self._container: av.container.InputContainer | None = None
        self._decoded: Iterator[av.VideoFrame] | None = None

    def fresh(self) -> VideoSource:
        return VideoSource(
            self.path, height=self.height, width=self.width, frames=self.frames, loop=self.loop
        )

    def read(self, n: int) -> np.ndarray:
        """The next `n` frames; ConfigError if the file holds fewer than it was counted with."""
        out = self._decode(n)
        if len(out) < n and self.loop:
            self.close()  # from its first frame again
            out += self._decode(n - len(out))
        if len(out) < n:
            raise ConfigError(
                f"input video {self.path} ended at frame {self.position + len(out)}; "
                f"{self.frames} were counted [field=input_video]"
            )
        self.position += n
        return np.stack(out)

    def _decode(self, n: int) -> list[np.ndarray]:
        if self._decoded is None:
            self._container = av.open(str(self.path))
            self._decoded = self._container.decode(video=0)
        out: list[np.ndarray] = []
        try:
            for frame in itertools.islice(self._decoded, n):
                out.append(frame.reformat(width=self.width, height=self.height, format="rgb24").to_ndarray())
        except av.FFmpegError as exc:
            raise ConfigError(f"input video {self.path} failed to decode: {exc} [field=input_video]") from exc
        return out

    def close(self) -> None:
        if self._container is not None:
            self._container.close()
        self._container = self._decoded = None


def count_mp4_frames(path: Path) -> int:
    """Decode every frame of a video file and count them (the honest check of validity)."""
    with av.open(str(path)) as container:
        return sum(1 for _ in container.decode(video=0))


def mp4_boxes(path: Path) -> list[tuple[str, int]]:
    """The file's top-level boxes (kind, size); ValueError when a box is torn or bytes stray."""
    data = path.read_bytes()
    boxes, at = [], 0
    while at < len(data):
        if at + 8 > len(data):
            raise ValueError(f"{path}: {len(data) - at} stray bytes at {at}")
        size, kind = struct.unpack(">I4s", data[at : at + 8])
        if size == 1:  # a 64-bit size follows
            size = struct.unpack(">Q", data[at + 8 : at + 16])[0]
        if size < 8 or at + size > len(data):
            raise ValueError(f"{path}: box {kind!r} at {at} torn ({size} bytes)")
        boxes.append((kind.decode("latin1"), size))
        at += size
    return boxes


def strict_frames(path: Path) -> int:
    """The frames a reader finds in a streamdit video, or ValueError if the file is not whole."""
    if path.suffix == ".npy":
        return int(np.load(path, mmap_mode="r").shape[0])
    kinds = [k for k, _ in mp4_boxes(path)]
    fragments = kinds[2:-1] if kinds[-1:] == ["mfra"] else kinds[2:]  # mfra: from a clean close
    if kinds[:2] != ["ftyp", "moov"] or fragments != ["moof", "mdat"] * (len(fragments) // 2):
        raise ValueError(f"{path}: top-level boxes {kinds} are not ftyp, moov, (moof, mdat)*")
    return count_mp4_frames(path)
