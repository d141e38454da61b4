"""Phase B: the generator side of one chunk (denoising steps and KV-cache recompute).

Owns: `GeneratorRunner`, which holds the DiT, its KV and cross-attention caches and the flow
scheduler, and turns one `GeneratorInputs` into denoised latents. It acts only on the inputs it
is given (cache policy, reset bits, plan, tensors) and on the recipe's fixed `LoopRules`: it
never infers a reset, never encodes text, never touches the VAE, and asserts the number of
generator calls against the plan before returning. Every topology runs this same object (through
`phase_b.PhaseB`) on every generator rank.

One chunk, by cache policy (protocol.policy): `rank0_anchor` / `latent_anchor` chunks after an
epoch's first rebuild the cache from 3 clean context frames (one call at t = 0, no KV bias, at the
frames just before the chunk) and then denoise; `append` chunks denoise and then write their own
clean K/V (one call at t = 0 on x0 at the chunk's frames); `off` chunks only denoise.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch.profiler import record_function

from streamdit.errors import PlanError
from streamdit.model.dit import CausalWanDiT
from streamdit.model.kv_cache import CrossAttnCache, KVCache
from streamdit.model.scheduler import FlowMatchScheduler
from streamdit.protocol.header import Ids
from streamdit.protocol.policy import CachePolicy
from streamdit.runtime.graphs import CallGraphs
from streamdit.runtime.plan import GeneratorInputs, id_kwargs, mix_seed, seeded_normal

if TYPE_CHECKING:
    from streamdit.runtime.compile_health import CompileProbe

RENOISE_STREAM = 1  # seed stream of the per-step re-noise draws (Phase A uses stream 0)


@dataclass(frozen=True, kw_only=True, slots=True)
class LoopRules:
    """The recipe's fixed Phase B rules (equal on every rank: the recipe is a parity key)."""

    recompute_text: str = "current"
    """"previous": the recompute attends to the text of the chunk before (Krea)."""
    bias_skips_anchor: bool = False
    """The KV bias spares the recompute anchor (Scope)."""
    context_frames: int = 3
    """Clean frames of a recompute (anchor + most recent): the latent-anchor window of r0."""


