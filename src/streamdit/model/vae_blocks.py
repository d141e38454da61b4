"""Building blocks of the causal 3-D conv video VAE (see vae.py for the model and its streams).

Owns: the explicit streaming cache (`CausalCache`), the causal conv, the RMS norm, residual,
attention and time/space resampling blocks, and the encoder/decoder trunks. Module names and
parameter shapes follow Wan2.1's `wan/modules/vae.py` so a Wan VAE checkpoint maps onto them
one to one (e.g. `residual.0.gamma`, `resample.1.weight`, `time_conv.weight`, `head.2.weight`).

Every block takes a `CausalCache` and is run one *step* at a time: in the encoder one group of
1 (first step) or 4 (later steps) pixel frames, as Wan's `feat_cache` loop does (so chunked and
whole-clip encoding run identical arithmetic); in the decoder a stream's first latent frame
alone, then any number of latent frames per step (`StreamingDecoder._steps`: equal to Wan's
frame-by-frame loop up to float rounding, in larger, faster convolutions).

Compiled steps (`CausalVideoVAE.compile_decoder`) stay pure functions of tensors:
`cache_layers` numbers the layers that carry history (`_cache_slot`), `CausalCache.export` /
`store` move their entries in and out of the graph as one list, and inside it a `StepCache`
(`get` / `put` / `first_step` over that list) stands in for the stream's cache.

Must not import: anything from streamdit except errors (model/ is torch-only, single device).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class CausalCache:
    """Activations that causal layers carry from one step of a stream to the next.

    Wan's `feat_cache` list made explicit: entries are keyed by the layer that owns them rather
    than by a running index, so the order in which layers run cannot silently misalign them.
    `steps` counts finished steps; the resample blocks treat step 0 specially (the first frame
    of a stream is compressed/expanded alone). `reset()` is a hard cut.

    `upsample_history` is the rule of the decoder's temporal upsampling (the only place two
    public decoders differ): "wan2.1" keeps [x_{n-1}, x_n] as the time conv's history, "krea"
    (Krea Realtime's `vae_block3.py`) keeps [where(h_last == 0, 0, x_n), x_n], h_last being the
    last frame of the previous history (zeros before step 1). Decodes agree for the first three
    latent frames of a stream and differ from the fourth on.
    """

    def __init__(self, upsample_history: str = "wan2.1") -> None:
        if upsample_history not in ("wan2.1", "krea"):
            raise ValueError(f"upsample_history must be wan2.1 or krea, got {upsample_history!r}")
        self.upsample_history = upsample_history
        self._history: dict[nn.Module, Tensor] = {}
        self.steps = 0

    @property
    def first_step(self) -> bool:
        return self.steps == 0

    def get(self, layer: nn.Module) -> Tensor | None:
        return self._history.get(layer)

    def put(self, layer: nn.Module, frames: Tensor) -> None:
        # clone: a view would keep the whole activation of this step alive
        self._history[layer] = frames.clone()

    def advance(self, steps: int = 1) -> None:
        """Mark `steps` steps of the stream done (called by the streaming encoder/decoder)."""
        self.steps += steps

    def reset(self) -> None:
        self._history.clear()
        self.steps = 0

    def export(self, layers: Sequence[nn.Module]) -> list[Tensor | None]:
        """The entries of `layers` in their order (None: no history yet), for a compiled step."""
        return [self._history.get(layer) for layer in layers]

    def store(self, layers: Sequence[nn.Module], history: Sequence[Tensor | None]) -> None:
        """Take back a compiled step's entries (fresh tensors: no clone needed)."""
        self._history.update((k, v) for k, v in zip(layers, history, strict=True) if v is not None)


class StepCache:
    """One step's view of a `CausalCache`: a list indexed by each layer's `_cache_slot`, which
    goes in and out of a compiled step as graph inputs and outputs (no Python state inside)."""

    def __init__(self, history: Sequence[Tensor | None], *, first_step: bool, upsample_history: str) -> None:
        self.history = list(history)
        self.first_step = first_step
        self.upsample_history = upsample_history

    def get(self, layer: nn.Module) -> Tensor | None:
        return self.history[layer._cache_slot]  # type: ignore[index]

    def put(self, layer: nn.Module, frames: Tensor) -> None:
        self.history[layer._cache_slot] = frames.clone()  # type: ignore[index]


def cache_layers(root: nn.Module) -> list[nn.Module]:
    """The layers under `root` that keep history between steps, each numbered (`_cache_slot`)
    by its position in the returned list."""
    layers = [
        m
        for m in root.modules()
        if (isinstance(m, CausalConv3d) and m._time_pad > 0)
        or (isinstance(m, Resample) and m.mode == "downsample3d")
    ]
    for slot, layer in enumerate(layers):
        layer._cache_slot = slot
    return layers


Cache = CausalCache | StepCache


class CausalConv3d(nn.Conv3d):
    """Conv3d padded only towards the past in time (and symmetrically in space).

    With a cache, the last `kernel_t − 1` input frames of earlier steps stand in for the zero
    padding, so a stream processed step by step equals the whole clip processed causally.
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        kernel: int | tuple[int, int, int],
        stride: int | tuple[int, int, int] = 1,
        padding: int | tuple[int, int, int] = 0,
    ) -> None:
        super().__init__(in_dim, out_dim, kernel, stride=stride, padding=padding)
        pt, ph, pw = self.padding  # type: ignore[misc]
        self._time_pad = 2 * pt
        self._space_pad = (pw, pw, ph, ph)
        self.padding = (0, 0, 0)
        self.fold_time = False  # GPU: one 2-D conv over the time taps as channels (see below)

    def forward(self, x: Tensor, cache: Cache | None = None) -> Tensor:  # type: ignore[override]
        pad_t = self._time_pad
        if pad_t > 0 and cache is not None:
            prev = cache.get(self)
            if prev is not None:
                x = torch.cat([prev, x], dim=2)
            pad_t -= 0 if prev is None else prev.shape[2]
            cache.put(self, x[:, :, -self._time_pad :])
        if self.fold_time and self.stride[0] == 1 and x.device.type != "cpu":
            return self._conv_time_folded(F.pad(x, (0, 0, 0, 0, pad_t, 0)) if pad_t else x)
        x = F.pad(x, (*self._space_pad, pad_t, 0))
        if x.device.type == "cpu" and self.stride[0] == 1:
            return self._conv_by_time_taps(x)
        return super().forward(x)

    def _conv_time_folded(self, x: Tensor) -> Tensor:
        """The same convolution as ONE 2-D conv: output frame t sees input frames t..t+kt−1
        stacked as kt·C channels, the weight [O, C, kt, kh, kw] folded to [O, kt·C, kh, kw]: the
        same sum (one reduction, one rounding) in other cuDNN kernels; spatial zero padding is
        the conv's own. The taps are stacked channels-last ([B, T, H, W, kt, C], one coalesced
        write of kt copies of the input), which is the 2-D conv's input layout as it stands."""
        b, c, t, h, w = x.shape
        kt = self.kernel_size[0]
        t_out = t - kt + 1
        xl = x.permute(0, 2, 3, 4, 1)  # [B, T, H, W, C]: a view of a channels-last x
        taps = xl if kt == 1 else torch.stack([xl[:, i : i + t_out] for i in range(kt)], dim=4)
        frames = taps.reshape(b * t_out, h, w, kt * c).permute(0, 3, 1, 2)
        weight = self.weight.permute(0, 2, 1, 3, 4).reshape(self.out_channels, kt * c, *self.kernel_size[1:])
        weight = weight.contiguous(memory_format=torch.channels_last)
        y = F.conv2d(frames, weight, self.bias, self.stride[1:], (self._space_pad[2], self._space_pad[0]))
        return y.reshape(b, t_out, *y.shape[1:]).transpose(1, 2)

    def _conv_by_time_taps(self, x: Tensor) -> Tensor:
        """The same convolution as a sum over time taps of batched 2-D convs.

        PyTorch's CPU conv3d falls back to a slow unfolded kernel (~6x slower than oneDNN's
        conv2d at VAE shapes), and decode is the largest Stage 0 cost. Both the streaming and
        the whole-clip paths run this same code, so they stay bit-identical.
        """
        b, c, t, h, w = x.shape
        kt = self.kernel_size[0]
        t_out = t - kt + 1
        out: Tensor | None = None
        for i in range(kt):
            frames = x[:, :, i : i + t_out].transpose(1, 2).reshape(b * t_out, c, h, w)
            bias = self.bias if i == 0 else None
            y = F.conv2d(frames, self.weight[:, :, i], bias, self.stride[1:], 0, self.dilation[1:])
            out = y if out is None else out + y
        assert out is not None
        return out.reshape(b, t_out, *out.shape[1:]).transpose(1, 2)


