"""FP8 linear layers (`--fp8`) and the fused q/k/v projection, on the CPU (PyTorch's CPU
`_scaled_mm` runs the same rowwise-scaled product the GPU runs).

- `Fp8Linear` is a quantized Linear: close to it (e4m3 error), not equal to it, and its weight
  dequantizes to within e4m3's rounding of the original, row by row.
- `quantize_blocks` swaps exactly the listed layers of every block, and refuses before touching
  anything when a layer cannot be quantized.
- `fuse_qkv` changes no number and no parameter: the fused buffers are the parameters' storage.
- The CLI refuses `--fp8` where it cannot run (exit 2, naming the flag) before building a model.
"""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import torch
from torch import nn

from factories import dit_caches
from streamdit.errors import ConfigError
from streamdit.model.dit import CausalWanDiT
from streamdit.model.fp8 import QUANTIZED_LINEARS, Fp8Linear, quantize_blocks
from streamdit.model.presets import get_dit_config

CFG = get_dit_config("tiny")


def _model() -> CausalWanDiT:
    model = CausalWanDiT(CFG, "cpu")
    model.init_weights(0)
    return model.eval()


@torch.no_grad()
def _stream(model: CausalWanDiT) -> list[torch.Tensor]:
    kv, cc = dit_caches(CFG, dtype=torch.float32, device="cpu")
    gen = torch.Generator().manual_seed(1)
    xs = [torch.randn(1, 3, 16, 8, 8, generator=gen) for _ in range(2)]
    text = torch.randn(1, CFG.text_len, CFG.text_dim, generator=gen)
    t = torch.tensor([500.0])
    return [
        model(x, t, text, kv_cache=kv, cross_cache=cc, start_frame=3 * i, kv_bias=0.5)
        for i, x in enumerate(xs)
    ]


def test_fp8_linear_is_a_quantized_linear() -> None:
    gen = torch.Generator().manual_seed(2)
    layer = nn.Linear(256, 128).to(torch.bfloat16)
    nn.init.normal_(layer.weight, std=0.02, generator=gen)
    nn.init.normal_(layer.bias, std=0.02, generator=gen)
    x = torch.randn(2, 7, 256, generator=gen).to(torch.bfloat16)
    fp8 = Fp8Linear.from_linear(layer)
    assert fp8.weight.dtype == torch.float8_e4m3fn and fp8.weight.shape == layer.weight.shape
    with torch.no_grad():
        ref, got = layer(x).float(), fp8(x)
    assert got.dtype == torch.bfloat16 and got.shape == (2, 7, 128)
    rel = ((got.float() - ref).norm() / ref.norm()).item()
    assert 1e-3 < rel < 0.06, rel  # quantized (not a bf16 Linear in disguise), within e4m3's error
    # e4m3 keeps 3 mantissa bits: each weight within 2^-4 of its row's scale-relative value
    w = layer.weight.float()
    err = (fp8.dequantized() - w).abs() / w.abs().amax(dim=1, keepdim=True)
    assert err.max().item() <= 2**-4


def test_quantize_blocks_swaps_every_listed_layer_and_leaves_the_rest() -> None:
    model = _model()
    assert quantize_blocks(model.blocks) == len(QUANTIZED_LINEARS) * CFG.num_layers
    for block in model.blocks:
        for path in QUANTIZED_LINEARS:
            assert isinstance(block.get_submodule(path), Fp8Linear), path
    assert type(model.head.head) is nn.Linear and type(model.text_embedding[0]) is nn.Linear
    assert model.blocks[0].self_attn.local_heads() == CFG.num_heads  # read from q.weight's shape


def test_quantize_blocks_refuses_before_replacing_anything() -> None:
    model = _model()
    model.blocks[-1].ffn[2] = nn.Linear(CFG.ffn_dim, CFG.dim - 8)  # not a multiple of 16
    with pytest.raises(ConfigError, match=r"--fp8: ffn\.2 is 56x256"):
        quantize_blocks(model.blocks)
    assert not any(isinstance(m, Fp8Linear) for m in model.modules())


@pytest.mark.parametrize("fp8", [False, True])
def test_fused_qkv_changes_no_number_and_no_parameter(fp8: bool) -> None:
    model = _model()
    if fp8:
        quantize_blocks(model.blocks)
    before = _stream(model)
    keys = list(model.state_dict())
    params = sum(p.numel() for p in model.parameters())
    fused = copy.deepcopy(model)
    fused.fuse_projections()
    for a, b in zip(_stream(fused), before, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    assert list(fused.state_dict()) == keys and sum(p.numel() for p in fused.parameters()) == params
    attn = fused.blocks[0].self_attn
    # q/k/v are views of the one fused weight: the same storage, not a copy
    assert attn.q.weight.data_ptr() == attn.qkv_weight.data_ptr()
    assert attn.v.weight.data_ptr() == attn.qkv_weight[2 * CFG.dim :].data_ptr()


def _cli(*flags: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "streamdit", "run", "--chunks", "1", "--out", "/nonexistent/x.mp4", *flags]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def test_fp8_on_the_cpu_exits_2_naming_the_flag() -> None:
    proc = _cli("--fp8")
    assert proc.returncode == 2, proc.stderr
    assert "--fp8 cannot run here: FP8 matmuls need a CUDA GPU" in proc.stderr
    assert "Traceback" not in proc.stderr
