"""Generator time per chunk at TP=1 and TP=2 in one run, plus time spent in collectives.

One chunk = the recompute call + 4 denoising calls (steady state: window full), wan-14b,
320x576, bf16. TP=1 runs on GPU 0 alone first; then both ranks shard the same seeded model with
`parallel.tp.apply_tp` and run the chunk in lockstep (NCCL, functional all-reduces). Collective
time is read from the profiler's NCCL kernels on rank 0. Variants: eager (functional
all-reduces), eager-inplace (c10d in-place all-reduces), compile (`compile_blocks`: one block
graph with functional all-reduces, reused by every layer), compile-reorder (the same with
inductor's compute/communication reordering), compile-inplace-disabled (in-place all-reduces
hidden from dynamo by `torch._dynamo.disable`: a graph break at every collective). Compiled
variants go through `CompileProbe`, the backend `--compile` uses, so each row also reports the
graphs run and graph breaks per generator call (the C-02 measure).

    python bench/bench_tp.py --out bench/results/tp_wan14b_h200x2.json
    python bench/bench_tp.py --preset tiny --height 32 --width 48 --out /tmp/t.json  # CPU check

Sets NCCL_NVLS_ENABLE=0, TORCH_SYMM_MEM_DISABLE_MULTICAST=1, NVSHMEM_DISABLE_NVLS=1 for its ranks.
"""

from __future__ import annotations

import argparse
import json
import shlex
import socket
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp

from streamdit.config import LaunchEnv, apply_environment, nccl_environment_defaults
from streamdit.model.attention import resolve_attention_backend
from streamdit.model.dit import CausalWanDiT
from streamdit.model.kv_cache import CrossAttnCache, KVCache
from streamdit.model.presets import get_dit_config
from streamdit.parallel.groups import destroy_groups, init_groups
from streamdit.parallel.tp import apply_tp, tp_collectives_per_call
from streamdit.runtime.compile_health import CompileProbe

F = 3  # latent frames per chunk
TP1_TWIN = {"eager-inplace": "eager", "compile-inplace-disabled": "compile"}


def dtype_for(device: torch.device) -> torch.dtype:
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def build(args: argparse.Namespace, device: torch.device) -> CausalWanDiT:
    cfg = get_dit_config(args.preset)
    backend = resolve_attention_backend("auto", device, dtype_for(device))
    model = CausalWanDiT(cfg, device=device, dtype=dtype_for(device), attn_backend=backend)
    model.init_weights(args.seed)
    return model.eval()


def timed(fn, device: torch.device) -> float:
    """ms of one fn() call: CUDA events on a GPU, wall clock on the CPU (the dry run)."""
    if device.type != "cuda":
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end)