class RMSNorm(nn.Module):
    """Wan's RMS_norm: L2-normalize over channels, times sqrt(dim) and a learned `gamma`."""

    def __init__(self, dim: int, *, images: bool) -> None:
        super().__init__()
        # images=True normalizes [N, C, H, W]; False normalizes [B, C, T, H, W]
        broadcast = (1, 1) if images else (1, 1, 1)
        self.scale = dim**0.5
        self.gamma = nn.Parameter(torch.ones(dim, *broadcast))

    def forward(self, x: Tensor) -> Tensor:
        return F.normalize(x, dim=1) * self.scale * self.gamma


class Upsample2x(nn.Module):
    """Nearest-exact ×2 in space (parameter-free; index 0 of Wan's `resample` Sequential)."""

    def forward(self, x: Tensor) -> Tensor:
        return F.interpolate(x, scale_factor=2.0, mode="nearest-exact")


def _per_frame(fn: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
    """Apply a 2-D module to every frame of [B, C, T, H, W]."""
    b, c, t, h, w = x.shape
    y = fn(x.transpose(1, 2).reshape(b * t, c, h, w))
    return y.reshape(b, t, *y.shape[1:]).transpose(1, 2)


class Resample(nn.Module):
    """Space ×2 down/up sampling, optionally with a causal ×2 in time (Wan's `Resample`).

    Time rules at the first step of a stream (match Wan): `downsample3d` passes the single first
    frame through and remembers it; `upsample3d` leaves the first frame alone (1 frame out) and
    its time conv starts from zero history at step 1. Later steps: down halves T via a stride-2
    conv over [last previous frame ‖ frames]; up doubles T by splitting channels into two frames.
    """

    def __init__(self, dim: int, mode: str) -> None:
        super().__init__()
        if mode not in ("upsample2d", "upsample3d", "downsample2d", "downsample3d"):
            raise ValueError(f"unknown resample mode {mode!r}")
        self.mode = mode
        self.resample: nn.Sequential
        if mode.startswith("upsample"):
            self.resample = nn.Sequential(Upsample2x(), nn.Conv2d(dim, dim // 2, 3, padding=1))
        else:
            # pad right/bottom only, like Wan, so H/2 is exact for even H
            self.resample = nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(dim, dim, 3, 2))
        if mode == "upsample3d":
            self.time_conv = CausalConv3d(dim, dim * 2, (3, 1, 1), padding=(1, 0, 0))
        elif mode == "downsample3d":
            self.time_conv = CausalConv3d(dim, dim, (3, 1, 1), stride=(2, 1, 1))

    def forward(self, x: Tensor, cache: Cache) -> Tensor:
        if self.mode == "upsample3d" and not cache.first_step:
            before = cache.get(self.time_conv)
            step_in = x
            x = self.time_conv(x, cache)
            if cache.upsample_history == "krea":
                cache.put(self.time_conv, _krea_history(before, step_in))
            b, c2, t, h, w = x.shape
            # channels [2, C] -> frames interleaved: out frame 2i+j comes from half j of frame i
            x = x.reshape(b, 2, c2 // 2, t, h, w)
            x = torch.stack((x[:, 0], x[:, 1]), dim=3).reshape(b, c2 // 2, 2 * t, h, w)
        x = _per_frame(self.resample, x)
        if self.mode == "downsample3d":
            prev = cache.get(self)
            cache.put(self, x[:, :, -1:])
            if not cache.first_step:
                assert prev is not None, "downsample3d history missing after step 0"
                x = self.time_conv(torch.cat([prev, x], dim=2))
        return x


def _krea_history(before: Tensor | None, x: Tensor) -> Tensor:
    """Krea's time-conv history after a step: [where(h_last == 0, 0, x_n), x_n] (see CausalCache)."""
    if x.shape[2] >= 2:
        return x[:, :, -2:]
    last = torch.zeros_like(x) if before is None else before[:, :, -1:]
    return torch.cat([torch.where(last == 0, torch.zeros_like(x), x), x], dim=2)


class ResidualBlock(nn.Module):
    """norm → SiLU → conv → norm → SiLU → (dropout slot) → conv, plus a 1×1 shortcut."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        # indices match Wan's Sequential (2 and 6 are the convs; 5 was Dropout, inert here)
        self.residual = nn.Sequential(
            RMSNorm(in_dim, images=False),
            nn.SiLU(),
            CausalConv3d(in_dim, out_dim, 3, padding=1),
            RMSNorm(out_dim, images=False),
            nn.SiLU(),
            nn.Identity(),
            CausalConv3d(out_dim, out_dim, 3, padding=1),
        )
        self.shortcut = CausalConv3d(in_dim, out_dim, 1) if in_dim != out_dim else nn.Identity()

    def forward(self, x: Tensor, cache: Cache) -> Tensor:
        r = self.residual
        h = self.shortcut(x)
        x = r[2](r[1](r[0](x)), cache)
        x = r[6](r[5](r[4](r[3](x))), cache)
        return x + h


class AttentionBlock(nn.Module):
    """Single-head self-attention over the pixels of each frame (no mixing across time)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = RMSNorm(dim, images=True)
        self.to_qkv = nn.Conv2d(dim, dim * 3, 1)
        self.proj = nn.Conv2d(dim, dim, 1)

    def _attend(self, x: Tensor) -> Tensor:
        n, c, h, w = x.shape
        qkv = self.to_qkv(self.norm(x)).reshape(n, 1, c * 3, h * w).transpose(2, 3)
        q, k, v = qkv.contiguous().chunk(3, dim=-1)
        y = F.scaled_dot_product_attention(q, k, v)
        return self.proj(y.squeeze(1).transpose(1, 2).reshape(n, c, h, w))

    def forward(self, x: Tensor, cache: Cache) -> Tensor:
        del cache  # per-frame: nothing to carry
        return x + _per_frame(self._attend, x)


def _middle(dim: int, attention: bool) -> nn.ModuleList:
    mid: list[nn.Module] = [ResidualBlock(dim, dim)]
    mid.append(AttentionBlock(dim) if attention else nn.Identity())
    mid.append(ResidualBlock(dim, dim))
    return nn.ModuleList(mid)


def _run(layers: nn.ModuleList, x: Tensor, cache: Cache) -> Tensor:
    for layer in layers:
        x = x if isinstance(layer, nn.Identity) else layer(x, cache)
    return x


class Encoder3d(nn.Module):
    """Pixels [B, 3, t, H, W] → 2·z_dim moments [B, 2z, t', H/8, W/8] for one step."""

    def __init__(
        self,
        dim: int,
        z_out: int,
        dim_mult: Sequence[int],
        num_res_blocks: int,
        temporal_downsample: Sequence[bool],
        attention: bool,
    ) -> None:
        super().__init__()
        dims = [dim * u for u in (1, *dim_mult)]
        self.conv1 = CausalConv3d(3, dims[0], 3, padding=1)
        blocks: list[nn.Module] = []
        for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:], strict=True)):
            for _ in range(num_res_blocks):
                blocks.append(ResidualBlock(in_dim, out_dim))
                in_dim = out_dim
            if i != len(dim_mult) - 1:
                mode = "downsample3d" if temporal_downsample[i] else "downsample2d"
                blocks.append(Resample(out_dim, mode))
        self.downsamples = nn.ModuleList(blocks)
        self.middle = _middle(dims[-1], attention)
        self.head = nn.Sequential(
            RMSNorm(dims[-1], images=False), nn.SiLU(), CausalConv3d(dims[-1], z_out, 3, padding=1)
        )

    def forward(self, x: Tensor, cache: Cache) -> Tensor:
        x = self.conv1(x, cache)
        x = _run(self.downsamples, x, cache)
        x = _run(self.middle, x, cache)
        return self.head[2](self.head[1](self.head[0](x)), cache)


class Decoder3d(nn.Module):
    """Latents [B, z, 1, h, w] → pixels [B, 3, 1 or 4, 8h, 8w] for one step."""

    def __init__(
        self,
        dim: int,
        z_dim: int,
        dim_mult: Sequence[int],
        num_res_blocks: int,
        temporal_upsample: Sequence[bool],
        attention: bool,
    ) -> None:
        super().__init__()
        dims = [dim * u for u in (dim_mult[-1], *reversed(dim_mult))]
        self.conv1 = CausalConv3d(z_dim, dims[0], 3, padding=1)
        self.middle = _middle(dims[0], attention)
        blocks: list[nn.Module] = []
        for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:], strict=True)):
            # every upsample halves channels (Wan hard-codes this for levels 1..3)
            in_dim = in_dim // 2 if i > 0 else in_dim
            for _ in range(num_res_blocks + 1):
                blocks.append(ResidualBlock(in_dim, out_dim))
                in_dim = out_dim
            if i != len(dim_mult) - 1:
                mode = "upsample3d" if temporal_upsample[i] else "upsample2d"
                blocks.append(Resample(out_dim, mode))
        self.upsamples = nn.ModuleList(blocks)
        self.head = nn.Sequential(
            RMSNorm(dims[-1], images=False), nn.SiLU(), CausalConv3d(dims[-1], 3, 3, padding=1)
        )

    def forward(self, x: Tensor, cache: Cache) -> Tensor:
        x = self.conv1(x, cache)
        x = _run(self.middle, x, cache)
        x = _run(self.upsamples, x, cache)
        return self.head[2](self.head[1](self.head[0](x)), cache)
