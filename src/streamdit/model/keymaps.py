"""Checkpoint key names → module key names: wrapper stripping, layout detection, key maps.

Owns: how a key found in a checkpoint becomes a state-dict key of `CausalWanDiT` or
`CausalVideoVAE` (whose names are Wan2.1's), for the two layouts users have:
- "wan": Wan2.1's original checkpoints, Self-Forcing / CausVid trainer files and
  `Wan2.1_VAE.pth` already use streamdit's names; only wrapper prefixes are removed.
- "diffusers": `WanTransformer3DModel` and `AutoencoderKLWan` names, renamed back to Wan's.
The layout is detected from the keys (diffusers-only module names), never from file names.
Imports only the standard library.

`map_key`, in order:
1. Wrapper segments are deleted wherever they occur — they are inserted by wrappers, never by a
   model, so they cannot collide with a real name:
   - `_fsdp_wrapped_module.`       FSDP1 wrapping of the root or of each block
   - `_checkpoint_wrapped_module.` activation-checkpoint wrapper (Self-Forcing trains with it)
   - `_orig_mod.`                  `torch.compile`'s OptimizedModule
2. Leading wrapper prefixes are stripped, repeatedly, while the key is not already a module key
   (so a module that really has a child named `model` still loads):
   - `generator.model.` / `generator.` Self-Forcing / CausVid: the trainer's `generator` is a
     `WanDiffusionWrapper` whose `model` is the CausalWanModel
   - `model.`  the diffusion wrapper alone (Self-Forcing inference checkpoints)
   - `module.` DistributedDataParallel
3. Renames from the key map: (regex, replacement) pairs applied in order with `re.sub`; a
   replacement may be a function of the match (index arithmetic of the VAE decoder).

`DIFFUSERS_WAN_KEY_MAP` (DiT; verified key by key and shape by shape against diffusers 0.42's
`WanTransformer3DModel` built with the "tiny" preset's shapes — all 69 tensors map one to one):
`condition_embedder.{time,text}_embedder.linear_{1,2}` → `{time,text}_embedding.{0,2}`,
`condition_embedder.time_proj` → `time_projection.1`, `proj_out` → `head.head`,
`scale_shift_table` → `head.modulation` (top level) / `modulation` (in blocks),
`attn1` / `attn2` → `self_attn` / `cross_attn`, `to_{q,k,v}` → `{q,k,v}`, `to_out.0` → `o`,
`ffn.net.0.proj` / `ffn.net.2` → `ffn.0` / `ffn.2`, and `norm2` → `norm3` (diffusers calls
Wan's affine cross-attention norm `norm2`; its `norm1`/`norm3` have no parameters).

`diffusers_vae_key_map(num_res_blocks)` (VAE; verified against `AutoencoderKLWan` built with
the "tiny" VAE preset's shapes — all 146 tensors map one to one, and every shape is identical,
RMS_norm `gamma` and `time_conv` weights included, so no reshape is needed or done):
- top level: `quant_conv` → `conv1`, `post_quant_conv` → `conv2`; in encoder and decoder
  `conv_in` → `conv1`, `norm_out` → `head.0`, `conv_out` → `head.2`;
- `encoder.down_blocks.{i}` → `encoder.downsamples.{i}` (both flat lists: residual blocks and
  resamples interleaved the same way);
- `mid_block.resnets.{i}` → `middle.{2i}`, `mid_block.attentions.{i}` → `middle.{2i+1}`;
- the decoder is nested in diffusers and flat in Wan: with L = num_res_blocks + 2 entries per
  level (num_res_blocks + 1 residual blocks, then the resample),
  `decoder.up_blocks.{i}.resnets.{j}` → `decoder.upsamples.{i*L + j}` and
  `decoder.up_blocks.{i}.upsamplers.0` → `decoder.upsamples.{i*L + L-1}`;
- inside a residual block `norm1` → `residual.0`, `conv1` → `residual.2`, `norm2` →
  `residual.3`, `conv2` → `residual.6` (Wan's Sequential indices), `conv_shortcut` → `shortcut`.
  Attention (`norm`, `to_qkv`, `proj`) and resample (`resample.1`, `time_conv`) names agree.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence

Replacement = str | Callable[[re.Match[str]], str]
KeyMap = Sequence[tuple[str, Replacement]]

WRAPPER_SEGMENTS = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")
WRAPPER_PREFIXES = ("generator.model.", "generator.", "model.", "module.")
WAN_KEY_MAP: KeyMap = ()
DIFFUSERS_WAN_KEY_MAP: KeyMap = (
    (r"^condition_embedder\.time_embedder\.linear_1\.", "time_embedding.0."),
    (r"^condition_embedder\.time_embedder\.linear_2\.", "time_embedding.2."),
    (r"^condition_embedder\.text_embedder\.linear_1\.", "text_embedding.0."),
    (r"^condition_embedder\.text_embedder\.linear_2\.", "text_embedding.2."),
    (r"^condition_embedder\.time_proj\.", "time_projection.1."),
    (r"^proj_out\.", "head.head."),
    (r"^scale_shift_table$", "head.modulation"),
    (r"\.scale_shift_table$", ".modulation"),
    (r"\.attn1\.", ".self_attn."),
    (r"\.attn2\.", ".cross_attn."),
    (r"\.to_q\.", ".q."),
    (r"\.to_k\.", ".k."),
    (r"\.to_v\.", ".v."),
    (r"\.to_out\.0\.", ".o."),
    (r"\.ffn\.net\.0\.proj\.", ".ffn.0."),
    (r"\.ffn\.net\.2\.", ".ffn.2."),
    (r"\.norm2\.", ".norm3."),
)

# Module names that only diffusers uses: one hit decides the layout (and which model it is).
_DIFFUSERS_DIT_MARKERS = ("condition_embedder.", "attn1.", "attn2.", "proj_out.", "scale_shift_table")
_DIFFUSERS_VAE_MARKERS = ("quant_conv.", "post_quant_conv.", "down_blocks.", "up_blocks.", "mid_block.")
_UP_RESNET = re.compile(r"(?:^|\.)decoder\.up_blocks\.0\.resnets\.(\d+)\.")
_IN_BLOCK = r"(\.(?:downsamples|upsamples|middle)\.\d+\.)"


def map_key(
    file_key: str,
    module_keys: Mapping[str, object] | Collection[str],
    *,
    key_map: KeyMap = WAN_KEY_MAP,
    strip_prefixes: Sequence[str] = WRAPPER_PREFIXES,
) -> str:
    """The module key a file key loads into (steps 1–3 of the module docstring)."""
    key = file_key
    for segment in WRAPPER_SEGMENTS:
        key = key.replace(segment, "")
    while key not in module_keys:
        prefix = next((p for p in strip_prefixes if key.startswith(p)), None)
        if prefix is None:
            break
        key = key[len(prefix) :]
    for pattern, replacement in key_map:
        key = re.sub(pattern, replacement, key)
    return key


def _has_segment(keys: Iterable[str], markers: Sequence[str]) -> bool:
    """Whether a marker starts at a name boundary of any key (so `xquant_conv.` is no hit)."""
    dotted = ["." + marker for marker in markers]
    return any(m in "." + key for key in keys for m in dotted)


def detect_layout(keys: Iterable[str]) -> str:
    """`"diffusers"` when the keys carry a diffusers-only module name, else `"wan"`."""
    keys = list(keys)
    markers = _DIFFUSERS_DIT_MARKERS + _DIFFUSERS_VAE_MARKERS
    return "diffusers" if _has_segment(keys, markers) else "wan"


def key_map_for(keys: Iterable[str]) -> tuple[str, KeyMap]:
    """The layout of `keys` and the key map that renames them to streamdit's (Wan) names."""
    keys = list(keys)
    if _has_segment(keys, _DIFFUSERS_VAE_MARKERS):
        return "diffusers", diffusers_vae_key_map(_decoder_res_blocks(keys))
    if _has_segment(keys, _DIFFUSERS_DIT_MARKERS):
        return "diffusers", DIFFUSERS_WAN_KEY_MAP
    return "wan", WAN_KEY_MAP


