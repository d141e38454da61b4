"""Megatron-style tensor parallelism of the DiT, applied from outside the model (gpt-fast style).

Owns: the sharding plan as data (`TP_PLAN`: module-path pattern → style) and `apply_tp(model,
handle)`, which slices weights in place and installs the collectives:

| style    | modules                                             | what happens                     |
|----------|-----------------------------------------------------|----------------------------------|
| colwise  | self/cross q, k, v (+bias); ffn.0                   | keep this rank's output rows     |
| norm     | self/cross norm_q, norm_k                           | keep rows; sum of squares        |
|          |                                                     | all-reduced over the TP group    |
| rowwise  | self/cross o; ffn.2                                 | keep input columns; output       |
|          |                                                     | all-reduced; bias on rank 0 only |

Heads are split contiguously (rank r holds heads [r·h/T, (r+1)·h/T)); the model derives its
local head count from the sliced q weight, and the KV cache is then built with that count.
Every collective goes through `collectives.all_reduce_sum(..., allowed="tp")`.
Imports torch, streamdit.errors, streamdit.model and streamdit.parallel only.
"""

from __future__ import annotations

import fnmatch
from functools import partial

import torch
from torch import nn

from streamdit.errors import ConfigError
from streamdit.model.dit import CausalWanDiT
from streamdit.model.presets import DiTConfig
from streamdit.parallel.collectives import all_reduce_sum
from streamdit.parallel.groups import GroupHandle

TP_PLAN: tuple[tuple[str, str], ...] = (
    ("blocks.*.self_attn.[qkv]", "colwise"),
    ("blocks.*.cross_attn.[qkv]", "colwise"),
    ("blocks.*.self_attn.norm_[qk]", "norm"),
    ("blocks.*.cross_attn.norm_[qk]", "norm"),
    ("blocks.*.ffn.0", "colwise"),
    ("blocks.*.self_attn.o", "rowwise"),
    ("blocks.*.cross_attn.o", "rowwise"),
    ("blocks.*.ffn.2", "rowwise"),
)


def style_of(path: str) -> str | None:
    """The plan's style for a module path, or None (replicated)."""
    for pattern, style in TP_PLAN:
        if fnmatch.fnmatchcase(path, pattern):
            return style
    return None


def tp_collectives_per_call(cfg: DiTConfig) -> dict[str, int]:
    """Steady-state collectives of one generator call (text K/V cached).

    Per block: 3 row-parallel all-reduces of [tokens, dim] (self o, cross o, ffn.2) and 3 tiny
    [tokens, 1] sum-of-squares all-reduces (self q, self k, cross q); cross k adds one more only
    when the text cache is rebuilt.
    """
    return {"large": 3 * cfg.num_layers, "tiny": 3 * cfg.num_layers}


def apply_tp(model: CausalWanDiT, handle: GroupHandle) -> None:
    """Shard `model` in place for group rank `handle.rank` of `handle.size`."""
    cfg, size, rank = model.cfg, handle.size, handle.rank
    for name, value in (("num_heads", cfg.num_heads), ("ffn_dim", cfg.ffn_dim)):
        if value % size:
            raise ConfigError(f"{name}={value} is not divisible by the TP size {size} [field={name}]")
    if size == 1:
        return
    reduce = partial(all_reduce_sum, handle=handle, allowed="tp")
    for path, module in model.named_modules():
        style = style_of(path)
        if style == "colwise":
            _keep_rows(module, rank, size)
        elif style == "norm":
            _keep_rows(module, rank, size)
            module.reduce_sum_of_squares = reduce
        elif style == "rowwise":
            _keep_cols(module, rank, size)
            module.register_forward_hook(lambda _m, _i, out: reduce(out))


def _slice(t: torch.Tensor, dim: int, rank: int, size: int) -> torch.Tensor:
    n = t.shape[dim] // size
    # clone: the full tensor's storage must be freed, not kept alive by a view
    return t.narrow(dim, rank * n, n).clone()


def _keep_rows(module: nn.Module, rank: int, size: int) -> None:
    module.weight = nn.Parameter(_slice(module.weight.data, 0, rank, size), requires_grad=False)
    if getattr(module, "bias", None) is not None:
        module.bias = nn.Parameter(_slice(module.bias.data, 0, rank, size), requires_grad=False)


def _keep_cols(module: nn.Module, rank: int, size: int) -> None:
    module.weight = nn.Parameter(_slice(module.weight.data, 1, rank, size), requires_grad=False)
    if module.bias is not None and rank != 0:
        # the all-reduce sums every rank's output: the bias must be counted once
        module.bias = nn.Parameter(torch.zeros_like(module.bias.data), requires_grad=False)
