"""Loading module weights from a checkpoint: validate every key and shape, then copy.

Owns: the load plan (which checkpoint key fills which module key), its validation against a
module before anything is copied, the `LoadReport`, and `save_safetensors`. Opening files,
formats and selection live in checkpoints.py; key names and layouts in keymaps.py; diffusers
config checks in diffusers_config.py — all re-exported here, so callers import one module.
Must not import: anything from streamdit except errors and model/ (model/ is torch-only).
Works on any `nn.Module` (the DiT, the VAE, the text encoder); the state dict's names are the
target names, so persistent buffers are checked like parameters.

Validation (`check_checkpoint`) reads only shapes (safetensors headers, mmapped torch files),
so it works on a meta-device module: every module key must be filled exactly once, every
selected, non-ignored checkpoint key must map to a module key, and shapes must match; otherwise
a `CheckpointError` names the file(s) and the first few missing / unexpected / mis-shaped keys
with expected vs found shapes. While copying, values are cast to the module's dtype and moved
to its device. The layout ("wan" or "diffusers") and so the key map are detected from the keys.

`load_safetensors_into` / `check_safetensors` are the single-file API of earlier callers: one
`.safetensors` file, its keys as they are (no selection), and the Wan key map unless told.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from streamdit.errors import CheckpointError
from streamdit.model.checkpoints import (
    CheckpointSource,
    diffusers_config,
    open_checkpoint,
    open_safetensors_file,
)
from streamdit.model.diffusers_config import (
    check_dit_config,
    check_vae_config,
    diffusers_latent_stats,
    vae_config_from_diffusers,
)
from streamdit.model.keymaps import (
    DIFFUSERS_WAN_KEY_MAP,
    WAN_KEY_MAP,
    WRAPPER_PREFIXES,
    WRAPPER_SEGMENTS,
    KeyMap,
    detect_layout,
    diffusers_vae_key_map,
    key_map_for,
    map_key,
)

__all__ = [
    "DIFFUSERS_WAN_KEY_MAP",
    "WAN_KEY_MAP",
    "WRAPPER_PREFIXES",
    "WRAPPER_SEGMENTS",
    "CheckpointSource",
    "KeyMap",
    "LoadPlan",
    "LoadReport",
    "check_checkpoint",
    "check_dit_config",
    "check_safetensors",
    "check_vae_config",
    "detect_layout",
    "diffusers_config",
    "diffusers_latent_stats",
    "diffusers_vae_key_map",
    "load_checkpoint_into",
    "load_safetensors_into",
    "map_key",
    "open_checkpoint",
    "save_safetensors",
    "vae_config_from_diffusers",
]

_SHOW = 5  # offending keys listed per category in an error message
Source = CheckpointSource | str | os.PathLike[str]


@dataclass(frozen=True, slots=True)
class LoadPlan:
    """A validated load: checkpoint key → module key, plus what is left out and why."""

    mapping: dict[str, str]
    ignored: tuple[str, ...]
    """Checkpoint keys not loaded: skipped by `ignore_prefixes` or left out by the selection."""
    layout: str

    def __len__(self) -> int:
        return len(self.mapping)


@dataclass(frozen=True, slots=True)
class LoadReport:
    """What a load did; `summary()` is the one log line."""

    path: str
    loaded: int
    ignored: tuple[str, ...]
    files: tuple[str, ...] = ()
    format: str = "safetensors"
    layout: str = "wan"
    selection: str | None = None
    dtypes: dict[str, int] = field(default_factory=dict)
    """Histogram of the loaded tensors' dtypes as stored in the file, e.g. {"bfloat16": 825}."""
    notes: tuple[str, ...] = ()

    def summary(self) -> str:
        files = f"{len(self.files)} file{'s' if len(self.files) != 1 else ''}"
        dtypes = ", ".join(f"{name}={count}" for name, count in sorted(self.dtypes.items()))
        selection = self.selection if self.selection is not None else "whole file"
        notes = "".join(f"; {note}" for note in self.notes)
        return (
            f"loaded {self.loaded} tensors from {self.path} ({self.format}, {files}, layout "
            f"{self.layout}, selection {selection}; {dtypes or 'no tensors'}; "
            f"{len(self.ignored)} ignored{notes})"
        )


def check_checkpoint(
    module: nn.Module,
    source: Source,
    *,
    key_map: KeyMap | None = None,
    ignore_prefixes: Sequence[str] = (),
) -> LoadPlan:
    """Validation only (no tensor data is read): the plan `load_checkpoint_into` would run.

    `source` is an opened checkpoint or a path for `open_checkpoint`. `key_map` None detects
    the layout from the keys; `ignore_prefixes` skips selected keys (matched before renaming).
    """
    source = source if isinstance(source, CheckpointSource) else open_checkpoint(source)
    layout, detected = key_map_for(source.keys())
    return _plan(
        module,
        source,
        layout,
        detected if key_map is None else key_map,
        ignore_prefixes,
        WRAPPER_PREFIXES,
    )


