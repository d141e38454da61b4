"""Causal video VAE: frame arithmetic, streaming == whole-clip == frame by frame, reset, init, dtypes.

Small shapes (32×32 pixels, tiny preset) keep the file to a few seconds on a 2-core CPU.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from streamdit.errors import ConfigError
from streamdit.model.vae import (
    VAE_PRESETS,
    WAN21_LATENT_MEAN,
    WAN21_LATENT_STD,
    CausalVideoVAE,
    StreamingDecoder,
    StreamingEncoder,
    get_vae_config,
    latent_frames,
    pixel_frames,
)
from streamdit.model.vae_blocks import CausalCache, CausalConv3d

SPLITS = [(1, 3, 3), (3, 4), (2, 2, 2, 1), (1, 1, 1, 1, 1, 1, 1)]


@pytest.fixture(scope="module")
def vae() -> CausalVideoVAE:
    model = CausalVideoVAE(get_vae_config("tiny"))
    model.init_weights(seed=0)
    return model


def _latents(frames: int, batch: int = 1, seed: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, frames, 16, 4, 4, generator=gen)


def _pixels(frames: int, batch: int = 1, seed: int = 2) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, frames, 32, 32, generator=gen) * 2 - 1


def test_presets_and_unknown_name() -> None:
    assert set(VAE_PRESETS) == {"tiny", "wan"}
    assert get_vae_config("wan").base_dim == 96
    with pytest.raises(ConfigError, match="vae"):
        get_vae_config("huge")
    with pytest.raises(ConfigError, match="temporal_downsample"):
        dataclasses.replace(get_vae_config("tiny"), temporal_downsample=(True, True, True))


def test_wan_preset_has_wan21_vae_names_and_size() -> None:
    """The wan preset must accept a Wan2.1 VAE checkpoint: same names, same shapes, ~127 M."""
    sd = CausalVideoVAE(get_vae_config("wan"), device="meta").state_dict()
    assert 126e6 < sum(t.numel() for t in sd.values()) < 128e6
    expected = {
        "encoder.conv1.weight": (96, 3, 3, 3, 3),
        "encoder.downsamples.0.residual.0.gamma": (96, 1, 1, 1),
        "encoder.downsamples.5.time_conv.weight": (192, 192, 3, 1, 1),
        "encoder.middle.1.to_qkv.weight": (1152, 384, 1, 1),
        "encoder.head.2.weight": (32, 384, 3, 3, 3),
        "conv1.weight": (32, 32, 1, 1, 1),
        "conv2.weight": (16, 16, 1, 1, 1),
        "decoder.upsamples.3.time_conv.weight": (768, 384, 3, 1, 1),
        "decoder.upsamples.4.residual.2.weight": (384, 192, 3, 3, 3),
        "decoder.upsamples.11.resample.1.weight": (96, 192, 3, 3),
        "decoder.head.2.weight": (3, 96, 3, 3, 3),
    }
    assert {k: tuple(sd[k].shape) for k in expected} == expected
    assert "latent_mean" not in sd  # stats are not part of Wan checkpoints


def test_frame_arithmetic_helpers() -> None:
    assert [pixel_frames(f, first_chunk=True) for f in (1, 2, 3)] == [1, 5, 9]
    assert [pixel_frames(f, first_chunk=False) for f in (1, 3)] == [4, 12]
    assert latent_frames(13, first_chunk=True) == 4
    assert latent_frames(12, first_chunk=False) == 3


def test_whole_clip_shapes(vae: CausalVideoVAE) -> None:
    z = vae.encode(_pixels(9, batch=2))
    assert z.shape == (2, 3, 16, 4, 4)
    x = vae.decode(z)
    assert x.shape == (2, 3, 9, 32, 32)
    assert x.abs().max() <= 1.0


@pytest.mark.parametrize("split", SPLITS)
def test_chunked_decode_equals_whole_decode(vae: CausalVideoVAE, split: tuple[int, ...]) -> None:
    lat = _latents(7, batch=2)
    whole = vae.decode(lat)
    dec = StreamingDecoder(vae)
    parts, start = [], 0
    for i, n in enumerate(split):
        out = dec.decode_chunk(lat[:, start : start + n])
        assert out.shape[2] == (1 + 4 * (n - 1) if i == 0 else 4 * n)
        parts.append(out)
        start += n
    assert dec.latent_frames_seen == 7
    # chunks are decoded in steps of other sizes than the whole clip's: float32 rounding only
    torch.testing.assert_close(torch.cat(parts, dim=2), whole, rtol=0, atol=1e-5)


def _frame_by_frame(vae: CausalVideoVAE, lat: torch.Tensor, rule: str = "wan2.1") -> torch.Tensor:
    """Wan's own loop: one decoder step per latent frame (the reference a batched step equals)."""
    cache, outs = CausalCache(rule), []
    with torch.no_grad():
        for i in range(lat.shape[1]):
            outs.append(vae.decode_step(lat[:, i].unsqueeze(2), cache))
            cache.advance()
    return torch.cat(outs, dim=2)


