"""Causal 3-D conv video VAE with explicit streaming caches (Wan2.1-VAE layout).

Owns: `VAEConfig` and its presets, the `CausalVideoVAE` module (encoder, decoder, latent
normalization, seeded init, its CUDA speed settings: channels-last, folded time taps, the
compiled decode step) and the per-stream `StreamingEncoder` / `StreamingDecoder`, and
`warm_up_decoder` (every decode-step variant a stream meets, run once at startup).
Must not import: anything from streamdit except errors (model/ is torch-only, single device).

Compression: 16 latent channels; space ×8; time ×4 with the first frame alone, so a stream of
`1 + 4(F−1)` pixel frames has F latent frames.

Public layouts: pixels `[B, 3, T, H, W]` in [-1, 1]; latents `[B, F, 16, H/8, W/8]` (frames
before channels, the codebase's latent layout). Inputs are cast to the VAE's dtype and must
already be on its device.

Streaming: a `StreamingDecoder` holds a `CausalCache`. Its first `decode_chunk` after creation
or `reset()` turns F latents into `1 + 4(F−1)` frames, every later one into `4F`. Internally
every path (whole clip or chunk) runs one latent frame per step, like Wan's `feat_cache`, so
chunked decode equals whole-clip decode bit for bit. The encoder runs steps of 1 then 4 pixel
frames: its first call takes T ≡ 1 (mod 4) frames, later calls T ≡ 0 (mod 4). After an
exception mid-chunk the stream state is undefined: call `reset()`.

Compiled decode (`compile_decoder`, CUDA runs with --compile): the whole decode step is one
graph, a pure function of (latents, the causal layers' history as a list); the stream's
`CausalCache` stays outside and exchanges that list with it (see vae_blocks). Static shapes: a
stream meets three step variants (its first latent frame alone, the rest of its first chunk,
then every later chunk), plus one step while the history's memory layout settles: 4 graphs,
the same after a hard cut, all compiled by `warm_up_decoder` at startup.

Latent normalization (inside encode/decode): z = (mu − mean) / std per channel, undone before
decoding. Stats are non-persistent buffers chosen by `VAEConfig.latent_norm`: "identity" (the
presets; right for synthetic weights) or "wan2.1" (Wan2.1's published per-channel stats; use it
with a real Wan2.1 VAE checkpoint). They are not in the state dict, matching Wan checkpoints.

Deviations from Wan2.1's `WanVAE_`, each deliberate:
- Encoding is deterministic: latents are `mu` (Wan's `sample(deterministic=True)`); `log_var`
  is computed by `conv1` (kept for checkpoint shape compatibility) and dropped.
- `conv1` and `conv2` (1×1×1) run per step instead of once over the whole clip, so whole and
  chunked paths share arithmetic.
- Decoded pixels are clamped to [-1, 1] (Wan does this in its `WanVAE.decode` wrapper).
- Dropout slots are `nn.Identity` (inference only); `middle_attention=False` replaces the middle
  attention block by an `nn.Identity` (Wan presets keep it).
- The bfloat16 float-cast around nearest upsampling is dropped (nearest copies values exactly).
- Parameters start uninitialized: call `init_weights(seed)` or load a checkpoint.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import torch
from torch import Tensor, nn

from streamdit.errors import ConfigError
from streamdit.model.vae_blocks import (
    CausalCache,
    CausalConv3d,
    Decoder3d,
    Encoder3d,
    StepCache,
    cache_layers,
)

TIME_STRIDE = 4
SPACE_STRIDE = 8
# H200: cuDNN runs the decoder's 96-channel 3-D convs at ~300 TFLOP/s, its wider ones near 600;
# folded into 2-D convs the narrow ones gain (docs/performance.md, "Compiled decode step")
FOLD_BELOW_CHANNELS = 128

# Wan2.1's published per-channel latent statistics (wan/modules/vae.py, class WanVAE).
WAN21_LATENT_MEAN = (
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
)  # fmt: skip
WAN21_LATENT_STD = (
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
)  # fmt: skip


@dataclass(frozen=True, kw_only=True, slots=True)
class VAEConfig:
    """Shape of the VAE; fields mirror Wan's `_video_vae` arguments."""

    name: str
    base_dim: int
    """Width of the first level (Wan: 96)."""
    dim_mult: tuple[int, int, int, int] = (1, 2, 4, 4)
    """Width multipliers of the 4 levels (3 space ×2 resamples → ×8)."""
    num_res_blocks: int = 2
    """Residual blocks per encoder level (the decoder has one more, as in Wan)."""
    z_dim: int = 16
    """Latent channels."""
    temporal_downsample: tuple[bool, bool, bool] = (False, True, True)
    """Which encoder resamples also halve time (exactly two: time ×4). Decoder mirrors it."""
    middle_attention: bool = True
    """Keep Wan's per-frame attention block in the middle of encoder and decoder."""
    latent_norm: str = "identity"
    """Latent statistics: "identity" (synthetic weights) or "wan2.1" (real Wan2.1 weights)."""

    def __post_init__(self) -> None:
        if self.base_dim <= 0 or self.z_dim <= 0 or self.num_res_blocks <= 0:
            raise ConfigError(f"vae: base_dim, z_dim, num_res_blocks must be > 0 ({self})")
        if len(self.dim_mult) != 4 or min(self.dim_mult) <= 0:
            raise ConfigError(f"vae: dim_mult must be 4 positive ints, got {self.dim_mult}")
        if len(self.temporal_downsample) != 3 or sum(self.temporal_downsample) != 2:
            raise ConfigError(
                f"vae: temporal_downsample must have 3 entries, exactly 2 True (time ×4), "
                f"got {self.temporal_downsample}"
            )
        if self.latent_norm not in ("identity", "wan2.1"):
            raise ConfigError(f"vae: latent_norm must be identity|wan2.1, got {self.latent_norm}")
        if self.latent_norm == "wan2.1" and self.z_dim != len(WAN21_LATENT_MEAN):
            raise ConfigError(f"vae: latent_norm=wan2.1 needs z_dim=16, got {self.z_dim}")


