"""diffusers `config.json` against streamdit's model configs: agreement checks and conversion.

Owns: which fields of a diffusers `WanTransformer3DModel` / `AutoencoderKLWan` config must agree
with `DiTConfig` / `VAEConfig` (shapes, and the few settings that change the math without
changing any shape, such as the head count or eps), `vae_config_from_diffusers`, and the VAE's
published latent statistics. A field absent from the dict takes diffusers' own default (the
`__init__` defaults of diffusers 0.42, copied below), as diffusers itself would.
`check_dit_config` also accepts the config.json of Wan2.1's own release folders
(`"_class_name": "WanModel"`, written by the same diffusers ConfigMixin, but with Wan's field
names `dim`, `num_heads`, `in_dim`, ... and Wan's `__init__` defaults).
Imports the standard library, streamdit.errors and streamdit.model only (never diffusers).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from streamdit.errors import CheckpointError
from streamdit.model.presets import DiTConfig
from streamdit.model.vae import WAN21_LATENT_MEAN, WAN21_LATENT_STD, VAEConfig

Config = Mapping[str, Any]
DIT_CLASS = "WanTransformer3DModel"
VAE_CLASS = "AutoencoderKLWan"
DIT_DEFAULTS: Config = {
    "patch_size": [1, 2, 2], "num_attention_heads": 40, "attention_head_dim": 128,
    "in_channels": 16, "out_channels": 16, "text_dim": 4096, "freq_dim": 256, "ffn_dim": 13824,
    "num_layers": 40, "cross_attn_norm": True, "qk_norm": "rms_norm_across_heads", "eps": 1e-6,
    "image_dim": None, "added_kv_proj_dim": None,
}  # fmt: skip
WAN_MODEL_CLASS = "WanModel"
WAN_MODEL_DEFAULTS: Config = {
    "model_type": "t2v", "patch_size": [1, 2, 2], "in_dim": 16, "dim": 2048, "ffn_dim": 8192,
    "freq_dim": 256, "text_dim": 4096, "out_dim": 16, "num_heads": 16, "num_layers": 32,
    "qk_norm": True, "cross_attn_norm": True, "eps": 1e-6,
}  # fmt: skip
VAE_DEFAULTS: Config = {
    "base_dim": 96, "decoder_base_dim": None, "z_dim": 16, "dim_mult": [1, 2, 4, 4],
    "num_res_blocks": 2, "attn_scales": [], "temperal_downsample": [False, True, True],
    "is_residual": False, "in_channels": 3, "out_channels": 3, "patch_size": None,
    "latents_mean": list(WAN21_LATENT_MEAN), "latents_std": list(WAN21_LATENT_STD),
}  # fmt: skip


def _field(config: Config, defaults: Config, name: str) -> Any:
    value = config.get(name, defaults.get(name))
    return tuple(value) if isinstance(value, list) else value


def _mismatch(kind: str, name: str, found: Any, want: Any, why: str) -> CheckpointError:
    return CheckpointError(f"config.json ({kind}): {name}={found!r} but {why} needs {want!r}")


def _check_class(kind: str, config: Config, expected: str) -> None:
    found = config.get("_class_name", expected)
    if found != expected:
        raise _mismatch(kind, "_class_name", found, expected, "streamdit's loader")


def check_dit_config(dit_cfg: DiTConfig, config: Config) -> None:
    """Raise CheckpointError naming the first config field that disagrees with `dit_cfg`."""
    if config.get("_class_name") == WAN_MODEL_CLASS:
        _check_wan_model_config(dit_cfg, config)
        return
    kind = DIT_CLASS
    _check_class(kind, config, DIT_CLASS)

    def field(name: str) -> Any:
        return _field(config, DIT_DEFAULTS, name)

    heads, head_dim = field("num_attention_heads"), field("attention_head_dim")
    if heads * head_dim != dit_cfg.dim:
        name = "num_attention_heads*attention_head_dim"
        raise _mismatch(kind, name, heads * head_dim, dit_cfg.dim, f"dit.dim ({dit_cfg.name})")
    out_channels = field("out_channels") or field("in_channels")  # diffusers: None means in
    expected = {
        "num_attention_heads": (heads, dit_cfg.num_heads, "dit.num_heads"),
        "num_layers": (field("num_layers"), dit_cfg.num_layers, "dit.num_layers"),
        "ffn_dim": (field("ffn_dim"), dit_cfg.ffn_dim, "dit.ffn_dim"),
        "text_dim": (field("text_dim"), dit_cfg.text_dim, "dit.text_dim"),
        "freq_dim": (field("freq_dim"), dit_cfg.freq_dim, "dit.freq_dim"),
        "in_channels": (field("in_channels"), dit_cfg.in_channels, "dit.in_channels"),
        "out_channels": (out_channels, dit_cfg.out_channels, "dit.out_channels"),
        "patch_size": (field("patch_size"), tuple(dit_cfg.patch_size), "dit.patch_size"),
        # not shapes, but they change the math: Wan2.1 T2V has both norms and no image branch
        "cross_attn_norm": (field("cross_attn_norm"), True, "the Wan2.1 block"),
        "qk_norm": (field("qk_norm"), "rms_norm_across_heads", "the Wan2.1 block"),
        "image_dim": (field("image_dim"), None, "text-to-video (no image branch)"),
        "added_kv_proj_dim": (field("added_kv_proj_dim"), None, "text-to-video (no image branch)"),
    }
    _raise_first(kind, expected, dit_cfg.name)
    _check_eps(kind, field("eps"), dit_cfg)


def _check_wan_model_config(dit_cfg: DiTConfig, config: Config) -> None:
    """The same agreement for Wan2.1's own `WanModel` config (its field names)."""
    kind = WAN_MODEL_CLASS

    def field(name: str) -> Any:
        return _field(config, WAN_MODEL_DEFAULTS, name)

    expected = {
        "model_type": (field("model_type"), "t2v", "text-to-video (no image branch)"),
        "dim": (field("dim"), dit_cfg.dim, "dit.dim"),
        "num_heads": (field("num_heads"), dit_cfg.num_heads, "dit.num_heads"),
        "num_layers": (field("num_layers"), dit_cfg.num_layers, "dit.num_layers"),
        "ffn_dim": (field("ffn_dim"), dit_cfg.ffn_dim, "dit.ffn_dim"),
        "text_dim": (field("text_dim"), dit_cfg.text_dim, "dit.text_dim"),
        "freq_dim": (field("freq_dim"), dit_cfg.freq_dim, "dit.freq_dim"),
        "in_dim": (field("in_dim"), dit_cfg.in_channels, "dit.in_channels"),
        "out_dim": (field("out_dim"), dit_cfg.out_channels, "dit.out_channels"),
        "patch_size": (field("patch_size"), tuple(dit_cfg.patch_size), "dit.patch_size"),
        "qk_norm": (field("qk_norm"), True, "the Wan2.1 block"),
        "cross_attn_norm": (field("cross_attn_norm"), True, "the Wan2.1 block"),
    }
    _raise_first(kind, expected, dit_cfg.name)
    _check_eps(kind, field("eps"), dit_cfg)


