"""Generator forward speed on one GPU: ms per call, achieved TFLOP/s, fraction of matmul peak.

Builds the DiT preset on the device with seeded weights, brings a KV cache to the steady state of
a stream (recompute context + one chunk, the window full), then times generator calls with CUDA
events. In the same process it measures the bf16 matmul peak (8192³ products on random data),
so the fraction of peak compares numbers taken side by side. Variants: eager, and
`torch.compile` of each transformer block (`--compile`).

    python bench/bench_generator.py --preset wan-14b --height 320 --width 576 \
        --variants eager,compile --out bench/results/generator_wan14b_h100.json

FLOP count: `streamdit.model.presets.dit_flops_per_call` (its docstring states the formula):
2·M·N·K for every linear / conv-as-linear, 4·Lq·Lk·dim for self-attention (QKᵀ and PV) over
the cached + current keys and for cross-attention over the text tokens.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

from streamdit.model.attention import resolve_attention_backend
from streamdit.model.dit import CausalWanDiT, add_norm
from streamdit.model.fp8 import quantize_blocks
from streamdit.model.kv_cache import CrossAttnCache, KVCache
from streamdit.model.presets import dit_flops_per_call, get_dit_config


def time_ms(fn, iters: int, warmup: int, device: torch.device) -> list[float]:
    """Per-call ms: CUDA events on a GPU (device time), perf_counter on the CPU."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return times


KERNEL_KINDS = (
    ("triton (fused pointwise / reductions)", ("triton_", "_add_norm_kernel")),
    ("attention", ("sdpa", "flash", "fmha", "attention")),
    ("matmul", ("nvjet", "gemm", "cutlass", "xmma", "sm90_")),
)
"""Kernel name fragments per kind, first match wins: Triton's kernels first (inductor's, whose
names quote the ops they fused, `_scaled_mm` or `cudnn_attention` included, and
model/norm_kernels.py's), then cuDNN / flash
attention, then cuBLAS / CUTLASS matmuls."""


def _kind(name: str) -> str:
    low = name.lower()
    for kind, marks in KERNEL_KINDS:
        if any(m in low for m in marks):
            return kind
    return "other"


