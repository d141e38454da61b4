"""Loading module weights from safetensors through a documented key map.

Owns: the key map from checkpoint names to module names (Wan2.1 / Self-Forcing / diffusers),
validation of a file against a module before anything is copied, and `save_safetensors`.
Must not import: anything from streamdit except errors (model/ is torch-only, single device).
Works on any `nn.Module` (the DiT, the VAE, the text encoder); the state dict's names are the
target names, so persistent buffers are checked like parameters.

Key map (how a file key becomes a module key), in order:
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
   Other trainer state sharing the file (`generator_ema.`, `critic.`, `fake_score.`) is skipped
   by passing it in `ignore_prefixes` (matched against the raw file key).
3. Renames from `key_map`: (regex, replacement) pairs applied in order with `re.sub`.
   - `WAN_KEY_MAP` (default) is empty: Wan2.1's original checkpoints and Self-Forcing's
     CausalWanModel use exactly the names of `CausalWanDiT` and `CausalVideoVAE`
     (`patch_embedding`, `blocks.{i}.self_attn.q`, `head.head`, `encoder.downsamples.*`, ...).
   - `DIFFUSERS_WAN_KEY_MAP` maps diffusers' `WanTransformer3DModel` names back to Wan's:
     `condition_embedder.{time,text}_embedder.linear_{1,2}` → `{time,text}_embedding.{0,2}`,
     `condition_embedder.time_proj` → `time_projection.1`, `proj_out` → `head.head`,
     `scale_shift_table` → `head.modulation` (top level) / `modulation` (in blocks),
     `attn1` / `attn2` → `self_attn` / `cross_attn`, `to_{q,k,v}` → `{q,k,v}`, `to_out.0` → `o`,
     `ffn.net.0.proj` / `ffn.net.2` → `ffn.0` / `ffn.2`, and `norm2` → `norm3` (diffusers
     renumbers Wan's affine cross-attention norm). diffusers' VAE layout is not mapped.

Validation reads only the safetensors header: every module key must be present exactly once,
every (non-ignored) file key must map to a module key, and shapes must match; otherwise a
`CheckpointError` names the file and the first few offending keys with expected vs found
shapes. Values are cast to the module's dtype and moved to its device while copying.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from streamdit.errors import CheckpointError

KeyMap = Sequence[tuple[str, str]]

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
_SHOW = 5  # offending keys listed per category in an error message


@dataclass(frozen=True, slots=True)
class LoadReport:
    """What a load did: the file, how many tensors were copied, which file keys were skipped."""

    path: str
    loaded: int
    ignored: tuple[str, ...]


def map_key(
    file_key: str,
    module_keys: Mapping[str, object] | set[str],
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


def load_safetensors_into(
    module: nn.Module,
    path: str | os.PathLike[str],
    *,
    key_map: KeyMap = WAN_KEY_MAP,
    ignore_prefixes: Sequence[str] = (),
    strip_prefixes: Sequence[str] = WRAPPER_PREFIXES,
) -> LoadReport:
    """Validate `path` against `module` from its header, then copy every tensor in.

    Raises CheckpointError (naming the file and keys) before touching the module if the file
    is unreadable or any key is missing, unexpected, duplicated or mis-shaped.
    """
    path = os.fspath(path)
    targets = module.state_dict()
    mapping, ignored = _checked_plan(module, path, key_map, ignore_prefixes, strip_prefixes)
    with torch.no_grad(), _open(path) as f:
        for file_key, target in mapping.items():
            targets[target].copy_(f.get_tensor(file_key))
    return LoadReport(path=path, loaded=len(mapping), ignored=tuple(ignored))


def check_safetensors(
    module: nn.Module,
    path: str | os.PathLike[str],
    *,
    key_map: KeyMap = WAN_KEY_MAP,
    ignore_prefixes: Sequence[str] = (),
    strip_prefixes: Sequence[str] = WRAPPER_PREFIXES,
) -> int:
    """Validation only: the checks of `load_safetensors_into`, reading nothing but the header.

    Works on a meta-device module, so bad checkpoints are rejected before weights are allocated.
    Returns the number of tensors that would load.
    """
    mapping, _ = _checked_plan(module, os.fspath(path), key_map, ignore_prefixes, strip_prefixes)
    return len(mapping)


def _checked_plan(
    module: nn.Module,
    path: str,
    key_map: KeyMap,
    ignore_prefixes: Sequence[str],
    strip_prefixes: Sequence[str],
) -> tuple[dict[str, str], list[str]]:
    header = _read_header(path)
    where = f"{path} ({type(module).__name__})"
    return _plan(header, module.state_dict(), where, key_map, ignore_prefixes, strip_prefixes)


def save_safetensors(
    module: nn.Module,
    path: str | os.PathLike[str],
    *,
    prefix: str = "",
    metadata: dict[str, str] | None = None,
) -> None:
    """Write the module's state dict (keys optionally prefixed) as one safetensors file."""
    tensors: dict[str, Tensor] = {}
    seen: set[int] = set()
    for name, value in module.state_dict().items():
        t = value.detach().cpu().contiguous()
        # safetensors refuses aliased storage (tied weights): give repeats their own copy
        if t.data_ptr() in seen:
            t = t.clone()
        seen.add(t.data_ptr())
        tensors[prefix + name] = t
    save_file(tensors, os.fspath(path), metadata=metadata)


