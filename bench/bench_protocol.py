"""Wire-protocol overhead per envelope: framing + validation alone, and channel vs bare transfers.

Payload: a `wan-14b` 320x576 TP envelope (latents and context frames [1, 3, 16, 40, 72] bf16,
conditioning_embeds [1, 512, 4096] bf16, denoising_step_list int64 [4]; 4.75 MB in all).

1. `framing` (one process): every step a message takes apart from the transfers themselves —
   sender `prepare()` (validate, specs, encode, dtype / limit checks, materialize, control frame,
   packing every tensor into the one payload buffer) and, on the receiver, the control frame's
   device -> host copy, header checks + inline meta, `decode_meta`, `check_payload`, payload
   layout + flat buffer allocation, building the tensor views over the payload (here: over the
   sender's packed buffer, standing in for the received bytes), rebuild and `validate()`.
2. `transport` (two ranks, the same run): ping-pong round trips. rank0 sends the envelope, rank1
   receives it and answers with a 1-element ack; rank0 times send -> ack. Variants, interleaved
   every iteration so drift hits all alike: `bare` (dist.send/recv of the same 4 tensors, receiver
   allocating from known shapes), `channel` (P2PChannel / BroadcastChannel, full protocol), and
   `ack_only` (the ack round trip alone). `overhead_ms` = median(channel) - median(bare);
   `ratio` = median(channel) / median(bare); `ratio_excl_ack` removes the ack round trip from both.

    PYTHONPATH=src python bench/bench_protocol.py --out bench/results/protocol_cpu.json
    PYTHONPATH=src python bench/bench_protocol.py --backend nccl --out bench/results/protocol_nccl.json

With `--backend nccl` it spawns 2 ranks on cuda:0 / cuda:1 (or runs as a rank under torchrun) and
sets NCCL_NVLS_ENABLE=0, TORCH_SYMM_MEM_DISABLE_MULTICAST=1, NVSHMEM_DISABLE_NVLS=1 for them.
Timed regions end with torch.cuda.synchronize(), so GPU work is inside the numbers.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from streamdit.protocol.channel import BroadcastChannel, P2PChannel
from streamdit.protocol.codec import Limits, decode_meta, tensor_to_bytes
from streamdit.protocol.framing import inline_meta, parse_header, payload_layout, unpack_payload
from streamdit.protocol.header import Action, Header
from streamdit.protocol.messages import TPEnvelopeV1
from streamdit.protocol.preflight import prepare

NCCL_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
LIMITS = Limits()


def envelope(device: torch.device, call_id: int = 0) -> TPEnvelopeV1:
    """The wan-14b 320x576 chunk envelope (recompute chunk: context frames included)."""
    gen = torch.Generator().manual_seed(0)
    lat = (1, 3, 16, 40, 72)
    return TPEnvelopeV1(
        action=Action.INFER,
        call_id=call_id,
        chunk_index=call_id,
        cache_epoch=0,
        tp_plan="generator_only",
        tp_envelope_version=1,
        height=320,
        width=576,
        current_start_frame=9,
        init_cache=False,
        reset_kv_cache=False,
        reset_crossattn_cache=False,
        conditioning_updated=False,
        kv_cache_attention_bias=1.0,
        do_kv_recompute=True,
        num_denoise_steps=4,
        expected_generator_calls=5,
        base_seed=42,
        denoising_step_list=torch.tensor([1000, 750, 500, 250], dtype=torch.int64, device=device),
        latents=torch.randn(lat, generator=gen).to(device, torch.bfloat16),
        conditioning_embeds=torch.randn((1, 512, 4096), generator=gen).to(device, torch.bfloat16),
        context_frames_override=torch.randn(lat, generator=gen).to(device, torch.bfloat16),
    )


def stats(ms: list[float]) -> dict[str, float]:
    q = statistics.quantiles(ms, n=10) if len(ms) >= 10 else [max(ms)] * 9
    return {"median_ms": statistics.median(ms), "p90_ms": q[8], "min_ms": min(ms), "n": len(ms)}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---- 1. framing without transport ---------------------------------------------------------------


def bench_framing(device: torch.device, iters: int, warmup: int) -> dict[str, Any]:
    base = envelope(device)
    stages: dict[str, list[float]] = {}

    def timed(name: str, fn: Callable[..., Any], *args: Any, **kw: Any) -> Any:
        t0 = time.perf_counter()
        out = fn(*args, **kw)
        sync(device)
        stages.setdefault(name, []).append((time.perf_counter() - t0) * 1e3)
        return out

    schema = TPEnvelopeV1.SCHEMA
    for i in range(warmup + iters):
        if i == warmup:
            stages.clear()
        msg = dataclasses.replace(base, call_id=i, chunk_index=i)
        prep = timed("sender_prepare", prepare, msg, LIMITS, device)
        assert prep.meta_tensor is None and len(prep.wire) == 2, prep.summary()  # control + payload
        frame = timed("recv_control_to_host", tensor_to_bytes, prep.control)
        head, data = timed("recv_parse_header", _parse_control, frame)
        meta = timed("recv_decode_meta", decode_meta, data, schema, LIMITS, n_tensors=head.n_tensors)
        specs = {s.name: s for s in meta.specs}
        ctx = head.ids.ctx()
        timed("recv_check_payload", TPEnvelopeV1.check_payload, head.action, meta.fields, specs, ctx)
        layout = timed("recv_allocate", _allocate, meta.specs, device)[0]
        # views over the sender's packed payload: what the receiver holds once the bytes arrived
        tensors = timed("recv_views", unpack_payload, prep.payload, meta.specs, layout, device)
        rebuilt = timed("recv_rebuild", TPEnvelopeV1.from_wire, head.action, head.ids, meta.fields, tensors)
        timed("recv_validate", rebuilt.validate)
    per_iter = [sum(v[i] for v in stages.values()) for i in range(iters)]
    return {"stages": {k: stats(v) for k, v in stages.items()}, "total": stats(per_iter)}


def _parse_control(frame: bytes) -> tuple[Header, bytes | None]:
    head = parse_header(frame, LIMITS)
    return head, inline_meta(frame, head, LIMITS)


def _allocate(specs: Any, device: torch.device) -> tuple[Any, torch.Tensor]:
    """The receiver's allocation: layout from the specs, one flat buffer (views: `recv_views`)."""
    layout = payload_layout(specs)
    return layout, torch.empty(layout.nbytes, dtype=torch.uint8, device=device)


