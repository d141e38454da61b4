"""Turning a RunConfig into objects: validation first, then the model parts each role needs.

Owns: `validate_run(cfg)` — every check that can reject user input (preset, geometry, timeline,
input video, checkpoint keys and shapes against a meta-device model) runs here, before any
weight is allocated or any model work starts; `build_generator` (Phase B parts, for every
generator rank) and `build_stage0_parts` (text encoder + VAE, rank0 only: workers never
construct them). Constructors only allocate; nothing here runs inference or a collective.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from streamdit.config import RunConfig
from streamdit.errors import ConfigError
from streamdit.media import VideoSource, check_output_path, count_video_frames, probe_video
from streamdit.model.attention import resolve_attention_backend
from streamdit.model.dit import CausalWanDiT
from streamdit.model.fp8 import ACTIVATION_DTYPE, fp8_supported, quantize_blocks
from streamdit.model.norms import resolve_norm_kernels
from streamdit.model.presets import DiTConfig, get_dit_config
from streamdit.model.scheduler import FlowMatchScheduler, validate_step_list
from streamdit.model.taehv import TinyVAEConfig, TinyVideoDecoder, load_tiny_decoder_state
from streamdit.model.text import HashTextEncoder, TextEncoder
from streamdit.model.text_embeddings import PrecomputedTextEncoder, save_text_embeddings
from streamdit.model.umt5 import UMT5TextEncoder, read_config
from streamdit.model.vae import CausalVideoVAE, VAEConfig, get_vae_config, pixel_frames, warm_up_decoder
from streamdit.model.weights import (
    CheckpointSource,
    check_checkpoint,
    check_dit_config,
    check_vae_config,
    load_checkpoint_into,
    open_checkpoint,
)
from streamdit.runtime.compile_health import CompileProbe
from streamdit.runtime.generator import CacheGeometry, GeneratorRunner, LoopRules
from streamdit.runtime.timeline import Timeline

log = logging.getLogger(__name__)
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
    norm_kernels: str  # "triton" | "torch", resolved once (model/norms.py)
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
    backend = resolve_attention_backend(cfg.attn_backend, device, dtype, head_dim=dit.head_dim)
    if cfg.fp8:
        _check_fp8(device, dtype)
    norm_kernels = resolve_norm_kernels(cfg.norm_kernels, device)
    validate_step_list(cfg.denoising_step_list)
    if cfg.checkpoint is not None:
        with dit_checkpoint(cfg) as source:
            if source.config is not None:
                check_dit_config(dit, source.config)
            check_checkpoint(_meta_dit(dit), source)
    check_output_path(cfg.out, "out")  # every rank writes its flight record beside it
    timeline = Timeline.single(cfg.prompt)
    if not generator_only:
        for name in ("metrics", "summary", "profile"):
            path = getattr(cfg, name)
            if path is not None:
                check_output_path(path, name)
        timeline = _validate_stage0_inputs(cfg, dit, dtype)
    return ValidatedRun(
        cfg=cfg,
        dit=dit,
        device=device,
        dtype=dtype,
        attn_backend=backend,
        norm_kernels=norm_kernels,
        timeline=timeline,
        chunks=cfg.chunks,
    )


def _check_fp8(device: torch.device, dtype: torch.dtype) -> None:
    why = fp8_supported(device)
    if why is None and dtype != ACTIVATION_DTYPE:
        why = f"FP8 layers compute in bfloat16, got dtype {dtype}"
    if why is not None:
        raise ConfigError(f"--fp8 cannot run here: {why} [field=fp8]")


def _validate_stage0_inputs(cfg: RunConfig, dit: DiTConfig, dtype: torch.dtype) -> Timeline:
    vae_cfg = vae_config(cfg)
    timeline = Timeline.load(cfg.timeline) if cfg.timeline else Timeline.single(cfg.prompt)
    _validate_text(cfg, dit, timeline)
    if cfg.input_video is not None:
        probe_video(cfg.input_video)
    if cfg.vae_checkpoint is not None:
        with vae_checkpoint(cfg) as source:
            if source.config is not None:
                check_vae_config(vae_cfg, source.config)
            check_checkpoint(CausalVideoVAE(vae_cfg, device=torch.device("meta"), dtype=dtype), source)
    if cfg.tiny_vae_checkpoint is not None:  # keys and shapes only: no tensor data is read
        meta = TinyVideoDecoder(TinyVAEConfig(), device="meta", dtype=dtype)
        load_tiny_decoder_state(meta, _tiny_state(cfg.tiny_vae_checkpoint, shapes_only=True))
    return timeline


def dit_checkpoint(cfg: RunConfig) -> CheckpointSource:
    assert cfg.checkpoint is not None
    return open_checkpoint(cfg.checkpoint, select=cfg.checkpoint_select, component="transformer")


def vae_checkpoint(cfg: RunConfig) -> CheckpointSource:
    assert cfg.vae_checkpoint is not None
    return open_checkpoint(cfg.vae_checkpoint, component="vae")


def vae_config(cfg: RunConfig) -> VAEConfig:
    """The VAE preset with its latent statistics: Wan2.1's for real (checkpoint) weights unless
    --latent-norm says otherwise; identity for synthetic ones."""
    norm = cfg.latent_norm
    if norm == "auto":
        norm = "wan2.1" if cfg.vae_checkpoint is not None else "identity"
    return dataclasses.replace(get_vae_config(cfg.vae_preset), latent_norm=norm)


def _validate_text(cfg: RunConfig, dit: DiTConfig, timeline: Timeline) -> None:
    """The text source must fit the DiT's text path, and precomputed embeddings must cover every
    prompt of the timeline (a live prompt without one is refused when it is submitted)."""
    if cfg.text_encoder is not None:
        read_config(cfg.text_encoder, expect_dim=dit.text_dim)  # the config only, no weights
    if cfg.text_embeddings is not None:
        table = PrecomputedTextEncoder.load(cfg.text_embeddings, text_len=dit.text_len, text_dim=dit.text_dim)
        table.check_prompts(e.prompt for e in timeline.entries)


def live_prompt_check(cfg: RunConfig) -> Callable[[str], None] | None:
    """serve with precomputed embeddings: the check a submitted prompt passes (a 4xx naming the
    prompt otherwise, and the stream goes on)."""
    if cfg.text_embeddings is None:
        return None
    dit = get_dit_config(cfg.preset)
    table = PrecomputedTextEncoder.load(cfg.text_embeddings, text_len=dit.text_len, text_dim=dit.text_dim)
    return lambda prompt: table.check_prompts([prompt])


def _meta_dit(dit: DiTConfig) -> CausalWanDiT:
    return CausalWanDiT(dit, device=torch.device("meta"), dtype=torch.float32, attn_backend="math")


def build_model(run: ValidatedRun) -> CausalWanDiT:
    """The full (unsharded) DiT with checkpoint or seeded weights; TP shards it afterwards."""
    model = CausalWanDiT(run.dit, device=run.device, dtype=run.dtype, attn_backend=run.attn_backend)
    if run.cfg.checkpoint is not None:
        with dit_checkpoint(run.cfg) as source:
            log.info("DiT weights: %s", load_checkpoint_into(model, source).summary())
    else:
        model.init_weights(run.cfg.seed)
    if run.cfg.fp8:  # after loading, before TP shards (shards keep their rows' scales)
        log.info(
            "FP8: %d linear layers of the DiT blocks quantized (e4m3, rowwise)", quantize_blocks(model.blocks)
        )
    return model.eval()


def build_generator(run: ValidatedRun, model: CausalWanDiT | None = None) -> GeneratorRunner:
    """Phase B for one rank: the (possibly already sharded) model, its caches, the scheduler.

    The KV cache is sized from the model's local head count, so build it after sharding.
    """
    cfg = run.cfg
    model = model if model is not None else build_model(run)
    model.fuse_projections()  # after loading, FP8 and TP: each rank fuses what it holds
    if run.norm_kernels == "triton":  # before compile: the blocks' graphs call the kernels
        model.use_fused_norms()
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
    recipe = cfg.recipe_spec
    runner = GeneratorRunner(
        model,
        scheduler=FlowMatchScheduler(shift=cfg.shift, warp=recipe.warp_timesteps),
        geometry=CacheGeometry(height=cfg.height, width=cfg.width),
        capacity_frames=cfg.local_attn_frames,
        sink_frames=cfg.sink_frames,
        device=run.device,
        dtype=run.dtype,
        rules=LoopRules(
            recompute_text=recipe.recompute_text,
            bias_skips_anchor=recipe.bias_skips_anchor,
            context_frames=cfg.context_frames,
        ),
    )
    runner.compile_probe = probe
    return runner


def build_text_encoder(run: ValidatedRun) -> TextEncoder:
    """rank0's text source: umT5 from a local folder (bf16 on CUDA), precomputed embeddings, or
    the offline hash stand-in."""
    cfg, dit = run.cfg, run.dit
    if cfg.text_encoder is not None:
        dtype = torch.bfloat16 if run.device.type == "cuda" else torch.float32
        t0 = time.perf_counter()
        encoder = UMT5TextEncoder.from_folder(
            cfg.text_encoder, text_len=dit.text_len, device=run.device, dtype=dtype, expect_dim=dit.text_dim
        )
        params = sum(p.numel() for p in encoder.model.parameters())
        log.info(
            "text encoder: umT5 from %s (%s parameters, %s on %s) in %.1f s",
            cfg.text_encoder, f"{params:,}", dtype, run.device, time.perf_counter() - t0,
        )  # fmt: skip
        return encoder
    if cfg.text_embeddings is not None:
        table = PrecomputedTextEncoder.load(
            cfg.text_embeddings,
            text_len=dit.text_len,
            text_dim=dit.text_dim,
            device=run.device,
            dtype=run.dtype,
        )
        log.info("text embeddings: %d prompts from %s", len(table.known_prompts()), cfg.text_embeddings)
        return table
    log.info("text: the hash stand-in (no --text-encoder / --text-embeddings)")
    return HashTextEncoder(
        dit.text_dim, dit.text_len, seed=cfg.seed + TEXT_SEED_OFFSET, device=run.device, dtype=run.dtype
    )


def encode_text_file(cfg: RunConfig, prompts: list[str], out: Path) -> int:
    """`streamdit encode-text`: the embeddings of `prompts` (and the timeline's), as rank0 would
    compute them, written for `--text-embeddings`. Returns how many were written."""
    if out.suffix != ".safetensors":
        raise ConfigError(f"{out}: embeddings are written as .safetensors [field=out]")
    run = validate_run(cfg)
    every = [*prompts, *(e.prompt for e in run.timeline.entries)] if cfg.timeline else list(prompts)
    unique = list(dict.fromkeys(p for p in every if p.strip()))
    if not unique:
        raise ConfigError("no prompt to encode: give --prompt or --timeline [field=prompt]")
    encoder = build_text_encoder(run)
    save_text_embeddings(out, {p: encoder.encode([p])[0].float().cpu() for p in unique})
    return len(unique)


def build_stage0_parts(run: ValidatedRun) -> tuple[TextEncoder, CausalVideoVAE, TinyVideoDecoder | None]:
    """Rank0's text encoder, Wan VAE and (`--vae tiny`) the tiny decoder Phase C uses instead."""
    cfg = run.cfg
    text = build_text_encoder(run)
    vae = CausalVideoVAE(vae_config(cfg), device=run.device, dtype=run.dtype)
    log.info("VAE latent statistics: %s", vae.cfg.latent_norm)
    if cfg.vae_checkpoint is not None:
        with vae_checkpoint(cfg) as source:
            log.info("VAE weights: %s", load_checkpoint_into(vae, source).summary())
    else:
        vae.init_weights(cfg.seed + VAE_SEED_OFFSET)
    if run.device.type == "cuda":
        vae.to_channels_last()
    vae.eval()
    _compile_decoder(run, vae)
    return text, vae, build_tiny_decoder(cfg, run.device, run.dtype)


def compiles_decoder(run: ValidatedRun) -> bool:
    """Whether Stage 0's build compiles the Wan decoder (see `_compile_decoder`)."""
    return run.cfg.compile and run.device.type == "cuda" and run.cfg.vae == "wan"


def _compile_decoder(run: ValidatedRun, vae: CausalVideoVAE) -> None:
    """--compile on CUDA with the Wan decoder showing the frames: its decode step as one graph
    (`CausalVideoVAE.compile_decoder`), its narrow convs folded into 2-D convs (4 ms a chunk at
    320x576 for ~50 s more cold compile: docs/performance.md), compiled here by a warm-up,
    before the stream's clock starts. The backend is --compile-backend's, in its default mode
    (a CUDA-graph mode would reuse the buffers the stream's cache keeps). Every topology's
    rank0 builds Stage 0 before its startup barrier (`all_ready`), so the compile runs under
    --startup-timeout."""
    cfg = run.cfg
    if not compiles_decoder(run):
        return
    t0 = time.perf_counter()
    vae.fold_time_taps(vae.decoder)
    vae.compile_decoder(backend=cfg.compile_backend)
    shape = (1, cfg.frames_per_chunk, vae.cfg.z_dim, cfg.height // 8, cfg.width // 8)
    chunks, graphs = warm_up_decoder(vae, shape, upsample_history=cfg.recipe_spec.vae_time_cache)
    seconds = time.perf_counter() - t0
    log.info("VAE decoder compiled: %d graphs, %d warm-up chunks, %.1f s", graphs, chunks, seconds)


def build_tiny_decoder(cfg: RunConfig, device: torch.device, dtype: torch.dtype) -> TinyVideoDecoder | None:
    """`--vae tiny`: the TAEHV decoder, from `--tiny-vae-checkpoint` or seeded (None otherwise)."""
    if cfg.vae != "tiny":
        return None
    decoder = TinyVideoDecoder(TinyVAEConfig(), device=device, dtype=dtype)
    if cfg.tiny_vae_checkpoint is None:
        decoder.init_weights(cfg.seed + VAE_SEED_OFFSET)
    else:
        load_tiny_decoder_state(decoder, _tiny_state(cfg.tiny_vae_checkpoint))
        log.info("tiny decoder weights: %s", cfg.tiny_vae_checkpoint)
    return decoder.eval()


def _tiny_state(path: Path, *, shapes_only: bool = False) -> dict[str, torch.Tensor]:
    """The file's tensors; `shapes_only`: meta tensors of the stored shapes (header read only)."""
    with open_checkpoint(path) as source:
        if shapes_only:
            return {key: torch.empty(shape, device="meta") for key, shape in source.shapes().items()}
        return {key: source.get(key) for key in source.shapes()}


def open_input_video(run: ValidatedRun, *, loop: bool = False) -> tuple[VideoSource | None, int]:
    """The v2v input (decoded a chunk at a time) and how many chunks it covers (ConfigError if
    it cannot cover the first). Its frames are counted from packets; none is decoded here.
    `loop` (a live stream): the file starts over at its end, so it covers every chunk."""
    cfg = run.cfg
    if cfg.input_video is None:
        return None, run.chunks
    f = cfg.frames_per_chunk
    first, later = pixel_frames(f, first_chunk=True), pixel_frames(f, first_chunk=False)
    frames = count_video_frames(cfg.input_video)
    if frames < first:
        raise ConfigError(
            f"input video {cfg.input_video} has {frames} frames; the first chunk needs {first} "
            "[field=input_video]"
        )
    source = VideoSource(cfg.input_video, height=cfg.height, width=cfg.width, frames=frames, loop=loop)
    return source, run.chunks if loop else min(run.chunks, 1 + (frames - first) // later)
