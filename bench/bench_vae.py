"""Phase C's decoders side by side on one GPU: ms per steady-state chunk decode.

Variants (`--variants`, comma-separated; the default is the original set):
- `default`, `autotuned`: the Wan VAE decoder as built, without / with cuDNN autotuning
  (`cudnn.benchmark`); the TAEHV tiny decoder (`--vae tiny`) and the Wan encoder on one pixel
  frame (the re-encoded recompute anchor of Phase A) beside each.
- `channels_last`, `channels_last_frame_by_frame`, `channels_last_autotuned`: conv weights
  NDHWC (what a CUDA run builds), the last two frame by frame (Wan's loop) and autotuned.
- `folded`: channels-last with the decoder's narrow causal convs (fewer than `--fold-below`
  input channels) as one 2-D conv over their time taps stacked as channels
  (`CausalVideoVAE.fold_time_taps`).
- `compiled`, `compiled_folded`: the decode step compiled as one graph (inductor,
  `CausalVideoVAE.compile_decoder`), without / with those folds (what a `--compile` run on
  CUDA builds), warmed up as that run does; each reports its
  compile seconds, graphs, graphs compiled while timed (should be 0) and its deviation from the
  eager channels-last decode of the same 4-chunk stream (max abs, relative error); beside it,
  every variant's relative error from a float32 decode (no TF32) of that stream, eager's too.

A chunk is 3 latent frames after a first chunk (12 pixel frames); the first chunk is decoded
before timing, so the causal caches are in their steady state. `--profile`: the heaviest
kernels of one chunk for the channels-last and compiled variants.

    python bench/bench_vae.py --height 320 --width 576 --out bench/results/vae_h200.json
    python bench/bench_vae.py --variants channels_last,folded,compiled,compiled_folded --profile \\
        --out bench/results/vae_compiled_h200.json
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

sys.path.insert(0, str(Path(__file__).parent))
from bench_generator import profile_kernels, time_ms  # noqa: E402
from streamdit.model.taehv import StreamingTinyDecoder, TinyVAEConfig, TinyVideoDecoder  # noqa: E402
from streamdit.model.vae import (  # noqa: E402
    FOLD_BELOW_CHANNELS,
    CausalVideoVAE,
    StreamingDecoder,
    get_vae_config,
    warm_up_decoder,
)

DEV = torch.device("cuda")
ORIGINAL = "default,autotuned,channels_last,channels_last_frame_by_frame,channels_last_autotuned"
CONV_KINDS = (
    ("triton (inductor's fused kernels)", ("triton_",)),
    ("conv", ("conv", "fprop", "implicit", "xmma", "sm90_", "sm80_", "cudnn", "nhwc", "dgrad")),
    ("attention", ("sdpa", "flash", "fmha", "attention")),
    ("gemm", ("gemm", "nvjet", "cutlass")),
)


def _decoder_ms(make, latents: torch.Tensor, iters: int) -> float:
    dec = make()
    dec.decode_chunk(latents)  # the stream's first chunk: caches filled
    return statistics.median(time_ms(lambda: dec.decode_chunk(latents), iters, 3, DEV))


class _FrameByFrame:
    """Wan's loop: one decoder step per latent frame (streamdit before batched decode steps)."""

    def __init__(self, dec: StreamingDecoder) -> None:
        self.dec = dec

    def decode_chunk(self, latents: torch.Tensor) -> torch.Tensor:
        return torch.cat(
            [self.dec.decode_chunk(latents[:, i : i + 1]) for i in range(latents.shape[1])], dim=2
        )


def _stream(vae: CausalVideoVAE, chunks: list[torch.Tensor]) -> torch.Tensor:
    dec = StreamingDecoder(vae)
    return torch.cat([dec.decode_chunk(c) for c in chunks], dim=2).float()


def _fp32_stream(vae: CausalVideoVAE, chunks: list[torch.Tensor]) -> torch.Tensor:
    """The same stream through a float32 copy of the decoder (no TF32): the precision reference."""
    ref = CausalVideoVAE(vae.cfg, device=DEV, dtype=torch.float32)
    ref.load_state_dict(vae.state_dict())
    ref.to_channels_last()
    tf32 = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    try:
        return _stream(ref.eval(), [c.float() for c in chunks])
    finally:
        torch.backends.cudnn.allow_tf32 = tf32


def _relative(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out - ref).norm() / ref.norm())


