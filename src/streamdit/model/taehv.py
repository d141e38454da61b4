"""Tiny streaming video decoder for Wan2.1 latents (TAEHV decoder layout, `taew2_1.pth`).

Owns: `TinyVAEConfig`, the `TinyVideoDecoder` module (the decoder half of Ollin Boer Bohan's
TAEHV, github.com/madebyollin/taehv), its seeded init, the per-stream `StreamingTinyDecoder`
and `load_tiny_decoder_state` (the published state dict's `decoder.*` tensors).
Must not import: anything from streamdit except errors (model/ is torch-only, single device).

Architecture: a flat `nn.Sequential` whose indices equal the published keys: Clamp
(3·tanh(x/3)), conv 16→256, ReLU, then three stages of [3 MemBlocks, nearest ×2 upsample,
TGrow, conv to the next width (no bias)], then ReLU and conv →3. A MemBlock sees its input
frame and its previous input frame (zeros at a stream start): relu(convs(cat[x, past]) + x).
A TGrow is a 1×1 conv to `stride·C` channels whose channel groups become `stride` consecutive
frames. Strides are (1, 2, 2) at defaults: one latent frame → 4 pixel frames.

Frame counts: like the reference `decode_video`, the first `4 − 1 = 3` frames of a stream are
dropped (they come from no latent history and are not in Wan's causal alignment), so a first
chunk of F latents yields 1 + 4(F−1) frames and later chunks 4F, the same as the Wan VAE's
`StreamingDecoder`.

Latent space: the reference takes the diffusion model's latents as they are, i.e. Wan's
*normalized* z = (mu − mean)/std — its README ("TAEHV does not use any latent scales / shifts
(TAEHV encodes / decodes exactly what diffusion models use)") and its Wan2.1 diffusers demo
(examples/TAEW2.1_T2I_Demo.ipynb, a wrapper with latents_mean=0, latents_std=1, so the
pipeline hands the transformer's latents straight through). That is the space the project's
Wan VAE `StreamingDecoder` takes, so no statistics are applied here.

Streaming: every chunk runs each layer once over all its frames ([T·B, C, H, W], time-major
so a one-frame shift is a slice along dim 0); a MemBlock's past is its input shifted by one
frame, the first row coming from the last frame of the previous chunk. TGrow is per frame, so
MemBlock memories are the only state. Decoding a whole clip after `reset()` is one chunk, so
chunked and whole-clip decoding share one code path. After an exception mid-chunk the stream
state is undefined: call `reset()`.

Deviations from the reference, each deliberate:
- Decoder only (no encoder, no 'super' or patch-size variants); `encoder.*` keys are ignored.
- Output is mapped from the reference's [0, 1] to [-1, 1] (after the same clamp) and laid out
  [B, 3, T, H, W] like the Wan VAE; latents come in [B, F, 16, h, w] like the reference.
- Activations run channels-last; time is flattened time-major instead of batch-major.
- Parameters start uninitialized: call `init_weights(seed)` or load a checkpoint.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from streamdit.errors import CheckpointError, ConfigError


@dataclass(frozen=True, kw_only=True, slots=True)
class TinyVAEConfig:
    """Shape of the decoder; defaults are the published `taew2_1.pth`."""

    latent_channels: int = 16
    widths: tuple[int, int, int, int] = (256, 128, 64, 64)
    """Channels of the three MemBlock stages and of the final conv's input."""
    time_upscale: tuple[bool, bool] = (True, True)
    """Whether stages 2 and 3 double time (stage 1 never does, as in the reference)."""
    space_upscale: tuple[bool, bool, bool] = (True, True, True)
    """Whether each stage doubles height and width."""

    def __post_init__(self) -> None:
        if self.latent_channels <= 0 or len(self.widths) != 4 or min(self.widths) <= 0:
            raise ConfigError(f"tiny vae: latent_channels and 4 widths must be > 0 ({self})")
        if len(self.time_upscale) != 2 or len(self.space_upscale) != 3:
            raise ConfigError(f"tiny vae: need 2 time_upscale and 3 space_upscale flags ({self})")

    @property
    def time_strides(self) -> tuple[int, int, int]:
        return (1, 2 if self.time_upscale[0] else 1, 2 if self.time_upscale[1] else 1)

    @property
    def time_factor(self) -> int:
        return math.prod(self.time_strides)

    @property
    def space_factor(self) -> int:
        return 2 ** sum(self.space_upscale)