@pytest.mark.parametrize("split", SPLITS)
def test_batched_decode_steps_equal_wan_frame_by_frame_loop(
    vae: CausalVideoVAE, split: tuple[int, ...]
) -> None:
    """A chunk's latents after a stream's first go through the decoder as ONE step; every
    causal layer then sees exactly the history Wan's per-frame loop gives it."""
    lat = _latents(7, batch=2, seed=6)
    ref = _frame_by_frame(vae, lat)
    dec, start, parts, stepped = StreamingDecoder(vae), 0, [], []
    hook = vae.decoder.conv1.register_forward_pre_hook(lambda m, a: stepped.append(a[0].shape[2]))
    try:
        for n in split:
            parts.append(dec.decode_chunk(lat[:, start : start + n]))
            start += n
    finally:
        hook.remove()
    want_steps = ([1, split[0] - 1] if split[0] > 1 else [1]) + list(split[1:])
    assert stepped == want_steps
    torch.testing.assert_close(torch.cat(parts, dim=2), ref, rtol=0, atol=1e-5)
    assert (ref[:, :, 5:] - _frame_by_frame(vae, lat.flip(1))[:, :, 5:]).abs().max() > 1e-2  # not vacuous


@pytest.mark.parametrize("split", [(1, 4, 8), (5, 8), (9, 4), (1, 4, 4, 4)])
def test_chunked_encode_equals_whole_encode(vae: CausalVideoVAE, split: tuple[int, ...]) -> None:
    pix = _pixels(13, batch=2)
    whole = vae.encode(pix)
    enc = StreamingEncoder(vae)
    parts, start = [], 0
    for n in split:
        parts.append(enc.encode_chunk(pix[:, :, start : start + n]))
        start += n
    assert [p.shape[1] for p in parts] == [1 + (split[0] - 1) // 4] + [n // 4 for n in split[1:]]
    assert torch.equal(torch.cat(parts, dim=1), whole)


def test_decode_is_causal(vae: CausalVideoVAE) -> None:
    lat = _latents(4)
    torch.testing.assert_close(vae.decode(lat[:, :2]), vae.decode(lat)[:, :, :5], rtol=0, atol=1e-5)
    changed = torch.cat([lat[:, :2], -lat[:, 2:]], dim=1)
    assert torch.equal(vae.decode(changed[:, :2]), vae.decode(lat[:, :2]))


def test_history_is_used_and_reset_is_a_hard_cut(vae: CausalVideoVAE) -> None:
    a, b = _latents(3, seed=3), _latents(3, seed=4)
    fresh = vae.decode(b)
    dec = StreamingDecoder(vae)
    dec.decode_chunk(a)
    continued = dec.decode_chunk(b)
    # latent frames 1.. of b: after a they see a's history, on a fresh stream they do not
    assert not torch.allclose(continued[:, :, 4:], fresh[:, :, 1:], atol=1e-3)
    dec.reset()
    assert dec.latent_frames_seen == 0
    assert torch.equal(dec.decode_chunk(b), fresh)

    pix = _pixels(5)
    enc = StreamingEncoder(vae)
    enc.encode_chunk(_pixels(9, seed=5))
    enc.reset()
    assert torch.equal(enc.encode_chunk(pix), vae.encode(pix))


def test_bad_geometry_raises_config_error(vae: CausalVideoVAE) -> None:
    with pytest.raises(ConfigError, match="height"):
        vae.encode(torch.zeros(1, 3, 1, 36, 32))
    with pytest.raises(ConfigError, match="width"):
        vae.encode(torch.zeros(1, 3, 1, 32, 20))
    with pytest.raises(ConfigError, match="num_frames"):
        vae.encode(torch.zeros(1, 3, 4, 32, 32))  # first chunk needs T ≡ 1 (mod 4)
    enc = StreamingEncoder(vae)
    enc.encode_chunk(torch.zeros(1, 3, 1, 32, 32))
    with pytest.raises(ConfigError, match="num_frames"):
        enc.encode_chunk(torch.zeros(1, 3, 5, 32, 32))  # later chunks need T ≡ 0 (mod 4)
    with pytest.raises(ConfigError, match="latents"):
        vae.decode(torch.zeros(1, 2, 8, 4, 4))


def test_init_is_deterministic_and_seeded() -> None:
    cfg = get_vae_config("tiny")
    a, b, c = (CausalVideoVAE(cfg) for _ in range(3))
    a.init_weights(7)
    b.init_weights(7)
    c.init_weights(8)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa if k.endswith("weight"))