def _graphs() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def _profile(vae: CausalVideoVAE, latents: torch.Tensor) -> dict:
    dec = StreamingDecoder(vae)
    dec.decode_chunk(latents)
    out = profile_kernels(lambda: dec.decode_chunk(latents), DEV)
    kinds: dict[str, float] = {}
    for row in out["top"]:
        low = row["name"].lower()
        kind = next((k for k, marks in CONV_KINDS if any(m in low for m in marks)), "other")
        kinds[kind] = kinds.get(kind, 0.0) + row["ms_per_call"]
    out["top_by_kind_ms"] = kinds  # over the `top` rows only (this table's kinds)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--height", type=int, default=320)
    p.add_argument("--width", type=int, default=576)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--variants", default=ORIGINAL)
    p.add_argument("--profile", action="store_true")
    p.add_argument("--fold-below", type=int, default=FOLD_BELOW_CHANNELS, help="folded variants' policy")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    variants = args.variants.split(",")
    fold = args.fold_below
    dtype = torch.bfloat16
    h, w = args.height // 8, args.width // 8
    latents = torch.randn(1, 3, 16, h, w, device=DEV, dtype=dtype)
    gen = torch.Generator(device=DEV).manual_seed(1)
    stream = [torch.randn(1, 3, 16, h, w, device=DEV, dtype=dtype, generator=gen) for _ in range(4)]
    vae = CausalVideoVAE(get_vae_config("wan"), device=DEV, dtype=dtype)
    vae.init_weights(0)
    vae.eval()
    tiny = TinyVideoDecoder(TinyVAEConfig(), device=DEV, dtype=dtype)
    tiny.init_weights(0)
    tiny.eval()
    rows: dict[str, float] = {}
    result: dict = {
        "bench": "vae_decode",
        "command": shlex.join([sys.executable, *sys.argv]),
        "device_name": torch.cuda.get_device_name(DEV),
        "torch": torch.__version__,
        "geometry": [args.height, args.width],
        "ms_per_chunk_of_3_latents": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)

    def wan_ms(make=lambda: StreamingDecoder(vae)) -> float:
        return _decoder_ms(make, latents, args.iters)

    def save() -> None:  # what ran survives a failure
        args.out.write_text(json.dumps(result, indent=2) + "\n")

    with torch.no_grad():
        for bench_mode in (False, True):
            tag = "autotuned" if bench_mode else "default"
            if tag not in variants:
                continue
            torch.backends.cudnn.benchmark = bench_mode
            rows[f"wan_{tag}"] = wan_ms()
            rows[f"tiny_{tag}"] = _decoder_ms(lambda: StreamingTinyDecoder(tiny), latents, args.iters)
            frame = torch.randn(1, 3, 1, args.height, args.width, device=DEV, dtype=dtype)
            rows[f"wan_encode_1_frame_{tag}"] = statistics.median(
                time_ms(lambda f=frame: vae.encode(f), args.iters, 3, DEV)
            )
            save()
        torch.backends.cudnn.benchmark = False
        vae.to_channels_last()
        reference = _stream(vae, stream)  # eager channels-last: what the compiled variants match
        fp32 = _fp32_stream(vae, stream)
        result["relative_error_vs_fp32"] = {"channels_last": _relative(reference, fp32)}
        if "channels_last" in variants:
            rows["wan_channels_last_default"] = wan_ms()
            if args.profile:
                result["profile_channels_last"] = _profile(vae, latents)
        if "channels_last_frame_by_frame" in variants:
            rows["wan_channels_last_frame_by_frame"] = wan_ms(lambda: _FrameByFrame(StreamingDecoder(vae)))
        if "channels_last_autotuned" in variants:
            torch.backends.cudnn.benchmark = True
            rows["wan_channels_last_autotuned"] = wan_ms()
            torch.backends.cudnn.benchmark = False
        save()
        for name in ("folded", "compiled_folded", "compiled"):
            if name not in variants:
                continue
            folded = vae.fold_time_taps(vae.decoder, 0 if name == "compiled" else fold)
            detail: dict = {"convs_folded": folded}
            if name.startswith("compiled"):
                torch._dynamo.reset()  # each compiled variant from a cold dynamo cache
                t0 = time.perf_counter()
                vae.compile_decoder()
                chunks, graphs = warm_up_decoder(vae, tuple(latents.shape))
                detail.update(compile_s=time.perf_counter() - t0, warm_up_chunks=chunks, graphs=graphs)
            before = _graphs()
            rows[f"wan_{name}"] = wan_ms()
            out = _stream(vae, stream)
            detail["graphs_compiled_while_timed"] = _graphs() - before
            detail["max_abs_vs_channels_last"] = float((out - reference).abs().max())
            detail["relative_error_vs_channels_last"] = _relative(out, reference)
            result["relative_error_vs_fp32"][name] = _relative(out, fp32)
            if args.profile and name.startswith("compiled"):
                detail["profile"] = _profile(vae, latents)
            result[f"detail_{name}"] = detail
            print(name, rows[f"wan_{name}"], {k: v for k, v in detail.items() if k != "profile"}, flush=True)
            vae._compiled_decode = None  # the next variant starts eager
            save()
        vae.fold_time_taps(vae.decoder, 0)
    print(json.dumps({k: v for k, v in result.items() if not k.startswith(("profile", "detail"))}))
    save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
