"""CUDA graphs of the generator's calls: the host's launch work off a compiled stream's device.

Owns: `CallGraphs`, through which `GeneratorRunner` runs every generator call's tensor math
(`CausalWanDiT.forward_chunk` on a `ChunkCall`): directly, or by replaying a CUDA graph captured
for the call's signature; and the text K/V refill of a new conditioning (`fill_text`), replayed
in place into the cross-attention cache's storage. The cache bookkeeping (`CausalWanDiT.prepare`:
slots, eviction, RoPE, bias) stays on the host, eager, before every call.

Why: a compiled wan-14b call is 40 compiled blocks, and on an H200 the host needs 2-4 ms to
launch a block that the device runs in 2.6 ms, so the device waited for the host 2-9 ms per call
(`bench/results/profile_wan14b_bf16_h200.json`). A replayed graph is one launch. Inductor's own
CUDA graphs (`--compile-mode reduce-overhead`) gained nothing: inductor skips graphs that mutate
their inputs, as these blocks do (the KV cache).

A graph bakes in addresses and Python ints, so its signature is: every input's shape and dtype,
the slot bounds, the KV bias's bounds, and the addresses of the KV cache and text K/V storage
(fixed for a cache's life: `KVCache` allocates once, `CrossAttnCache` refills in place). A new
cache (a geometry change) drops every call graph. Before each replay the call's latents, timestep,
RoPE tables and bias weight are copied into the graph's own input tensors; the output is cloned
out of the graph's memory (the next replay overwrites it).

Policy: a signature is captured the second time it is seen, so the first run of it compiled
whatever it needed and nothing compiles during a capture; the warm-up at startup
(`capture_warmup`) sees every signature of a stream twice. At most `MAX_GRAPHS` graphs are kept,
least recently used dropped. A refill (eager code: nothing to compile) is captured at the first
fill that finds the cache's storage allocated, keyed by the text's shape and that storage's
addresses; the cache then adopts what the replay wrote. Replay runs the captured kernels on the
same inputs, so its output equals the direct call's bit for bit (tests/unit/test_graphs.py, on
a GPU; on the CPU the bookkeeping is checked with capture and replay emulated).
"""

from __future__ import annotations

import logging
from collections import Counter, OrderedDict
from dataclasses import dataclass, replace

import torch

from streamdit.model.dit import CausalWanDiT, ChunkCall
from streamdit.model.kv_cache import CrossAttnCache, LayerKV

log = logging.getLogger(__name__)
MAX_GRAPHS = 8  # a stream meets ~4 signatures at steady state (recompute, denoise, biased, append)
MAX_TEXT_GRAPHS = 2  # refill graphs: one per text length (a stream has one)

Signature = tuple[object, ...]


@dataclass(slots=True)
class _Graph:
    graph: torch.cuda.CUDAGraph
    inputs: list[torch.Tensor]  # the graph's copies of the call's varying tensors
    out: torch.Tensor | None  # None: the graph writes its results in place (the text refill)


def _varying(call: ChunkCall) -> list[torch.Tensor]:
    """The tensors that change from call to call (copied into a graph before its replay)."""
    tensors = [call.x, call.timestep, *call.rope]
    if call.key_bias is not None:
        tensors.append(call.key_bias.log_weight)
    return tensors


def _staged(call: ChunkCall) -> tuple[list[torch.Tensor], ChunkCall]:
    """A graph's own copies of `call`'s varying tensors, and the call that reads them."""
    inputs = [t.clone() for t in _varying(call)]
    x, timestep, cos, sin, *weight = inputs
    key_bias = None if call.key_bias is None else replace(call.key_bias, log_weight=weight[0])
    return inputs, ChunkCall(x, timestep, (cos, sin), key_bias, call.layer_kvs, call.text_kvs, call.slots)


def _addresses(call: ChunkCall) -> tuple[int, ...]:
    return tuple(t.data_ptr() for pair in (*call.layer_kvs, *call.text_kvs) for t in pair)


def _storage_addresses(storage: list[LayerKV]) -> tuple[int, ...]:
    return tuple(t.data_ptr() for pair in storage for t in pair)


def signature(call: ChunkCall) -> Signature:
    bias = None if call.key_bias is None else (call.key_bias.start, call.key_bias.end)
    shapes = tuple((tuple(t.shape), t.dtype) for t in _varying(call))
    text = tuple(call.text_kvs[0][0].shape)
    return (shapes, bias, call.slots.write_start, call.slots.write_end, text, len(call.layer_kvs))