def test_bfloat16_is_finite_and_non_trivial(vae: CausalVideoVAE) -> None:
    bf = CausalVideoVAE(get_vae_config("tiny"), dtype=torch.bfloat16)
    bf.init_weights(0)
    lat = _latents(2)
    out = bf.decode(lat)
    assert out.dtype == torch.bfloat16
    assert torch.isfinite(out).all()
    assert out.float().std() > 0.05
    # same weights, lower precision: close to the fp32 decode, not equal
    assert (out.float() - vae.decode(lat)).abs().mean() < 0.05
    z = bf.encode(_pixels(5))
    assert torch.isfinite(z).all() and z.float().std() > 0.05


def test_wan21_latent_norm_is_applied_inside_encode_and_decode(vae: CausalVideoVAE) -> None:
    cfg = dataclasses.replace(get_vae_config("tiny"), latent_norm="wan2.1")
    normed = CausalVideoVAE(cfg)
    normed.load_state_dict(vae.state_dict())
    mean = torch.tensor(WAN21_LATENT_MEAN).view(1, 1, 16, 1, 1)
    std = torch.tensor(WAN21_LATENT_STD).view(1, 1, 16, 1, 1)
    pix = _pixels(5)
    torch.testing.assert_close(normed.encode(pix), (vae.encode(pix) - mean) / std)
    lat = _latents(2)
    torch.testing.assert_close(normed.decode(lat), vae.decode(lat * std + mean))


def test_cached_causal_conv_equals_one_shot_causal_conv() -> None:
    """The cache carries exactly the frames zero padding would otherwise stand for."""
    conv = CausalConv3d(4, 5, 3, padding=1)
    with torch.no_grad():
        x = torch.randn(2, 4, 9, 6, 6, generator=torch.Generator().manual_seed(0))
        cache = CausalCache()
        steps = [conv(x[:, :, a:b], cache) for a, b in ((0, 1), (1, 5), (5, 6), (6, 9))]
        torch.testing.assert_close(torch.cat(steps, dim=2), conv(x))


def test_krea_time_cache_rule(vae: CausalVideoVAE) -> None:
    """Krea's decoder keeps [where(h_last == 0, 0, x_n), x_n] as each temporal upsample's
    history (Wan2.1: [x_{n-1}, x_n]): the two agree for a stream's first 3 latent frames (its
    first 9 pixel frames) and differ from the 4th on."""
    from streamdit.model.vae import StreamingDecoder
    from streamdit.model.vae_blocks import Resample

    z = torch.randn(1, 5, 16, 4, 4, generator=torch.Generator().manual_seed(8))
    wan = _frame_by_frame(vae, z)
    torch.testing.assert_close(StreamingDecoder(vae).decode_chunk(z), wan, rtol=0, atol=1e-5)
    krea_dec = StreamingDecoder(vae, upsample_history="krea")
    convs = [m.time_conv for m in vae.decoder.modules() if isinstance(m, Resample) and m.mode == "upsample3d"]
    assert convs
    seen: dict[int, list[torch.Tensor]] = {id(c): [] for c in convs}
    hooks = [c.register_forward_pre_hook(lambda m, a: seen[id(m)].append(a[0].clone())) for c in convs]
    before: dict[int, torch.Tensor | None] = {}
    try:
        pixels = []
        for i in range(z.shape[1]):
            before = {id(c): krea_dec.cache.get(c) for c in convs}
            pixels.append(krea_dec.decode_chunk(z[:, i : i + 1]))
    finally:
        for h in hooks:
            h.remove()
    krea = torch.cat(pixels, dim=2)
    assert krea.shape == wan.shape
    # the krea rule is defined per frame: a whole chunk steps frame by frame, bit for bit
    assert torch.equal(StreamingDecoder(vae, upsample_history="krea").decode_chunk(z), krea)
    assert torch.equal(krea[:, :, :9], wan[:, :, :9])
    assert (krea[:, :, 9:] - wan[:, :, 9:]).abs().max() > 1e-3
    one_frame = 0
    for conv in convs:  # the history after the last step, stated independently of the code
        x_n, prev = seen[id(conv)][-1], before[id(conv)]
        assert prev is not None
        if x_n.shape[2] >= 2:  # a layer fed 2+ frames keeps its last two, as Wan2.1 does
            want = x_n[:, :, -2:]
        else:
            one_frame += 1
            want = torch.cat([torch.where(prev[:, :, -1:] == 0, torch.zeros_like(x_n), x_n), x_n], dim=2)
        assert torch.equal(krea_dec.cache.get(conv), want)
    assert one_frame >= 1  # the first temporal upsample sees one frame per step: Krea's case