def _check_eps(kind: str, eps: Any, dit_cfg: DiTConfig) -> None:
    if not isinstance(eps, int | float) or not math.isclose(eps, dit_cfg.eps, rel_tol=1e-9):
        raise _mismatch(kind, "eps", eps, dit_cfg.eps, f"dit.eps ({dit_cfg.name})")


def _raise_first(kind: str, expected: Mapping[str, tuple[Any, Any, str]], preset: str) -> None:
    for name, (found, want, why) in expected.items():
        if found != want:
            raise _mismatch(kind, name, found, want, f"{why} ({preset})")


def check_vae_config(vae_cfg: VAEConfig, config: Config) -> None:
    """Raise CheckpointError naming the first config field that disagrees with `vae_cfg`.

    Latent statistics are not checked: they are not weights (see `diffusers_latent_stats`).
    """
    kind = VAE_CLASS
    _check_class(kind, config, VAE_CLASS)

    def field(name: str) -> Any:
        return _field(config, VAE_DEFAULTS, name)

    base = field("base_dim")
    expected = {
        "base_dim": (base, vae_cfg.base_dim, "vae.base_dim"),
        "decoder_base_dim": (field("decoder_base_dim") or base, vae_cfg.base_dim, "vae.base_dim"),
        "z_dim": (field("z_dim"), vae_cfg.z_dim, "vae.z_dim"),
        "dim_mult": (field("dim_mult"), tuple(vae_cfg.dim_mult), "vae.dim_mult"),
        "num_res_blocks": (field("num_res_blocks"), vae_cfg.num_res_blocks, "vae.num_res_blocks"),
        "temperal_downsample": (
            field("temperal_downsample"),
            tuple(vae_cfg.temporal_downsample),
            "vae.temporal_downsample",
        ),
        # Wan2.1 layout only: no down-block attention, no Wan2.2 residual blocks or patching
        "attn_scales": (field("attn_scales"), (), "the Wan2.1 VAE"),
        "is_residual": (field("is_residual"), False, "the Wan2.1 VAE"),
        "in_channels": (field("in_channels"), 3, "the Wan2.1 VAE"),
        "out_channels": (field("out_channels"), 3, "the Wan2.1 VAE"),
        "patch_size": (field("patch_size"), None, "the Wan2.1 VAE"),
    }
    _raise_first(kind, expected, vae_cfg.name)


