"""Tiny TAEHV decoder: published layout, frame counts, range, streaming == whole clip, init, loading.

The math is checked against a deliberately naive decoder written here (one frame through every
layer at a time, functional convs), in float64. Narrow widths and 3×4 latents keep it fast on CPU.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from streamdit.errors import ConfigError
from streamdit.model.taehv import (
    Clamp,
    MemBlock,
    StreamingTinyDecoder,
    TGrow,
    TinyVAEConfig,
    TinyVideoDecoder,
    load_tiny_decoder_state,
)

SMALL = TinyVAEConfig(widths=(16, 8, 8, 8))


def _model(cfg: TinyVAEConfig = SMALL, seed: int = 0, dtype: torch.dtype = torch.float32) -> TinyVideoDecoder:
    model = TinyVideoDecoder(cfg, device=torch.device("cpu"), dtype=dtype)
    model.init_weights(seed)
    return model


def _latents(frames: int, batch: int = 1, seed: int = 1, dtype: torch.dtype = torch.float32) -> Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, frames, 16, 3, 4, generator=gen).to(dtype)


def _stream(model: TinyVideoDecoder, latents: Tensor, split: tuple[int, ...]) -> list[Tensor]:
    dec, outs, start = StreamingTinyDecoder(model), [], 0
    for n in split:
        outs.append(dec.decode_chunk(latents[:, start : start + n]))
        start += n
    assert dec.latent_frames_seen == start
    return outs


def naive_decode(model: TinyVideoDecoder, latents: Tensor) -> Tensor:
    """Reference algorithm, one frame at a time through every layer (causal depth-first order).

    MemBlock i remembers its previous input frame (zeros at the start); a TGrow splits its
    output channels into `stride` groups that continue as consecutive frames; the first
    (time factor − 1) frames are dropped; [0, 1] output is clamped and mapped to [-1, 1]."""
    layers = list(model.decoder)
    memory: dict[int, Tensor] = {}
    frames: list[Tensor] = []

    def conv(layer: nn.Conv2d, x: Tensor) -> Tensor:
        return F.conv2d(x, layer.weight, layer.bias, padding=layer.kernel_size[0] // 2)

    def visit(x: Tensor, i: int) -> None:
        if i == len(layers):
            frames.append(x)
            return
        layer = layers[i]
        if isinstance(layer, MemBlock):
            past = memory.get(i, torch.zeros_like(x))
            memory[i] = x
            h = F.relu(conv(layer.conv[0], torch.cat([x, past], 1)))
            h = conv(layer.conv[4], F.relu(conv(layer.conv[2], h)))
            visit(F.relu(h + x), i + 1)
        elif isinstance(layer, TGrow):
            for part in conv(layer.conv, x).chunk(layer.stride, dim=1):
                visit(part, i + 1)
        elif isinstance(layer, Clamp):
            visit(3 * torch.tanh(x / 3), i + 1)
        elif isinstance(layer, nn.Conv2d):
            visit(conv(layer, x), i + 1)
        elif isinstance(layer, nn.ReLU):
            visit(F.relu(x), i + 1)
        elif isinstance(layer, nn.Upsample):
            visit(F.interpolate(x, scale_factor=layer.scale_factor, mode="nearest"), i + 1)
        else:
            raise AssertionError(f"unknown layer {layer}")

    with torch.no_grad():
        for t in range(latents.shape[1]):
            visit(latents[:, t].to(model.dtype), 0)
    trim = model.cfg.time_factor - 1
    return torch.stack(frames, dim=2)[:, :, trim:].clamp(0, 1) * 2 - 1


def test_published_decoder_layout() -> None:
    """Names and shapes of taew2_1.pth's decoder (TAEHV decoder at widths 256/128/64/64)."""
    sd = TinyVideoDecoder(TinyVAEConfig(), device=torch.device("meta"), dtype=torch.float32).state_dict()
    expected = {"decoder.1.weight": (256, 16, 3, 3), "decoder.1.bias": (256,)}
    for blocks, c in (((3, 4, 5), 256), ((9, 10, 11), 128), ((15, 16, 17), 64)):
        for b in blocks:
            expected[f"decoder.{b}.conv.0.weight"] = (c, 2 * c, 3, 3)
            for j in (2, 4):
                expected[f"decoder.{b}.conv.{j}.weight"] = (c, c, 3, 3)
            for j in (0, 2, 4):
                expected[f"decoder.{b}.conv.{j}.bias"] = (c,)
    expected |= {
        "decoder.7.conv.weight": (256, 256, 1, 1),  # TGrow stride 1
        "decoder.8.weight": (128, 256, 3, 3),
        "decoder.13.conv.weight": (256, 128, 1, 1),  # TGrow stride 2
        "decoder.14.weight": (64, 128, 3, 3),
        "decoder.19.conv.weight": (128, 64, 1, 1),  # TGrow stride 2
        "decoder.20.weight": (64, 64, 3, 3),
        "decoder.22.weight": (3, 64, 3, 3),
        "decoder.22.bias": (3,),
    }
    assert {k: tuple(v.shape) for k, v in sd.items()} == expected
    assert len(expected) == 64


