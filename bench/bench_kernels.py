"""The generator's kernels at real shapes, side by side: attention (plain and KV-biased) per
backend, bf16 vs FP8 linear layers, and the bf16 / FP8 matmul peaks, with correctness beside
every timing (a fast kernel that is wrong is reported as wrong, not fast).

    python bench/bench_kernels.py --out bench/results/kernels_h200.json

Attention: `[1, heads, Lq, 128]` queries against Lk keys in bf16 (wan-14b: 40 heads; a chunk of
3 latent frames at 320x576 is 2160 queries; the streamdit window of 6 frames 4320 keys, a
21-frame window 15120). "biased" = a KV bias on the cached keys (streamdit's soft transition),
run as `streamdit.model.attention.sdpa` runs it (one fused call per span, log-sum-exp mix), and
for comparison as one masked call on the kernels that take a mask. Error: max |out - ref| where
ref is the float32 math result with the same bias.

Linear: `[M, K] x [K, N]` in bf16 (`F.linear`) and through `Fp8Linear` (rowwise e4m3, the
activation quantized inside the same compiled graph), plus the bare `_scaled_mm` on already
quantized inputs (the ceiling the quantization overhead is measured against). Error: relative
Frobenius error vs the float32 product.
"""

# ruff: noqa: B023  (every closure is timed inside its own loop iteration)
from __future__ import annotations

import argparse
import json
import math
import shlex
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).parent))
from bench_generator import fp8_matmul_peak_tflops, matmul_peak_tflops, time_ms  # noqa: E402
from streamdit.model.attention import KeyBias, sdpa  # noqa: E402
from streamdit.model.fp8 import Fp8Linear, rowwise_quantize  # noqa: E402

DEV = torch.device("cuda")
MASKED = {"efficient": SDPBackend.EFFICIENT_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION}


def _med(fn, iters: int = 30) -> float:
    return statistics.median(time_ms(fn, iters, 5, DEV))


def attention_rows(heads: int, lq: int, keys: list[int], bias: float) -> list[dict]:
    gen = torch.Generator(device=DEV).manual_seed(0)
    rows = []
    for lk in keys:
        q = torch.randn(1, heads, lq, 128, device=DEV, dtype=torch.bfloat16, generator=gen)
        k = torch.randn(1, heads, lk, 128, device=DEV, dtype=torch.bfloat16, generator=gen)
        v = torch.randn(1, heads, lk, 128, device=DEV, dtype=torch.bfloat16, generator=gen)
        cached = lk - lq  # the chunk's own keys come last
        kb = KeyBias(0, cached, torch.full((), math.log(bias), device=DEV))
        ref = sdpa(q.float(), k.float(), v.float(), backend="math", key_bias=kb)
        plain_ref = sdpa(q.float(), k.float(), v.float(), backend="math")
        for backend in ("flash", "cudnn", "efficient"):
            row: dict = {"backend": backend, "lq": lq, "lk": lk, "heads": heads}
            try:
                row["plain_ms"] = _med(lambda b=backend: sdpa(q, k, v, backend=b))
                row["plain_err"] = (sdpa(q, k, v, backend=backend).float() - plain_ref).abs().max().item()
                row["biased_ms"] = _med(lambda b=backend: sdpa(q, k, v, backend=b, key_bias=kb))
                got = sdpa(q, k, v, backend=backend, key_bias=kb)
                row["biased_err"] = (got.float() - ref).abs().max().item()
                row["biased_over_plain"] = row["biased_ms"] / row["plain_ms"]
                row["augmented_ms"], row["augmented_err"] = _augmented(q, k, v, cached, bias, backend, ref)
                row["augmented_over_plain"] = row["augmented_ms"] / row["plain_ms"]
                if backend in MASKED:
                    mask = kb.mask(lk, q.dtype)

                    def masked(b: str = backend) -> torch.Tensor:
                        with sdpa_kernel([MASKED[b]]):
                            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

                    row["one_masked_call_ms"] = _med(masked)
                    row["one_masked_call_err"] = (masked().float() - ref).abs().max().item()
            except RuntimeError as exc:
                row["error"] = str(exc)[:300]
            print(json.dumps(row), flush=True)
            rows.append(row)
    return rows


