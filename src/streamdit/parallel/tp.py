"""Megatron-style tensor parallelism of the DiT, applied from outside the model (gpt-fast style).

Owns: `apply_tp(model, handle)`, which slices weights in place by the plan of `tp_plan.py` and
installs the collectives, and `tp_collectives_per_call` (the benchmark's collective count):

| style    | modules                                             | what happens                     |
|----------|-----------------------------------------------------|----------------------------------|
| colwise  | self/cross q, k, v (+bias); ffn.0                   | keep this rank's output rows     |
| norm     | self/cross norm_q, norm_k                           | keep rows; sum of squares        |
|          |                                                     | all-reduced over the TP group    |
| rowwise  | self/cross o; ffn.2                                 | keep input columns; output       |
|          |                                                     | all-reduced; bias on rank 0 only |

Heads are split contiguously (rank r holds heads [r·h/T, (r+1)·h/T)); the model derives its
local head count from the sliced q weight (`q.weight.shape[0] // head_dim`), and the KV cache
must then be built with that count. Every collective goes through
`collectives.all_reduce_sum(..., allowed="tp")`, so a model sharded with a non-TP handle fails
here, before any weight is touched (OM-08).
Imports torch, streamdit.errors, streamdit.model and streamdit.parallel only.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
from torch import nn

from streamdit.errors import ConfigError
from streamdit.model.dit import CausalWanDiT
from streamdit.model.fp8 import ROW_TENSORS
from streamdit.model.presets import DiTConfig
from streamdit.parallel.collectives import all_reduce_sum, all_reduce_sum_inplace, check_group
from streamdit.parallel.groups import GroupHandle
from streamdit.parallel.tp_plan import COLWISE, NORM, ROWWISE, TP_PLAN, style_of

__all__ = ["TP_PLAN", "apply_tp", "local_heads", "style_of", "tp_collectives_per_call"]

TP_GROUP = "tp"  # the only group a TP collective may run on


def tp_collectives_per_call(cfg: DiTConfig) -> dict[str, int]:
    """Collectives of one generator call, by kind.

    Steady state (text K/V cached), per block: 3 row-parallel all-reduces of [tokens, dim]
    (self o, cross o, ffn.2) and 2 tiny sum-of-squares all-reduces: [tokens, 2] for self norm_q
    and norm_k together (`norm_pair`), [tokens, 1] for cross norm_q. A call that rebuilds the
    cross-attention cache (new conditioning or `reset_crossattn_cache`) adds one tiny
    [text_len, 1] all-reduce per block (cross norm_k).
    """
    return {
        "large": 3 * cfg.num_layers,
        "tiny": 2 * cfg.num_layers,
        "tiny_on_text_rebuild": cfg.num_layers,
    }


def local_heads(model: CausalWanDiT) -> int:
    """Heads this rank holds (after `apply_tp`); build the KV cache with this count."""
    return model.blocks[0].self_attn.local_heads()


def apply_tp(
    model: CausalWanDiT,
    handle: GroupHandle,
    *,
    group: str = TP_GROUP,
    inplace_collectives: bool = False,
    hide_from_compiler: bool = False,
) -> None:
    """Shard `model` in place for group rank `handle.rank` of `handle.size`.

    `group` names the only group its collectives may use: "tp" (tp topology) or "mesh" (pp).

    `inplace_collectives` swaps the functional all-reduce for c10d's in-place one (eager
    benchmarks only: it cannot be compiled without graph breaks). `hide_from_compiler` wraps the
    collective in `torch._dynamo.disable`, the layout that cost the reference system >60% of its
    compiled throughput: for the docs/protocol.md §11 benchmark and the C-02 gate's test only.

    Everything is validated before the first weight is replaced, so a refusal leaves the model
    whole. The replaced Parameters hold fresh copies of their slices: the full weights are freed
    as soon as the caller drops its own references to them.
    """
    check_group(handle, group)
    cfg, size, rank = model.cfg, handle.size, handle.rank
    for name, value in (("num_heads", cfg.num_heads), ("ffn_dim", cfg.ffn_dim)):
        if value % size:
            raise ConfigError(f"{name}={value} is not divisible by the TP size {size} [field={name}]")
    if not 0 <= rank < size:
        raise ConfigError(f"tp rank {rank} outside group of size {size} [field=group_rank]")
    targets = [(path, module, style_of(path)) for path, module in model.named_modules()]
    targets = [(path, module, style) for path, module, style in targets if style is not None]
    _check_unsharded(model, targets)
    if size == 1:
        return
    reducer = all_reduce_sum_inplace if inplace_collectives else all_reduce_sum
    reduce = partial(reducer, handle=handle, allowed=group)
    if hide_from_compiler:
        reduce = torch._dynamo.disable(reduce)
    # One hook object for every row-parallel module: a compiled block then guards on the same
    # function in every layer and reuses its graph (compile_blocks).
    output_hook = _output_reducer(reduce)
    for _, module, style in targets:
        if style == COLWISE:
            _keep_rows(module, rank, size)
        elif style == NORM:
            _keep_rows(module, rank, size)
            module.reduce_sum_of_squares = reduce
        elif style == ROWWISE:
            _keep_cols(module, rank, size)
            module.register_forward_hook(output_hook)


def _check_unsharded(model: CausalWanDiT, targets: list[tuple[str, nn.Module, str]]) -> None:
    """Refuse a model that is already sharded (a second apply_tp would slice the slices)."""
    cfg = model.cfg
    if not targets:
        raise ConfigError("tp plan matches no module of the model [field=tp_plan]")
    for path, module, style in targets:
        full = cfg.ffn_dim if path.endswith(("ffn.0", "ffn.2")) else cfg.dim
        dim = 1 if style == ROWWISE else 0
        if module.weight.shape[dim] != full:
            raise ConfigError(
                f"{path}.weight has {module.weight.shape[dim]} != {full} along dim {dim}: "
                "the model is already sharded [field=tp_plan]"
            )


def _output_reducer(reduce: Callable[[torch.Tensor], torch.Tensor]) -> Callable[..., torch.Tensor]:
    def hook(_module: nn.Module, _inputs: object, out: torch.Tensor) -> torch.Tensor:
        # Row-parallel outputs are partial sums: the true output is their sum over the group.
        return reduce(out)

    return hook


def _slice(t: torch.Tensor, dim: int, rank: int, size: int) -> torch.Tensor:
    n = t.shape[dim] // size
    # clone: the full tensor's storage must be freed, not kept alive by a view
    return t.narrow(dim, rank * n, n).clone()


def _keep_rows(module: nn.Module, rank: int, size: int) -> None:
    # every per-row tensor, an FP8 layer's scales too (a row-parallel shard keeps all rows)
    for name in ROW_TENSORS:
        if getattr(module, name, None) is not None:
            tensor = getattr(module, name).data
            setattr(module, name, nn.Parameter(_slice(tensor, 0, rank, size), requires_grad=False))


def _keep_cols(module: nn.Module, rank: int, size: int) -> None:
    module.weight = nn.Parameter(_slice(module.weight.data, 1, rank, size), requires_grad=False)
    if module.bias is not None and rank != 0:
        # the all-reduce sums every rank's output: the bias must be counted once
        module.bias = nn.Parameter(torch.zeros_like(module.bias.data), requires_grad=False)
