"""The `single` topology: Phase A, B and C of every chunk in one process, no transport.

Owns: `run_single(cfg)`, the loop that TP and PP later split across ranks: the same Stage0
(A + C) and GeneratorRunner (B) objects, called directly. The output file and the metrics file
are closed in `finally`, so a crash or Ctrl-C leaves every decoded frame in a valid video.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from streamdit.config import RunConfig
from streamdit.media import open_writer
from streamdit.model.scheduler import FlowMatchScheduler
from streamdit.runtime.build import (
    build_generator,
    build_stage0_parts,
    load_input_frames,
    validate_run,
)
from streamdit.runtime.faults import FaultPlan
from streamdit.runtime.liveness import StopFlag
from streamdit.runtime.metrics import ChunkMetrics, MetricsWriter, Progress
from streamdit.runtime.stage0 import Stage0

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True, slots=True)
class RunSummary:
    chunks: int
    frames: int
    out: Path
    seconds: float
    stopped_early: str = ""  # the drain reason when a stop request ended the stream


def _sync(device: torch.device) -> None:
    # Phase timings must include the device work they launched.
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_single(cfg: RunConfig, stop: StopFlag | None = None) -> RunSummary:
    stop = stop or StopFlag()
    t_start = time.monotonic()
    run = validate_run(cfg)
    faults = FaultPlan.from_config(cfg)
    input_frames, chunks = load_input_frames(run)
    runner = build_generator(run)
    runner.extra_calls = faults.extra_generator_calls
    text, vae = build_stage0_parts(run)
    stage0 = Stage0(
        cfg,
        timeline=run.timeline,
        text_encoder=text,
        vae=vae,
        scheduler=FlowMatchScheduler(shift=cfg.shift),
        device=run.device,
        dtype=run.dtype,
        input_frames=input_frames,
    )
    log.info(
        "single: preset=%s %dx%d chunks=%d device=%s dtype=%s attn=%s",
        cfg.preset,
        cfg.height,
        cfg.width,
        chunks,
        run.device,
        cfg.dtype,
        run.attn_backend,
    )
    writer = open_writer(cfg.out, height=cfg.height, width=cfg.width, fps=cfg.fps)
    metrics = MetricsWriter(cfg.metrics)
    progress = Progress(chunks, enabled=cfg.progress)
    try:
        for k in range(chunks):
            if stop.requested:
                log.warning("single: draining after %d chunks (%s)", k, stop.reason)
                break
            t0 = time.perf_counter()
            ids, inputs, notes = stage0.prepare(k)
            _sync(run.device)
            t1 = time.perf_counter()
            faults.before_generator(k)
            calls_before = runner.calls_made
            latents = runner.run(inputs, ids)
            _sync(run.device)
            t2 = time.perf_counter()
            frames = stage0.finish(latents)
            writer.write(frames)
            t3 = time.perf_counter()
            metrics.write(
                ChunkMetrics(
                    chunk_index=ids.chunk_index,
                    cache_epoch=ids.cache_epoch,
                    call_id=ids.call_id,
                    frames=int(frames.shape[0]),
                    generator_calls=runner.calls_made - calls_before,
                    phase_a_ms=(t1 - t0) * 1e3,
                    phase_b_ms=(t2 - t1) * 1e3,
                    phase_c_ms=(t3 - t2) * 1e3,
                    transition=notes.transition,
                    kv_recompute=inputs.do_kv_recompute,
                )
            )
            progress.update(k + 1, writer.frames_written)
            if faults.slow_chunk_ms:
                time.sleep(faults.slow_chunk_ms / 1e3)
    finally:
        progress.close()
        writer.close()
        metrics.close()
    return RunSummary(
        chunks=len(metrics.records),
        frames=writer.frames_written,
        out=cfg.out,
        seconds=time.monotonic() - t_start,
        stopped_early=stop.reason if stop.requested else "",
    )
