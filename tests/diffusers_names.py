"""Wan → diffusers key names of the DiT, written out in the tests independently of
`streamdit.model.keymaps` (which maps the other way), so a wrong map cannot agree with itself."""

from __future__ import annotations

TOP = {
    "time_embedding.0.": "condition_embedder.time_embedder.linear_1.",
    "time_embedding.2.": "condition_embedder.time_embedder.linear_2.",
    "text_embedding.0.": "condition_embedder.text_embedder.linear_1.",
    "text_embedding.2.": "condition_embedder.text_embedder.linear_2.",
    "time_projection.1.": "condition_embedder.time_proj.",
    "head.head.": "proj_out.",
}
PARTS = {"self_attn": "attn1", "cross_attn": "attn2", "q": "to_q", "k": "to_k", "v": "to_v"}
PARTS |= {"o": "to_out.0", "norm3": "norm2", "modulation": "scale_shift_table"}


def dit_to_diffusers(key: str) -> str:
    for wan, diff in TOP.items():
        if key.startswith(wan):
            return diff + key[len(wan) :]
    if key == "head.modulation":
        return "scale_shift_table"
    key = ".".join(PARTS.get(p, p) for p in key.split("."))
    return key.replace(".ffn.0.", ".ffn.net.0.proj.").replace(".ffn.2.", ".ffn.net.2.")