def load_checkpoint_into(
    module: nn.Module,
    source: Source,
    *,
    key_map: KeyMap | None = None,
    ignore_prefixes: Sequence[str] = (),
) -> LoadReport:
    """Validate (`check_checkpoint`), then copy every planned tensor into `module`.

    Raises CheckpointError before touching the module if anything does not match. The
    source's file handles are released afterwards (it stays usable: they reopen on demand).
    """
    source = source if isinstance(source, CheckpointSource) else open_checkpoint(source)
    plan = check_checkpoint(module, source, key_map=key_map, ignore_prefixes=ignore_prefixes)
    _copy(module, source, plan)
    dtypes = Counter(source.dtypes()[key] for key in plan.mapping)
    return LoadReport(
        path=source.path,
        loaded=len(plan),
        ignored=plan.ignored,
        files=source.files,
        format=source.format,
        layout=plan.layout,
        selection=source.selection,
        dtypes=dict(sorted(dtypes.items())),
        notes=source.notes,
    )


def load_safetensors_into(
    module: nn.Module,
    path: str | os.PathLike[str],
    *,
    key_map: KeyMap = WAN_KEY_MAP,
    ignore_prefixes: Sequence[str] = (),
    strip_prefixes: Sequence[str] = WRAPPER_PREFIXES,
) -> LoadReport:
    """Single-file API: validate `path` against `module` from its header, then copy it in."""
    source = open_safetensors_file(path)
    plan = _plan(module, source, detect_layout(source.keys()), key_map, ignore_prefixes, strip_prefixes)
    _copy(module, source, plan)
    return LoadReport(path=source.path, loaded=len(plan), ignored=plan.ignored, files=source.files)


def check_safetensors(
    module: nn.Module,
    path: str | os.PathLike[str],
    *,
    key_map: KeyMap = WAN_KEY_MAP,
    ignore_prefixes: Sequence[str] = (),
    strip_prefixes: Sequence[str] = WRAPPER_PREFIXES,
) -> int:
    """Single-file validation (header only, meta modules fine); the number of tensors to load."""
    source = open_safetensors_file(path)
    layout = detect_layout(source.keys())
    return len(_plan(module, source, layout, key_map, ignore_prefixes, strip_prefixes))


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


def _copy(module: nn.Module, source: CheckpointSource, plan: LoadPlan) -> None:
    targets = module.state_dict()
    try:
        with torch.no_grad():
            for key, target in plan.mapping.items():
                targets[target].copy_(source.get(key))
    finally:
        source.close()


def _plan(
    module: nn.Module,
    source: CheckpointSource,
    layout: str,
    key_map: KeyMap,
    ignore_prefixes: Sequence[str],
    strip_prefixes: Sequence[str],
) -> LoadPlan:
    """Map every selected key to a module key; raise CheckpointError listing every problem."""
    targets = module.state_dict()
    shapes = source.shapes()
    several = len(source.files) > 1
    mapping: dict[str, str] = {}
    claimed: dict[str, str] = {}
    ignored: list[str] = []
    unexpected: list[str] = []
    mis_shaped: list[str] = []
    for key in sorted(shapes):
        where = f" (in {os.path.basename(source.file_of(key))})" if several else ""
        if key.startswith(tuple(ignore_prefixes)):
            ignored.append(key)
            continue
        target = map_key(key, targets, key_map=key_map, strip_prefixes=strip_prefixes)
        if target not in targets:
            shown = key if target == key else f"{key} (as {target})"
            unexpected.append(f"{shown} {list(shapes[key])}{where}")
        elif target in claimed:
            unexpected.append(f"{key} (duplicate of {claimed[target]}, as {target}){where}")
        else:
            claimed[target] = key
            mapping[key] = target
            want = tuple(targets[target].shape)
            if shapes[key] != want:
                mis_shaped.append(f"{key}: expected {list(want)} found {list(shapes[key])}{where}")
    missing = [f"{k} {list(targets[k].shape)}" for k in targets if k not in claimed]
    found = (("missing", missing), ("unexpected", unexpected), ("mis-shaped", mis_shaped))
    problems = [_describe(name, keys) for name, keys in found if keys]
    if problems:
        where = f"{source.describe()} ({type(module).__name__})"
        raise CheckpointError(f"{where}: checkpoint does not match: " + "; ".join(problems))
    return LoadPlan(mapping, (*source.dropped, *ignored), layout)


def _describe(name: str, keys: list[str]) -> str:
    more = f" (+{len(keys) - _SHOW} more)" if len(keys) > _SHOW else ""
    return f"{len(keys)} {name}: " + ", ".join(keys[:_SHOW]) + more
