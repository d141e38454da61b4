"""Recipes: everything besides the weights that decides which video a checkpoint produces.

Owns: `Recipe` (a frozen dataclass: data, not branches) and `RECIPES`, the loops of the public
causal Wan students as their reference code runs them (docs/recipes.md gives each step and its
source). A recipe is selected by name (`--recipe`, a parity key). It has two parts:

- defaults of run settings a flag may still override (cache policy, steps, window, sinks, KV-bias
  value, blend length): `Recipe.run_defaults()` fills `RunConfig`;
- fixed rules of the loop, read where they act: the step schedule (`step_list`), whether
  timesteps are warped through the shift table (`warp_timesteps`), which text the KV recompute
  attends to (`recompute_text`), when a KV bias applies and to which cached keys (`kv_bias`,
  `bias_skips_anchor`), the VAE decoder's time-cache rule (`vae_time_cache`), the pixel frames
  dropped at a stream's start (`drop_first_frames`), how a soft prompt change blends (`blend`)
  and whether a hard cut replays the stream's seed (`reseed_on_cut`).

Imports nothing but streamdit.errors (config.py reads it).
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

from streamdit.errors import ConfigError

STEP_SCHEDULES = ("even", "linspace_zero")
RECOMPUTE_TEXT = ("current", "previous")
KV_BIAS_RULES = ("soft", "always", "never")
VAE_TIME_CACHE = ("wan2.1", "krea")
BLENDS = ("alpha", "lerp_from_current")
MAX_STEPS = 50


@dataclass(frozen=True, kw_only=True, slots=True)
class Recipe:
    name: str
    reference: str
    """The public code this loop follows (repository @ commit, file)."""
    # ---- run defaults (RunConfig fields a flag may override)
    recompute: str
    """KV-cache regime: off | r0a | r0 | append (see RunConfig.recompute)."""
    steps: int
    frames_per_chunk: int = 3
    local_attn_frames: int = 6
    sink_frames: int = 0
    soft_bias: float = 0.3
    """The KV-bias value where `kv_bias` applies one."""
    blend_chunks: int = 2
    """Chunks a soft prompt change blends over unless the timeline says otherwise."""
    # ---- the loop's fixed rules
    step_schedule: str = "even"
    """even: 1000 - i*1000/n (no zero step); linspace_zero: trunc(linspace(1000, 0, n)), the last
    step t = 0 (its sigma is the schedule table's floor, sigma(1/1000), not 0)."""
    warp_timesteps: bool = True
    """The generator is fed 1000*sigma(t) (Self-Forcing's warp) rather than t itself."""
    recompute_text: str = "current"
    """The conditioning the KV recompute call attends to: the chunk's own, or the previous
    chunk's (Krea recomputes before it applies the chunk's prompt update)."""
    kv_bias: str = "soft"
    """When denoise calls de-weight cached keys by `soft_bias`: on soft transitions only,
    always (every chunk after an epoch's first), or never. Cache-building calls never."""
    bias_skips_anchor: bool = False
    """The bias spares the recompute anchor (the first cached frame after a recompute)."""
    vae_time_cache: str = "wan2.1"
    """The decoder's temporal-upsample history: Wan2.1's [x_{n-1}, x_n] or Krea's variant."""
    drop_first_frames: int = 0
    """Pixel frames of each stream start (chunk 0, every hard cut) decoded but not shown."""
    blend: str = "alpha"
    """Soft prompt change: alpha = (j+1)/N from the previous prompt's embedding, or Krea's lerp
    from the embedding in use when the change arrived with weights linspace(0, 1, N)."""
    reseed_on_cut: bool = False
    """A hard cut restarts the stream's noise from the seed (Krea: a reset is a new session)."""

    def __post_init__(self) -> None:
        for name, value, allowed in (
            ("step_schedule", self.step_schedule, STEP_SCHEDULES),
            ("recompute_text", self.recompute_text, RECOMPUTE_TEXT),
            ("kv_bias", self.kv_bias, KV_BIAS_RULES),
            ("vae_time_cache", self.vae_time_cache, VAE_TIME_CACHE),
            ("blend", self.blend, BLENDS),
        ):
            if value not in allowed:
                raise ConfigError(f"recipe {self.name}: {name}={value!r} is not one of {allowed}")

    def step_list(self, steps: int) -> tuple[int, ...]:
        """The denoising step list of `steps` steps under this recipe's schedule."""
        if not 1 <= steps <= MAX_STEPS:
            raise ConfigError(f"steps must be in 1..{MAX_STEPS}, got {steps} [field=steps]")
        if self.step_schedule == "even":
            return tuple(round(1000 - i * 1000 / steps) for i in range(steps))
        if steps < 2:
            raise ConfigError(f"recipe {self.name} needs steps >= 2 (the last is t = 0) [field=steps]")
        return tuple(int(v) for v in _linspace_float32(1000.0, 0.0, steps))  # .long() truncates

    def run_defaults(self) -> dict[str, object]:
        """The RunConfig fields this recipe sets unless a flag overrides them."""
        return {
            "recipe": self.name,
            "recompute": self.recompute,
            "denoising_step_list": self.step_list(self.steps),
            "frames_per_chunk": self.frames_per_chunk,
            "local_attn_frames": self.local_attn_frames,
            "sink_frames": self.sink_frames,
            "soft_bias": self.soft_bias,
            "blend_chunks": self.blend_chunks,
        }

    def blend_weight(self, step: int, chunks: int) -> float:
        """Weight of the new prompt at chunk `step` (0-based) of an N-chunk soft change."""
        if self.blend == "alpha":
            return (step + 1) / chunks
        # Krea's linspace(0, 1, 1) = [0] never applies the new prompt; here N = 1 switches at once
        return step / (chunks - 1) if chunks > 1 else 1.0


def _linspace_float32(start: float, end: float, n: int) -> list[float]:
    """torch.linspace(start, end, n) in float32, value for value (Krea's schedule is built with
    it): the first half counts up from `start`, the second half back from `end`."""
    step = _f32((end - start) / (n - 1))
    half = n // 2
    return [
        _f32(start + _f32(step * i)) if i < half else _f32(end - _f32(step * (n - 1 - i))) for i in range(n)
    ]


def _f32(x: float) -> float:
    return struct.unpack("<f", struct.pack("<f", x))[0]


RECIPES: Mapping[str, Recipe] = MappingProxyType(
    {
        "streamdit": Recipe(
            name="streamdit",
            reference="streamdit's own loop (the seeds' system): R0a recompute, soft-transition bias",
            recompute="r0a",
            steps=4,
        ),
        "self-forcing": Recipe(
            name="self-forcing",
            reference="guandeh17/Self-Forcing@33593df3 pipeline/causal_inference.py",
            recompute="append",
            steps=4,
            local_attn_frames=21,
        ),
        "krea-realtime": Recipe(
            name="krea-realtime",
            reference="krea-ai/realtime-video@acf4b7b2 release_server.py",
            recompute="r0a",
            steps=5,  # the server's and the demo's default (4 is its "performance" setting)
            step_schedule="linspace_zero",
            recompute_text="previous",
            kv_bias="never",
            vae_time_cache="krea",
            drop_first_frames=3,
            blend="lerp_from_current",
            blend_chunks=4,
            reseed_on_cut=True,
        ),
        "scope-krea": Recipe(
            name="scope-krea",
            reference="daydreamlive/scope@68b0f956 src/scope/core/pipelines/krea_realtime_video",
            recompute="r0a",
            steps=4,
            warp_timesteps=False,
            kv_bias="always",
            bias_skips_anchor=True,
            blend="lerp_from_current",
            blend_chunks=4,
            reseed_on_cut=True,
        ),
    }
)


def get_recipe(name: str) -> Recipe:
    try:
        return RECIPES[name]
    except KeyError:
        raise ConfigError(f"unknown recipe {name!r} (known: {', '.join(RECIPES)}) [field=recipe]") from None