def _decoder_res_blocks(keys: Iterable[str]) -> int:
    """num_res_blocks of a diffusers VAE from its keys: decoder levels hold one more resnet."""
    found = [int(m.group(1)) for key in keys if (m := _UP_RESNET.search(key))]
    # an encoder-only file has no decoder index to compute; Wan2.1's value is then harmless
    return max(found) if found else 2


def diffusers_vae_key_map(num_res_blocks: int) -> KeyMap:
    """diffusers `AutoencoderKLWan` → Wan2.1 VAE names (see the module docstring)."""
    level = num_res_blocks + 2  # decoder entries per level in Wan's flat `upsamples` list

    def up_resnet(m: re.Match[str]) -> str:
        return f"decoder.upsamples.{int(m.group(1)) * level + int(m.group(2))}."

    def up_sampler(m: re.Match[str]) -> str:
        return f"decoder.upsamples.{int(m.group(1)) * level + level - 1}."

    def mid(m: re.Match[str]) -> str:
        index = 2 * int(m.group(3)) + (1 if m.group(2) == "attentions" else 0)
        return f"{m.group(1)}coder.middle.{index}."

    return (
        (r"^quant_conv\.", "conv1."),
        (r"^post_quant_conv\.", "conv2."),
        (r"^(en|de)coder\.conv_in\.", r"\1coder.conv1."),
        (r"^(en|de)coder\.norm_out\.", r"\1coder.head.0."),
        (r"^(en|de)coder\.conv_out\.", r"\1coder.head.2."),
        (r"^encoder\.down_blocks\.(\d+)\.", r"encoder.downsamples.\1."),
        (r"^(en|de)coder\.mid_block\.(resnets|attentions)\.(\d+)\.", mid),
        (r"^decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.", up_resnet),
        (r"^decoder\.up_blocks\.(\d+)\.upsamplers\.0\.", up_sampler),
        # residual-block internals, only right after a block index (so `encoder.conv1` stays)
        (_IN_BLOCK + r"norm1\.", r"\1residual.0."),
        (_IN_BLOCK + r"conv1\.", r"\1residual.2."),
        (_IN_BLOCK + r"norm2\.", r"\1residual.3."),
        (_IN_BLOCK + r"conv2\.", r"\1residual.6."),
        (_IN_BLOCK + r"conv_shortcut\.", r"\1shortcut."),
    )
