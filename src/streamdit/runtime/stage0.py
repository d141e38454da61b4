"""Phase A (conditioning, noise, encode, plan) and Phase C (decode, buffers) of the driving rank.

Owns: `Stage0`, the rank0-only state of a stream — timeline position, `cache_epoch`, `call_id`,
the conditioning cache, the recompute context buffers (first latent, recent clean latents,
decoded pixel window) and the VAE's streaming caches. Phase A turns chunk k into `ChunkIds` +
`GeneratorInputs` (every decision is made here, once: resets, plan, bias, noise); Phase C decodes
the generator's latents into uint8 frames. Nothing here runs a collective.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch

from streamdit.config import RunConfig
from streamdit.model.scheduler import FlowMatchScheduler
from streamdit.model.text import TextEncoder, blend
from streamdit.model.vae import CausalVideoVAE, StreamingDecoder, StreamingEncoder, pixel_frames
from streamdit.runtime.plan import ChunkIds, GeneratorInputs, PhasePlan, mix_seed, seeded_normal
from streamdit.runtime.timeline import PromptSource, PromptState, Timeline, TimelineEntry

log = logging.getLogger(__name__)
LATENT_CHANNELS = 16
NOISE_STREAM = 0
COND_CACHE_SIZE = 8  # conditioning tensors kept (prompts and soft-blend steps), least recent out


@dataclass(frozen=True, kw_only=True, slots=True)
class ChunkNotes:
    """Rank0-side facts about a chunk that never travel to generator ranks."""

    prompt: str
    transition: str  # "start" | "hard" | "soft" | "none"


class Stage0:
    """Rank0's Phase A and Phase C for one stream."""

    def __init__(
        self,
        cfg: RunConfig,
        *,
        timeline: PromptSource,
        text_encoder: TextEncoder,
        vae: CausalVideoVAE,
        scheduler: FlowMatchScheduler,
        device: torch.device,
        dtype: torch.dtype,
        input_frames: np.ndarray | None = None,
    ) -> None:
        self.cfg = cfg
        self.timeline = timeline
        self.text_encoder = text_encoder
        self.vae = vae
        self.scheduler = scheduler
        self.device = device
        self.dtype = dtype
        self.input_frames = input_frames
        self.decoder = StreamingDecoder(vae)
        self.encoder = StreamingEncoder(vae)
        self.step_list = torch.tensor(cfg.denoising_step_list, dtype=torch.int64)
        self.latent_hw = (cfg.height // 8, cfg.width // 8)
        self.cache_epoch = 0
        self.next_call_id = 0
        self.next_start_frame = 0
        self.input_pos = 0
        # Bounded: a live stream with many prompt changes must not grow GPU memory without end.
        self._cond_cache: OrderedDict[tuple[str, str | None, float], torch.Tensor] = OrderedDict()
        self._last_cond_key: tuple[str, str | None, float] | None = None
        self._reset_buffers()

    def _reset_buffers(self) -> None:
        self.first_latent: torch.Tensor | None = None
        self.recent_latents: torch.Tensor | None = None
        self.decoded_window: torch.Tensor | None = None

    # ---- Phase A -------------------------------------------------------------------------

    def prepare(self, chunk_index: int) -> tuple[ChunkIds, GeneratorInputs, ChunkNotes]:
        ps = self.timeline.state(chunk_index)
        init = chunk_index == 0 or ps.hard_cut
        if init:
            self._begin_epoch(bump=chunk_index > 0)
        ids = ChunkIds(call_id=self.take_call_id(), chunk_index=chunk_index, cache_epoch=self.cache_epoch)
        embeds, updated = self._conditioning(ps)
        plan = PhasePlan.build(
            do_kv_recompute=self.cfg.kv_recompute and not init,
            num_denoise_steps=len(self.step_list),
        )
        start = self.next_start_frame
        base_seed = mix_seed(self.cfg.seed, self.cache_epoch, chunk_index)
        inputs = GeneratorInputs(
            height=self.cfg.height,
            width=self.cfg.width,
            current_start_frame=start,
            init_cache=init,
            reset_kv_cache=init,
            reset_crossattn_cache=init or updated,
            conditioning_updated=updated,
            kv_cache_attention_bias=self.cfg.soft_bias if ps.soft_active and not init else 1.0,
            do_kv_recompute=plan.do_kv_recompute,
            num_denoise_steps=plan.num_denoise_steps,
            expected_generator_calls=plan.expected_generator_calls,
            base_seed=base_seed,
            denoising_step_list=self.step_list.clone(),
            latents=self._start_latents(base_seed, first=init),
            conditioning_embeds=embeds,
            context_frames_override=self._context(start) if self._ships_context(plan) else None,
        )
        inputs.check(ids, latent_anchor=self.cfg.recompute == "r0")  # never ship a plan we'd reject
        self.next_start_frame += self.cfg.frames_per_chunk
        transition = "start" if chunk_index == 0 else "hard" if init else "soft" if ps.soft_active else "none"
        return ids, inputs, ChunkNotes(prompt=ps.prompt, transition=transition)

    def _ships_context(self, plan: PhasePlan) -> bool:
        # r0: the generator ranks build the anchor from their own latents
        return plan.do_kv_recompute and self.cfg.recompute == "r0a"

    def needs_previous_decode(self, chunk_index: int) -> bool:
        """True when `prepare(chunk_index)` reads buffers that `finish` of the previous chunk
        fills (r0a recompute): a pipelined driver must decode everything in flight first."""
        if chunk_index == 0 or self.cfg.recompute != "r0a":
            return False
        return not self.timeline.state(chunk_index).hard_cut

    def take_call_id(self) -> int:
        """The next call_id: strictly increasing over every message rank0 sends, any action."""
        self.next_call_id += 1
        return self.next_call_id - 1

    def _begin_epoch(self, *, bump: bool) -> None:
        """Hard cut: new epoch, stream position 0, every rank0 cache and buffer cleared."""
        if bump:
            self.cache_epoch += 1
        self.next_start_frame = 0
        self.decoder.reset()
        self.encoder.reset()
        self._reset_buffers()
        self._last_cond_key = None

    def _conditioning(self, ps: PromptState) -> tuple[torch.Tensor, bool]:
        key = ps.key
        embeds = self._cached(key)
        if embeds is None:
            new = self._encode(ps.prompt)
            embeds = new if ps.previous is None else blend(self._encode(ps.previous), new, ps.alpha)
            self._remember(key, embeds)
        updated = key != self._last_cond_key
        self._last_cond_key = key
        return embeds, updated

    def _encode(self, prompt: str) -> torch.Tensor:
        key = (prompt, None, 1.0)
        embeds = self._cached(key)
        if embeds is None:
            embeds = self.text_encoder.encode([prompt]).to(self.device, self.dtype)
            self._remember(key, embeds)
        return embeds

    def _cached(self, key: tuple[str, str | None, float]) -> torch.Tensor | None:
        embeds = self._cond_cache.get(key)
        if embeds is not None:
            self._cond_cache.move_to_end(key)
        return embeds

    def _remember(self, key: tuple[str, str | None, float], embeds: torch.Tensor) -> None:
        self._cond_cache[key] = embeds
        while len(self._cond_cache) > COND_CACHE_SIZE:
            self._cond_cache.popitem(last=False)

    def _start_latents(self, base_seed: int, *, first: bool) -> torch.Tensor:
        shape = (1, self.cfg.frames_per_chunk, LATENT_CHANNELS, *self.latent_hw)
        noise = seeded_normal(mix_seed(base_seed, NOISE_STREAM), shape, device=self.device, dtype=self.dtype)
        if self.input_frames is None:
            return noise
        # Video-to-video: the chunk's input frames, encoded and noised to the first step's sigma.
        z = self.encoder.encode_chunk(self._next_input_pixels(first))
        sigma = float(self.scheduler.sigmas(self.step_list[:1])[0])
        return self.scheduler.renoise(z.to(self.dtype), noise, sigma)

    def _next_input_pixels(self, first: bool) -> torch.Tensor:
        assert self.input_frames is not None
        n = pixel_frames(self.cfg.frames_per_chunk, first_chunk=first)
        clip = self.input_frames[self.input_pos : self.input_pos + n]
        self.input_pos += n
        return frames_to_pixels(clip, self.device, self.dtype)

    def _context(self, start: int) -> torch.Tensor:
        """Anchor + most recent clean latents (model.md, "Recompute")."""
        assert self.first_latent is not None and self.recent_latents is not None
        young = start - self.cfg.frames_per_chunk < self.cfg.context_frames
        if young or self.decoded_window is None:
            anchor = self.first_latent
        else:
            # The oldest decoded pixel frame still in the window, re-encoded with a fresh cache.
            anchor = self.vae.encode(self.decoded_window[:, :, :1]).to(self.dtype)
        return torch.cat([anchor, self.recent_latents], dim=1).contiguous()

    # ---- Phase C -------------------------------------------------------------------------

    def finish(self, latents_out: torch.Tensor) -> np.ndarray:
        """Decode one chunk's latents, update recompute buffers, return uint8 [T, H, W, 3]."""
        latents_out = latents_out.to(self.device, self.dtype)
        if self.first_latent is None:
            self.first_latent = latents_out[:, :1].clone()
        keep = self.cfg.context_frames - 1
        prev = (
            latents_out if self.recent_latents is None else torch.cat([self.recent_latents, latents_out], 1)
        )
        self.recent_latents = prev[:, prev.shape[1] - keep :].clone()
        pixels = self.decoder.decode_chunk(latents_out)
        window = 1 + 4 * keep
        joined = pixels if self.decoded_window is None else torch.cat([self.decoded_window, pixels], 2)
        self.decoded_window = joined[:, :, max(0, joined.shape[2] - window) :].clone()
        return pixels_to_frames(pixels)


def rehearse(stage0: Stage0, max_chunks: int) -> int:
    """Phase A and C of synthetic chunks on a throwaway twin of `stage0` (same models, fresh
    state; `stage0` itself is untouched): every kernel, library handle and allocator pool a
    stream's Stage 0 uses exists afterwards. Returns the number of chunks rehearsed.

    Why: under pp, rank0's comm threads keep NCCL transfers pending while the main thread runs
    Stage 0, and the first use of a kernel module or a library (cuBLAS, cuDNN) waits for the
    device's running kernels, the pending NCCL ones included, while those wait for an envelope
    only this thread can build: a hang until the NCCL timeout. So Stage 0 runs every path it
    will take (init, recompute context until the window is full, a soft blend) before any
    transfer is posted; the generator's output is stood in for by the chunk's own noise.
    """
    cfg = stage0.cfg
    chunks = min(max_chunks, cfg.window_fill_chunks)
    timeline = Timeline(
        [
            TimelineEntry(chunk=0, prompt="rehearsal"),
            TimelineEntry(chunk=1, prompt="rehearsal, blended", transition="soft"),
        ]
    )
    twin = Stage0(
        cfg,
        timeline=timeline,
        text_encoder=stage0.text_encoder,
        vae=stage0.vae,
        scheduler=stage0.scheduler,
        device=stage0.device,
        dtype=stage0.dtype,
        input_frames=stage0.input_frames,
    )
    for k in range(chunks):
        _, inputs, _ = twin.prepare(k)
        twin.finish(inputs.latents)
    return chunks


def pixels_to_frames(pixels: torch.Tensor) -> np.ndarray:
    """[1, 3, T, H, W] in [-1, 1] → uint8 [T, H, W, 3]."""
    x = ((pixels[0].float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(1, 2, 3, 0).contiguous().cpu().numpy()


def frames_to_pixels(frames: np.ndarray, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """uint8 [T, H, W, 3] → [1, 3, T, H, W] in [-1, 1]."""
    x = torch.from_numpy(np.ascontiguousarray(frames)).to(torch.float32) / 127.5 - 1.0
    return x.permute(3, 0, 1, 2).unsqueeze(0).to(device=device, dtype=dtype)