VAE_PRESETS: MappingProxyType[str, VAEConfig] = MappingProxyType(
    {
        # 12-frame 64×64 decode in well under a second on one CPU core
        "tiny": VAEConfig(name="tiny", base_dim=8, dim_mult=(1, 2, 2, 2), num_res_blocks=1),
        # Wan2.1 VAE widths: realistic decode cost on GPU (~127 M parameters)
        "wan": VAEConfig(name="wan", base_dim=96),
    }
)


def get_vae_config(name: str) -> VAEConfig:
    try:
        return VAE_PRESETS[name]
    except KeyError:
        known = ", ".join(sorted(VAE_PRESETS))
        raise ConfigError(f"vae: unknown VAE preset {name!r} (known: {known})") from None


def pixel_frames(latent_frames: int, *, first_chunk: bool) -> int:
    """Pixel frames a decode of `latent_frames` yields: 1+4(F−1) on a stream's first chunk."""
    return TIME_STRIDE * latent_frames - (TIME_STRIDE - 1 if first_chunk else 0)


def latent_frames(num_pixel_frames: int, *, first_chunk: bool) -> int:
    """Latent frames an encode of `num_pixel_frames` yields (inverse of `pixel_frames`)."""
    extra = TIME_STRIDE - 1 if first_chunk else 0
    return (num_pixel_frames + extra) // TIME_STRIDE


