"""Text conditioning behind an interface, with a deterministic dependency-free default.

Owns: the `TextEncoder` protocol (what the pipeline needs from any text encoder), the default
`HashTextEncoder`, its tokenizer, `pad_text` (zero-padding embeddings to `text_len` rows, as Wan
does before cross-attention) and `blend` for soft prompt transitions. The real umT5 encoder lives
in umt5.py, precomputed embeddings in text_embeddings.py.
Must not import: anything from streamdit except errors (model/ is torch-only, single device).

`HashTextEncoder` stands in for Wan2.1's umT5-XXL: lowercase word/punctuation tokens → ids by a
stable hash (blake2b, never Python's per-process salted `hash()`) → embedding table + learned
positions → a small pre-norm transformer → linear projection to `text_dim`. Like Wan's T5 path
the output is `[B, text_len, text_dim]`, zero beyond each prompt's tokens; like T5 every prompt
ends with an end token (so "" still conditions), and prompts longer than `text_len` are cut to
`text_len − 1` words plus the end token.

Determinism: same prompt → bit-identical embedding across calls, batches and processes (each
prompt runs alone through the transformer, so the batch it arrives in cannot change its
arithmetic). The transformer runs at `width` (default min(text_dim, 256)) and projects to
`text_dim` at the end, so a 4096-wide Wan conditioning costs ~1 M extra parameters, not ~400 M.
"""

from __future__ import annotations

import hashlib
import math
import re
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from streamdit.errors import ConfigError

EOS_ID = 1
"""Appended to every prompt (id 0 is left unused; padding is zeros in the output)."""
_FIRST_WORD_ID = 2
_TOKEN_RE = re.compile(r"\w+|[^\w\s]")


@runtime_checkable
class TextEncoder(Protocol):
    """What the pipeline needs from a text encoder (a real umT5 plugs in behind this)."""

    text_dim: int
    text_len: int

    def encode(self, prompts: list[str]) -> Tensor:
        """Prompts → embeddings [B, text_len, text_dim], zero beyond each prompt's tokens."""
        ...


def tokenize(prompt: str) -> list[str]:
    """Lowercase words (\\w+) and single punctuation marks; whitespace is dropped."""
    return _TOKEN_RE.findall(prompt.lower())


def token_id(token: str, vocab_size: int) -> int:
    """Stable id in [2, vocab_size): blake2b of the UTF-8 token, the same in every process."""
    digest = hashlib.blake2b(token.encode("utf-8"), digest_size=8).digest()
    return _FIRST_WORD_ID + int.from_bytes(digest, "little") % (vocab_size - _FIRST_WORD_ID)


def pad_text(embeds: Tensor, text_len: int, *, field: str = "text_embeddings") -> Tensor:
    """Zero-pad embeddings [L, D] or [B, L, D] to `text_len` rows (a new tensor, never a view).

    Wan's cross-attention runs over all `text_len` rows, so an unpadded conditioning changes the
    output; rows beyond L are exactly 0. L > text_len raises ConfigError naming `field`.
    """
    if embeds.ndim not in (2, 3):
        raise ConfigError(
            f"{field}: need [L, D] or [B, L, D], got shape {tuple(embeds.shape)} [field={field}]"
        )
    if text_len <= 0:
        raise ConfigError(f"{field}: text_len must be > 0, got {text_len} [field={field}]")
    rows = embeds.shape[-2]
    if rows > text_len:
        raise ConfigError(
            f"{field}: {rows} rows is more than text_len={text_len} (shape {tuple(embeds.shape)}) "
            f"[field={field}]"
        )
    out = embeds.new_zeros((*embeds.shape[:-2], text_len, embeds.shape[-1]))
    out[..., :rows, :] = embeds
    return out