@pytest.mark.parametrize("batch", [1, 2])
def test_frame_counts_shape_and_range(batch: int) -> None:
    model = _model()
    dec = StreamingTinyDecoder(model)
    first = dec.decode_chunk(_latents(3, batch))
    assert first.shape == (batch, 3, 1 + 4 * 2, 24, 32)
    later = dec.decode_chunk(_latents(2, batch, seed=2))
    assert later.shape == (batch, 3, 8, 24, 32)
    assert dec.latent_frames_seen == 5
    assert StreamingTinyDecoder(model).decode_chunk(_latents(1, batch)).shape[2] == 1
    for y in (first, later):
        assert y.dtype == torch.float32 and y.is_contiguous()
        assert y.min() >= -1 and y.max() <= 1
        assert y.std() > 0.01  # seeded init gives a non-trivial picture ...
        assert (y.abs() == 1).float().mean() < 0.01  # ... that the clamp rarely touches


def test_output_is_reference_01_mapped_to_pm1() -> None:
    """With a zero head, pixels are the head bias in [0, 1]: 0.75 → 0.5; out-of-range biases clamp."""
    model = _model()
    head = model.decoder[-1]
    with torch.no_grad():
        head.weight.zero_()
        head.bias.copy_(torch.tensor([0.75, 1.7, -0.4]))
    y = StreamingTinyDecoder(model).decode_chunk(_latents(2))
    assert torch.equal(y[:, 0], torch.full_like(y[:, 0], 0.5))
    assert torch.equal(y[:, 1], torch.ones_like(y[:, 1]))
    assert torch.equal(y[:, 2], -torch.ones_like(y[:, 2]))


@pytest.mark.parametrize("split", [(1, 3, 3), (2, 2, 3), (1, 1, 1, 1, 1, 1, 1)], ids=str)
def test_chunked_equals_whole_clip(split: tuple[int, ...]) -> None:
    model, z = _model(), _latents(7, batch=2)
    whole = StreamingTinyDecoder(model).decode_chunk(z)
    assert whole.shape[2] == 1 + 4 * 6
    chunked = torch.cat(_stream(model, z, split), dim=2)
    # not bit-exact: oneDNN picks conv kernels by batch size; 2e-6 is float32 noise, a lost memory is ~1e-2
    torch.testing.assert_close(chunked, whole, rtol=0, atol=2e-6)


def test_memory_carries_across_chunks() -> None:
    """A continuing chunk depends on the previous chunk (not just on its own latents)."""
    model, z = _model(), _latents(4)
    a = _stream(model, z, (2, 2))[1]
    b = _stream(model, torch.cat([_latents(2, seed=9), z[:, 2:]], 1), (2, 2))[1]
    assert (a - b).abs().max() > 1e-3


def test_reset_restarts_the_stream() -> None:
    model, z = _model(), _latents(3)
    dec = StreamingTinyDecoder(model)
    dec.decode_chunk(_latents(2, seed=5))
    dec.reset()
    assert dec.latent_frames_seen == 0
    again = dec.decode_chunk(z)
    assert again.shape[2] == 1 + 4 * 2
    assert torch.equal(again, StreamingTinyDecoder(model).decode_chunk(z))


