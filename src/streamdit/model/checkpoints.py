"""Opening a checkpoint: finding its files, reading shapes and dtypes lazily, selecting weights.

Owns: `open_checkpoint` and `CheckpointSource` — every on-disk form users have, seen through one
interface (`shapes()`, `dtypes()`, `get(key)`), and which nested state dict / key prefix is
used. Names are not touched here beyond the selection (keymaps.py renames, weights.py loads).
Imports torch, safetensors, the standard library and streamdit.errors only.

Formats (`CheckpointSource.format`):
- "safetensors": one `.safetensors` file; only its header is read until `get`.
- "safetensors-sharded": a `*.safetensors.index.json` (`{"weight_map": {key: shard}}`) and
  its shards, given as the index or as the folder holding it. The index is authoritative and
  is checked against the shard headers: a missing shard file, an index key absent from its
  shard, or a shard key the index does not list raises CheckpointError.
- "torch": a `.pt` / `.pth` (or `.bin`, `.ckpt`) file, loaded ONLY with `torch.load(path,
  map_location="cpu", weights_only=True, mmap=True)` — no arbitrary code runs, and tensors
  stay memory-mapped until copied. Legacy (non-zip) torch files cannot be mmapped and are
  refused with a message saying so.
- "diffusers-safetensors", "diffusers-safetensors-sharded", "diffusers-torch": a diffusers
  model folder (`config.json` + `diffusion_pytorch_model.safetensors`, its sharded form, or
  `diffusion_pytorch_model.bin`). A pipeline root holding `transformer/` and/or `vae/` model
  folders is accepted too; `component` names the subfolder when there are both.

Selection (`select`), over the state dicts of the file (a safetensors file is one state dict;
a torch file may nest them: `{"generator": sd, "generator_ema": sd}`, `{"state_dict": sd}`,
...; a state dict is a non-empty str-keyed mapping of tensors):
- None: a file holding one state dict loads it whole; when both `generator` and
  `generator_ema` exist (as nested dicts or as key prefixes) `generator` is used and a note
  says EMA weights are also available; several other state dicts are ambiguous (error).
- "ema": `generator_ema`.
- any other string: a nested dict name (`"generator"`, `"state_dict.model"`) or a key prefix
  ending in "." (`"model."`); the keys under it are kept with the prefix stripped. It is
  matched against the full dotted key (nesting path + key) and, failing that, against the keys
  of the default selection (so `"model."` works inside a lone `{"state_dict": ...}` too).
A selection that matches nothing raises CheckpointError naming the top-level keys.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import Tensor

from streamdit.errors import CheckpointError

Shape = tuple[int, ...]
DIFFUSERS_WEIGHTS = "diffusion_pytorch_model"
PIPELINE_COMPONENTS = ("transformer", "vae")
TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
_SAFETENSORS_DTYPES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
    "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2", "I64": "int64", "I32": "int32",
    "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool",
}  # fmt: skip
_SHOW = 5


@dataclass(frozen=True, slots=True)
class _Entry:
    """Where one selected tensor lives: its file and its name there (dotted path for torch)."""

    file: str
    name: str
    shape: Shape
    dtype: str


@dataclass(slots=True)
class CheckpointSource:
    """An opened checkpoint: selected keys with shapes/dtypes; tensor data read on `get`.

    `files` are the weight files (absolute, sorted), `selection` the nested dict or prefix
    used (None: the whole file), `dropped` the file keys the selection left out, `notes`
    remarks for the log (EMA weights available), `config` the diffusers config.json if any.
    `close()` releases open file handles; a later `get` reopens them.
    """

    path: str
    format: str
    files: tuple[str, ...]
    selection: str | None
    entries: dict[str, _Entry]
    dropped: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()
    config: dict[str, Any] | None = None
    _handles: dict[str, Any] = field(default_factory=dict, repr=False)
    _torch: dict[str, Tensor] = field(default_factory=dict, repr=False)

    def keys(self) -> list[str]:
        return list(self.entries)

    def shapes(self) -> dict[str, Shape]:
        return {key: e.shape for key, e in self.entries.items()}

    def dtypes(self) -> dict[str, str]:
        return {key: e.dtype for key, e in self.entries.items()}

    def file_of(self, key: str) -> str:
        return self.entries[key].file

    def describe(self) -> str:
        """The path given, plus the files when there are several (for error messages)."""
        if len(self.files) <= 1:
            return self.path
        names = ", ".join(os.path.basename(f) for f in self.files[:_SHOW])
        more = f", +{len(self.files) - _SHOW} more" if len(self.files) > _SHOW else ""
        return f"{self.path} ({len(self.files)} files: {names}{more})"

    def get(self, key: str) -> Tensor:
        """The tensor stored under selected key `key` (CPU; mmapped where the format allows)."""
        try:
            entry = self.entries[key]
        except KeyError:
            raise CheckpointError(f"{self.describe()}: no key {key!r} in the selection") from None
        if self.format.endswith("torch"):
            if not self._torch:  # closed: map the file again
                self._torch.update(_flat_tensors(_torch_load(entry.file)))
            return self._torch[entry.name]
        if entry.file not in self._handles:
            self._handles[entry.file] = _safe_open(entry.file)
        return self._handles[entry.file].get_tensor(entry.name)

    def close(self) -> None:
        self._handles.clear()
        self._torch.clear()

    def __enter__(self) -> CheckpointSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_checkpoint(
    path: str | os.PathLike[str], *, select: str | None = None, component: str | None = None
) -> CheckpointSource:
    """Open any supported checkpoint (module docstring); reads headers / mmaps, copies nothing."""
    given = os.fspath(path)
    p = Path(given)
    if not p.exists():
        raise CheckpointError(f"{given}: no such checkpoint file or folder")
    if p.is_dir():
        p = _entry_point(_model_folder(p, component))
    config = _read_config(p.parent) if _is_diffusers_file(p) else None
    found = _read(p)
    entries = found.entries
    chosen, selection, notes = _select(found, select, given)
    files = tuple(sorted({e.file for e in entries.values()}))
    dropped = tuple(sorted(set(entries) - {e.name for e in chosen.values()}))
    fmt = "diffusers-" + found.format if config is not None else found.format
    source = CheckpointSource(given, fmt, files, selection, chosen, dropped, notes, config)
    source._torch.update(found.tensors)
    return source


def open_safetensors_file(path: str | os.PathLike[str]) -> CheckpointSource:
    """One `.safetensors` file with every key as stored: no folder logic, no selection."""
    given = os.fspath(path)
    entries = _read_header(given)
    return CheckpointSource(given, "safetensors", (given,), None, entries)


def diffusers_config(path: str | os.PathLike[str], *, component: str | None = None) -> dict[str, Any] | None:
    """The diffusers `config.json` of the model folder at (or holding) `path`; None if absent.

    `path` is a model folder, a pipeline root (`component` picks `transformer` / `vae` when it
    holds both), or a weight file inside a model folder.
    """
    p = Path(os.fspath(path))
    if not p.exists():
        raise CheckpointError(f"{p}: no such checkpoint file or folder")
    folder = _model_folder(p, component) if p.is_dir() else p.parent
    return _read_config(folder) if (folder / "config.json").is_file() else None


# ---------------------------------------------------------------- finding the files


def _model_folder(folder: Path, component: str | None) -> Path:
    """`folder` itself, or the pipeline component subfolder it names / holds. A folder that
    holds weights of its own is a model folder: `component` then names what it must be."""
    if component is not None and _weight_files(folder) and not (folder / component).is_dir():
        return folder
    if component is not None:
        if not (folder / component).is_dir():
            have = ", ".join(_components(folder)) or "no component folders"
            raise CheckpointError(f"{folder}: component {component!r} not found (has {have})")
        return folder / component
    if _weight_files(folder):
        return folder
    subs = _components(folder)
    if len(subs) > 1:
        raise CheckpointError(f"{folder}: a diffusers pipeline with {', '.join(subs)}; pass component=")
    return folder / subs[0] if subs else folder


def _entry_point(folder: Path) -> Path:
    """The one index or weight file of a folder; diffusers' safetensors win over its .bin."""
    files = _weight_files(folder)
    if len(files) == 1:
        return files[0]
    preferred = [f for f in files if f.name == DIFFUSERS_WEIGHTS + ".safetensors"]
    if len(preferred) == 1:
        return preferred[0]
    if not files:
        raise CheckpointError(f"{folder}: no checkpoint in this folder (no .safetensors, index or .pt)")
    names = ", ".join(f.name for f in files)
    raise CheckpointError(f"{folder}: several checkpoints ({names}); name the file to load")


