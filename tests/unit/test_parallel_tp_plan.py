"""The TP plan as data and apply_tp's local effects (no process group needed: slicing is local
and collectives only run at forward time): which modules are sharded how, validation before any
weight is touched, freed full weights, the row-parallel bias rule, the collective count."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
import torch

from streamdit.errors import ConfigError, GroupError
from streamdit.model.dit import CausalWanDiT
from streamdit.model.presets import get_dit_config
from streamdit.parallel.collectives import all_reduce_sum
from streamdit.parallel.groups import GroupHandle
from streamdit.parallel.tp import apply_tp, local_heads, tp_collectives_per_call
from streamdit.parallel.tp_plan import STYLES, TP_PLAN, matching_patterns, style_of

CFG = get_dit_config("tiny")
CPU = torch.device("cpu")


def _model(cfg: Any = CFG) -> CausalWanDiT:
    model = CausalWanDiT(cfg, CPU, torch.float32, "math")
    model.init_weights(0)
    return model


def _handle(rank: int, size: int, name: str = "tp") -> GroupHandle:
    # No process group: these tests never run a forward, so no collective is issued.
    return GroupHandle(pg=None, name=name, rank=rank, size=size, device=CPU)  # type: ignore[arg-type]


EXPECTED = {
    "blocks.0.self_attn.q": "colwise",
    "blocks.1.self_attn.k": "colwise",
    "blocks.0.self_attn.v": "colwise",
    "blocks.0.cross_attn.q": "colwise",
    "blocks.1.cross_attn.k": "colwise",
    "blocks.1.cross_attn.v": "colwise",
    "blocks.0.ffn.0": "colwise",
    "blocks.0.self_attn.o": "rowwise",
    "blocks.1.cross_attn.o": "rowwise",
    "blocks.1.ffn.2": "rowwise",
    "blocks.0.self_attn.norm_q": "norm",
    "blocks.0.self_attn.norm_k": "norm",
    "blocks.1.cross_attn.norm_q": "norm",
    "blocks.1.cross_attn.norm_k": "norm",
    # replicated
    "blocks.0.norm3": None,
    "blocks.0.norm1": None,
    "blocks.0.ffn.1": None,
    "blocks.0.ffn": None,
    "blocks.0.self_attn": None,
    "patch_embedding": None,
    "text_embedding.0": None,
    "time_embedding.2": None,
    "time_projection.1": None,
    "head.head": None,
    "head.norm": None,
}


@pytest.mark.parametrize(("path", "style"), EXPECTED.items())
def test_plan_table_styles(path: str, style: str | None) -> None:
    assert style_of(path) == style


def test_plan_is_unambiguous_and_covers_every_block() -> None:
    assert {style for _, style in TP_PLAN} == set(STYLES)
    paths = [path for path, _ in _model().named_modules()]
    for path in paths:
        assert len(matching_patterns(path)) <= 1, path
    for pattern, _ in TP_PLAN:  # every pattern matches each block exactly as often
        hits = [p for p in paths if pattern in matching_patterns(p)]
        assert hits and len(hits) % CFG.num_layers == 0, pattern
    sharded = [p for p in paths if style_of(p)]
    assert len(sharded) == CFG.num_layers * 14  # 2x(q,k,v,o,norm_q,norm_k) + ffn.0 + ffn.2


@pytest.mark.parametrize(("rank", "size"), [(0, 2), (1, 2), (3, 4)])
def test_apply_tp_slices_rows_cols_and_frees_full_weights(rank: int, size: int) -> None:
    full, model = _model(), _model()
    apply_tp(model, _handle(rank, size))
    d, f, n = (
        CFG.dim // size,
        CFG.ffn_dim // size,
        slice(rank * CFG.dim // size, (rank + 1) * CFG.dim // size),
    )
    fs = slice(rank * f, (rank + 1) * f)
    b, fb = model.blocks[1], full.blocks[1]
    for attn, fattn in ((b.self_attn, fb.self_attn), (b.cross_attn, fb.cross_attn)):
        for name in ("q", "k", "v"):
            assert torch.equal(getattr(attn, name).weight, getattr(fattn, name).weight[n])
            assert torch.equal(getattr(attn, name).bias, getattr(fattn, name).bias[n])
        assert torch.equal(attn.norm_q.weight, fattn.norm_q.weight[n])
        assert attn.norm_k.full_dim == CFG.dim  # the norm still divides by the full dim
        assert torch.equal(attn.o.weight, fattn.o.weight[:, n])
        assert tuple(attn.o.weight.shape) == (CFG.dim, d)
    assert torch.equal(b.ffn[0].weight, fb.ffn[0].weight[fs])
    assert torch.equal(b.ffn[2].weight, fb.ffn[2].weight[:, fs])
    assert local_heads(model) == CFG.num_heads // size
    # Fresh storage of exactly the slice: no view keeps the full weight alive.
    for param in (b.self_attn.q.weight, b.self_attn.o.weight, b.ffn[2].weight, b.cross_attn.norm_k.weight):
        assert param.untyped_storage().nbytes() == param.numel() * param.element_size()
    # Replicated parameters are untouched.
    assert torch.equal(b.norm3.weight, fb.norm3.weight) and torch.equal(b.modulation, fb.modulation)


def test_row_parallel_bias_kept_on_rank0_only() -> None:
    models = [_model(), _model()]
    for rank, model in enumerate(models):
        model.blocks[0].ffn[2].bias.data.normal_(generator=torch.Generator().manual_seed(1))
        apply_tp(model, _handle(rank, 2))
    assert models[0].blocks[0].ffn[2].bias.abs().sum() > 0
    assert models[1].blocks[0].ffn[2].bias.abs().sum() == 0


def _snapshot(model: CausalWanDiT) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize(
    ("cfg", "size", "field"),
    [
        (CFG, 3, "num_heads"),  # 4 heads
        (dataclasses.replace(CFG, ffn_dim=250), 4, "ffn_dim"),  # heads divide, ffn does not
    ],
)
def test_indivisible_sizes_refused_before_touching_weights(cfg: Any, size: int, field: str) -> None:
    model = _model(cfg)
    before = _snapshot(model)
    with pytest.raises(ConfigError, match=field):
        apply_tp(model, _handle(0, size))
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_wrong_group_and_double_apply_refused() -> None:
    model = _model()
    before = _snapshot(model)
    with pytest.raises(GroupError, match="world"):
        apply_tp(model, _handle(0, 2, name="world"))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    apply_tp(model, _handle(0, 2))
    with pytest.raises(ConfigError, match="already sharded"):
        apply_tp(model, _handle(0, 2))


def test_group_check_happens_before_the_backend() -> None:
    # pg=None: had the backend been reached it would fail with a non-GroupError.
    with pytest.raises(GroupError, match="may only use 'tp'"):
        all_reduce_sum(torch.ones(2), _handle(0, 2, name="world"), allowed="tp")


def test_collective_count_helper() -> None:
    counts = tp_collectives_per_call(get_dit_config("wan-14b"))
    # Per block: self o, cross o, ffn.2 (large); self norm_q+norm_k fused, cross norm_q (tiny).
    # The dispatched count is checked against this in tests/dist/test_parallel_tp.py.
    assert counts == {"large": 120, "tiny": 80, "tiny_on_text_rebuild": 40}
