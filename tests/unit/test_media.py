"""Video writers stay valid after every write; the .npy header never claims unwritten frames."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from streamdit.errors import ConfigError
from streamdit.media import (
    count_mp4_frames,
    open_writer,
    probe_video,
    read_npy_header_shape,
    read_video_frames,
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
    assert read_video_frames(path, height=16, width=16, max_frames=5).shape == (5, 16, 16, 3)


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
