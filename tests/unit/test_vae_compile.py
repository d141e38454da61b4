"""The compiled decode step (`CausalVideoVAE.compile_decoder`) equals the eager one over a stream.

One graph per decode-step variant, its streaming cache outside the graph: a stream of chunks
(its first included, then a hard cut) decodes to the eager frames, leaves the eager cache behind
after every chunk, and compiles nothing after the warm-up. The folded-time-taps conv (a GPU
layout of the same sum) is checked against conv3d here on the CPU. The CPU backend is
aot_eager: the same graph capture and cache handling inductor gets, without its C++ build.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.utils import counters

from streamdit.model.vae import CausalVideoVAE, StreamingDecoder, get_vae_config, warm_up_decoder
from streamdit.model.vae_blocks import CausalCache, CausalConv3d, cache_layers

SHAPE = (1, 3, 16, 4, 4)  # [B, F, z, h, w]: 3 latent frames per chunk, 32x32 pixels


def _vae() -> CausalVideoVAE:
    vae = CausalVideoVAE(get_vae_config("tiny"))
    vae.init_weights(seed=0)
    return vae.eval()


@pytest.fixture(scope="module")
def pair() -> tuple[CausalVideoVAE, CausalVideoVAE, tuple[int, int]]:
    torch._dynamo.reset()
    compiled = _vae()
    compiled.compile_decoder(backend="aot_eager")
    warm = warm_up_decoder(compiled, SHAPE)
    return _vae(), compiled, warm


def _history(vae: CausalVideoVAE, cache: CausalCache) -> list[torch.Tensor | None]:
    return cache.export(cache_layers(vae.decoder))


def test_compiled_stream_equals_eager_and_keeps_the_cache(pair) -> None:
    eager, compiled, _ = pair
    gen = torch.Generator().manual_seed(3)
    chunks = [torch.randn(SHAPE, generator=gen) for _ in range(6)]
    ref, got = StreamingDecoder(eager), StreamingDecoder(compiled)
    graphs = counters["stats"]["unique_graphs"]
    for k, latents in enumerate(chunks):
        if k == 4:  # a hard cut: the stream starts again (first-step graphs reused)
            ref.reset()
            got.reset()
        want = ref.decode_chunk(latents)
        out = got.decode_chunk(latents)
        assert out.shape == want.shape == (1, 3, 9 if k in (0, 4) else 12, 32, 32)
        torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-6, msg=f"chunk {k}")
        assert got.latent_frames_seen == ref.latent_frames_seen
        mine, theirs = _history(compiled, got.cache), _history(eager, ref.cache)
        assert [h is None for h in mine] == [h is None for h in theirs], f"chunk {k}"
        for i, (a, b) in enumerate(zip(mine, theirs, strict=True)):
            if a is not None:
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=f"chunk {k} slot {i}")
    assert counters["stats"]["unique_graphs"] == graphs, "a decode after the warm-up compiled a graph"


def test_warm_up_compiles_a_bounded_set_of_graphs(pair) -> None:
    _, _, (chunks, graphs) = pair
    # step variants: a stream's first latent alone, the rest of its first chunk, the steady step
    # (plus one while the history's memory layout settles on the CPU path)
    assert 3 <= chunks <= 5
    assert 3 <= graphs <= 4


@pytest.mark.parametrize(
    ("in_dim", "out_dim", "kernel", "padding"),
    [(6, 5, 3, 1), (6, 12, (3, 1, 1), (1, 0, 0)), (6, 5, 1, 0)],
    ids=["3x3x3", "time-conv", "1x1x1"],
)
def test_folded_time_taps_equal_conv3d(in_dim: int, out_dim: int, kernel, padding) -> None:
    torch.manual_seed(0)
    conv = CausalConv3d(in_dim, out_dim, kernel, padding=padding)
    x = torch.randn(1, in_dim, 5, 7, 9, dtype=torch.float64)
    conv = conv.double()
    pw, ph = conv._space_pad[0], conv._space_pad[2]
    want = F.conv3d(F.pad(x, (pw, pw, ph, ph, conv._time_pad, 0)), conv.weight, conv.bias)
    got = conv._conv_time_folded(F.pad(x, (0, 0, 0, 0, conv._time_pad, 0)))
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