@torch.no_grad()
def chunk_ms(
    model: CausalWanDiT,
    args: argparse.Namespace,
    device: torch.device,
    profile: bool,
    probe: CompileProbe | None = None,
) -> dict:
    """Median ms of one steady-state chunk (recompute + 4 denoise calls) and NCCL kernel ms."""
    cfg = model.cfg
    dtype = dtype_for(device)
    heads = model.blocks[0].self_attn.q.weight.shape[0] // cfg.head_dim
    tpf = (args.height // 16) * (args.width // 16)
    kv = KVCache(
        num_layers=cfg.num_layers,
        batch=1,
        heads=heads,
        head_dim=cfg.head_dim,
        tokens_per_frame=tpf,
        capacity_frames=2 * F,
        dtype=dtype,
        device=device,
    )
    cross = CrossAttnCache(cfg.num_layers)
    gen = torch.Generator(device=device).manual_seed(1)
    shape = (1, F, 16, args.height // 8, args.width // 8)
    text = torch.randn(1, cfg.text_len, cfg.text_dim, device=device, dtype=dtype, generator=gen)
    ctx = torch.randn(shape, device=device, dtype=dtype, generator=gen)
    x = torch.randn(shape, device=device, dtype=dtype, generator=gen)

    def chunk() -> None:
        kv.reset()
        model(ctx, torch.zeros(1, device=device), text, kv_cache=kv, cross_cache=cross, start_frame=F)
        for t in (1000.0, 937.5, 833.3, 625.0):
            step = torch.full((1,), t, device=device)
            model(x, step, text, kv_cache=kv, cross_cache=cross, start_frame=2 * F)

    for _ in range(args.warmup):
        chunk()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    out: dict = {}
    if probe is not None:  # graphs one steady chunk runs (5 generator calls)
        before = probe.graph_calls
        chunk()
        per_call = (probe.graph_calls - before) // 5
        out.update({"graphs_per_call": per_call, "graph_breaks_per_call": per_call - cfg.num_layers})
    times = [timed(chunk, device) for _ in range(args.iters)]
    out.update({"chunk_ms_median": statistics.median(times), "chunk_ms_min": min(times), "iters": len(times)})
    if profile and device.type == "cuda":
        out.update(nccl_ms_per_chunk(chunk, device))
    return out


def nccl_ms_per_chunk(chunk, device: torch.device, reps: int = 2) -> dict:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            chunk()
        torch.cuda.synchronize(device)
    nccl_us, count = 0.0, 0
    for evt in prof.key_averages():
        if "nccl" in evt.key.lower() and "kernel" in evt.key.lower():
            nccl_us += getattr(evt, "self_device_time_total", 0) or 0
            count += evt.count
    return {"nccl_kernel_ms_per_chunk": nccl_us / 1e3 / reps, "nccl_kernels_per_chunk": count // reps}


def compile_model(model: CausalWanDiT, variant: str) -> CompileProbe | None:
    """Regional compile for the compile variants; a fresh dynamo cache for every model."""
    if not variant.startswith("compile"):
        return None
    import torch._inductor.config as inductor_config

    torch._dynamo.reset()  # else a new model reuses the previous variant's block graph
    inductor_config.reorder_for_compute_comm_overlap = variant == "compile-reorder"
    probe = CompileProbe("inductor", "default")
    model.compile_blocks(backend=probe, fullgraph=False)
    return probe


def run_variant(variant: str, rank: int, groups, args: argparse.Namespace, device: torch.device) -> dict:
    row: dict = {"variant": variant}
    # TP=1 has no collectives: the in-place variants would time the same model as their twin
    twin = TP1_TWIN.get(variant)
    if rank == 0 and twin not in args.variants.split(","):
        full = build(args, device)
        probe = compile_model(full, variant)
        row["tp1"] = chunk_ms(full, args, device, profile=False, probe=probe)
        del full
        empty_cache(device)
    torch.distributed.barrier(group=groups.world.pg)
    model = build(args, device)
    inplace = variant in ("eager-inplace", "compile-inplace-disabled")
    hide = variant == "compile-inplace-disabled"
    apply_tp(model, groups.tp, inplace_collectives=inplace, hide_from_compiler=hide)
    empty_cache(device)
    probe = compile_model(model, variant)
    # every rank profiles: a collective-bearing chunk run on one rank only would hang the other
    row["tp2"] = chunk_ms(model, args, device, profile=True, probe=probe)
    del model
    empty_cache(device)
    if rank == 0:
        if "tp1" in row:
            row["speedup"] = row["tp1"]["chunk_ms_median"] / row["tp2"]["chunk_ms_median"]
        print(json.dumps(row), flush=True)
    return row


def empty_cache(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


def rank_main(rank: int, world: int, port: int, args: argparse.Namespace, out: str) -> None:
    launch = LaunchEnv(rank=rank, world_size=world, local_rank=rank, master_port=port, launched=True)
    device = torch.device("cuda", rank) if torch.cuda.is_available() else torch.device("cpu")
    groups = init_groups(launch, device=device, timeout_s=600)
    results: dict = {"variants": []}
    try:
        for variant in args.variants.split(","):
            try:
                row = run_variant(variant, rank, groups, args, device)
            except Exception as exc:  # a failed variant (e.g. a compile error) is a result too
                row = {"variant": variant, "error": f"{type(exc).__name__}: {str(exc)[:2000]}"}
                print(json.dumps(row), flush=True)
            results["variants"].append(row)
            if rank == 0:  # after every variant: a run cut short still leaves its rows
                write_results(results, args, device, out)
            torch.distributed.barrier(group=groups.world.pg)
    finally:
        destroy_groups(groups)


def write_results(results: dict, args: argparse.Namespace, device: torch.device, out: str) -> None:
    cfg = get_dit_config(args.preset)
    results.update(
        {
            "bench": "tp_generator",
            "command": shlex.join([sys.executable, *sys.argv]),
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "torch": torch.__version__,
            "nccl": ".".join(map(str, torch.cuda.nccl.version())) if device.type == "cuda" else None,
            "preset": args.preset,
            "geometry": [args.height, args.width],
            "dtype": str(dtype_for(device)).removeprefix("torch."),
            "calls_per_chunk": 5,
            "collectives_per_call": tp_collectives_per_call(cfg),
        }
    )
    Path(out).write_text(json.dumps(results, indent=2) + "\n")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="wan-14b")
    p.add_argument("--height", type=int, default=320)
    p.add_argument("--width", type=int, default=576)
    p.add_argument("--variants", default="eager-inplace,compile,compile-reorder")
    p.add_argument("--iters", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True)
    args = p.parse_args()
    apply_environment(nccl_environment_defaults())
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(rank_main, args=(2, port, args, args.out), nprocs=2, start_method="spawn", join=True)
    print(Path(args.out).read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