# ---- 2. transport: channel vs bare, two ranks ---------------------------------------------------


def _init(rank: int, world: int, init_file: str | None, backend: str) -> torch.device:
    if backend == "nccl":
        for key, value in NCCL_ENV.items():  # the ranks' own environment, before NCCL starts
            os.environ[key] = value
        device = torch.device("cuda", rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
        torch.set_num_threads(1)
    method = f"file://{init_file}" if init_file else "env://"
    kw = {"device_id": device} if backend == "nccl" else {}
    dist.init_process_group(
        backend, init_method=method, rank=rank, world_size=world, timeout=timedelta(seconds=120), **kw
    )
    return device


def _bare_send(group: Any, tensors: list[torch.Tensor], kind: str) -> None:
    for t in tensors:
        if kind == "p2p":
            dist.send(t, group=group, group_dst=1)
        else:
            dist.broadcast(t, group=group, group_src=0)


def _bare_recv(
    group: Any, specs: list[tuple[tuple[int, ...], torch.dtype]], device: torch.device, kind: str
) -> None:
    for shape, dtype in specs:
        buf = torch.empty(shape, dtype=dtype, device=device)
        if kind == "p2p":
            dist.recv(buf, group=group, group_src=0)
        else:
            dist.broadcast(buf, group=group, group_src=0)


def _noop() -> None:
    return None


def transport_rank(
    rank: int, world: int, init_file: str | None, backend: str, iters: int, warmup: int, out: str
) -> None:
    device = _init(rank, world, init_file, backend)
    group = dist.group.WORLD
    base = envelope(device)
    tensors = [t for _, t in sorted(base.tensor_fields().items())]
    specs = [(tuple(t.shape), t.dtype) for t in tensors]
    ack = torch.zeros(1, dtype=torch.int64, device=device)
    results: dict[str, Any] = {}
    for kind in ("p2p", "broadcast"):
        if kind == "p2p":
            ch = P2PChannel(group, 1 - rank, device=device, role=f"bench{rank}", group_name="world")
        else:
            ch = BroadcastChannel(group, 0, device=device, role=f"bench{rank}", group_name="world")
        times: dict[str, list[float]] = {"bare": [], "channel": [], "ack_only": []}
        for i in range(warmup + iters):
            msg = dataclasses.replace(base, call_id=i, chunk_index=i) if rank == 0 else None
            steps = {
                "ack_only": (_noop, _noop),
                "bare": (
                    functools.partial(_bare_send, group, tensors, kind),
                    functools.partial(_bare_recv, group, specs, device, kind),
                ),
                "channel": (functools.partial(ch.send, msg), ch.recv),
            }
            for name, (send_fn, recv_fn) in steps.items():
                dist.barrier(group=group)  # both sides start together; not timed
                sync(device)
                t0 = time.perf_counter()
                if rank == 0:
                    send_fn()
                    dist.recv(ack, group=group, group_src=1)
                else:
                    recv_fn()
                    dist.send(ack, group=group, group_dst=0)
                sync(device)
                if i >= warmup:
                    times[name].append((time.perf_counter() - t0) * 1e3)
        results[kind] = _summarize(times)
    if rank == 0:
        Path(out).write_text(json.dumps(results))
    dist.barrier(group=group)
    dist.destroy_process_group()


def _summarize(times: dict[str, list[float]]) -> dict[str, Any]:
    s = {k: stats(v) for k, v in times.items()}
    bare, chan, ack = s["bare"]["median_ms"], s["channel"]["median_ms"], s["ack_only"]["median_ms"]
    return {
        **s,
        "overhead_ms": chan - bare,
        "ratio": chan / bare,
        "ratio_excl_ack": (chan - ack) / max(bare - ack, 1e-9),
    }


def bench_transport(backend: str, iters: int, warmup: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="bench-protocol-") as tmp:
        out = os.path.join(tmp, "rank0.json")
        if "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # launched by torchrun
            transport_rank(
                int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), None, backend, iters, warmup, out
            )
            return json.loads(Path(out).read_text()) if int(os.environ["RANK"]) == 0 else {}
        if backend == "nccl":
            os.environ.update(NCCL_ENV)  # inherited by the spawned ranks as well
        args = (2, os.path.join(tmp, "filestore"), backend, iters, warmup, out)
        mp.start_processes(transport_rank, args=args, nprocs=2, start_method="spawn", join=True)
        return json.loads(Path(out).read_text())