def _augmented(q, k, v, cached: int, bias: float, backend: str, ref: torch.Tensor) -> tuple[float, float]:
    """The KV bias as ONE call: an extra head-dim channel (1 on queries, log(bias)/scale on
    cached keys, 0 elsewhere) adds log(bias) to exactly the cached keys' scores; padded to a
    multiple of 8 (136) for the fused kernels. An experiment for the soft-transition cost."""
    d = q.shape[-1]
    scale = d**-0.5
    pad = 8
    qa = torch.cat([q, torch.ones_like(q[..., :1]), torch.zeros_like(q[..., : pad - 1])], -1)
    col = torch.zeros_like(k[..., :1])
    col[:, :, :cached] = math.log(bias) / scale
    ka = torch.cat([k, col, torch.zeros_like(k[..., : pad - 1])], -1)
    va = torch.cat([v, torch.zeros_like(v[..., :pad])], -1)
    kern = {"flash": SDPBackend.FLASH_ATTENTION, **MASKED}[backend]

    def call() -> torch.Tensor:
        with sdpa_kernel([kern]):
            return F.scaled_dot_product_attention(qa, ka, va, scale=scale)[..., :d]

    return _med(call), (call().float() - ref).abs().max().item()


def linear_rows(m: int, shapes: list[tuple[str, int, int]]) -> list[dict]:
    gen = torch.Generator(device=DEV).manual_seed(1)
    rows = []
    for name, k, n in shapes:
        x = torch.randn(m, k, device=DEV, dtype=torch.bfloat16, generator=gen)
        layer = torch.nn.Linear(k, n, device=DEV, dtype=torch.bfloat16)
        torch.nn.init.normal_(layer.weight, std=0.02, generator=gen)
        ref = x.float() @ layer.weight.float().t() + layer.bias.float()
        fp8 = Fp8Linear.from_linear(layer)
        fp8_compiled = torch.compile(fp8, fullgraph=True)
        xq, xs = rowwise_quantize(x)
        wt, ws = fp8.weight.t(), fp8.weight_scale.view(1, -1)

        def bare() -> torch.Tensor:
            return torch._scaled_mm(xq, wt, scale_a=xs, scale_b=ws, out_dtype=torch.bfloat16)

        row: dict = {"layer": name, "m": m, "k": k, "n": n}
        row["bf16_ms"] = _med(lambda: layer(x))
        row["fp8_layer_ms"] = _med(lambda: fp8_compiled(x))
        row["fp8_bare_mm_ms"] = _med(bare)
        row["speedup_fp8_layer"] = row["bf16_ms"] / row["fp8_layer_ms"]
        row["speedup_fp8_bare"] = row["bf16_ms"] / row["fp8_bare_mm_ms"]
        flops = 2 * m * k * n
        row["bf16_tflops"] = flops / row["bf16_ms"] / 1e9
        row["fp8_bare_tflops"] = flops / row["fp8_bare_mm_ms"] / 1e9
        for key, out in (("bf16", layer(x)), ("fp8", fp8_compiled(x))):
            row[f"{key}_rel_err"] = ((out.float() - ref).norm() / ref.norm()).item()
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def peaks(n: int) -> dict:
    """bf16 and e4m3 matmul rates on random data: bench_generator's measurements."""
    return {
        "n": n,
        "bf16_tflops": matmul_peak_tflops(DEV, n=n)["tflops"],
        "fp8_tflops": fp8_matmul_peak_tflops(DEV, n=n)["tflops"],
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--heads", type=int, default=40)
    p.add_argument("--queries", type=int, default=2160)
    p.add_argument("--keys", default="4320,15120")
    p.add_argument("--bias", type=float, default=0.3)
    p.add_argument("--dim", type=int, default=5120)
    p.add_argument("--ffn-dim", type=int, default=13824)
    p.add_argument("--matmul-n", type=int, default=8192)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    d, f = args.dim, args.ffn_dim
    result = {
        "bench": "kernels",
        "command": shlex.join([sys.executable, *sys.argv]),
        "device_name": torch.cuda.get_device_name(DEV),
        "torch": torch.__version__,
        "cudnn": torch.backends.cudnn.version(),
        "peaks": peaks(args.matmul_n),
    }
    print(json.dumps(result["peaks"]), flush=True)
    keys = [int(k) for k in args.keys.split(",")]
    result["attention"] = attention_rows(args.heads, args.queries, keys, args.bias)
    shapes = [("qkvo", d, d), ("ffn.0", d, f), ("ffn.2", f, d)]
    result["linear"] = linear_rows(args.queries, shapes)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