@pytest.mark.parametrize(
    "cfg",
    [
        SMALL,
        TinyVAEConfig(widths=(8, 8, 4, 6), time_upscale=(False, True), space_upscale=(True, False, True)),
    ],
    ids=["default-strides", "reduced-upscale"],
)
def test_matches_naive_frame_by_frame_reference(cfg: TinyVAEConfig) -> None:
    model = _model(cfg, seed=3, dtype=torch.float64)
    z = _latents(5, batch=2, dtype=torch.float64)
    expect = naive_decode(model, z)
    assert expect.shape[2] == cfg.time_factor * 5 - (cfg.time_factor - 1)
    whole = StreamingTinyDecoder(model).decode_chunk(z)
    torch.testing.assert_close(whole, expect, rtol=0, atol=1e-12)
    torch.testing.assert_close(torch.cat(_stream(model, z, (2, 3)), 2), expect, rtol=0, atol=1e-12)


def test_seeded_init_is_deterministic() -> None:
    a, b, c = _model(seed=7).state_dict(), _model(seed=7).state_dict(), _model(seed=8).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a if not k.endswith("22.bias"))


def _published_state(model: TinyVideoDecoder) -> dict[str, Tensor]:
    """A state dict in the published layout: encoder tensors, then the decoder's."""
    gen = torch.Generator().manual_seed(4)
    state = {
        "encoder.0.weight": torch.randn(64, 3, 3, 3, generator=gen),
        "encoder.0.bias": torch.randn(64, generator=gen),
        "encoder.4.conv.0.weight": torch.randn(64, 128, 3, 3, generator=gen),
        "encoder.stray": torch.randn(5, generator=gen),
    }
    state |= {k: v.clone() for k, v in model.state_dict().items()}
    return state


def test_load_published_pth_roundtrip(tmp_path: Path) -> None:
    source, z = _model(seed=11), _latents(3)
    path = tmp_path / "taew2_1.pth"
    torch.save(_published_state(source), path)
    target = _model(seed=12)
    load_tiny_decoder_state(target, torch.load(path, map_location="cpu", weights_only=True))
    want = StreamingTinyDecoder(source).decode_chunk(z)
    assert torch.equal(StreamingTinyDecoder(target).decode_chunk(z), want)


def test_load_keeps_last_tgrow_group_when_time_upscale_is_off() -> None:
    """As the reference: a disabled time upscale keeps each latent's last frame of the weight."""
    source = _model(seed=11)
    target = _model(TinyVAEConfig(widths=SMALL.widths, time_upscale=(False, False)), seed=12)
    load_tiny_decoder_state(target, _published_state(source))
    for key in ("decoder.13.conv.weight", "decoder.19.conv.weight"):
        full = source.state_dict()[key]
        assert torch.equal(target.state_dict()[key], full[full.shape[0] // 2 :])


@pytest.mark.parametrize(
    ("edit", "key"),
    [
        ("drop", "decoder.9.conv.2.bias"),
        ("add", "decoder.22.extra"),
        ("reshape", "decoder.8.weight"),
        ("reshape", "decoder.13.conv.weight"),
    ],
)
def test_load_rejects_bad_state_naming_the_key(edit: str, key: str) -> None:
    model = _model()
    state = _published_state(model)
    if edit == "drop":
        del state[key]
    elif edit == "add":
        state[key] = torch.zeros(3)
    else:
        state[key] = torch.zeros(state[key].shape[0] + 1, *state[key].shape[1:])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ConfigError, match=re.escape(key)):
        load_tiny_decoder_state(model, state)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_bad_latents_and_mid_stream_geometry_change_raise() -> None:
    dec = StreamingTinyDecoder(_model())
    with pytest.raises(ConfigError, match="latents"):
        dec.decode_chunk(torch.zeros(1, 2, 8, 3, 4))
    with pytest.raises(ConfigError, match="latents"):
        dec.decode_chunk(torch.zeros(1, 0, 16, 3, 4))
    dec.decode_chunk(_latents(1))
    with pytest.raises(ConfigError, match="reset"):
        dec.decode_chunk(_latents(1, batch=2))
    with pytest.raises(ConfigError, match="reset"):
        dec.decode_chunk(torch.zeros(1, 1, 16, 4, 4))
    dec.reset()
    assert dec.decode_chunk(_latents(1, batch=2)).shape[0] == 2


def test_config_validation() -> None:
    with pytest.raises(ConfigError, match="widths"):
        TinyVAEConfig(widths=(16, 8, 0, 8))
    with pytest.raises(ConfigError, match="time_upscale"):
        TinyVAEConfig(time_upscale=(True, True, True))  # type: ignore[arg-type]