def _weight_files(folder: Path) -> list[Path]:
    """Loadable entry points of a folder: its indexes if any (they list the shards), else files."""
    indexes = sorted(folder.glob("*.safetensors.index.json"))
    if indexes:
        return indexes
    suffixes = (".safetensors", *TORCH_SUFFIXES)
    return sorted(f for f in folder.iterdir() if f.is_file() and f.suffix in suffixes)


def _components(folder: Path) -> list[str]:
    return [c for c in PIPELINE_COMPONENTS if (folder / c / "config.json").is_file()]


def _is_diffusers_file(path: Path) -> bool:
    return path.name.startswith(DIFFUSERS_WEIGHTS) and (path.parent / "config.json").is_file()


def _read_config(folder: Path) -> dict[str, Any]:
    path = folder / "config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: not a readable JSON config ({exc})") from exc
    if not isinstance(config, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return config


# ---------------------------------------------------------------- reading keys


@dataclass(frozen=True, slots=True)
class _Contents:
    """What a file holds: entries by full dotted key, and for torch files their nesting."""

    format: str
    entries: dict[str, _Entry]
    groups: tuple[str, ...] = ()
    """Dotted paths of the nested state dicts (empty: the file is one flat state dict)."""
    top_keys: tuple[str, ...] = ()
    """The torch object's own top-level keys, non-tensor ones included (for messages)."""
    tensors: dict[str, Tensor] = field(default_factory=dict)
    """The mmapped tensors of a torch file, by full key."""


def _read(path: Path) -> _Contents:
    if path.name.endswith(".index.json"):
        return _Contents("safetensors-sharded", _read_index(path))
    if path.suffix in TORCH_SUFFIXES or (path.suffix != ".safetensors" and _is_zip(path)):
        return _read_torch(path)
    return _Contents("safetensors", _read_header(str(path.resolve())))


def _is_zip(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"PK\x03\x04"


def _safe_open(path: str) -> Any:
    try:
        return safe_open(path, framework="pt", device="cpu")
    except Exception as exc:  # safetensors raises its own error type, OSError or ValueError
        raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from exc


def _read_header(path: str) -> dict[str, _Entry]:
    """Key → entry from the safetensors header only (no tensor data is read)."""
    f = _safe_open(path)
    entries = {}
    for key in f.keys():  # noqa: SIM118 — safe_open handles are not iterable
        info = f.get_slice(key)
        dtype = _SAFETENSORS_DTYPES.get(info.get_dtype(), info.get_dtype().lower())
        entries[key] = _Entry(path, key, tuple(info.get_shape()), dtype)
    return entries


def _read_index(index: Path) -> dict[str, _Entry]:
    """Entries of a sharded checkpoint, each checked against its shard's header."""
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map")
    except (OSError, ValueError, AttributeError) as exc:
        raise CheckpointError(f"{index}: not a readable safetensors index ({exc})") from exc
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{index}: no weight_map {{key: shard file}} in this index")
    by_shard: dict[str, list[str]] = {}
    for key, shard in weight_map.items():
        by_shard.setdefault(str((index.parent / shard).resolve()), []).append(key)
    missing = [
        f"{os.path.basename(shard)} (listed for {keys[0]!r} and {len(keys) - 1} more)"
        for shard, keys in by_shard.items()
        if not os.path.isfile(shard)
    ]
    if missing:
        raise CheckpointError(f"{index}: shard file(s) missing: " + ", ".join(missing[:_SHOW]))
    entries: dict[str, _Entry] = {}
    for shard, keys in sorted(by_shard.items()):
        header = _read_header(shard)
        absent = [k for k in keys if k not in header]
        extra = sorted(set(header) - set(keys))
        if absent or extra:
            raise CheckpointError(
                f"{index}: index and shard {os.path.basename(shard)} disagree: "
                f"index names absent key(s) {absent[:_SHOW]}; unlisted shard key(s) {extra[:_SHOW]}"
            )
        entries.update({k: header[k] for k in keys})
    return entries


def _torch_load(path: str) -> Any:
    """The only way a pickle is read: weights_only (tensors and plain containers), mmapped."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # UnpicklingError, RuntimeError (not a zip file), OSError
        text = str(exc)
        if "Weights only load failed" in text:
            reason = text.split("WeightsUnpickler error:")[-1].strip().split(". ")[0]
            raise CheckpointError(
                f"{path}: refused by torch.load(weights_only=True): it holds a non-tensor object "
                f"({reason}); re-save it as a plain state dict"
            ) from exc
        raise CheckpointError(f"{path}: not a loadable torch checkpoint ({text.splitlines()[0]})") from exc


def _state_dicts(obj: Any, path: str = "") -> Iterator[tuple[str, Mapping[str, Tensor]]]:
    """(dotted path, mapping) of every nested state dict; other containers are not entered."""
    # str keys only: optimizer state ({0: {...}}) is not a state dict of module weights
    if not isinstance(obj, Mapping) or not obj or not all(isinstance(k, str) for k in obj):
        return
    if all(isinstance(v, Tensor) for v in obj.values()):
        yield path, obj
        return
    for key, value in obj.items():
        yield from _state_dicts(value, f"{path}.{key}" if path else key)


def _flat_tensors(obj: Any) -> dict[str, Tensor]:
    return {(f"{p}.{k}" if p else k): t for p, sd in _state_dicts(obj) for k, t in sd.items()}


def _read_torch(path: Path) -> _Contents:
    file = str(path.resolve())
    obj = _torch_load(file)
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{file}: expected a state dict, found a {type(obj).__name__}")
    tensors = _flat_tensors(obj)
    if not tensors:
        raise CheckpointError(f"{file}: no state dict inside (top-level keys: {_list(obj)})")
    dtype = {k: str(t.dtype).removeprefix("torch.") for k, t in tensors.items()}
    entries = {k: _Entry(file, k, tuple(t.shape), dtype[k]) for k, t in tensors.items()}
    groups = tuple(p for p, _ in _state_dicts(obj) if p)
    return _Contents("torch", entries, groups, tuple(str(k) for k in obj), tensors)


# ---------------------------------------------------------------- selection


def _select(
    found: _Contents, select: str | None, where: str
) -> tuple[dict[str, _Entry], str | None, tuple[str, ...]]:
    """(selected key → entry, the selection made, notes for the log)."""
    entries, groups = found.entries, found.groups
    heads = {k.split(".")[0] for k in entries}  # first name of every tensor's dotted key
    tops = sorted(heads | set(found.top_keys))
    ema = {"generator", "generator_ema"} <= heads
    default = "generator" if ema else (groups[0] if len(groups) == 1 else None)
    notes = ("generator_ema (EMA weights) also available: select='ema'",) if ema else ()
    if select is None:
        if default is None and groups:
            raise CheckpointError(
                f"{where}: several state dicts ({_list(groups)}); pass select= one of them "
                f"(top-level keys: {_list(tops)})"
            )
        chosen = entries if default is None else _under(entries, default + ".")
        return chosen, default, notes
    name = "generator_ema" if select == "ema" else select
    prefix = name if name.endswith(".") else name + "."
    chosen = _under(entries, prefix)
    if not chosen and default is not None:  # a prefix inside the default state dict
        chosen = _under(_under(entries, default + "."), prefix)
        name = f"{default}.{name}" if chosen else name
    if not chosen:
        raise CheckpointError(
            f"{where}: select={select!r} matches nothing; top-level keys: {_list(tops)}"
            + (f"; nested state dicts: {_list(groups)}" if groups else "")
        )
    return chosen, name, () if name.startswith("generator_ema") else notes


def _under(entries: dict[str, _Entry], prefix: str) -> dict[str, _Entry]:
    return {k[len(prefix) :]: e for k, e in entries.items() if k.startswith(prefix)}


def _list(names: Any) -> str:
    names = [str(n) for n in names]
    more = f" (+{len(names) - 2 * _SHOW} more)" if len(names) > 2 * _SHOW else ""
    return ", ".join(names[: 2 * _SHOW]) + more
