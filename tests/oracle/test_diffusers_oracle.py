"""diffusers as the oracle: its own saved Wan models load into streamdit and compute the same.

diffusers' `WanTransformer3DModel` and `AutoencoderKLWan` are built with random (seeded) weights
in the shapes of streamdit's "tiny" presets, written with `save_pretrained` (diffusers' own
folder format), loaded through `open_checkpoint` + `load_checkpoint_into`, and run side by side
in float32. One DiT chunk attends only to itself, which is diffusers' full attention on it.
The key maps are also checked at full size (Wan2.1 1.3B / 14B DiT, the Wan2.1 VAE) on meta.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKLWan, WanTransformer3DModel
from torch import Tensor, nn

from streamdit.errors import CheckpointError
from streamdit.model.dit import CausalWanDiT
from streamdit.model.keymaps import key_map_for, map_key
from streamdit.model.kv_cache import CrossAttnCache, KVCache
from streamdit.model.presets import DiTConfig, get_dit_config
from streamdit.model.vae import CausalVideoVAE, VAEConfig, get_vae_config
from streamdit.model.weights import (
    check_dit_config,
    check_vae_config,
    diffusers_config,
    diffusers_latent_stats,
    load_checkpoint_into,
    open_checkpoint,
    vae_config_from_diffusers,
)

TOL = 1e-5


def _dit_kwargs(cfg: DiTConfig) -> dict[str, object]:
    return {
        "patch_size": cfg.patch_size,
        "num_attention_heads": cfg.num_heads,
        "attention_head_dim": cfg.head_dim,
        "in_channels": cfg.in_channels,
        "out_channels": cfg.out_channels,
        "text_dim": cfg.text_dim,
        "freq_dim": cfg.freq_dim,
        "ffn_dim": cfg.ffn_dim,
        "num_layers": cfg.num_layers,
        "cross_attn_norm": True,
        "qk_norm": "rms_norm_across_heads",
        "eps": cfg.eps,
    }


def _vae_kwargs(cfg: VAEConfig) -> dict[str, object]:
    return {
        "base_dim": cfg.base_dim,
        "z_dim": cfg.z_dim,
        "dim_mult": list(cfg.dim_mult),
        "num_res_blocks": cfg.num_res_blocks,
        "attn_scales": [],
        "temperal_downsample": list(cfg.temporal_downsample),
    }


@torch.no_grad()
def _randomize(model: nn.Module, seed: int, *, weight_gain: float) -> None:
    """Every parameter random (diffusers zero-inits some), variance-preserving so outputs stay O(1)."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        noise = torch.randn(p.shape, generator=gen)
        if name.endswith("scale_shift_table"):
            p.copy_(noise * p.shape[-1] ** -0.5)
        elif name.endswith("gamma"):  # VAE RMS_norm scales, stored [C, 1, 1(, 1)]
            p.copy_(1.0 + 0.1 * noise)
        elif name.endswith("bias"):
            p.copy_(0.05 * noise)
        elif p.dim() >= 2:  # linear / conv weights: unit gain over the fan-in
            p.copy_(noise * weight_gain / math.sqrt(math.prod(p.shape[1:])))
        else:  # LayerNorm / RMSNorm weights
            p.copy_(1.0 + 0.1 * noise)
    assert all(p.abs().max() > 0 for p in model.parameters())


