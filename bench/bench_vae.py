"""Phase C's decoders side by side on one GPU: ms per steady-state chunk decode.

Variants: the Wan VAE decoder as built, with cuDNN autotuning (`cudnn.benchmark`), and with
its conv weights channels-last (NDHWC: the layout cuDNN's tensor-core conv kernels run
natively), there also frame by frame (Wan's loop) against the batched decode steps streamdit
runs; the TAEHV tiny decoder (`--vae tiny`) likewise. A chunk is 3 latent frames
after a first chunk (12 pixel frames); the first chunk is decoded before timing, so the causal
caches are in their steady state. Also the Wan encoder on one pixel frame (the re-encoded
recompute anchor of Phase A).

    python bench/bench_vae.py --height 320 --width 576 --out bench/results/vae_h200.json
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_generator import time_ms  # noqa: E402
from streamdit.model.taehv import StreamingTinyDecoder, TinyVAEConfig, TinyVideoDecoder  # noqa: E402
from streamdit.model.vae import CausalVideoVAE, StreamingDecoder, get_vae_config  # noqa: E402

DEV = torch.device("cuda")


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


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--height", type=int, default=320)
    p.add_argument("--width", type=int, default=576)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    dtype = torch.bfloat16
    h, w = args.height // 8, args.width // 8
    latents = torch.randn(1, 3, 16, h, w, device=DEV, dtype=dtype)
    vae = CausalVideoVAE(get_vae_config("wan"), device=DEV, dtype=dtype)
    vae.init_weights(0)
    vae.eval()
    tiny = TinyVideoDecoder(TinyVAEConfig(), device=DEV, dtype=dtype)
    tiny.init_weights(0)
    tiny.eval()
    rows: dict[str, float] = {}
    result = {
        "bench": "vae_decode",
        "command": shlex.join([sys.executable, *sys.argv]),
        "device_name": torch.cuda.get_device_name(DEV),
        "torch": torch.__version__,
        "geometry": [args.height, args.width],
        "ms_per_chunk_of_3_latents": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        for bench_mode in (False, True):
            torch.backends.cudnn.benchmark = bench_mode
            tag = "autotuned" if bench_mode else "default"
            rows[f"wan_{tag}"] = _decoder_ms(lambda: StreamingDecoder(vae), latents, args.iters)
            rows[f"tiny_{tag}"] = _decoder_ms(lambda: StreamingTinyDecoder(tiny), latents, args.iters)
            frame = torch.randn(1, 3, 1, args.height, args.width, device=DEV, dtype=dtype)
            rows[f"wan_encode_1_frame_{tag}"] = statistics.median(
                time_ms(lambda f=frame: vae.encode(f), args.iters, 3, DEV)
            )
            args.out.write_text(json.dumps(result, indent=2) + "\n")  # what ran survives a failure
        vae.to_channels_last()
        torch.backends.cudnn.benchmark = False
        rows["wan_channels_last_default"] = _decoder_ms(lambda: StreamingDecoder(vae), latents, args.iters)
        rows["wan_channels_last_frame_by_frame"] = _decoder_ms(
            lambda: _FrameByFrame(StreamingDecoder(vae)), latents, args.iters
        )
        torch.backends.cudnn.benchmark = True
        rows["wan_channels_last_autotuned"] = _decoder_ms(lambda: StreamingDecoder(vae), latents, args.iters)
    print(json.dumps(result), flush=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
