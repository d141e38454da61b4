"""CUDA graphs of generator calls (runtime/graphs.py) and the text-cache storage they rely on.

On the CPU: a call's signature changes with every fact a graph bakes in, the cross-attention
cache refills in place (its addresses are what a graph reads), and with capture and replay
emulated, the graphs' bookkeeping leaves a compiled stream's video unchanged. On a GPU (run on the device
machine: `python -m pytest tests/unit/test_graphs.py`): a compiled stream with graphs writes the
same video, bit for bit, as the same stream without them, through a window fill, the steady
state and a soft prompt change (each blend step a text K/V refill), and the graphs were really
captured and replayed.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import streamdit
from streamdit.errors import ConfigError
from streamdit.model.attention import KeyBias
from streamdit.model.dit import CausalWanDiT, ChunkCall
from streamdit.model.kv_cache import ChunkSlots, CrossAttnCache, LayerKV
from streamdit.model.presets import get_dit_config
from streamdit.runtime.graphs import CallGraphs, _Graph, _staged, signature

pytestmark = pytest.mark.timeout(300)


def _call(
    frames: int = 3, slots: tuple[int, int] = (8, 20), bias: tuple[int, int] | None = None
) -> ChunkCall:
    tokens = frames * 4
    kv = [(torch.zeros(1, 24, 2, 8), torch.zeros(1, 24, 2, 8)) for _ in range(2)]
    text = [(torch.zeros(1, 5, 2, 8), torch.zeros(1, 5, 2, 8)) for _ in range(2)]
    key_bias = None if bias is None else KeyBias(bias[0], bias[1], torch.tensor(-0.5))
    return ChunkCall(
        torch.zeros(1, frames, 16, 4, 4),
        torch.zeros(1),
        (torch.zeros(tokens, 4), torch.zeros(tokens, 4)),
        key_bias,
        kv,
        text,
        ChunkSlots(start_frame=9, num_frames=frames, write_start=slots[0], write_end=slots[1]),
    )


def test_a_signature_changes_with_every_fact_a_graph_bakes_in() -> None:
    base = signature(_call())
    assert signature(_call()) == base  # equal calls (other tensors, other start frame) share one
    others = [_call(frames=2, slots=(8, 16)), _call(slots=(0, 12)), _call(bias=(0, 8)), _call(bias=(4, 8))]
    keys = [signature(c) for c in others]
    assert base not in keys and len(set(keys)) == len(keys)


def test_the_text_cache_refills_in_place_and_reallocates_for_a_new_shape() -> None:
    cache = CrossAttnCache(1)
    cache.store(0, torch.ones(1, 5, 2, 8), torch.ones(1, 5, 2, 8))
    k0, v0 = cache.layers()[0]
    cache.reset()
    assert not cache.filled
    cache.store(0, torch.full((1, 5, 2, 8), 2.0), torch.full((1, 5, 2, 8), 3.0))
    k1, v1 = cache.layers()[0]
    assert (k1.data_ptr(), v1.data_ptr()) == (k0.data_ptr(), v0.data_ptr())
    assert torch.equal(k1, torch.full((1, 5, 2, 8), 2.0)) and torch.equal(v1, torch.full((1, 5, 2, 8), 3.0))
    cache.reset()
    cache.store(0, torch.zeros(1, 7, 2, 8), torch.zeros(1, 7, 2, 8))  # another text length
    assert cache.layers()[0][0].shape == (1, 7, 2, 8)


def test_a_replayed_refill_is_adopted_from_the_storage_it_wrote() -> None:
    cache = CrossAttnCache(2)
    with pytest.raises(ConfigError, match="adopt_storage"):
        cache.adopt_storage()  # nothing to adopt: no layer has storage yet
    cache.store(0, torch.ones(1, 5, 2, 8), torch.ones(1, 5, 2, 8))
    assert cache.storage() is None  # layer 1 has none yet
    cache.store(1, torch.ones(1, 5, 2, 8), torch.ones(1, 5, 2, 8))
    storage = cache.storage()
    assert storage is not None
    cache.reset()
    for k, v in storage:  # what a replayed refill graph does: write in place, on the device
        k.fill_(4.0)
        v.fill_(5.0)
    assert not cache.filled
    cache.adopt_storage()
    assert cache.filled and all(torch.equal(k, torch.full_like(k, 4.0)) for k, _ in cache.layers())


class _Recorded:
    """A stand-in for a captured CUDA graph on the CPU: replay runs the recorded tensor work."""

    def __init__(self, work: Callable[[], None]) -> None:
        self.replay = work


def _emulated_capture(self: CallGraphs, call: ChunkCall) -> _Graph:
    """`CallGraphs._capture` without CUDA: the same static input copies and one output buffer
    that every replay overwrites; replay = `forward_chunk` on those copies (its tensor math)."""
    inputs, mine = _staged(call)
    out = torch.empty_like(call.x)

    def work() -> None:
        out.copy_(self.model.forward_chunk(*mine))

    self.captured += 1
    return _Graph(graph=_Recorded(work), inputs=inputs, out=out)  # type: ignore[arg-type]


def _emulated_text_capture(
    self: CallGraphs, context: torch.Tensor, cache: CrossAttnCache, storage: list[LayerKV]
) -> _Graph:
    """`CallGraphs._capture_text` without CUDA: a replay writes the storage in place and, like
    a real graph's kernels, leaves `cache`'s host bookkeeping alone (a scratch cache over the
    same storage takes the stores)."""
    mine = context.clone()

    def work() -> None:
        scratch = CrossAttnCache(cache.num_layers)
        scratch._storage = list(storage)
        self.model.fill_cross_cache(mine, scratch)

    self.captured_text += 1
    return _Graph(graph=_Recorded(work), inputs=[mine], out=None)  # type: ignore[arg-type]


def _soft_timeline(tmp_path: Path) -> Path:
    timeline = tmp_path / "soft.json"
    entries = [
        {"chunk": 0, "prompt": "a red fox in snow"},
        {"chunk": 4, "prompt": "a red fox in a forest", "transition": "soft", "blend_chunks": 2},
    ]
    timeline.write_text(json.dumps({"entries": entries}))
    return timeline


def _graph_counts(caplog: pytest.LogCaptureFixture) -> list[tuple[int, int]]:
    """(generator-call graphs, text-refill graphs) of each `CUDA graphs:` line logged."""
    counts = []
    for record in caplog.records:
        words = record.getMessage().split()
        if words[:2] == ["CUDA", "graphs:"]:
            counts.append((int(words[2]), int(words[words.index("text-refill") - 1])))
    return counts


def test_the_graphs_bookkeeping_gives_the_same_video_on_the_cpu(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Capture and replay emulated (the only CUDA parts): signatures, capture at second sight,
    input copies, output buffers, the refill's adoption and what a new cache drops, through a
    compiled stream with a soft change; a bug there changes the video or the counts."""
    monkeypatch.setattr(CallGraphs, "_capture", _emulated_capture)
    monkeypatch.setattr(CallGraphs, "_capture_text", _emulated_text_capture)
    idle = SimpleNamespace(synchronize=lambda: None)  # capture_warmup's wait for the device
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: idle)
    timeline = _soft_timeline(tmp_path)
    videos = {}
    for graphs in (True, False):
        monkeypatch.setattr(streamdit.RunConfig, "graphs_calls", lambda self, on=graphs: on)
        cfg = streamdit.RunConfig(
            compile=True, compile_backend="aot_eager", chunks=8, height=32, width=48,
            timeline=timeline, out=tmp_path / f"graphs_{graphs}.npy",
        )  # fmt: skip
        with caplog.at_level(logging.INFO, logger="streamdit.runtime.compile_health"):
            streamdit.Stream(cfg).run()
        videos[graphs] = np.load(cfg.out)
    # one line, the graphed run's: recompute, denoise, biased calls; one refill graph, replayed
    # by every later blend step (not recaptured when the first call's cache is adopted)
    assert _graph_counts(caplog) == [(3, 1)]
    np.testing.assert_array_equal(videos[True], videos[False])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_a_graphed_stream_writes_the_same_video_bit_for_bit(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    timeline = _soft_timeline(tmp_path)
    videos = {}
    for graphs in (True, False):
        cfg = streamdit.RunConfig(
            device="cuda",
            dtype="bfloat16",
            compile=True,
            cuda_graphs=graphs,
            chunks=8,
            height=64,
            width=96,
            timeline=timeline,
            out=tmp_path / f"graphs_{graphs}.npy",
        )
        with caplog.at_level(logging.INFO, logger="streamdit.runtime.compile_health"):
            streamdit.Stream(cfg).run()
        videos[graphs] = np.load(cfg.out)
    counts = _graph_counts(caplog)
    assert len(counts) == 1  # the graphed run only
    assert counts[0][0] >= 3 and counts[0][1] == 1  # recompute, denoise, biased; one refill
    assert videos[True].shape == videos[False].shape
    np.testing.assert_array_equal(videos[True], videos[False])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_replayed_text_refill_equals_the_eager_one(dtype: torch.dtype) -> None:
    cfg = get_dit_config("tiny")
    model = CausalWanDiT(cfg, device="cuda", dtype=dtype)
    model.init_weights(0)
    graphs = CallGraphs(model)
    graphs.enabled = True
    graphed, eager = CrossAttnCache(cfg.num_layers), CrossAttnCache(cfg.num_layers)
    gen = torch.Generator(device="cpu").manual_seed(3)
    texts = [torch.randn(1, cfg.text_len, cfg.text_dim, generator=gen).to("cuda", dtype) for _ in range(3)]
    for i, text in enumerate(texts):
        graphed.reset()
        eager.reset()
        graphs.fill_text(text, graphed)  # 1st: allocates eagerly; 2nd: captured; 3rd: replayed
        model.fill_cross_cache(text, eager)
        for layer, (mine, theirs) in enumerate(zip(graphed.layers(), eager.layers(), strict=True)):
            for a, b in zip(mine, theirs, strict=True):
                diff = (a.float() - b.float()).abs().max().item()
                assert torch.equal(a, b), f"text {i} layer {layer}: max |diff| {diff}"
    assert graphs.captured_text == 1
