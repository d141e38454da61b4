"""The fused residual + norm + modulation kernel (model/norm_kernels.py) against `dit.add_norm`.

On the CPU, Triton's interpreter runs the kernel itself (a subprocess with TRITON_INTERPRET=1:
the flag is read when triton is imported) over every combination of its switches: the residual
comes out bit for bit (gated: within the one rounding a fused multiply-add saves), the
normalized row within float32 rounding, its cast to bf16 within one bf16 step, and an FP8 row's
scale within one bf16 step of its amax (the interpreter's e4m3 cast itself is wrong, so FP8
values are compared on the GPU only). On a GPU (the device machine): the same at wan-14b's
width and a chunk's rows, and a compiled tiny DiT using the kernels against the same DiT on the
torch reference, bf16 and FP8.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from factories import dit_caches
from streamdit.model.dit import CausalWanDiT
from streamdit.model.norms import WanLayerNorm
from streamdit.model.presets import get_dit_config

pytestmark = pytest.mark.timeout(300)
SRC = Path(__file__).resolve().parents[2] / "src"

# every switch of the kernel: (affine norm, y, gate, modulation) with each output dtype
COMPARE = textwrap.dedent(
    """
    import itertools, sys, torch
    from streamdit.model.fp8 import FP8, RowQuantized
    from streamdit.model.norms import WanLayerNorm, add_norm
    from streamdit.model.norm_kernels import fused_add_norm

    DTYPES = (torch.bfloat16, torch.float32, FP8)
    INTERPRETED = sys.argv[5] == "1"

    def compare(device, batch, rows, dim):
        gen = torch.Generator(device=device).manual_seed(0)
        x = torch.randn(batch, rows, dim, generator=gen, device=device) * 3 + 1
        y = torch.randn(batch, rows, dim, generator=gen, device=device).to(torch.bfloat16)
        mod = torch.randn(batch, 6, dim, generator=gen, device=device).unsqueeze(2).unbind(1)
        worst = {}
        for affine, with_y, gated, modulated, dtype in itertools.product(
            (False, True), (False, True), (False, True), (False, True), DTYPES
        ):
            if gated and not with_y:
                continue
            norm = WanLayerNorm(dim, 1e-6, elementwise_affine=affine, device=device, dtype=torch.bfloat16)
            if affine:
                with torch.no_grad():
                    norm.weight.normal_(generator=gen)
                    norm.bias.normal_(generator=gen)
            args = (
                x, y if with_y else None, mod[2] if gated else None, norm,
                mod[0] if modulated else None, mod[1] if modulated else None, dtype,
            )
            (xr, hr), (xf, hf) = add_norm(*args), fused_add_norm(*args)
            case = f"affine={affine} y={with_y} gate={gated} mod={modulated} {dtype}"
            # the residual: float32 x + y·gate; a GPU kernel contracts it into one fused
            # multiply-add (one rounding, not two), so it may differ by an ulp of the product
            if gated:
                product = (y.float() * mod[2]).abs()
                assert ((xf - xr).abs() <= 2.0**-23 * (product + xr.abs())).all(), case
            else:
                assert torch.equal(xf, xr), case
            if dtype == FP8:  # rows quantized: compare what the FP8 layer multiplies by
                assert isinstance(hf, RowQuantized) and hf.data.dtype == FP8, case
                assert hf.scale.shape == hr.scale.shape == (batch, rows, 1), case
                amax = hr.scale * 448.0
                worst[case] = err = ((hf.scale - hr.scale).abs() / hr.scale).max().item()
                assert err <= 2.0**-7, (case, "scale", err)  # one bf16 step of the row's amax
                if INTERPRETED:  # its e4m3 cast mis-rounds (a carry into the exponent is
                    continue  # dropped: 7.9 -> 4): the values are compared on the GPU only
                deq_f, deq_r = hf.data.float() * hf.scale, hr.data.float() * hr.scale
                err = ((deq_f - deq_r).abs() / amax).max().item()
                # two roundings apart at most one e4m3 step (32 at the top binade, of 448)
                assert err <= 32 / 448 + 2.0**-7, (case, err)
                flips = (hf.data.float() != hr.data.float()).float().mean().item()
                assert flips < 0.1, (case, flips)  # a row whose amax flipped re-rounds, no more
                continue
            assert hf.dtype == dtype and hf.shape == hr.shape, case
            scale = hr.float().abs().clamp(min=1.0)
            err = ((hf.float() - hr.float()).abs() / scale).max().item()
            bound = 2.0**-7 if dtype == torch.bfloat16 else 1e-5  # one bf16 step; fp32 rounding
            assert err <= bound, (case, err)
            worst[case] = err
        print(len(worst), "cases, worst", max(worst.values()))

    compare(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))
    """
)


def _run_compare(device: str, batch: int, rows: int, dim: int, *, interpret: bool) -> str:
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    proc = subprocess.run(
        [sys.executable, "-c", COMPARE, device, str(batch), str(rows), str(dim), str(int(interpret))],
        capture_output=True,
        text=True,
        timeout=240,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_the_kernel_matches_the_reference_in_trition_s_interpreter() -> None:
    pytest.importorskip("triton", reason="triton is a test dependency on Linux (pyproject [test])")
    out = _run_compare("cpu", 2, 5, 96, interpret=True)  # 96: a row narrower than its block
    assert out.startswith("36 cases"), out


def test_a_bad_input_is_refused_before_any_launch() -> None:
    pytest.importorskip("triton", reason="triton is a test dependency on Linux (pyproject [test])")
    from streamdit.model.norm_kernels import fused_add_norm

    norm = WanLayerNorm(8, 1e-6, elementwise_affine=False, device="cpu", dtype=torch.float32)
    shift = torch.zeros(1, 1, 8)
    with pytest.raises(ValueError, match="must be float32"):
        fused_add_norm(
            torch.zeros(1, 4, 8, dtype=torch.bfloat16), None, None, norm, shift, shift, torch.float32
        )
    with pytest.raises(ValueError, match="shift and scale"):
        fused_add_norm(torch.zeros(1, 4, 8), None, None, norm, shift, None, torch.float32)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the kernel's own speed path needs a GPU")
def test_the_kernel_matches_the_reference_at_wan_14b_width_on_a_gpu() -> None:
    out = _run_compare("cuda", 1, 2160, 5120, interpret=False)
    assert out.startswith("36 cases"), out


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the kernel's own speed path needs a GPU")
@pytest.mark.parametrize("fp8", [False, True], ids=["bf16", "fp8"])
@torch.no_grad()
def test_a_compiled_dit_on_the_kernels_matches_the_reference_dit(fp8: bool) -> None:
    from streamdit.model.fp8 import quantize_blocks

    cfg = get_dit_config("tiny")
    device = torch.device("cuda")

    def build(fused: bool) -> CausalWanDiT:
        model = CausalWanDiT(cfg, device=device, dtype=torch.bfloat16, attn_backend="math")
        model.init_weights(3)
        if fp8:
            quantize_blocks(model.blocks)
        model.fuse_projections()
        if fused:
            model.use_fused_norms()
            model.compile_blocks()
        return model.eval()

    gen = torch.Generator(device=device).manual_seed(5)
    x = torch.randn(1, 3, cfg.in_channels, 8, 8, generator=gen, device=device).to(torch.bfloat16)
    text = torch.randn(1, 7, cfg.text_dim, generator=gen, device=device).to(torch.bfloat16)
    outs = []
    for fused in (False, True):
        model = build(fused)
        kv, cross = dit_caches(cfg, dtype=torch.bfloat16, device=device)
        t = torch.full((1,), 500.0, device=device)
        outs.append(model(x, t, text, kv_cache=kv, cross_cache=cross, start_frame=0).float())
    ref, fused_out = outs
    rel = ((fused_out - ref).norm() / ref.norm()).item()
    assert rel < 2e-2, rel  # bf16 stream: a rounding flip per norm, nothing systematic
    assert not torch.equal(fused_out, torch.zeros_like(fused_out))


def test_triton_norm_kernels_on_the_cpu_exit_2_naming_the_flag() -> None:
    cmd = [sys.executable, "-m", "streamdit", "run", "--chunks", "1", "--norm-kernels", "triton"]
    proc = subprocess.run(cmd + ["--out", "/nonexistent/x.mp4"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "--norm-kernels triton cannot run here: it needs a CUDA device, got cpu" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_auto_resolves_to_the_torch_definition_off_cuda() -> None:
    from streamdit.model.norms import resolve_norm_kernels

    assert resolve_norm_kernels("auto", torch.device("cpu")) == "torch"
    assert resolve_norm_kernels("torch", torch.device("cpu")) == "torch"