def _open(path: str) -> safe_open:
    try:
        return safe_open(path, framework="pt", device="cpu")
    except Exception as exc:  # safetensors raises its own error type, OSError or ValueError
        raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from exc


def _read_header(path: str) -> dict[str, tuple[int, ...]]:
    """File key → shape, read from the header only (no tensor data is loaded)."""
    # safe_open handles are not iterable: .keys() is the only way to list them
    with _open(path) as f:
        return {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}  # noqa: SIM118


def _plan(
    header: Mapping[str, tuple[int, ...]],
    targets: Mapping[str, Tensor],
    where: str,
    key_map: KeyMap,
    ignore_prefixes: Sequence[str],
    strip_prefixes: Sequence[str],
) -> tuple[dict[str, str], list[str]]:
    """Map every file key to a module key; raise CheckpointError listing every problem."""
    mapping: dict[str, str] = {}
    claimed: dict[str, str] = {}
    ignored: list[str] = []
    unexpected: list[str] = []
    mis_shaped: list[str] = []
    for file_key in sorted(header):
        if file_key.startswith(tuple(ignore_prefixes)):
            ignored.append(file_key)
            continue
        target = map_key(file_key, targets, key_map=key_map, strip_prefixes=strip_prefixes)
        if target not in targets:
            shown = file_key if target == file_key else f"{file_key} (as {target})"
            unexpected.append(f"{shown} {list(header[file_key])}")
        elif target in claimed:
            unexpected.append(f"{file_key} (duplicate of {claimed[target]}, as {target})")
        else:
            claimed[target] = file_key
            mapping[file_key] = target
            want = tuple(targets[target].shape)
            if header[file_key] != want:
                mis_shaped.append(f"{file_key}: expected {list(want)} found {list(header[file_key])}")
    missing = [f"{k} {list(targets[k].shape)}" for k in targets if k not in claimed]
    found = (("missing", missing), ("unexpected", unexpected), ("mis-shaped", mis_shaped))
    problems = [_describe(name, keys) for name, keys in found if keys]
    if problems:
        raise CheckpointError(f"{where}: checkpoint does not match: " + "; ".join(problems))
    return mapping, ignored


def _describe(name: str, keys: list[str]) -> str:
    more = f" (+{len(keys) - _SHOW} more)" if len(keys) > _SHOW else ""
    return f"{len(keys)} {name}: " + ", ".join(keys[:_SHOW]) + more
