"""safetensors loading: round trips, wrapper-prefix stripping, key maps, and bad checkpoints.

Every checkpoint is synthetic and written into tmp_path by the test. Most tests use a stand-in
with Wan2.1's DiT module names; the tiny VAE and the tiny CausalWanDiT round-trip too. The other
file formats (shards, torch files, diffusers folders) are in test_checkpoint_formats.py.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from diffusers_names import dit_to_diffusers
from streamdit.errors import CheckpointError
from streamdit.model.dit import CausalWanDiT
from streamdit.model.keymaps import key_map_for
from streamdit.model.presets import get_dit_config
from streamdit.model.vae import CausalVideoVAE, get_vae_config
from streamdit.model.weights import (
    DIFFUSERS_WAN_KEY_MAP,
    check_checkpoint,
    check_safetensors,
    detect_layout,
    diffusers_vae_key_map,
    load_checkpoint_into,
    load_safetensors_into,
    map_key,
    open_checkpoint,
    save_safetensors,
)

D = 8


class _Attn(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(D, D) for _ in range(4))
        self.norm_q, self.norm_k = nn.RMSNorm(D), nn.RMSNorm(D)


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(D, elementwise_affine=False)
        self.self_attn = _Attn()
        self.norm3 = nn.LayerNorm(D)
        self.cross_attn = _Attn()
        self.ffn = nn.Sequential(nn.Linear(D, 2 * D), nn.GELU(), nn.Linear(2 * D, D))
        self.modulation = nn.Parameter(torch.randn(1, 6, D))


class _Head(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(D, 64)
        self.modulation = nn.Parameter(torch.randn(1, 2, D))


class TinyWan(nn.Module):
    """Stand-in with Wan2.1 DiT module names (the real CausalWanDiT is tested elsewhere)."""

    def __init__(self) -> None:
        super().__init__()
        self.patch_embedding = nn.Conv3d(16, D, (1, 2, 2), stride=(1, 2, 2))
        self.text_embedding = nn.Sequential(nn.Linear(12, D), nn.GELU(), nn.Linear(D, D))
        self.time_embedding = nn.Sequential(nn.Linear(4, D), nn.SiLU(), nn.Linear(D, D))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(D, 6 * D))
        self.blocks = nn.ModuleList(_Block() for _ in range(2))
        self.head = _Head()


def _model(seed: int) -> TinyWan:
    torch.manual_seed(seed)
    return TinyWan()


def _state(m: nn.Module) -> dict[str, Tensor]:
    return {k: v.clone() for k, v in m.state_dict().items()}


def _same(a: dict[str, Tensor], b: dict[str, Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _write(path: Path, tensors: dict[str, Tensor]) -> Path:
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    return path


def test_vae_round_trip(tmp_path: Path) -> None:
    cfg = get_vae_config("tiny")
    src, dst = CausalVideoVAE(cfg), CausalVideoVAE(cfg)
    src.init_weights(0)
    dst.init_weights(1)
    path = tmp_path / "vae.safetensors"
    save_safetensors(src, path)
    report = load_safetensors_into(dst, path)
    assert report.loaded == len(src.state_dict()) and report.ignored == ()
    assert _same(_state(src), _state(dst))
    lat = torch.randn(1, 2, 16, 2, 2)
    assert torch.equal(src.decode(lat), dst.decode(lat))


WRAPPINGS: dict[str, Callable[[str], str]] = {
    "self-forcing model.": lambda k: "model." + k,
    "self-forcing generator.model.": lambda k: "generator.model." + k,
    "causvid generator.": lambda k: "generator." + k,
    "ddp + compile": lambda k: "module._orig_mod." + k,
    "fsdp per block": lambda k: (
        "_fsdp_wrapped_module."
        + k.replace("blocks.0.", "blocks.0._fsdp_wrapped_module._checkpoint_wrapped_module.")
    ),
}


@pytest.mark.parametrize("wrap", WRAPPINGS.values(), ids=WRAPPINGS.keys())
def test_wrapper_prefixes_are_stripped(tmp_path: Path, wrap: Callable[[str], str]) -> None:
    src, dst = _model(0), _model(1)
    path = _write(tmp_path / "ckpt.safetensors", {wrap(k): v for k, v in src.state_dict().items()})
    load_safetensors_into(dst, path)
    assert _same(_state(src), _state(dst))


def test_saved_prefix_and_ignored_trainer_state(tmp_path: Path) -> None:
    gen, ema, dst = _model(0), _model(1), _model(2)
    tensors = {"generator.model." + k: v for k, v in gen.state_dict().items()}
    tensors |= {"generator_ema.model." + k: v for k, v in ema.state_dict().items()}
    path = _write(tmp_path / "selfforcing.safetensors", tensors)
    with pytest.raises(CheckpointError, match=r"unexpected: generator_ema\.model\."):
        load_safetensors_into(dst, path)
    report = load_safetensors_into(dst, path, ignore_prefixes=("generator_ema.",))
    assert _same(_state(gen), _state(dst))
    assert len(report.ignored) == len(ema.state_dict())

    path2 = tmp_path / "prefixed.safetensors"
    save_safetensors(gen, path2, prefix="model.")
    load_safetensors_into(_model(3), path2)


def test_bf16_file_is_cast_to_module_dtype(tmp_path: Path) -> None:
    src, dst = _model(0), _model(1)
    bf = {k: v.to(torch.bfloat16) for k, v in src.state_dict().items()}
    load_safetensors_into(dst, _write(tmp_path / "bf16.safetensors", bf))
    assert all(v.dtype == torch.float32 for v in dst.state_dict().values())
    assert _same({k: v.float() for k, v in bf.items()}, _state(dst))


def test_diffusers_key_map(tmp_path: Path) -> None:
    src, dst = _model(0), _model(1)
    tensors = {dit_to_diffusers(k): v for k, v in src.state_dict().items()}
    assert "blocks.1.attn2.to_out.0.weight" in tensors and "blocks.0.norm2.weight" in tensors
    path = _write(tmp_path / "diffusers.safetensors", tensors)
    with pytest.raises(CheckpointError, match="missing"):
        load_safetensors_into(dst, path)  # the default (Wan) map does not rename
    load_safetensors_into(dst, path, key_map=DIFFUSERS_WAN_KEY_MAP)
    assert _same(_state(src), _state(dst))


def test_map_key_keeps_real_model_child() -> None:
    """A module whose child is really named `model` keeps its prefix."""
    keys = {"model.weight"}
    assert map_key("model.weight", keys) == "model.weight"
    assert map_key("module.model.weight", keys) == "model.weight"


def _bad_cases(src: TinyWan) -> dict[str, tuple[dict[str, Tensor], list[str]]]:
    good = {"model." + k: v for k, v in src.state_dict().items()}
    missing = {k: v for k, v in good.items() if k != "model.blocks.1.ffn.2.bias"}
    extra = good | {"model.blocks.0.self_attn.extra.weight": torch.zeros(3)}
    shaped = good | {"model.blocks.0.self_attn.q.weight": torch.zeros(D, D + 1)}
    dup = good | {"blocks.0.modulation": torch.zeros(1, 6, D)}
    return {
        "missing": (missing, ["1 missing", "blocks.1.ffn.2.bias [8]"]),
        "unexpected": (extra, ["1 unexpected", "model.blocks.0.self_attn.extra.weight"]),
        "mis-shaped": (shaped, ["model.blocks.0.self_attn.q.weight: expected [8, 8] found [8, 9]"]),
        "duplicate": (dup, ["duplicate of", "blocks.0.modulation"]),
    }


@pytest.mark.parametrize("case", ["missing", "unexpected", "mis-shaped", "duplicate"])
def test_bad_checkpoint_names_file_and_key_and_changes_nothing(tmp_path: Path, case: str) -> None:
    src, dst = _model(0), _model(1)
    tensors, needles = _bad_cases(src)[case]
    path = _write(tmp_path / f"{case}.safetensors", tensors)
    before = _state(dst)
    with pytest.raises(CheckpointError) as err:
        load_safetensors_into(dst, path)
    message = str(err.value)
    assert str(path) in message and case.split("-")[0] in message
    for needle in needles:
        assert needle in message
    assert _same(before, _state(dst))  # validated before anything was copied


def test_error_lists_only_the_first_few_keys(tmp_path: Path) -> None:
    path = _write(tmp_path / "half.safetensors", {"patch_embedding.weight": torch.zeros(D, 16, 1, 2, 2)})
    with pytest.raises(CheckpointError, match=r"missing: .* \(\+\d+ more\)"):
        load_safetensors_into(_model(0), path)


@pytest.mark.parametrize("content", [b"", b"not a safetensors file at all", b"\xff" * 64])
def test_unreadable_file_names_the_file(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "garbage.safetensors"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match="garbage.safetensors"):
        load_safetensors_into(_model(0), path)
    with pytest.raises(CheckpointError, match="absent.safetensors"):
        load_safetensors_into(_model(0), tmp_path / "absent.safetensors")


def test_dit_round_trip_and_meta_check(tmp_path: Path) -> None:
    cfg = get_dit_config("tiny")
    src, dst = CausalWanDiT(cfg, "cpu"), CausalWanDiT(cfg, "cpu")
    src.init_weights(0)
    dst.init_weights(1)
    path = tmp_path / "dit.safetensors"
    save_safetensors(src, path, prefix="model.")
    assert check_safetensors(CausalWanDiT(cfg, "meta"), path) == len(src.state_dict())
    report = load_safetensors_into(dst, path)
    assert _same(_state(src), _state(dst))
    assert report.summary().startswith(f"loaded {len(src.state_dict())} tensors from {path}")


def test_diffusers_layout_is_detected_by_the_new_api(tmp_path: Path) -> None:
    src, dst = _model(0), _model(1)
    path = _write(tmp_path / "d.safetensors", {dit_to_diffusers(k): v for k, v in src.state_dict().items()})
    report = load_checkpoint_into(dst, open_checkpoint(path))
    assert report.layout == "diffusers" and _same(_state(src), _state(dst))
    plan = check_checkpoint(_model(2), path)  # a path works as a source too
    assert plan.layout == "diffusers" and plan.mapping["proj_out.weight"] == "head.head.weight"


def test_self_forcing_safetensors_defaults_to_generator(tmp_path: Path) -> None:
    gen, ema, dst = _model(0), _model(1), _model(2)
    tensors = {"generator.model." + k: v for k, v in gen.state_dict().items()}
    tensors |= {"generator_ema.model." + k: v for k, v in ema.state_dict().items()}
    tensors |= {"critic.head.weight": torch.zeros(2)}
    path = _write(tmp_path / "sf.safetensors", tensors)
    report = load_checkpoint_into(dst, path)
    assert _same(_state(gen), _state(dst)) and report.selection == "generator"
    assert len(report.ignored) == len(ema.state_dict()) + 1 and "EMA" in report.summary()
    report = load_checkpoint_into(dst, open_checkpoint(path, select="ema"))
    assert _same(_state(ema), _state(dst)) and report.notes == ()
    # ignore_prefixes match the selected keys (here still carrying the wrapper's `model.`)
    with pytest.raises(CheckpointError, match=r"missing: blocks\.1\."):
        check_checkpoint(_model(3), open_checkpoint(path), ignore_prefixes=("model.blocks.1.",))


@pytest.mark.parametrize(
    ("diffusers_key", "wan_key"),
    [
        ("quant_conv.bias", "conv1.bias"),
        ("post_quant_conv.weight", "conv2.weight"),
        ("encoder.conv_in.weight", "encoder.conv1.weight"),
        ("module.decoder.norm_out.gamma", "decoder.head.0.gamma"),
        ("encoder.conv_out.bias", "encoder.head.2.bias"),
        ("encoder.down_blocks.3.conv_shortcut.bias", "encoder.downsamples.3.shortcut.bias"),
        ("encoder.down_blocks.0.norm2.gamma", "encoder.downsamples.0.residual.3.gamma"),
        ("encoder.down_blocks.2.resample.1.weight", "encoder.downsamples.2.resample.1.weight"),
        ("encoder.mid_block.attentions.0.to_qkv.weight", "encoder.middle.1.to_qkv.weight"),
        ("decoder.mid_block.resnets.1.conv2.weight", "decoder.middle.2.residual.6.weight"),
        ("decoder.up_blocks.0.resnets.0.norm1.gamma", "decoder.upsamples.0.residual.0.gamma"),
        ("decoder.up_blocks.1.resnets.2.conv1.weight", "decoder.upsamples.6.residual.2.weight"),
        ("decoder.up_blocks.1.upsamplers.0.time_conv.weight", "decoder.upsamples.7.time_conv.weight"),
        ("decoder.up_blocks.3.resnets.2.conv2.bias", "decoder.upsamples.14.residual.6.bias"),
    ],
)
def test_diffusers_vae_key_map_for_two_res_blocks(diffusers_key: str, wan_key: str) -> None:
    """Wan2.1's real VAE has num_res_blocks=2: 4 decoder entries per level."""
    assert map_key(diffusers_key, set(), key_map=diffusers_vae_key_map(2)) == wan_key
    keys = [diffusers_key, "decoder.up_blocks.0.resnets.2.conv1.weight"]  # 3 resnets: 2 blocks
    layout, inferred = key_map_for(keys)
    assert layout == "diffusers" and map_key(diffusers_key, set(), key_map=inferred) == wan_key


def test_detect_layout() -> None:
    assert detect_layout(["blocks.0.self_attn.q.weight", "head.head.bias"]) == "wan"
    assert detect_layout(["encoder.conv1.weight", "decoder.upsamples.2.time_conv.weight"]) == "wan"
    assert detect_layout(["model.blocks.0.attn1.to_q.weight"]) == "diffusers"
    assert detect_layout(["decoder.up_blocks.0.resnets.0.conv1.weight"]) == "diffusers"
    assert detect_layout(["encoder.xquant_conv.weight"]) == "wan"  # markers start at a name
