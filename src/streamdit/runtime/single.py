"""The `single` topology: Phase A, B and C of every chunk in one process, no transport.

Owns: `run_single(cfg)`: brings up Phase B (`PhaseB`, no group) and the rank0 parts (Stage0),
then runs the shared chunk loop (`driver.drive`) with no publish hook; and `build_stage0`, the
rank0 parts every topology's rank0 uses.
"""

from __future__ import annotations

import logging

from streamdit.config import RunConfig
from streamdit.model.scheduler import FlowMatchScheduler
from streamdit.runtime.build import (
    ValidatedRun,
    build_stage0_parts,
    compiles_decoder,
    open_input_video,
    validate_run,
)
from streamdit.runtime.driver import RunSummary, drive
from streamdit.runtime.faults import FaultPlan
from streamdit.runtime.live import LiveStream
from streamdit.runtime.liveness import StopFlag
from streamdit.runtime.phase_b import PhaseB
from streamdit.runtime.stage0 import Stage0
from streamdit.runtime.startup import StartupProgress

log = logging.getLogger(__name__)

__all__ = ["LIVE_CHUNKS", "RunSummary", "build_stage0", "run_single"]
LIVE_CHUNKS = 10**12  # serve: "until stopped" (a chunk loop bound no stream reaches)


def build_stage0(run: ValidatedRun, live: LiveStream | None = None) -> tuple[Stage0, int]:
    """Rank0's Phase A/C parts (text encoder, VAE, input video) and the chunk count.

    `live` (the API, serve): prompts come from its live timeline unless it follows the run's
    timeline file; `until_stopped` streams run until stopped, an input file starting over at
    its end; with browser input, Phase A reads the frames the page sends."""
    until_stopped = live is not None and live.until_stopped
    input_video, chunks = open_input_video(run, loop=until_stopped)
    if live is not None and live.input_frames is not None:
        input_video = live.input_frames  # frames the page sends while the stream runs
    if until_stopped:
        chunks = LIVE_CHUNKS
    stage = "building the text encoder and the VAE"
    if compiles_decoder(run):
        stage += " (compiling its decoder and warming it up)"
    with StartupProgress.for_rank(run.cfg, 0).stage(stage):
        text, vae, tiny = build_stage0_parts(run)
    stage0 = Stage0(
        run.cfg,
        timeline=live.timeline if live is not None and live.timeline is not None else run.timeline,
        text_encoder=text,
        vae=vae,
        tiny_decoder=tiny,
        scheduler=FlowMatchScheduler(shift=run.cfg.shift, warp=run.cfg.recipe_spec.warp_timesteps),
        device=run.device,
        dtype=run.dtype,
        input_video=input_video,
    )
    return stage0, chunks


def run_single(cfg: RunConfig, stop: StopFlag | None = None, live: LiveStream | None = None) -> RunSummary:
    run = validate_run(cfg)
    faults = FaultPlan.from_config(cfg)
    phase_b = PhaseB.bring_up(run, faults=faults, rank=0)
    stage0, chunks = build_stage0(run, live)
    log.info(
        "single: preset=%s %dx%d chunks=%d device=%s dtype=%s attn=%s norms=%s",
        cfg.preset,
        cfg.height,
        cfg.width,
        chunks,
        run.device,
        cfg.dtype,
        run.attn_backend,
        run.norm_kernels,
    )
    return drive(
        cfg,
        chunks=chunks,
        stage0=stage0,
        phase_b=phase_b,
        device=run.device,
        faults=faults,
        stop=stop or StopFlag(),
        live=live,
    )