@dataclass(frozen=True, kw_only=True, slots=True)
class CacheGeometry:
    height: int
    width: int

    @property
    def tokens_per_frame(self) -> int:
        return (self.height // 16) * (self.width // 16)


class GeneratorRunner:
    """Runs Phase B for a stream of chunks on one generator rank (or shard)."""

    def __init__(
        self,
        model: CausalWanDiT,
        *,
        scheduler: FlowMatchScheduler,
        geometry: CacheGeometry,
        capacity_frames: int,
        sink_frames: int,
        device: torch.device,
        dtype: torch.dtype,
        rules: LoopRules | None = None,
    ) -> None:
        self.model = model
        self.rules = rules or LoopRules()
        # latent_anchor (r0): this runner builds each chunk's context itself, from the epoch's
        # first latent frame plus its most recent outputs (rules.context_frames in all)
        self._first_latent: torch.Tensor | None = None
        self._recent: torch.Tensor | None = None
        self.scheduler = scheduler
        self.device = device
        self.dtype = dtype
        self.capacity_frames = capacity_frames
        self.sink_frames = sink_frames
        self.geometry = geometry
        self.kv_cache = self._allocate_kv(geometry)
        self.cross_cache = CrossAttnCache(len(model.blocks))
        self.calls_made = 0
        # Test hook: an extra generator call per chunk (proves the plan assertion fires).
        self.extra_calls = 0
        # Test hook: the first generator call of the process takes this long more (as a GPU's
        # first-use work does: library handles, kernels, a lazily built communicator).
        self.first_call_ms = 0
        # The counting backend of the compiled blocks (None when eager): compile_health reads it.
        self.compile_probe: CompileProbe | None = None
        # Every call's tensor math; CUDA graphs once enabled (runtime/graphs.py, --cuda-graphs)
        self.graphs = CallGraphs(model)

    def _local_heads(self) -> int:
        q = self.model.blocks[0].self_attn.q.weight
        return q.shape[0] // self.model.cfg.head_dim

    def _allocate_kv(self, geometry: CacheGeometry) -> KVCache:
        return KVCache(
            num_layers=len(self.model.blocks),
            batch=1,
            heads=self._local_heads(),
            head_dim=self.model.cfg.head_dim,
            tokens_per_frame=geometry.tokens_per_frame,
            capacity_frames=self.capacity_frames,
            sink_frames=self.sink_frames,
            dtype=self.dtype,
            device=self.device,
        )

    @torch.no_grad()
    def run(self, inputs: GeneratorInputs, ids: Ids) -> torch.Tensor:
        """Denoise one chunk; returns x0 latents `[1, F, 16, h, w]`."""
        inputs.check(ids)
        policy = inputs.policy
        # Krea recomputes before the chunk's prompt update: its cross-attention cache still
        # holds the previous chunk's text K/V, so a text change resets it only afterwards.
        keep_text = inputs.do_kv_recompute and self.rules.recompute_text == "previous"
        self._apply_resets(inputs, ids, keep_text=keep_text)
        text = inputs.conditioning_embeds.to(self.device, self.dtype)
        start = self.calls_made
        if inputs.do_kv_recompute:
            self._recompute(inputs, text, ids, previous_text=keep_text)
            if keep_text and (inputs.reset_crossattn_cache or inputs.conditioning_updated):
                self.cross_cache.reset()
        spare = 1 if inputs.do_kv_recompute and self.rules.bias_skips_anchor else 0
        x0 = self._denoise(inputs, text, spare)
        if policy is CachePolicy.APPEND:  # the chunk's clean K/V, at its own frames
            self._call(x0, 0.0, text, inputs.current_start_frame, 1.0)
        for _ in range(self.extra_calls):
            self._call(x0, 0.0, text, inputs.current_start_frame, inputs.kv_cache_attention_bias)
        inputs.plan.assert_observed(self.calls_made - start, ids)
        self._remember(x0)
        return x0

    def _remember(self, x0: torch.Tensor) -> None:
        """Keep the epoch's first latent frame and the latest outputs (r0's next anchor)."""
        if self._first_latent is None:
            self._first_latent = x0[:, :1].clone()
        keep = self.rules.context_frames - 1
        joined = x0 if self._recent is None else torch.cat([self._recent, x0], dim=1)
        self._recent = joined[:, joined.shape[1] - keep :].clone()

    def _apply_resets(self, inputs: GeneratorInputs, ids: Ids, *, keep_text: bool) -> None:
        geometry = CacheGeometry(height=inputs.height, width=inputs.width)
        if geometry != self.geometry:
            if not inputs.init_cache:
                raise PlanError(
                    f"geometry {inputs.height}x{inputs.width} differs from the cache's "
                    f"{self.geometry.height}x{self.geometry.width} without init_cache",
                    field="height",
                    **id_kwargs(ids),
                )
            self.geometry = geometry
            self.kv_cache = self._allocate_kv(geometry)
        if inputs.init_cache or inputs.reset_kv_cache:
            self.kv_cache.reset()
        if inputs.init_cache:
            self._first_latent = self._recent = None
        text_changed = inputs.reset_crossattn_cache or inputs.conditioning_updated
        if inputs.init_cache or (text_changed and not keep_text):
            self.cross_cache.reset()

    def _recompute(
        self, inputs: GeneratorInputs, text: torch.Tensor, ids: Ids, *, previous_text: bool
    ) -> None:
        """Rebuild the cache from clean context frames: one call at timestep 0, no KV bias."""
        ctx = inputs.context_frames_override
        if inputs.policy is CachePolicy.LATENT_ANCHOR:
            if self._first_latent is None or self._recent is None:
                raise PlanError(
                    "recompute r0 without a previous chunk in this epoch (do_kv_recompute on the "
                    "epoch's first chunk)",
                    field="do_kv_recompute",
                    **id_kwargs(ids),
                )
            ctx = torch.cat([self._first_latent, self._recent], dim=1)
        if previous_text and not self.cross_cache.filled:
            raise PlanError(
                "the recompute attends to the previous chunk's text, but no text is cached",
                field="conditioning_embeds",
                **id_kwargs(ids),
            )
        assert ctx is not None  # GeneratorInputs.check enforces it
        ctx = ctx.to(self.device, self.dtype)
        self.kv_cache.reset()
        self._call(ctx, 0.0, text, inputs.current_start_frame - ctx.shape[1], 1.0)

    def _denoise(self, inputs: GeneratorInputs, text: torch.Tensor, spare: int) -> torch.Tensor:
        steps = inputs.denoising_step_list.to("cpu", torch.int64)
        sigmas = self.scheduler.sigmas(steps)
        # The generator is conditioned on the warped timestep 1000·sigma(t) (Self-Forcing).
        timesteps = self.scheduler.timesteps(steps)
        x = inputs.latents.to(self.device, self.dtype)
        noise_seed = mix_seed(inputs.base_seed, RENOISE_STREAM)
        x0 = x
        for i in range(len(steps)):
            v = self._call(
                x,
                float(timesteps[i]),
                text,
                inputs.current_start_frame,
                inputs.kv_cache_attention_bias,
                spare,
            )
            x0 = self.scheduler.x0_from_flow(x, v, float(sigmas[i]))
            if i + 1 < len(steps):
                eps = seeded_normal(
                    mix_seed(noise_seed, i), tuple(x.shape), device=self.device, dtype=self.dtype
                )
                x = self.scheduler.renoise(x0, eps, float(sigmas[i + 1]))
        return x0

    def _call(
        self, x: torch.Tensor, t: float, text: torch.Tensor, start_frame: int, bias: float, spare: int = 0
    ) -> torch.Tensor:
        if self.first_call_ms and self.calls_made == 0:
            time.sleep(self.first_call_ms / 1e3)
        timestep = torch.full((x.shape[0],), t, device=self.device, dtype=torch.float32)
        with record_function("streamdit.generator_call"):  # bench/profile_stream.py reads it
            call = self.model.prepare(
                x,
                timestep,
                text,
                kv_cache=self.kv_cache,
                cross_cache=self.cross_cache,
                start_frame=start_frame,
                kv_bias=bias,
                kv_bias_spare_frames=spare,
                fill_text=self.graphs.fill_text,
            )
            out = self.graphs(call)
        self.calls_made += 1
        return out