def profile_kernels(fn, device: torch.device, calls: int = 3, top: int = 20) -> dict:
    """Device time per call: the heaviest GPU kernels and the sum per kind (where the gap to
    peak goes). Only device-side events count (an op and its kernel are not counted twice)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        for _ in range(calls):
            fn()
        sync(device)
    rows = []
    for evt in prof.key_averages():
        dev_us = getattr(evt, "self_device_time_total", 0) or getattr(evt, "self_cuda_time_total", 0)
        if dev_us > 0 and evt.device_type != DeviceType.CPU:
            rows.append(
                {"name": evt.key[:160], "ms_per_call": dev_us / 1e3 / calls, "count": evt.count // calls}
            )
    rows.sort(key=lambda r: -r["ms_per_call"])
    kinds: dict[str, float] = {}
    for r in rows:
        kinds[_kind(r["name"])] = kinds.get(_kind(r["name"]), 0.0) + r["ms_per_call"]
    for r in rows[:top]:
        print(f"  {r['ms_per_call']:8.2f} ms  x{r['count']:<4d} {r['name']}", flush=True)
    print("  per kind (ms/call): " + json.dumps({k: round(v, 2) for k, v in kinds.items()}), flush=True)
    return {"top": rows[:top], "ms_per_call_by_kind": kinds, "kernels_ms_per_call": sum(kinds.values())}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak_tflops(device: torch.device, n: int = 8192, iters: int = 20) -> dict:
    """bf16 matmul rate on random data (rotating 3 operand sets so L2 does not flatter it)."""
    gen = torch.Generator(device=device).manual_seed(0)
    sets = [
        (
            torch.randn(n, n, device=device, dtype=torch.bfloat16, generator=gen),
            torch.randn(n, n, device=device, dtype=torch.bfloat16, generator=gen),
        )
        for _ in range(3)
    ]
    i = [0]

    def mm() -> None:
        a, b = sets[i[0] % 3]
        i[0] += 1
        torch.mm(a, b)

    ms = time_ms(mm, iters, 5, device)
    flops = 2 * n**3
    return {
        "n": n,
        "median_ms": statistics.median(ms),
        "tflops": flops / (statistics.median(ms) / 1e3) / 1e12,
    }


def fp8_matmul_peak_tflops(device: torch.device, n: int = 8192, iters: int = 20) -> dict:
    """e4m3 `_scaled_mm` rate on random data (tensorwise scales: the kernel's ceiling)."""
    gen = torch.Generator(device=device).manual_seed(0)
    a = [torch.randn(n, n, device=device, generator=gen).to(torch.float8_e4m3fn) for _ in range(3)]
    b = [torch.randn(n, n, device=device, generator=gen).to(torch.float8_e4m3fn).t() for _ in range(3)]
    one = torch.ones((), device=device)
    i = [0]

    def mm() -> None:
        i[0] += 1
        torch._scaled_mm(a[i[0] % 3], b[i[0] % 3], scale_a=one, scale_b=one, out_dtype=torch.bfloat16)

    ms = statistics.median(time_ms(mm, iters, 5, device))
    return {"n": n, "median_ms": ms, "tflops": 2 * n**3 / (ms / 1e3) / 1e12}


COMPILE_VARIANTS: dict[str, dict] = {
    "compile": {},
    # inductor tunes each generated kernel's block sizes / warps by timing them at compile
    "compile-cdt": {"options": {"coordinate_descent_tuning": True}},
    "compile-max-autotune": {"mode": "max-autotune-no-cudagraphs"},
    # every reduction generated both persistent (a row read once) and looped, the faster kept
    # at run time: the norm / modulation kernels over the float32 residual stream are looped
    "compile-multi-kernel": {"options": {"triton.multi_kernel": 1}},
    # no reduction split into two kernels (fewer passes over a row, less parallelism)
    "compile-no-split": {"options": {"split_reductions": False}},
    # the blocks' residual + norm + modulation steps as one Triton kernel each
    "compile-fused-norms": {"fused_norms": True},
}
"""`--variants` names beside `eager`: torch.compile options for the blocks."""


def build(
    args: argparse.Namespace, device: torch.device
) -> tuple[CausalWanDiT, KVCache, CrossAttnCache, dict]:
    cfg = get_dit_config(args.preset)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    backend = resolve_attention_backend(args.attn_backend, device, dtype, head_dim=cfg.head_dim)
    t0 = time.perf_counter()
    model = CausalWanDiT(cfg, device=device, dtype=dtype, attn_backend=backend)
    model.init_weights(args.seed)
    if args.fp8:
        quantize_blocks(model.blocks)
    model.fuse_projections()  # as build_generator does
    model.eval()
    sync(device)
    tpf = (args.height // 16) * (args.width // 16)
    kv = KVCache(
        num_layers=cfg.num_layers,
        batch=1,
        heads=cfg.num_heads,
        head_dim=cfg.head_dim,
        tokens_per_frame=tpf,
        capacity_frames=2 * args.frames,
        sink_frames=0,
        dtype=dtype,
        device=device,
    )
    cross = CrossAttnCache(cfg.num_layers)
    info = {
        "init_s": time.perf_counter() - t0,
        "attn_backend": backend,
        "tokens_per_frame": tpf,
        "params": sum(p.numel() for p in model.parameters()),
    }
    return model, kv, cross, info


@torch.no_grad()
def bench_variant(model, kv, cross, args, device, compiled: bool) -> dict:
    cfg = model.cfg
    h, w, f = args.height // 8, args.width // 8, args.frames
    gen = torch.Generator(device=device).manual_seed(1)
    dt = model.patch_embedding.weight.dtype
    text = torch.randn(1, cfg.text_len, cfg.text_dim, device=device, dtype=dt, generator=gen)
    ctx = torch.randn(1, f, 16, h, w, device=device, dtype=dt, generator=gen)
    x = torch.randn(1, f, 16, h, w, device=device, dtype=dt, generator=gen)
    t = torch.full((1,), 750.0, device=device)
    kv.reset()
    cross.reset()
    t0 = time.perf_counter()
    # steady state: recompute call over the context frames, then the chunk (the window is full)
    model(
        ctx,
        torch.zeros(1, device=device),
        text,
        kv_cache=kv,
        cross_cache=cross,
        start_frame=f,
        kv_bias=1.0,
    )

    def call() -> None:
        model(x, t, text, kv_cache=kv, cross_cache=cross, start_frame=2 * f, kv_bias=1.0)

    call()
    sync(device)
    first_s = time.perf_counter() - t0
    ms = time_ms(call, args.iters, args.warmup, device)
    profile = profile_kernels(call, device) if args.profile else {}
    tokens = f * (args.height // 16) * (args.width // 16)
    flops = dit_flops_per_call(cfg, tokens=tokens, cached_tokens=tokens, text_len=cfg.text_len)
    med = statistics.median(ms)
    return {
        "compiled": compiled,
        "first_calls_s": first_s,
        "ms_per_call_median": med,
        "ms_per_call_min": min(ms),
        "ms_per_call_p90": sorted(ms)[int(0.9 * len(ms))],
        "flops_per_call": flops,
        "tflops_achieved": flops / (med / 1e3) / 1e12,
        "tokens": tokens,
        "keys": 2 * tokens,
        "profile": profile,
        "peak_mem_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="wan-14b")
    p.add_argument("--height", type=int, default=320)
    p.add_argument("--width", type=int, default=576)
    p.add_argument("--frames", type=int, default=3)
    p.add_argument("--attn-backend", default="auto")
    p.add_argument("--variants", default="eager,compile", help=f"eager or {', '.join(COMPILE_VARIANTS)}")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda:0")
    p.add_argument("--fp8", action="store_true", help="FP8 linear layers in the blocks (streamdit --fp8)")
    p.add_argument("--profile", action="store_true", help="print the heaviest kernels per call")
    p.add_argument("--matmul-n", type=int, default=8192)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    device = torch.device(args.device)
    peak = matmul_peak_tflops(device, n=args.matmul_n)
    fp8_peak = fp8_matmul_peak_tflops(device, n=args.matmul_n) if args.fp8 else None
    model, kv, cross, info = build(args, device)
    results = []
    for variant in args.variants.split(","):
        compiled = variant != "eager"
        if compiled:
            # forward does the cache bookkeeping eagerly; every block runs one compiled graph
            torch._dynamo.reset()  # a fresh compile per variant (options differ)
            options = dict(COMPILE_VARIANTS[variant])
            for block in model.blocks:
                block.add_norm = add_norm
            if options.pop("fused_norms", False):
                model.use_fused_norms()
            model.compile_blocks(**options)
        res = bench_variant(model, kv, cross, args, device, compiled=compiled)
        res["variant"] = variant
        res["fraction_of_peak"] = res["tflops_achieved"] / peak["tflops"]
        if fp8_peak is not None:
            res["fraction_of_fp8_peak"] = res["tflops_achieved"] / fp8_peak["tflops"]
        results.append(res)
        print(json.dumps(res), flush=True)
    out = {
        "bench": "generator_forward",
        "command": shlex.join([sys.executable, *sys.argv]),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "preset": args.preset,
        "geometry": [args.height, args.width],
        "dtype": str(model.patch_embedding.weight.dtype),
        "matmul_peak": peak,
        "fp8_matmul_peak": fp8_peak,
        "model": info,
        "results": results,
        "chunk_generator_ms_4_steps_plus_recompute": [5 * r["ms_per_call_median"] for r in results],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print(
        json.dumps(
            {
                "peak_tflops": peak["tflops"],
                "results": [
                    {
                        k: r[k]
                        for k in (
                            "variant",
                            "ms_per_call_median",
                            "tflops_achieved",
                            "fraction_of_peak",
                        )
                    }
                    for r in results
                ],
            },
            indent=2,
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