class CallGraphs:
    """Runs `forward_chunk` calls, replaying CUDA graphs once `enabled` (see the module docstring)."""

    def __init__(self, model: CausalWanDiT, *, max_graphs: int = MAX_GRAPHS) -> None:
        self.model = model
        self.max_graphs = max_graphs
        self.enabled = False
        self.captured = 0  # graphs captured over this object's life
        self._seen: Counter[Signature] = Counter()
        self._graphs: OrderedDict[Signature, _Graph] = OrderedDict()
        self._addresses: tuple[int, ...] | None = None
        self.captured_text = 0  # refill graphs captured over this object's life
        self._text: OrderedDict[Signature, _Graph] = OrderedDict()

    def __call__(self, call: ChunkCall) -> torch.Tensor:
        if not self.enabled:
            return self.model.forward_chunk(*call)
        addresses = _addresses(call)
        if addresses != self._addresses:  # a new cache: graphs of the old one read freed memory
            self.clear()
            self._addresses = addresses
        key = signature(call)
        graph = self._graphs.get(key)
        if graph is None:
            self._seen[key] += 1
            if self._seen[key] < 2:
                return self.model.forward_chunk(*call)
            graph = self._capture(call)
            self._graphs[key] = graph
            while len(self._graphs) > self.max_graphs:
                self._graphs.popitem(last=False)
        self._graphs.move_to_end(key)
        for mine, given in zip(graph.inputs, _varying(call), strict=True):
            mine.copy_(given)
        graph.graph.replay()
        assert graph.out is not None
        return graph.out.clone()

    def fill_text(self, context: torch.Tensor, cache: CrossAttnCache) -> None:
        """A new conditioning's text K/V into `cache` (`CausalWanDiT.fill_cross_cache`).

        Once enabled, and once `cache` has storage for this text length (its first fill
        allocated it, and ran every library's first use), the refill is captured and then
        replayed: eager, it is ~12 small launches per layer (more under FP8, whose activation
        quantization runs eagerly there) that leave the device waiting on the host at the
        start of every blended chunk. The graph writes into the storage in place.
        """
        storage = cache.storage()
        fits = storage is not None and all(k.shape[:2] == context.shape[:2] for k, _ in storage)
        if not self.enabled or storage is None or not fits:
            self.model.fill_cross_cache(context, cache)
            return
        key = (tuple(context.shape), context.dtype, _storage_addresses(storage))
        graph = self._text.get(key)
        if graph is None:
            graph = self._capture_text(context, cache, storage)
            self._text[key] = graph
            while len(self._text) > MAX_TEXT_GRAPHS:
                self._text.popitem(last=False)
        self._text.move_to_end(key)
        graph.inputs[0].copy_(context)
        graph.graph.replay()
        cache.adopt_storage()

    def clear(self) -> None:
        """Drop the call graphs (a new KV cache). Refill graphs stay: each is keyed by the
        text storage it writes, which a new KV cache leaves where it was."""
        self._graphs.clear()
        self._seen.clear()

    @property
    def held(self) -> int:
        return len(self._graphs)

    def _capture(self, call: ChunkCall) -> _Graph:
        inputs, mine = _staged(call)
        graph = torch.cuda.CUDAGraph()
        # thread_local: the writer thread's copies and event queries go on while this captures
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            out = self.model.forward_chunk(*mine)
        self.captured += 1
        log.debug("captured generator-call graph %d: %s", self.captured, signature(call))
        return _Graph(graph=graph, inputs=inputs, out=out)

    def _capture_text(self, context: torch.Tensor, cache: CrossAttnCache, storage: list[LayerKV]) -> _Graph:
        mine = context.clone()
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                self.model.fill_cross_cache(mine, cache)
            # the capture ran nothing: its stores must have gone to the storage a replay writes
            after = cache.storage()
            if after is None or _storage_addresses(after) != _storage_addresses(storage):
                raise RuntimeError("the text refill's capture allocated new storage (a layout changed)")
        except BaseException:
            cache.reset()  # the captured stores marked layers filled with nothing computed yet
            raise
        self.captured_text += 1
        log.debug("captured text-refill graph %d: %s", self.captured_text, tuple(context.shape))
        return _Graph(graph=graph, inputs=[mine], out=None)
