"""Turning a RunConfig into objects: validation first, then the model parts each role needs.

Owns: `validate_run(cfg)` — every check that can reject user input (preset, geometry, timeline,
input video, checkpoint keys and shapes against a meta-device model) runs here, before any
weight is allocated or any model work starts; `build_generator` (Phase B parts, for every
generator rank) and `build_stage0_parts` (text encoder + VAE, rank0 only: workers never
construct them). Constructors only allocate; nothing here runs inference or a collective.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from streamdit.config import RunConfig
from streamdit.errors import ConfigError
from streamdit.media import probe_video, read_video_frames
from streamdit.model.attention import resolve_attention_backend
from streamdit.model.dit import CausalWanDiT
from streamdit.model.presets import DiTConfig, get_dit_config
from streamdit.model.scheduler import FlowMatchScheduler, validate_step_list
from streamdit.model.text import HashTextEncoder
from streamdit.model.vae import CausalVideoVAE, get_vae_config, pixel_frames
from streamdit.model.weights import check_safetensors, load_safetensors_into
from streamdit.runtime.compile_health import CompileProbe
from streamdit.runtime.generator import CacheGeometry, GeneratorRunner
from streamdit.runtime.timeline import Timeline

DTYPE_BY_NAME = {"float32": torch.float32, "bfloat16": torch.bfloat16}
TEXT_SEED_OFFSET = 1  # text encoder and VAE weights get seeds distinct from the DiT's
VAE_SEED_OFFSET = 2


@dataclass(frozen=True, kw_only=True, slots=True)
class ValidatedRun:
    """The result of validation: everything derived from user input, nothing allocated."""

    cfg: RunConfig
    dit: DiTConfig
    device: torch.device
    dtype: torch.dtype
    attn_backend: str
    timeline: Timeline
    chunks: int


def resolve_device(name: str) -> torch.device:
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise ConfigError(f"invalid device {name!r}: {exc} [field=device]") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} requested but CUDA is not available [field=device]")
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"device type {device.type!r} is not supported (cpu, cuda) [field=device]")
    return device


def validate_run(cfg: RunConfig, *, generator_only: bool = False) -> ValidatedRun:
    """Reject bad input with a ConfigError naming the field (and file / key), before model work.

    `generator_only` (TP workers): skip what only rank0 touches (VAE, timeline, input video), so
    a worker never opens those files.
    """
    dit = get_dit_config(cfg.preset)
    device = resolve_device(cfg.device)
    dtype = DTYPE_BY_NAME[cfg.dtype]
    backend = resolve_attention_backend(cfg.attn_backend, device, dtype)
    validate_step_list(cfg.denoising_step_list)
    if cfg.checkpoint is not None:
        check_safetensors(_meta_dit(dit), cfg.checkpoint)
    timeline = Timeline.single(cfg.prompt)
    if not generator_only:
        timeline = _validate_stage0_inputs(cfg, dtype)
    return ValidatedRun(
        cfg=cfg,
        dit=dit,
        device=device,
        dtype=dtype,
        attn_backend=backend,
        timeline=timeline,
        chunks=cfg.chunks,
    )


def _validate_stage0_inputs(cfg: RunConfig, dtype: torch.dtype) -> Timeline:
    get_vae_config(cfg.vae_preset)
    timeline = Timeline.load(cfg.timeline) if cfg.timeline else Timeline.single(cfg.prompt)
    if cfg.input_video is not None:
        probe_video(cfg.input_video)
    if cfg.vae_checkpoint is not None:
        meta_vae = CausalVideoVAE(get_vae_config(cfg.vae_preset), device=torch.device("meta"), dtype=dtype)
        check_safetensors(meta_vae, cfg.vae_checkpoint)
    return timeline


def _meta_dit(dit: DiTConfig) -> CausalWanDiT:
    return CausalWanDiT(dit, device=torch.device("meta"), dtype=torch.float32, attn_backend="math")


def build_model(run: ValidatedRun) -> CausalWanDiT:
    """The full (unsharded) DiT with checkpoint or seeded weights; TP shards it afterwards."""
    model = CausalWanDiT(run.dit, device=run.device, dtype=run.dtype, attn_backend=run.attn_backend)
    if run.cfg.checkpoint is not None:
        load_safetensors_into(model, run.cfg.checkpoint)
    else:
        model.init_weights(run.cfg.seed)
    return model.eval()


def build_generator(run: ValidatedRun, model: CausalWanDiT | None = None) -> GeneratorRunner:
    """Phase B for one rank: the (possibly already sharded) model, its caches, the scheduler.

    The KV cache is sized from the model's local head count, so build it after sharding.
    """
    cfg = run.cfg
    model = model if model is not None else build_model(run)
    probe = None
    if cfg.compile:
        # One compiled generator per process: a previous model's cache entries would count
        # against dynamo's recompile limit and push these blocks back to eager.
        torch._dynamo.reset()
        probe = CompileProbe(cfg.compile_backend, cfg.compile_mode)
        # forward keeps the cache bookkeeping eager; each block is compiled (one shared graph,
        # static shapes once the window is full: see CausalWanDiT.compile_blocks). fullgraph
        # off: a break is counted and judged by compile_health's budget (C-02), with dynamo's
        # reasons, instead of an exception at the first trace.
        model.compile_blocks(backend=probe, fullgraph=False)
    runner = GeneratorRunner(
        model,
        scheduler=FlowMatchScheduler(shift=cfg.shift),
        geometry=CacheGeometry(height=cfg.height, width=cfg.width),
        capacity_frames=cfg.local_attn_frames,
        sink_frames=cfg.sink_frames,
        device=run.device,
        dtype=run.dtype,
        latent_anchor_frames=cfg.context_frames if cfg.recompute == "r0" else 0,
    )
    runner.compile_probe = probe
    return runner


def build_stage0_parts(run: ValidatedRun) -> tuple[HashTextEncoder, CausalVideoVAE]:
    cfg = run.cfg
    text = HashTextEncoder(
        run.dit.text_dim,
        run.dit.text_len,
        seed=cfg.seed + TEXT_SEED_OFFSET,
        device=run.device,
        dtype=run.dtype,
    )
    vae = CausalVideoVAE(get_vae_config(cfg.vae_preset), device=run.device, dtype=run.dtype)
    if cfg.vae_checkpoint is not None:
        load_safetensors_into(vae, cfg.vae_checkpoint)
    else:
        vae.init_weights(cfg.seed + VAE_SEED_OFFSET)
    vae.eval()
    return text, vae


def load_input_frames(run: ValidatedRun) -> tuple[np.ndarray | None, int]:
    """Input video frames for v2v and how many chunks they cover (ConfigError if none)."""
    cfg = run.cfg
    if cfg.input_video is None:
        return None, run.chunks
    f = cfg.frames_per_chunk
    first, later = pixel_frames(f, first_chunk=True), pixel_frames(f, first_chunk=False)
    need = first + later * (run.chunks - 1)
    frames = read_video_frames(cfg.input_video, height=cfg.height, width=cfg.width, max_frames=need)
    if frames.shape[0] < first:
        raise ConfigError(
            f"input video {cfg.input_video} has {frames.shape[0]} frames; the first chunk needs {first} "
            "[field=input_video]"
        )
    return frames, min(run.chunks, 1 + (frames.shape[0] - first) // later)
