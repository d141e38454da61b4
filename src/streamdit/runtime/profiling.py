"""`--profile`: a torch.profiler trace of a window of rank0's chunks.

Owns: `ChunkProfiler`, which the chunk loop (`driver.drive`) calls at every chunk boundary. It
starts the profiler (CPU ops and, on a GPU, every kernel) before chunk `first` and stops it
before chunk `first + count`, once the device has finished the window, then writes a Chrome trace
(open it in Perfetto or chrome://tracing; `bench/profile_stream.py` reads the device timeline
from the loop's `streamdit.*` ranges). A stream that ends cleanly inside the window writes what
it ran; one that fails leaves the profile unwritten (waiting for a device that may be stuck
would turn a crash into a hang). The profiler records the ops of the thread that starts it, so
it runs on the loop's thread; used as a context manager around the loop.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

log = logging.getLogger(__name__)


class ChunkProfiler:
    """Profiles chunks `[first, first + count)` of one stream into `path` (None: does nothing)."""

    def __init__(self, path: Path | None, *, first: int, count: int, device: torch.device) -> None:
        self.path = path
        self.first = first
        self.count = count
        self.device = device
        self._prof: profile | None = None

    def at_chunk(self, chunk_index: int) -> None:
        """Called at each chunk boundary, before the chunk's Phase A."""
        if self.path is None:
            return
        if chunk_index == self.first and self._prof is None:
            activities = [ProfilerActivity.CPU]
            if self.device.type == "cuda":
                activities.append(ProfilerActivity.CUDA)
            self._prof = profile(activities=activities)
            self._prof.__enter__()
        elif chunk_index == self.first + self.count:
            self.close()

    def __enter__(self) -> ChunkProfiler:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None:
            self.close()
        elif self._prof is not None:
            log.warning("the stream failed inside the profiled window: no profile written")
            self._prof = None

    def close(self) -> None:
        """Stop and write the trace (idempotent)."""
        prof, self._prof = self._prof, None
        if prof is None or self.path is None:
            return
        if self.device.type == "cuda":  # the window's kernels are in the trace only once done
            torch.cuda.current_stream(self.device).synchronize()
        prof.__exit__(None, None, None)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        prof.export_chrome_trace(str(self.path))
        log.info("profile of chunks %d..%d written to %s", self.first, self.first + self.count - 1, self.path)
