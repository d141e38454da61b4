"""DiT presets: validation, lookup errors, parameter counts from shapes (meta device, nothing
allocated) and the FLOP model used by the GPU benchmark."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from streamdit.errors import ConfigError
from streamdit.model.dit import CausalWanDiT
from streamdit.model.presets import (
    DIT_PRESETS,
    DiTConfig,
    dit_flops_per_call,
    dit_param_count,
    get_dit_config,
)

META = torch.device("meta")


def _meta_model(name: str) -> CausalWanDiT:
    return CausalWanDiT(get_dit_config(name), META, torch.bfloat16, "math")


def test_presets_and_head_dims() -> None:
    assert set(DIT_PRESETS) == {"tiny", "wan-1.3b", "wan-14b"}
    assert get_dit_config("wan-1.3b").head_dim == 128 and get_dit_config("wan-14b").head_dim == 128
    assert dit_param_count(get_dit_config("tiny")) < 5_000_000
    with pytest.raises(TypeError):
        DIT_PRESETS["mine"] = get_dit_config("tiny")  # type: ignore[index]
    with pytest.raises(dataclasses.FrozenInstanceError):
        get_dit_config("tiny").dim = 3  # type: ignore[misc]


def test_unknown_preset_names_field_and_choices() -> None:
    with pytest.raises(ConfigError, match="preset") as info:
        get_dit_config("wan-7b")
    assert all(name in str(info.value) for name in DIT_PRESETS)


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"num_heads": 3}, "num_heads"),  # 64 % 3 != 0
        ({"dim": 66, "num_heads": 6}, "num_heads"),  # head_dim 11 is odd
        ({"dim": 0}, "dim"),
        ({"patch_size": (2, 2, 2)}, "patch_size"),
        ({"eps": 0.0}, "eps"),
        ({"freq_dim": 255}, "freq_dim"),
    ],
)
def test_config_validation_names_the_field(change: dict, field: str) -> None:
    with pytest.raises(ConfigError, match=field):
        dataclasses.replace(get_dit_config("tiny"), **change)


@pytest.mark.parametrize(("name", "nominal"), [("wan-1.3b", 1.3e9), ("wan-14b", 1.4e10)])
def test_param_counts_from_shapes(name: str, nominal: float) -> None:
    count = sum(p.numel() for p in _meta_model(name).parameters())
    assert count == dit_param_count(get_dit_config(name))
    assert abs(count - nominal) / nominal < 0.10


def _token_weights(model: CausalWanDiT) -> int:
    """Weights applied to every query token (what 2*params*tokens approximates)."""
    skip = ("text_embedding", "time_", "cross_attn.k.", "cross_attn.v.", "modulation")
    return sum(
        p.numel() for n, p in model.named_parameters() if p.dim() >= 2 and not any(s in n for s in skip)
    )


@pytest.mark.parametrize("name", ["tiny", "wan-1.3b", "wan-14b"])
def test_flops_match_two_params_per_token_without_attention(name: str) -> None:
    cfg = get_dit_config(name)
    per_token = _token_weights(_meta_model(name))
    # Subtracting the zero-token call removes the per-call time MLP; one token attends to itself
    # only, so attention adds exactly 4*d per layer (0.2% for tiny, < 0.01% for the wan presets).
    flops = dit_flops_per_call(cfg, 1, 0, 0) - dit_flops_per_call(cfg, 0, 0, 0)
    assert flops == 2 * per_token + cfg.num_layers * 4 * cfg.dim
    assert flops == pytest.approx(2 * per_token, rel=3e-3)
    # The time MLP is the whole zero-token cost and is small next to a real chunk.
    assert dit_flops_per_call(cfg, 0, 0, 0) < 0.01 * dit_flops_per_call(cfg, 2160, 0, 0)


def test_flops_attention_terms_are_exact() -> None:
    cfg = get_dit_config("wan-14b")
    t, cached, text = 2160, 2160, 512
    base = dit_flops_per_call(cfg, t, 0, 0)
    d, n = cfg.dim, cfg.num_layers
    assert dit_flops_per_call(cfg, t, cached, 0) - base == n * 4 * t * cached * d
    assert dit_flops_per_call(cfg, t, 0, text) - base == n * 4 * t * text * d
    with_kv = dit_flops_per_call(cfg, t, cached, text, cross_kv=True)
    cross_kv = n * 4 * text * d * d + 2 * text * (cfg.text_dim * d + d * d)
    assert with_kv - dit_flops_per_call(cfg, t, cached, text) == cross_kv
    with pytest.raises(ConfigError, match="cached_tokens"):
        dit_flops_per_call(cfg, t, -1, 0)


def test_tiny_config_is_a_dataclass_with_kw_only_fields() -> None:
    with pytest.raises(TypeError):
        DiTConfig("x", 64, 2, 2, 256, 64, 16)  # type: ignore[misc]