def _rel(a: Tensor, b: Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


# (from_pretrained needs `accelerate` for these models, so the saved instance is the reference)
@pytest.fixture(scope="module")
def dit_saved(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, WanTransformer3DModel]:
    ref = WanTransformer3DModel(**_dit_kwargs(get_dit_config("tiny"))).eval()
    _randomize(ref, 0, weight_gain=1.0)
    root = tmp_path_factory.mktemp("pipeline")
    ref.save_pretrained(root / "transformer")
    return root, ref


@pytest.fixture(scope="module")
def vae_saved(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, AutoencoderKLWan]:
    ref = AutoencoderKLWan(**_vae_kwargs(get_vae_config("tiny"))).eval()
    _randomize(ref, 1, weight_gain=1.0)
    with torch.no_grad():
        ref.decoder.conv_out.weight.mul_(0.5)  # pixels mostly inside [-1, 1]: the clamp rarely bites
    root = tmp_path_factory.mktemp("vae_pipeline")
    ref.save_pretrained(root / "vae")
    return root, ref


def test_dit_forward_matches_diffusers(dit_saved: tuple[Path, WanTransformer3DModel]) -> None:
    cfg = get_dit_config("tiny")
    dit_folder, ref = dit_saved
    ours = CausalWanDiT(cfg, "cpu")
    ours.init_weights(123)  # different from the file: the load must overwrite everything
    report = load_checkpoint_into(ours, open_checkpoint(dit_folder / "transformer"))
    assert report.format == "diffusers-safetensors" and report.layout == "diffusers"
    assert report.loaded == len(ours.state_dict()) == 69 and report.ignored == ()
    gen = torch.Generator().manual_seed(7)
    latents = torch.randn(1, 3, 16, 4, 6, generator=gen)  # [B, F, C, H, W]: 32x48 pixels
    text = torch.randn(1, cfg.text_len, cfg.text_dim, generator=gen)
    text[:, 11:] = 0.0  # zero-padded rows, as a real prompt shorter than text_len has
    t = torch.tensor([937.5])
    kv = KVCache(
        num_layers=cfg.num_layers,
        batch=1,
        heads=cfg.num_heads,
        head_dim=cfg.head_dim,
        tokens_per_frame=2 * 3,
        capacity_frames=3,
        dtype=torch.float32,
        device=torch.device("cpu"),
    )
    with torch.no_grad():
        got = ours(latents, t, text, kv_cache=kv, cross_cache=CrossAttnCache(cfg.num_layers), start_frame=0)
        want = ref(latents.transpose(1, 2), t, text, return_dict=False)[0].transpose(1, 2)
    assert got.shape == want.shape == latents.shape
    assert want.abs().mean() > 0.1  # a real signal, not a trivially small output
    assert _rel(got, want) <= TOL, _rel(got, want)


def test_dit_loads_diffusers_shards_and_pipeline_root(
    dit_saved: tuple[Path, WanTransformer3DModel], tmp_path: Path
) -> None:
    ref = dit_saved[1]
    ref.save_pretrained(tmp_path / "transformer", max_shard_size="40KB")
    assert len(list((tmp_path / "transformer").glob("diffusion_pytorch_model-*.safetensors"))) > 1
    ours = CausalWanDiT(get_dit_config("tiny"), "cpu")
    report = load_checkpoint_into(ours, open_checkpoint(tmp_path))  # the pipeline root
    assert report.format == "diffusers-safetensors-sharded" and len(report.files) > 1
    _, key_map = key_map_for(ref.state_dict())
    loaded = ours.state_dict()
    for key, value in ref.state_dict().items():
        assert torch.equal(loaded[map_key(key, loaded, key_map=key_map)], value), key


def test_vae_decode_and_encode_match_diffusers(vae_saved: tuple[Path, AutoencoderKLWan]) -> None:
    vae_folder, ref = vae_saved
    ours = CausalVideoVAE(get_vae_config("tiny"))  # latent_norm "identity": latents as diffusers'
    ours.init_weights(5)
    report = load_checkpoint_into(ours, open_checkpoint(vae_folder, component="vae"))
    assert report.layout == "diffusers" and report.loaded == 146
    gen = torch.Generator().manual_seed(3)
    latents = torch.randn(1, 3, 16, 4, 6, generator=gen)  # [B, F, z, h, w]
    with torch.no_grad():
        got = ours.decode(latents)
        want = ref.decode(latents.transpose(1, 2)).sample
    assert got.shape == want.shape == (1, 3, 9, 32, 48)
    assert (want.abs() < 1.0).float().mean() > 0.9  # the clamp leaves most pixels alone
    assert _rel(got, want) <= TOL, _rel(got, want)
    longer = torch.randn(1, 5, 16, 4, 6, generator=gen)  # past 3 frames: the time-conv history
    with torch.no_grad():
        assert _rel(ours.decode(longer), ref.decode(longer.transpose(1, 2)).sample) <= TOL

    pixels = torch.rand(1, 3, 9, 32, 48, generator=gen) * 2 - 1
    with torch.no_grad():
        got = ours.encode(pixels)
        want = ref.encode(pixels).latent_dist.mean.transpose(1, 2)
    assert got.shape == want.shape == (1, 3, 16, 4, 6)
    assert _rel(got, want) <= TOL, _rel(got, want)


def test_diffusers_configs_agree_and_disagree(
    dit_saved: tuple[Path, WanTransformer3DModel], vae_saved: tuple[Path, AutoencoderKLWan], tmp_path: Path
) -> None:
    dit_folder, vae_folder = dit_saved[0], vae_saved[0]
    dit_cfg = diffusers_config(dit_folder, component="transformer")
    assert dit_cfg is not None and dit_cfg["_class_name"] == "WanTransformer3DModel"
    check_dit_config(get_dit_config("tiny"), dit_cfg)
    for field, value in (("num_layers", 3), ("attention_head_dim", 8), ("eps", 1e-5), ("qk_norm", None)):
        with pytest.raises(CheckpointError, match=field):
            check_dit_config(get_dit_config("tiny"), dit_cfg | {field: value})
    with pytest.raises(CheckpointError, match="num_attention_heads"):  # same dim, other heads
        check_dit_config(
            get_dit_config("tiny"), dit_cfg | {"num_attention_heads": 8, "attention_head_dim": 8}
        )

    vae_cfg = diffusers_config(vae_folder / "vae" / "diffusion_pytorch_model.safetensors")
    assert vae_cfg is not None
    derived = vae_config_from_diffusers(vae_cfg)
    tiny = get_vae_config("tiny")
    assert (derived.base_dim, derived.dim_mult, derived.num_res_blocks) == (8, (1, 2, 2, 2), 1)
    assert derived.latent_norm == "wan2.1"  # diffusers' default statistics are Wan2.1's
    stats = diffusers_latent_stats(vae_cfg)
    assert stats is not None and len(stats[0]) == len(stats[1]) == 16
    check_vae_config(tiny, vae_cfg)
    for field, value in (
        ("z_dim", 8),
        ("dim_mult", [1, 2, 4, 4]),
        ("temperal_downsample", [True, True, False]),
    ):
        with pytest.raises(CheckpointError, match=field):
            check_vae_config(tiny, vae_cfg | {field: value})
    (tmp_path / "config.json").write_text(json.dumps(vae_cfg | {"latents_std": [2.0] * 16}))
    with pytest.raises(CheckpointError, match="latents_mean/latents_std"):
        vae_config_from_diffusers(diffusers_config(tmp_path) or {})
    identity = {"latents_mean": [0.0] * 16, "latents_std": [1.0] * 16}
    assert vae_config_from_diffusers(vae_cfg | identity).latent_norm == "identity"


@pytest.mark.parametrize("preset", ["wan-1.3b", "wan-14b"])
def test_full_size_dit_key_map(preset: str) -> None:
    cfg = get_dit_config(preset)
    with torch.device("meta"):
        ref = WanTransformer3DModel(**_dit_kwargs(cfg))
    _assert_maps_one_to_one(ref.state_dict(), CausalWanDiT(cfg, "meta").state_dict())


def test_full_size_vae_key_map() -> None:
    with torch.device("meta"):
        ref = AutoencoderKLWan()  # diffusers' defaults are the Wan2.1 VAE
    ours = CausalVideoVAE(get_vae_config("wan"), device="meta")
    _assert_maps_one_to_one(ref.state_dict(), ours.state_dict())


def _assert_maps_one_to_one(theirs: dict[str, Tensor], ours: dict[str, Tensor]) -> None:
    layout, key_map = key_map_for(theirs)
    assert layout == "diffusers"
    mapped = {map_key(k, ours, key_map=key_map): tuple(v.shape) for k, v in theirs.items()}
    assert len(mapped) == len(theirs) and mapped.keys() == ours.keys()
    assert all(mapped[k] == tuple(ours[k].shape) for k in ours)
