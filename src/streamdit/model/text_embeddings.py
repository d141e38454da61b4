"""Precomputed prompt embeddings from one .safetensors file, behind the `TextEncoder` protocol.

Owns: the file format below, `save_text_embeddings` (writes it) and `PrecomputedTextEncoder`
(reads and validates it up front, then serves `encode`).
Must not import: anything from streamdit except errors and model/ (model/ is torch-only, single
device).

File format (safetensors):
- tensors `embeds.0`, `embeds.1`, … `embeds.{N-1}`, each `[L_i, D]` or `[1, L_i, D]`, floating
  point and finite, 1 <= L_i <= text_len (the unpadded rows, e.g. umT5 output cut at the
  prompt's token count; rows already zero-padded up to text_len are fine too);
- metadata `{"prompts": json.dumps([prompt_0, …, prompt_{N-1}])}`: `embeds.i` is the embedding
  of prompt_i; prompts are distinct after whitespace normalization;
- or: exactly one tensor (any name) and no `prompts` metadata: a single embedding used for
  every prompt.
Prompts are matched after collapsing whitespace runs to one space and stripping, so a timeline
prompt that differs only in spacing still finds its embedding. `encode` zero-pads each
embedding to text_len rows (`pad_text`), as Wan does before cross-attention.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor

from streamdit.errors import ConfigError
from streamdit.model.text import pad_text

FIELD = "text_embeddings"
PROMPTS_KEY = "prompts"
KEY_PREFIX = "embeds."
_SHOW_KNOWN = 5


def _error(why: str, path: Path | str) -> ConfigError:
    return ConfigError(f"{FIELD}: {why} ({path}) [field={FIELD}]")


def _norm(prompt: str) -> str:
    return " ".join(prompt.split())


def save_text_embeddings(path: str | Path, embeddings: Mapping[str, Tensor] | Tensor) -> None:
    """Write `{prompt: [L, D] or [1, L, D]}` in the format above (a bare Tensor: single file)."""
    path = Path(path)
    if isinstance(embeddings, Tensor):
        save_file({"embeds.0": _checked(embeddings, "embeds.0", path).contiguous()}, str(path))
        return
    if not embeddings:
        raise _error("nothing to save: no embeddings", path)
    tensors: dict[str, Tensor] = {}
    prompts: list[str] = []
    seen: dict[str, str] = {}
    dims: set[int] = set()
    for i, (prompt, embeds) in enumerate(embeddings.items()):
        if not isinstance(prompt, str):
            raise _error(f"prompt keys must be strings, got {type(prompt).__name__}", path)
        if _norm(prompt) in seen:
            raise _error(f"prompts {seen[_norm(prompt)]!r} and {prompt!r} differ only in whitespace", path)
        seen[_norm(prompt)] = prompt
        key = f"{KEY_PREFIX}{i}"
        tensors[key] = _checked(embeds, key, path).detach().to("cpu").contiguous()
        dims.add(tensors[key].shape[-1])
        prompts.append(prompt)
    if len(dims) > 1:
        raise _error(f"embeddings have different widths {sorted(dims)}", path)
    save_file(tensors, str(path), metadata={PROMPTS_KEY: json.dumps(prompts)})


def _checked(embeds: Tensor, key: str, path: Path | str) -> Tensor:
    """[L, D] (a [1, L, D] input is squeezed): floating point, finite, at least one row."""
    if not isinstance(embeds, Tensor):
        raise _error(f"{key}: expected a tensor, got {type(embeds).__name__}", path)
    if embeds.ndim == 3 and embeds.shape[0] == 1:
        embeds = embeds[0]
    if embeds.ndim != 2:
        raise _error(f"{key}: need [L, D] or [1, L, D], got shape {tuple(embeds.shape)}", path)
    if not embeds.is_floating_point():
        raise _error(f"{key}: need a floating point tensor, got {embeds.dtype}", path)
    if embeds.shape[0] < 1 or embeds.shape[1] < 1:
        raise _error(f"{key}: empty embedding of shape {tuple(embeds.shape)}", path)
    if not torch.isfinite(embeds).all():
        raise _error(f"{key}: has non-finite values", path)
    return embeds


class PrecomputedTextEncoder:
    """Serves embeddings read from a file: `encode([p])` → the padded embedding of prompt p."""

    def __init__(
        self,
        table: Mapping[str, Tensor],
        *,
        text_len: int,
        text_dim: int,
        source: str,
        single: Tensor | None = None,
    ) -> None:
        self.text_len = text_len
        self.text_dim = text_dim
        self.source = source
        self._table = dict(table)  # normalized prompt -> padded [text_len, text_dim]
        self._prompts = tuple(self._table)
        self._single = single

    @classmethod
    def load(
        cls,
        path: str | Path,
        *,
        text_len: int,
        text_dim: int,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> PrecomputedTextEncoder:
        """Read and validate the whole file (format in the module docstring)."""
        path = Path(path).expanduser()
        if not path.is_file():
            raise _error("file does not exist" if not path.exists() else "not a file", path)
        try:
            with safe_open(str(path), framework="pt") as f:
                metadata = f.metadata() or {}
                raw = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 (safe_open is not iterable)
        except (SafetensorError, OSError, ValueError) as exc:
            raise _error(f"not a readable .safetensors file: {exc}", path) from exc

        def ready(key: str) -> Tensor:
            embeds = _checked(raw[key], key, path)
            if embeds.shape[1] != text_dim:
                raise _error(f"{key}: width D={embeds.shape[1]} != text_dim={text_dim}", path)
            if embeds.shape[0] > text_len:
                raise _error(f"{key}: {embeds.shape[0]} rows is more than text_len={text_len}", path)
            return pad_text(embeds.to(device=device, dtype=dtype), text_len, field=FIELD)

        if PROMPTS_KEY not in metadata:
            if len(raw) != 1:
                raise _error(
                    f"{len(raw)} tensors but no {PROMPTS_KEY!r} metadata (only a single-tensor file "
                    "may omit it)",
                    path,
                )
            (key,) = raw
            kwargs = {"text_len": text_len, "text_dim": text_dim, "source": str(path)}
            return cls({}, **kwargs, single=ready(key))
        prompts = _parse_prompts(metadata[PROMPTS_KEY], path)
        expected = {f"{KEY_PREFIX}{i}" for i in range(len(prompts))}
        if set(raw) != expected:
            extra = sorted(set(raw) - expected)[:_SHOW_KNOWN]
            missing = sorted(expected - set(raw), key=lambda k: int(k[len(KEY_PREFIX) :]))[:_SHOW_KNOWN]
            raise _error(
                f"{len(prompts)} prompts in metadata need tensors embeds.0..embeds.{len(prompts) - 1}; "
                f"missing {missing}, unexpected {extra}",
                path,
            )
        table: dict[str, Tensor] = {}
        for i, prompt in enumerate(prompts):
            if _norm(prompt) in table:
                raise _error(f"prompt {prompt!r} appears twice (embeds.{i})", path)
            table[_norm(prompt)] = ready(f"{KEY_PREFIX}{i}")
        return cls(table, text_len=text_len, text_dim=text_dim, source=str(path))

    @property
    def is_single(self) -> bool:
        """True for a single-embedding file: every prompt gets the same embedding."""
        return self._single is not None

    def known_prompts(self) -> tuple[str, ...]:
        """The prompts the file has embeddings for, whitespace-normalized (empty when single)."""
        return self._prompts

    def check_prompts(self, prompts: Iterable[str]) -> None:
        """Raise ConfigError for the first prompt without an embedding (validate a timeline)."""
        for prompt in prompts:
            self._lookup(prompt)

    def encode(self, prompts: list[str]) -> Tensor:
        if isinstance(prompts, str):
            raise ConfigError("prompts: expected a list of strings, got one str [field=prompts]")
        if not prompts:
            ref = self._single if self._single is not None else next(iter(self._table.values()))
            return ref.new_zeros((0, self.text_len, self.text_dim))
        return torch.stack([self._lookup(p) for p in prompts])

    def _lookup(self, prompt: str) -> Tensor:
        if self._single is not None:
            return self._single
        found = self._table.get(_norm(prompt))
        if found is None:
            known = ", ".join(repr(p) for p in self._prompts[:_SHOW_KNOWN])
            more = f", … ({len(self._prompts)} in all)" if len(self._prompts) > _SHOW_KNOWN else ""
            raise ConfigError(
                f"prompt: no precomputed embedding for {prompt!r} in {self.source}; "
                f"known prompts: {known}{more} [field=prompt]"
            )
        return found


def _parse_prompts(raw: str, path: Path) -> list[str]:
    try:
        prompts = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise _error(f"metadata {PROMPTS_KEY!r} is not JSON: {exc}", path) from exc
    if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
        raise _error(f"metadata {PROMPTS_KEY!r} must be a JSON list of strings", path)
    if not prompts:
        raise _error(f"metadata {PROMPTS_KEY!r} lists no prompts", path)
    return prompts
