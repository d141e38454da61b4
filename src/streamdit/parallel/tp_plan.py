"""The tensor-parallel sharding plan of the DiT, as data.

Owns: `TP_PLAN` (module-path glob → style) and `style_of(path)`. `tp.apply_tp` shards by it and
`parity.fingerprints` splits parameters into replicated / sharded by it, so the two can never
disagree about which weights are shards. Styles (Megatron):

| style     | what a rank keeps                          | collective                                   |
|-----------|--------------------------------------------|----------------------------------------------|
| `colwise` | its slice of output rows (weight + bias)   | none                                         |
| `rowwise` | its slice of input columns; bias on rank 0 | all-reduce (sum) of the output               |
| `norm`    | its slice of a full-dim RMSNorm weight     | all-reduce (sum) of the [tokens, 1] sum of sq |

Anything the plan does not match is replicated (embeddings, time/text MLPs, modulation tables,
norm3, the head). Globs use `fnmatch` on `nn.Module.named_modules()` paths; each module must
match at most one pattern (a unit test checks it on a real model).
Imports nothing from streamdit (pure data); must not import torch.distributed.
"""

from __future__ import annotations

import fnmatch

COLWISE = "colwise"
ROWWISE = "rowwise"
NORM = "norm"
STYLES = (COLWISE, ROWWISE, NORM)

TP_PLAN: tuple[tuple[str, str], ...] = (
    ("blocks.*.self_attn.[qkv]", COLWISE),
    ("blocks.*.cross_attn.[qkv]", COLWISE),
    ("blocks.*.self_attn.norm_[qk]", NORM),
    ("blocks.*.cross_attn.norm_[qk]", NORM),
    ("blocks.*.ffn.0", COLWISE),
    ("blocks.*.self_attn.o", ROWWISE),
    ("blocks.*.cross_attn.o", ROWWISE),
    ("blocks.*.ffn.2", ROWWISE),
)


def style_of(path: str) -> str | None:
    """The plan's style for a module path, or None (the module is replicated)."""
    for pattern, style in TP_PLAN:
        if fnmatch.fnmatchcase(path, pattern):
            return style
    return None


def matching_patterns(path: str) -> list[str]:
    """Every plan pattern that matches `path` (more than one would make the plan ambiguous)."""
    return [pattern for pattern, _ in TP_PLAN if fnmatch.fnmatchcase(path, pattern)]