def blend(a: Tensor, b: Tensor, alpha: float) -> Tensor:
    """Linear blend of two conditionings for soft prompt transitions: (1−alpha)·a + alpha·b.

    alpha = 0 returns a and alpha = 1 returns b exactly (torch.lerp is exact at both ends).
    """
    if a.shape != b.shape:
        raise ConfigError(f"blend: shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
    if not 0.0 <= alpha <= 1.0:
        raise ConfigError(f"alpha: {alpha} is outside [0, 1]")
    return torch.lerp(a, b.to(a.dtype), alpha)


class HashTextEncoder(nn.Module):
    """Deterministic stand-in text encoder: hashed tokens → small transformer → [B, L, D]."""

    def __init__(
        self,
        text_dim: int,
        text_len: int,
        *,
        seed: int,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        vocab_size: int = 4096,
        layers: int = 2,
        width: int | None = None,
    ) -> None:
        super().__init__()
        if text_dim <= 0 or text_len <= 0 or vocab_size <= _FIRST_WORD_ID or layers < 0:
            raise ConfigError(
                f"text: need text_dim, text_len > 0, vocab_size > {_FIRST_WORD_ID}, layers >= 0 "
                f"(got {text_dim}, {text_len}, {vocab_size}, {layers})"
            )
        self.text_dim = text_dim
        self.text_len = text_len
        self.vocab_size = vocab_size
        w = width or min(text_dim, 256)
        heads = max(1, w // 64) if w % 64 == 0 else 1
        # build on meta, allocate once on the target device, then fill from the seed
        with torch.device("meta"):
            self.token_embedding = nn.Embedding(vocab_size, w)
            self.pos_embedding = nn.Parameter(torch.empty(text_len, w))
            self.layers = nn.ModuleList(_layer(w, heads) for _ in range(layers))
            self.norm = nn.LayerNorm(w)
            self.proj = nn.Linear(w, text_dim)
        self.to(dtype=dtype).to_empty(device=device)
        self.init_weights(seed)
        self.eval()

    @torch.no_grad()
    def init_weights(self, seed: int) -> None:
        """Seeded init drawn on CPU in fp32, so values match on every device."""
        gen = torch.Generator(device="cpu").manual_seed(seed)
        for name, param in self.named_parameters():
            param.copy_(_init_value(name, tuple(param.shape), gen))

    def token_ids(self, prompt: str) -> list[int]:
        words = tokenize(prompt)[: self.text_len - 1]
        return [token_id(t, self.vocab_size) for t in words] + [EOS_ID]

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> Tensor:
        if isinstance(prompts, str):
            raise ConfigError("prompts: expected a list of strings, got one str")
        ref = self.proj.weight
        shape = (len(prompts), self.text_len, self.text_dim)
        out = torch.zeros(shape, dtype=ref.dtype, device=ref.device)
        for i, prompt in enumerate(prompts):
            ids = self.token_ids(prompt)
            out[i, : len(ids)] = self._encode_ids(ids)
        return out

    def _encode_ids(self, ids: list[int]) -> Tensor:
        tokens = torch.tensor([ids], device=self.pos_embedding.device)
        h = self.token_embedding(tokens) + self.pos_embedding[: len(ids)]
        for layer in self.layers:
            h = layer(h)
        return self.proj(self.norm(h))[0]


def _layer(width: int, heads: int) -> nn.TransformerEncoderLayer:
    return nn.TransformerEncoderLayer(
        width,
        heads,
        dim_feedforward=4 * width,
        dropout=0.0,
        activation="gelu",
        batch_first=True,
        norm_first=True,
    )


def _init_value(name: str, shape: tuple[int, ...], gen: torch.Generator) -> Tensor:
    owner = name.rpartition(".")[0].rpartition(".")[2]  # "layers.0.norm1.weight" -> "norm1"
    if owner.startswith("norm"):  # LayerNorm: identity affine
        return torch.ones(shape) if name.endswith("weight") else torch.zeros(shape)
    if name.endswith("bias"):
        return torch.zeros(shape)
    if name == "token_embedding.weight":
        return torch.randn(shape, generator=gen)
    if name == "pos_embedding":
        return 0.1 * torch.randn(shape, generator=gen)
    return torch.randn(shape, generator=gen) / math.sqrt(shape[-1])
