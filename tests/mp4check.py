"""A strict check of a fragmented MP4 written by streamdit: whole boxes only, every frame decodes.

`strict_frames(path)` walks the file's top-level boxes (ftyp, moov, then moof + mdat per
fragment): every box's declared size must fit, and the boxes must tile the file exactly, so a
torn tail (half a fragment, left by a failed or killed write) fails; then it decodes every
frame with PyAV and returns how many there were.
"""

from __future__ import annotations

import struct
from pathlib import Path

from streamdit.media import count_mp4_frames


def top_level_boxes(path: Path) -> list[tuple[str, int]]:
    data = path.read_bytes()
    boxes, at = [], 0
    while at < len(data):
        assert at + 8 <= len(data), f"{path}: {len(data) - at} stray bytes at {at}"
        size, kind = struct.unpack(">I4s", data[at : at + 8])
        if size == 1:  # a 64-bit size follows
            size = struct.unpack(">Q", data[at + 8 : at + 16])[0]
        assert size >= 8 and at + size <= len(data), f"{path}: box {kind!r} at {at} torn ({size} bytes)"
        boxes.append((kind.decode("latin1"), size))
        at += size
    return boxes


def strict_frames(path: Path) -> int:
    kinds = [k for k, _ in top_level_boxes(path)]
    assert kinds[:2] == ["ftyp", "moov"], kinds
    fragments = kinds[2:-1] if kinds[-1] == "mfra" else kinds[2:]  # mfra: written by a clean close
    assert fragments == ["moof", "mdat"] * (len(fragments) // 2), kinds
    return count_mp4_frames(path)