def _command_line() -> str:
    """The exact command, with PYTHONPATH when set, so the result can be reproduced verbatim."""
    cmd = shlex.join([sys.executable, *sys.argv])
    path = os.environ.get("PYTHONPATH")
    return f"PYTHONPATH={shlex.quote(path)} {cmd}" if path else cmd


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backend", choices=["gloo", "nccl"], default="gloo")
    p.add_argument("--iters", type=int, default=200)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--framing-iters", type=int, default=500)
    p.add_argument("--skip-transport", action="store_true")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    device = torch.device("cuda", 0) if args.backend == "nccl" else torch.device("cpu")
    if device.type == "cpu":
        torch.set_num_threads(1)
    is_rank = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    result: dict[str, Any] = {
        "command": _command_line(),
        "backend": args.backend,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "host": {"machine": platform.machine(), "cpus": os.cpu_count(), "node": platform.node()},
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or "cpu",
        "env": {k: os.environ.get(k, NCCL_ENV[k]) for k in NCCL_ENV} if args.backend == "nccl" else {},
        "payload": {
            n: [str(t.dtype), list(t.shape)] for n, t in envelope(torch.device("cpu")).tensor_fields().items()
        },
        "payload_bytes": sum(
            t.numel() * t.element_size() for t in envelope(torch.device("cpu")).tensor_fields().values()
        ),
    }
    wire = prepare(envelope(torch.device("cpu")), LIMITS, torch.device("cpu")).wire
    result["wire"] = {"transfers": len(wire), "bytes": [t.numel() for t in wire]}
    if not is_rank or int(os.environ["RANK"]) == 0:
        result["framing"] = bench_framing(device, args.framing_iters, args.warmup)
    if not args.skip_transport:
        result["transport"] = bench_transport(args.backend, args.iters, args.warmup)
    if is_rank and int(os.environ["RANK"]) != 0:
        return 0
    if "transport" in result:
        p2p = result["transport"]["p2p"]
        result["targets"] = {
            "overhead_lt_1ms": p2p["overhead_ms"] < 1.0,
            "ratio_le_1.25": p2p["ratio"] <= 1.25,
            "note": "targets are stated for NCCL on GPUs; on CPU/gloo they are informative only",
        }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("framing", "transport", "targets") if k in result}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
