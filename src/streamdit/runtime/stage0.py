"""Phase A (conditioning, noise, encode, plan) and Phase C (decode, buffers) of the driving rank.

Owns: `Stage0`, the rank0-only state of a stream — timeline position, `cache_epoch`, `call_id`,
the conditioning cache, the recompute context buffers (first latent, recent clean latents,
decoded pixel window) and the VAE's streaming caches. Phase A turns chunk k into `Ids` +
`GeneratorInputs` (every decision is made here, once: resets, plan, bias, noise); Phase C decodes
the generator's latents into uint8 frames. The recipe (`cfg.recipe_spec`) decides the blend of a
soft prompt change, the noise seed after a hard cut, the decoder's time-cache rule and the frames
a stream start does not show. Nothing here runs a collective.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch

from streamdit.config import RunConfig
from streamdit.media import FrameSource
from streamdit.model.scheduler import FlowMatchScheduler
from streamdit.model.taehv import StreamingTinyDecoder, TinyVideoDecoder
from streamdit.model.text import TextEncoder, blend
from streamdit.model.vae import CausalVideoVAE, StreamingDecoder, StreamingEncoder, pixel_frames
from streamdit.protocol.header import Ids
from streamdit.runtime.plan import GeneratorInputs, chunk_plan, mix_seed, seeded_normal, to_device
from streamdit.runtime.timeline import PromptSource, PromptState, Timeline, TimelineEntry

log = logging.getLogger(__name__)
LATENT_CHANNELS = 16
NOISE_STREAM = 0
COND_CACHE_SIZE = 8  # conditioning tensors kept (prompts and soft-blend steps), least recent out
CondKey = tuple[str, str | None, float]  # (prompt, blend source, weight): equal keys, equal embeds


@dataclass(frozen=True, kw_only=True, slots=True)
class ChunkNotes:
    """Rank0-side facts about a chunk that never travel to generator ranks."""

    prompt: str
    transition: str  # "start" | "hard" | "soft" | "none"
    text_ms: float = 0.0  # text-encoder time of this chunk's phase A (new prompts only)


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
        input_video: FrameSource | None = None,
        tiny_decoder: TinyVideoDecoder | None = None,
    ) -> None:
        self.cfg = cfg
        self.timeline = timeline
        self.text_encoder = text_encoder
        self.vae = vae
        self.scheduler = scheduler
        self.device = device
        self.dtype = dtype
        self.input_video = input_video
        self.recipe = cfg.recipe_spec
        self.tiny_decoder = tiny_decoder
        # --vae tiny: the TAEHV decoder shows the frames (the recipe's VAE time-cache rule is
        # the Wan decoder's); the Wan VAE still encodes input video and re-encoded anchors
        self.decoder: StreamingDecoder | StreamingTinyDecoder = (
            StreamingTinyDecoder(tiny_decoder)
            if tiny_decoder is not None
            else StreamingDecoder(vae, upsample_history=self.recipe.vae_time_cache)
        )
        self.encoder = StreamingEncoder(vae)
        self.step_list = torch.tensor(cfg.denoising_step_list, dtype=torch.int64)
        self.latent_hw = (cfg.height // 8, cfg.width // 8)
        self.cache_epoch = 0
        self.epoch_start = 0  # chunk index of the current epoch's first chunk
        self.next_call_id = 0
        self._text_s = 0.0  # text-encoder seconds of the chunk being prepared
        self.next_start_frame = 0
        # Bounded: a live stream with many prompt changes must not grow GPU memory without end.
        self._cond_cache: OrderedDict[CondKey, torch.Tensor] = OrderedDict()
        self._last_cond_key: CondKey | None = None
        self._last_embeds: torch.Tensor | None = None  # the conditioning of the last chunk
        self._blend_from: torch.Tensor | None = None  # lerp_from_current: a blend's source
        self._reset_buffers()

    def _reset_buffers(self) -> None:
        self.first_latent: torch.Tensor | None = None
        self.recent_latents: torch.Tensor | None = None
        self.decoded_window: torch.Tensor | None = None

    # ---- Phase A -------------------------------------------------------------------------

    def state(self, chunk_index: int) -> PromptState:
        """The prompt state of a chunk (soft changes last the run's `blend_chunks` by default)."""
        return self.timeline.state(chunk_index, self.cfg.blend_chunks)

    def prepare(self, chunk_index: int) -> tuple[Ids, GeneratorInputs, ChunkNotes]:
        self._text_s = 0.0
        ps = self.state(chunk_index)
        init = chunk_index == 0 or ps.hard_cut
        if init:
            self._begin_epoch(chunk_index)
        ids = Ids(call_id=self.take_call_id(), chunk_index=chunk_index, cache_epoch=self.cache_epoch)
        embeds, updated = self._conditioning(ps, chunk_index)
        plan, bias = chunk_plan(self.cfg, init=init, soft_active=ps.soft_active)
        start = self.next_start_frame
        base_seed = self._base_seed(chunk_index)
        ships = plan.do_kv_recompute and plan.cache_policy.ships_context
        inputs = GeneratorInputs(
            cache_policy=plan.cache_policy.value,
            height=self.cfg.height,
            width=self.cfg.width,
            current_start_frame=start,
            init_cache=init,
            reset_kv_cache=init,
            reset_crossattn_cache=init or updated,
            conditioning_updated=updated,
            kv_cache_attention_bias=bias,
            do_kv_recompute=plan.do_kv_recompute,
            num_denoise_steps=plan.num_denoise_steps,
            expected_generator_calls=plan.expected_generator_calls,
            base_seed=base_seed,
            denoising_step_list=self.step_list.clone(),
            latents=self._start_latents(base_seed, first=init),
            conditioning_embeds=embeds,
            context_frames_override=self._context(start) if ships else None,
        )
        inputs.check(ids)  # never ship a plan we would reject
        self.next_start_frame += self.cfg.frames_per_chunk
        transition = "start" if chunk_index == 0 else "hard" if init else "soft" if ps.soft_active else "none"
        return ids, inputs, ChunkNotes(prompt=ps.prompt, transition=transition, text_ms=self._text_s * 1e3)

    def _base_seed(self, chunk_index: int) -> int:
        if self.recipe.reseed_on_cut:  # every epoch replays the stream's noise (Krea's reset)
            return mix_seed(self.cfg.seed, 0, chunk_index - self.epoch_start)
        return mix_seed(self.cfg.seed, self.cache_epoch, chunk_index)

    def needs_previous_decode(self, chunk_index: int) -> bool:
        """True when `prepare(chunk_index)` reads buffers that `finish` of the previous chunk
        fills (rank0 anchor recompute): a pipelined driver must decode everything in flight first."""
        if chunk_index == 0 or not self.cfg.cache_policy.ships_context:
            return False
        return not self.state(chunk_index).hard_cut

    def take_call_id(self) -> int:
        """The next call_id: strictly increasing over every message rank0 sends, any action."""
        self.next_call_id += 1
        return self.next_call_id - 1

    def _begin_epoch(self, chunk_index: int) -> None:
        """Hard cut: new epoch, stream position 0, every rank0 cache and buffer cleared."""
        if chunk_index > 0:
            self.cache_epoch += 1
        self.epoch_start = chunk_index
        self.next_start_frame = 0
        self.decoder.reset()
        self.encoder.reset()
        self._reset_buffers()
        self._last_cond_key = None
        self._last_embeds = self._blend_from = None

    def _conditioning(self, ps: PromptState, chunk_index: int) -> tuple[torch.Tensor, bool]:
        """The chunk's conditioning and whether it differs from the previous chunk's."""
        weight = self.recipe.blend_weight(ps.blend_step, ps.blend_chunks) if ps.previous else 1.0
        lerp = self.recipe.blend == "lerp_from_current" and ps.previous is not None
        # the blend's source: the previous prompt's embedding, or (Krea) the conditioning in use
        # when the change arrived, whatever it was (an unfinished blend included)
        source = f"lerp@{chunk_index - ps.blend_step}" if lerp else ps.previous
        key: CondKey = (ps.prompt, source, weight)
        if lerp and (ps.blend_step == 0 or self._blend_from is None):
            self._blend_from = (
                self._last_embeds if self._last_embeds is not None else self._encode(ps.previous)
            )
        embeds = self._cached(key)
        if embeds is None:
            new = self._encode(ps.prompt)
            if ps.previous is None:
                embeds = new
            else:
                start = self._blend_from if lerp else self._encode(ps.previous)
                assert start is not None
                embeds = blend(start, new, weight)
            self._remember(key, embeds)
        updated = key != self._last_cond_key
        self._last_cond_key = key
        self._last_embeds = embeds
        return embeds, updated

    def _encode(self, prompt: str) -> torch.Tensor:
        key = (prompt, None, 1.0)
        embeds = self._cached(key)
        if embeds is None:
            t0 = time.perf_counter()
            embeds = self.text_encoder.encode([prompt]).to(self.device, self.dtype)
            if embeds.device.type == "cuda":  # the encode's own time, not whatever runs after
                torch.cuda.current_stream(embeds.device).synchronize()
            self._text_s += time.perf_counter() - t0
            self._remember(key, embeds)
        return embeds

    def _cached(self, key: CondKey) -> torch.Tensor | None:
        embeds = self._cond_cache.get(key)
        if embeds is not None:
            self._cond_cache.move_to_end(key)
        return embeds

    def _remember(self, key: CondKey, embeds: torch.Tensor) -> None:
        self._cond_cache[key] = embeds
        while len(self._cond_cache) > COND_CACHE_SIZE:
            self._cond_cache.popitem(last=False)

    def _start_latents(self, base_seed: int, *, first: bool) -> torch.Tensor:
        shape = (1, self.cfg.frames_per_chunk, LATENT_CHANNELS, *self.latent_hw)
        noise = seeded_normal(mix_seed(base_seed, NOISE_STREAM), shape, device=self.device, dtype=self.dtype)
        if self.input_video is None:
            return noise
        # Video-to-video: the chunk's input frames, encoded and noised to the first step's sigma.
        z = self.encoder.encode_chunk(self._next_input_pixels(first))
        sigma = float(self.scheduler.sigmas(self.step_list[:1])[0])
        return self.scheduler.renoise(z.to(self.dtype), noise, sigma)

    def _next_input_pixels(self, first: bool) -> torch.Tensor:
        assert self.input_video is not None
        clip = self.input_video.read(pixel_frames(self.cfg.frames_per_chunk, first_chunk=first))
        return frames_to_pixels(clip, self.device, self.dtype)

    def _context(self, start: int) -> torch.Tensor:
        """Anchor + most recent clean latents (docs/model.md, "Recompute")."""
        assert self.first_latent is not None and self.recent_latents is not None
        young = start - self.cfg.frames_per_chunk < self.cfg.context_frames
        if young or self.decoded_window is None:
            anchor = self.first_latent
        else:
            # The oldest decoded pixel frame still in the window, re-encoded with a fresh cache.
            anchor = self.vae.encode(self.decoded_window[:, :, :1]).to(self.dtype)
        return torch.cat([anchor, self.recent_latents], dim=1).contiguous()

    # ---- Phase C -------------------------------------------------------------------------

    def finish(self, latents_out: torch.Tensor) -> torch.Tensor:
        """Decode one chunk's latents, update recompute buffers, return uint8 [T, H, W, 3] on the
        decoder's device (the writer thread copies it to the host): the frames to show (a
        stream's first `drop_first_frames` are decoded and kept for the recompute anchor, but
        not shown)."""
        latents_out = latents_out.to(self.device, self.dtype)
        drop = self.recipe.drop_first_frames if self.decoder.latent_frames_seen == 0 else 0
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
        return pixels_to_frames(pixels[:, :, drop:])


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
        input_video=None if stage0.input_video is None else stage0.input_video.fresh(),
        tiny_decoder=stage0.tiny_decoder,
    )
    for k in range(chunks):
        _, inputs, _ = twin.prepare(k)
        twin.finish(inputs.latents)
    if twin.input_video is not None:
        twin.input_video.close()
    return chunks


def pixels_to_frames(pixels: torch.Tensor) -> torch.Tensor:
    """[1, 3, T, H, W] in [-1, 1] → uint8 [T, H, W, 3] on the same device."""
    x = ((pixels[0].float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(1, 2, 3, 0).contiguous()


def frames_to_pixels(frames: np.ndarray, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """uint8 [T, H, W, 3] → [1, 3, T, H, W] in [-1, 1]."""
    x = to_device(torch.from_numpy(np.ascontiguousarray(frames)), device, torch.float32) / 127.5 - 1.0
    return x.permute(3, 0, 1, 2).unsqueeze(0).to(dtype=dtype)
