"""Video writers stay valid after every write; the .npy header never claims unwritten frames;
an input video is read a chunk at a time (equal to a whole decode, never held whole)."""

from __future__ import annotations

import tracemalloc
from pathlib import Path

import av
import numpy as np
import pytest

from streamdit.errors import ConfigError
from streamdit.media import (
    VideoSource,
    count_mp4_frames,
    count_video_frames,
    open_writer,
    probe_video,
    read_npy_header_shape,
    strict_frames,
)


def _frames(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 32, 48, 3), dtype=np.uint8)


def test_npy_is_lossless_and_valid_between_writes(tmp_path: Path) -> None:
    path = tmp_path / "v.npy"
    w = open_writer(path, height=32, width=48, fps=16)
    a, b = _frames(9, 0), _frames(12, 1)
    w.write(a)
    assert np.array_equal(np.load(path), a)  # readable before close
    w.write(b)
    w.close()
    assert np.array_equal(np.load(path), np.concatenate([a, b]))
    assert read_npy_header_shape(path) == (21, 32, 48, 3)


def test_mp4_fragments_are_readable_before_close(tmp_path: Path) -> None:
    path = tmp_path / "v.mp4"
    w = open_writer(path, height=32, width=48, fps=16)
    w.write(_frames(9, 0))
    w.write(_frames(12, 1))
    w.write(_frames(12, 2))
    # without close(): every chunk but the newest is on disk as a closed fragment (what SIGKILL
    # would leave); the newest fragment closes at the next chunk's keyframe or at close()
    assert count_mp4_frames(path) == 21
    w.close()
    assert count_mp4_frames(path) == 33
    assert probe_video(path) in (0, 33)
    assert count_video_frames(path) == 33 == strict_frames(path)


def _whole_decode(path: Path, height: int, width: int) -> np.ndarray:
    """The oracle: PyAV's own decode of every frame, resized like the source resizes."""
    with av.open(str(path)) as container:
        return np.stack(
            [
                f.reformat(width=width, height=height, format="rgb24").to_ndarray()
                for f in container.decode(video=0)
            ]
        )


def _video(path: Path, chunks: int, height: int = 32, width: int = 48) -> Path:
    w = open_writer(path, height=height, width=width, fps=16)
    for k in range(chunks):
        w.write(np.random.default_rng(k).integers(0, 256, (12, height, width, 3), dtype=np.uint8))
    w.close()
    return path


def test_video_source_reads_chunk_by_chunk_what_a_whole_decode_gives(tmp_path: Path) -> None:
    path = _video(tmp_path / "in.mp4", 4)
    source = VideoSource(path, height=16, width=24, frames=count_video_frames(path))
    chunks = [source.read(9), source.read(12), source.read(12)]
    again = source.fresh()  # a rehearsal's own copy starts at frame 0, the stream's goes on
    assert np.array_equal(again.read(9), chunks[0])
    chunks.append(source.read(12))
    assert source.position == 45
    assert np.array_equal(np.concatenate(chunks), _whole_decode(path, 16, 24)[:45])
    with pytest.raises(ConfigError, match=r"ended at frame 48; 48 were counted \[field=input_video\]"):
        source.read(12)
    source.close()
    again.close()


def test_a_looping_video_source_starts_over_at_its_end(tmp_path: Path) -> None:
    path = _video(tmp_path / "in.mp4", 2)  # 24 frames
    whole = _whole_decode(path, 16, 24)
    source = VideoSource(path, height=16, width=24, frames=24, loop=True)
    read = np.concatenate([source.read(9), source.read(12), source.read(12), source.read(12)])
    assert np.array_equal(read, np.concatenate([whole, whole[:21]]))  # 45 frames from a 24-frame file
    assert source.fresh().loop
    source.close()


def test_video_source_holds_one_chunk_not_the_video(tmp_path: Path) -> None:
    """A 600-frame input (38 MB decoded at 128x160) streamed in 12-frame chunks: the Python
    heap never holds more than a few chunks' worth (a whole decode would peak above 38 MB)."""
    path = _video(tmp_path / "long.mp4", 50, height=128, width=160)
    source = VideoSource(path, height=128, width=160, frames=count_video_frames(path))
    chunk_bytes = 12 * 128 * 160 * 3
    tracemalloc.start()
    try:
        for _ in range(50):
            source.read(12)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
        source.close()
    assert source.position == 600
    assert peak < 4 * chunk_bytes, f"peak {peak / 1e6:.1f} MB while streaming"


def test_writer_rejects_wrong_frames(tmp_path: Path) -> None:
    w = open_writer(tmp_path / "v.npy", height=32, width=48, fps=16)
    with pytest.raises(ValueError, match="uint8"):
        w.write(np.zeros((2, 32, 48, 3), np.float32))
    w.close()


def test_probe_rejects_garbage(tmp_path: Path) -> None:
    bad = tmp_path / "x.mp4"
    bad.write_bytes(b"\x00" * 100)
    with pytest.raises(ConfigError, match="x.mp4"):
        probe_video(bad)