def diffusers_latent_stats(config: Config) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
    """`(latents_mean, latents_std)` of a diffusers VAE config, or None if it has none.

    diffusers' pipelines normalize latents with them as z = (mu - mean) / std; streamdit's
    `VAEConfig.latent_norm` does the same inside encode/decode.
    """
    mean, std = config.get("latents_mean"), config.get("latents_std")
    if not isinstance(mean, list) or not isinstance(std, list):
        return None
    return tuple(float(v) for v in mean), tuple(float(v) for v in std)


def vae_config_from_diffusers(
    config: Config, *, name: str = "diffusers", latent_norm: str | None = None
) -> VAEConfig:
    """The `VAEConfig` of a diffusers `AutoencoderKLWan` config (checked to be Wan2.1-shaped).

    `latent_norm` None derives it from the config's statistics: Wan2.1's published values
    (also diffusers' default) give "wan2.1", all-zero mean with all-one std "identity"; any
    other statistics raise CheckpointError (streamdit has no slot for them).
    """

    def field(key: str) -> Any:
        return _field(config, VAE_DEFAULTS, key)

    norm = latent_norm if latent_norm is not None else _latent_norm(config)
    try:
        cfg = VAEConfig(
            name=name,
            base_dim=field("base_dim"),
            dim_mult=field("dim_mult"),
            num_res_blocks=field("num_res_blocks"),
            z_dim=field("z_dim"),
            temporal_downsample=field("temperal_downsample"),
            latent_norm=norm,
        )
    except Exception as exc:  # ConfigError from VAEConfig, TypeError from odd JSON values
        raise CheckpointError(f"config.json ({VAE_CLASS}): not a usable VAE config ({exc})") from exc
    check_vae_config(cfg, config)
    return cfg


def _latent_norm(config: Config) -> str:
    stats = diffusers_latent_stats(config)
    mean, std = stats if stats is not None else (WAN21_LATENT_MEAN, WAN21_LATENT_STD)

    def close(found: tuple[float, ...], want: tuple[float, ...]) -> bool:
        return len(found) == len(want) and all(
            math.isclose(a, b, abs_tol=1e-6) for a, b in zip(found, want, strict=True)
        )

    if close(mean, WAN21_LATENT_MEAN) and close(std, WAN21_LATENT_STD):
        return "wan2.1"
    if close(mean, (0.0,) * len(mean)) and close(std, (1.0,) * len(std)):
        return "identity"
    raise CheckpointError(
        f"config.json ({VAE_CLASS}): latents_mean/latents_std are neither Wan2.1's nor identity; "
        "pass latent_norm= explicitly"
    )