def _conv3(c_in: int, c_out: int, *, bias: bool = True) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, 3, padding=1, bias=bias)


class Clamp(nn.Module):
    """Soft clamp of the latents to (−3, 3)."""

    def forward(self, x: Tensor) -> Tensor:
        return torch.tanh(x / 3) * 3


class MemBlock(nn.Module):
    """Residual block fed the current frame and the previous one (`conv` is the published name)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Sequential(
            _conv3(2 * channels, channels), nn.ReLU(), _conv3(channels, channels), nn.ReLU(),
            _conv3(channels, channels),
        )  # fmt: skip

    def forward(self, x: Tensor, past: Tensor) -> Tensor:
        return torch.relu(self.conv(torch.cat([x, past], dim=1)) + x)


class TGrow(nn.Module):
    """1×1 conv to `stride` channel groups, each becoming one output frame (in group order)."""

    def __init__(self, channels: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        self.conv = nn.Conv2d(channels, channels * stride, 1, bias=False)

    def forward(self, x: Tensor, batch: int) -> Tensor:
        """[T·B, C, H, W] (time-major) → [T·stride·B, C, H, W]."""
        y = self.conv(x)
        if self.stride == 1:
            return y
        tb, sc, h, w = y.shape
        # work in NHWC so the group → frame shuffle is one copy and the result stays channels-last
        y = y.permute(0, 2, 3, 1).reshape(tb // batch, batch, h, w, self.stride, sc // self.stride)
        y = y.permute(0, 4, 1, 2, 3, 5).reshape(-1, h, w, sc // self.stride)
        return y.permute(0, 3, 1, 2)


class TinyVideoDecoder(nn.Module):
    """TAEHV decoder; `decoder` indices match the published `decoder.<i>.*` keys."""

    def __init__(self, cfg: TinyVAEConfig, *, device: torch.device | str, dtype: torch.dtype) -> None:
        super().__init__()
        self.cfg = cfg
        w = cfg.widths
        # build on meta and allocate once on the target device: no wasted default init
        with torch.device("meta"):
            layers: list[nn.Module] = [Clamp(), _conv3(cfg.latent_channels, w[0]), nn.ReLU()]
            for stage in range(3):
                c = w[stage]
                layers += [MemBlock(c), MemBlock(c), MemBlock(c)]
                layers.append(nn.Upsample(scale_factor=2 if cfg.space_upscale[stage] else 1))
                layers.append(TGrow(c, cfg.time_strides[stage]))
                layers.append(_conv3(c, w[stage + 1], bias=False))
            layers += [nn.ReLU(), _conv3(w[3], 3)]
            self.decoder = nn.Sequential(*layers)
        self.to(dtype=dtype).to_empty(device=device)

    @property
    def dtype(self) -> torch.dtype:
        return self.decoder[1].weight.dtype

    @property
    def device(self) -> torch.device:
        return self.decoder[1].weight.device

    @torch.no_grad()
    def init_weights(self, seed: int) -> None:
        """Deterministic synthetic init (same values on every device; drawn on CPU in fp32)."""
        gen = torch.Generator(device="cpu").manual_seed(seed)
        last = f"decoder.{len(self.decoder) - 1}."
        for name, param in self.named_parameters():
            shape = tuple(param.shape)
            if name == last + "bias":
                value = torch.full(shape, 0.5)  # centre pixels in [0, 1] so the clamp rarely bites
            elif name.endswith(".bias"):
                value = 0.02 * torch.randn(shape, generator=gen)
            else:
                # variance-preserving; damp residual branches and the head so 9 MemBlocks stay tame
                gain = 0.5 if name.endswith(".conv.4.weight") or name.startswith(last) else 1.0
                value = torch.randn(shape, generator=gen) * (gain / math.sqrt(math.prod(shape[1:])))
            param.copy_(value)

    def run(self, x: Tensor, batch: int, memory: list[Tensor | None]) -> Tensor:
        """Raw decoder over a time-major chunk [F·B, C, h, w] → [4F·B, 3, H, W] in ~[0, 1].

        `memory[i]` is MemBlock i's last input frame [B, C, H, W] (None: stream start); updated.
        """
        for i, layer in enumerate(self.decoder):
            if isinstance(layer, MemBlock):
                carry = memory[i]
                head = torch.zeros_like(x[:batch]) if carry is None else carry
                past = torch.cat([head, x[:-batch]], dim=0)
                memory[i] = x[-batch:].clone()  # a copy: don't pin the whole chunk until the next one
                x = layer(x, past)
            elif isinstance(layer, TGrow):
                x = layer(x, batch)
            else:
                x = layer(x)
        return x


class StreamingTinyDecoder:
    """Per-stream decoder state: `decode_chunk` continues the stream, `reset()` is a hard cut."""

    def __init__(self, model: TinyVideoDecoder) -> None:
        self.model = model
        self.reset()

    @property
    def latent_frames_seen(self) -> int:
        return self._seen

    def reset(self) -> None:
        self._seen = 0
        self._geometry = (0, 0, 0)
        self._memory: list[Tensor | None] = [None] * len(self.model.decoder)

    @torch.no_grad()
    def decode_chunk(self, latents: Tensor) -> Tensor:
        """[B, F, 16, h, w] (normalized Wan latents) → [B, 3, T, 8h, 8w] in [-1, 1].

        T = 1 + 4(F−1) on a stream's first chunk, 4F afterwards."""
        cfg = self.model.cfg
        if latents.ndim != 5 or latents.shape[2] != cfg.latent_channels or latents.shape[1] < 1:
            raise ConfigError(
                f"latents: expected [B, F>=1, {cfg.latent_channels}, h, w], got {tuple(latents.shape)}"
            )
        b, f, c, h, w = latents.shape
        first = self._seen == 0
        if first:
            self._geometry = (b, h, w)
        elif self._geometry != (b, h, w):
            raise ConfigError(
                f"latents: [B, h, w] = {[b, h, w]} mid-stream, the stream has {list(self._geometry)}; "
                "call reset() first"
            )
        x = latents.to(self.model.dtype).transpose(0, 1).reshape(f * b, c, h, w)
        x = x.contiguous(memory_format=torch.channels_last)
        y = self.model.run(x, b, self._memory)
        self._seen += f
        y = y.reshape(-1, b, *y.shape[1:]).permute(1, 2, 0, 3, 4)  # [B, 3, T, H, W]
        if first:
            y = y[:, :, cfg.time_factor - 1 :]
        return y.clamp(0.0, 1.0).mul(2.0).sub(1.0).contiguous()