class CausalVideoVAE(nn.Module):
    """Wan2.1-style causal video VAE: `encoder`, `conv1`, `conv2`, `decoder` (Wan's names)."""

    def __init__(
        self,
        cfg: VAEConfig,
        *,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        self.cfg = cfg
        z = cfg.z_dim
        trunk = (cfg.dim_mult, cfg.num_res_blocks)
        # build on meta and allocate once on the target device: no wasted default init
        with torch.device("meta"):
            self.encoder = Encoder3d(
                cfg.base_dim, 2 * z, *trunk, cfg.temporal_downsample, cfg.middle_attention
            )
            self.conv1 = CausalConv3d(2 * z, 2 * z, 1)
            self.conv2 = CausalConv3d(z, z, 1)
            self.decoder = Decoder3d(
                cfg.base_dim, z, *trunk, cfg.temporal_downsample[::-1], cfg.middle_attention
            )
        self.to(dtype=dtype).to_empty(device=device)
        wan = cfg.latent_norm == "wan2.1"
        mean = WAN21_LATENT_MEAN if wan else (0.0,) * z
        std = WAN21_LATENT_STD if wan else (1.0,) * z
        stat = {"dtype": dtype, "device": device}
        self.latent_mean: Tensor
        self.latent_std: Tensor
        self.register_buffer("latent_mean", torch.tensor(mean, **stat), persistent=False)
        self.register_buffer("latent_std", torch.tensor(std, **stat), persistent=False)
        self._decoder_layers: list[nn.Module] = []
        self._compiled_decode: Callable[..., tuple[Tensor, list[Tensor | None]]] | None = None

    @property
    def dtype(self) -> torch.dtype:
        return self.conv2.weight.dtype

    @torch.no_grad()
    def to_channels_last(self) -> None:
        """Conv weights in NDHWC (`channels_last_3d`), the layout cuDNN's tensor-core conv
        kernels run natively; each conv's output then follows it, so the activations stay
        NDHWC without a transpose per layer. Values are unchanged (a CUDA speed setting)."""
        for module in self.modules():
            if isinstance(module, nn.Conv3d):
                module.weight.data = module.weight.data.contiguous(memory_format=torch.channels_last_3d)

    def fold_time_taps(self, root: nn.Module, below: int = FOLD_BELOW_CHANNELS) -> int:
        """GPU: the causal convs under `root` with fewer than `below` input channels (0: none)
        run as one 2-D conv over their time taps stacked as channels
        (`CausalConv3d._conv_time_folded`): the same sum, other kernels. Returns how many."""
        convs = [m for m in root.modules() if isinstance(m, CausalConv3d)]
        for conv in convs:
            conv.fold_time = conv.in_channels < below
        return sum(conv.fold_time for conv in convs)

    def compile_decoder(self, **options: Any) -> None:
        """Compile the decode step as one graph (static shapes; `options` go to torch.compile,
        e.g. backend, mode). The stream's cache stays outside it (see the module docstring)."""
        self._decoder_layers = cache_layers(self.decoder)
        self._compiled_decode = torch.compile(
            self._decode_step_traced, **{"fullgraph": True, "dynamic": False, **options}
        )

    @torch.no_grad()
    def init_weights(self, seed: int) -> None:
        """Deterministic synthetic init (same values on every device; drawn on CPU in fp32)."""
        gen = torch.Generator(device="cpu").manual_seed(seed)
        for name, param in self.named_parameters():
            param.copy_(_init_value(name, tuple(param.shape), gen))

    def encode(self, pixels: Tensor) -> Tensor:
        """Whole clip [B, 3, T, H, W] (T ≡ 1 mod 4) → latents [B, 1+(T−1)/4, 16, H/8, W/8]."""
        return StreamingEncoder(self).encode_chunk(pixels)

    def decode(self, latents: Tensor) -> Tensor:
        """Whole clip [B, F, 16, h, w] → pixels [B, 3, 1+4(F−1), 8h, 8w] in [-1, 1]."""
        return StreamingDecoder(self).decode_chunk(latents)

    def encode_step(self, pixels: Tensor, cache: CausalCache) -> Tensor:
        """One step: 1 (first) or 4 pixel frames [B, 3, t, H, W] → one latent [B, 1, z, h, w]."""
        moments = self.conv1(self.encoder(pixels, cache))
        mu = moments[:, : self.cfg.z_dim]
        z = (mu - _bcast(self.latent_mean)) / _bcast(self.latent_std)
        return z.transpose(1, 2)

    def decode_step(self, latent: Tensor, cache: CausalCache) -> Tensor:
        """One step: latents [B, z, t, h, w] → pixels [B, 3, 4t, H, W] (1 frame for a stream's
        first step, which must be a single latent)."""
        z = latent * _bcast(self.latent_std) + _bcast(self.latent_mean)
        return self.decoder(self.conv2(z), cache).clamp(-1.0, 1.0)  # type: ignore[arg-type]

    def run_decode_step(self, latent: Tensor, cache: CausalCache) -> Tensor:
        """`decode_step`, through the compiled graph once `compile_decoder` ran."""
        if self._compiled_decode is None:
            return self.decode_step(latent, cache)
        layers = self._decoder_layers
        out, history = self._compiled_decode(
            latent, cache.export(layers), cache.first_step, cache.upsample_history
        )
        cache.store(layers, history)
        return out

    def _decode_step_traced(
        self, latent: Tensor, history: list[Tensor | None], first_step: bool, upsample_history: str
    ) -> tuple[Tensor, list[Tensor | None]]:
        """What `compile_decoder` compiles: one step, its history in and out as a list."""
        cache = StepCache(history, first_step=first_step, upsample_history=upsample_history)
        return self.decode_step(latent, cache), cache.history  # type: ignore[arg-type]


def _bcast(stat: Tensor) -> Tensor:
    return stat.view(1, -1, 1, 1, 1)


def _init_value(name: str, shape: tuple[int, ...], gen: torch.Generator) -> Tensor:
    """Variance-preserving synthetic init chosen by parameter name."""
    if name.endswith(".gamma"):
        return torch.ones(shape)
    if name.endswith(".bias"):
        return 0.02 * torch.randn(shape, generator=gen)
    fan_in = math.prod(shape[1:])
    gain = 1.0
    if ".residual.6." in name or name.endswith("proj.weight"):
        gain = 0.5  # keep residual branches from dominating the skip path
    elif name == "decoder.head.2.weight":
        gain = 0.5  # pixels mostly inside [-1, 1] so the clamp rarely saturates
    return torch.randn(shape, generator=gen) * (gain / math.sqrt(fan_in))


class StreamingEncoder:
    """Per-stream encoder state: `encode_chunk` continues the stream, `reset()` is a hard cut."""

    def __init__(self, vae: CausalVideoVAE) -> None:
        self.vae = vae
        self.cache = CausalCache()

    @property
    def latent_frames_seen(self) -> int:
        return self.cache.steps

    def reset(self) -> None:
        self.cache.reset()

    @torch.no_grad()
    def encode_chunk(self, pixels: Tensor) -> Tensor:
        """[B, 3, T, H, W] → [B, T', 16, H/8, W/8]; T ≡ 1 (mod 4) first, T ≡ 0 (mod 4) later."""
        first = self.cache.first_step
        _check_pixels(pixels, first_chunk=first)
        x = pixels.to(self.vae.dtype)
        outs = []
        start = 0
        while start < x.shape[2]:
            size = 1 if self.cache.first_step else TIME_STRIDE
            step = x[:, :, start : start + size].contiguous()
            outs.append(self.vae.encode_step(step, self.cache))
            self.cache.advance()
            start += size
        return torch.cat(outs, dim=1)


class StreamingDecoder:
    """Per-stream decoder state: `decode_chunk` continues the stream, `reset()` is a hard cut.

    `upsample_history`: the temporal-upsample rule of the decoder (see `CausalCache`)."""

    def __init__(self, vae: CausalVideoVAE, *, upsample_history: str = "wan2.1") -> None:
        self.vae = vae
        self.cache = CausalCache(upsample_history)

    @property
    def latent_frames_seen(self) -> int:
        return self.cache.steps

    def reset(self) -> None:
        self.cache.reset()

    @torch.no_grad()
    def decode_chunk(self, latents: Tensor) -> Tensor:
        """[B, F, 16, h, w] → [B, 3, T, 8h, 8w]; T = 1+4(F−1) on a stream's first chunk, else 4F."""
        _check_latents(latents, self.vae.cfg.z_dim)
        x = latents.to(self.vae.dtype).transpose(1, 2)  # [B, z, F, h, w]
        outs = []
        for start, stop in self._steps(x.shape[2]):
            outs.append(self.vae.run_decode_step(x[:, :, start:stop].contiguous(), self.cache))
            self.cache.advance(stop - start)
        return torch.cat(outs, dim=2)

    def _steps(self, frames: int) -> list[tuple[int, int]]:
        """The latent frames each decoder step takes: [start, stop) ranges.

        A stream's first latent frame is always decoded alone (the time upsampling passes it
        through, see `Resample`). Under the wan2.1 history rule every causal layer carries
        "the last frames of its input", so the rest of a chunk is ONE step: the same arithmetic
        as frame by frame, in convolutions 3x larger (a GPU runs a 1-latent decode step
        launch-bound). The krea rule is defined per frame, so it steps frame by frame.
        """
        first = 1 if self.cache.first_step else 0
        if self.cache.upsample_history != "wan2.1":
            return [(i, i + 1) for i in range(frames)]
        return [r for r in ((0, first), (first, frames)) if r[1] > r[0]]


@torch.no_grad()
def warm_up_decoder(
    vae: CausalVideoVAE, shape: tuple[int, ...], *, upsample_history: str = "wan2.1", max_chunks: int = 6
) -> tuple[int, int]:
    """Decode synthetic chunks of `shape` [B, F, z, h, w] on a throwaway stream until every
    step variant a stream of such chunks meets has run (so compiled): at least three chunks (a
    stream's first step, the rest of its first chunk or at F = 1 the second chunk, the steady
    step), then until a chunk compiles no new graph (the history's memory layout can take one
    more step to settle). Returns (chunks decoded, graphs compiled)."""
    gen = torch.Generator(device=vae.latent_std.device).manual_seed(0)
    decoder = StreamingDecoder(vae, upsample_history=upsample_history)
    first = _graphs_compiled()
    chunks = 0
    while chunks < max_chunks:
        before = _graphs_compiled()
        decoder.decode_chunk(torch.randn(shape, generator=gen, device=gen.device, dtype=vae.dtype))
        chunks += 1
        if chunks >= 3 and _graphs_compiled() == before:
            break
    if gen.device.type == "cuda":
        torch.cuda.current_stream(gen.device).synchronize()
    return chunks, _graphs_compiled() - first


def _graphs_compiled() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def _check_pixels(pixels: Tensor, *, first_chunk: bool) -> None:
    if pixels.ndim != 5 or pixels.shape[1] != 3:
        raise ConfigError(f"pixels: expected [B, 3, T, H, W], got {tuple(pixels.shape)}")
    t, h, w = pixels.shape[2:]
    for field, size in (("height", h), ("width", w)):
        if size <= 0 or size % SPACE_STRIDE:
            raise ConfigError(f"{field}: {size} is not a positive multiple of {SPACE_STRIDE}")
    want = 1 if first_chunk else 0
    if t <= 0 or t % TIME_STRIDE != want:
        which = "a stream's first chunk" if first_chunk else "a continuing chunk"
        raise ConfigError(f"num_frames: {t} pixel frames for {which}; need T ≡ {want} (mod {TIME_STRIDE})")


def _check_latents(latents: Tensor, z_dim: int) -> None:
    if latents.ndim != 5 or latents.shape[2] != z_dim or latents.shape[1] < 1:
        raise ConfigError(f"latents: expected [B, F>=1, {z_dim}, h, w], got {tuple(latents.shape)}")