def load_tiny_decoder_state(model: TinyVideoDecoder, state: Mapping[str, Tensor]) -> None:
    """Copy the `decoder.*` tensors of a published TAEHV state dict (`encoder.*` is ignored).

    A TGrow whose time upscale is disabled keeps its published (stride 2) weight's last channel
    group, i.e. the last frame of each latent, as the reference's `patch_tgrow_layers` does.
    Every key and shape is checked before anything is copied."""
    params = dict(model.named_parameters())
    given = {k: v for k, v in state.items() if k.startswith("decoder.")}
    missing = sorted(set(params) - set(given))
    unexpected = sorted(set(given) - set(params))
    if missing or unexpected:
        raise CheckpointError(f"tiny vae: missing keys {missing}, unexpected keys {unexpected}")
    narrowed = {
        f"decoder.{i}.conv.weight"
        for i, m in enumerate(model.decoder)
        if isinstance(m, TGrow) and m.stride == 1
    }
    values: dict[str, Tensor] = {}
    for key, param in params.items():
        value = given[key]
        if key in narrowed and value.shape[0] == 2 * param.shape[0]:
            value = value[param.shape[0] :]
        if value.shape != param.shape:
            raise CheckpointError(
                f"tiny vae: {key} has shape {tuple(value.shape)}, the model needs {tuple(param.shape)}"
            )
        values[key] = value
    with torch.no_grad():
        for key, param in params.items():
            param.copy_(values[key])
