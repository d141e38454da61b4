"""Wan2.1's text encoder: umT5 (transformers' `UMT5EncoderModel`) behind the `TextEncoder` protocol.

Owns: finding the model and tokenizer in a local Hugging Face folder, prompt cleaning, and the
encode path of Wan2.1 (`wan/modules/t5.py` + `wan/modules/tokenizers.py`, as used by
Self-Forcing and Krea); also random-weight encoders of a given shape for benchmarks.
Must not import: anything from streamdit except errors and model/ (model/ is torch-only, single
device); transformers is imported lazily inside functions, so streamdit imports without it.

Folder layouts accepted by `UMT5TextEncoder.from_folder` (never downloads: local_files_only):
- a model folder: `config.json` + safetensors of a `UMT5EncoderModel`, plus tokenizer files
  (`tokenizer.json` and/or `spiece.model`, `tokenizer_config.json`) in the same folder;
- a diffusers pipeline root (e.g. Wan2.1-T2V-1.3B-Diffusers): `text_encoder/` (model) and
  `tokenizer/` (tokenizer) subfolders.

Encode path (per prompt, reproducing Wan2.1):
1. clean: `ftfy.fix_text` when ftfy is installed, `html.unescape` twice, whitespace runs → one
   space, strip (Wan's `basic_clean` + `whitespace_clean`, in that order);
2. tokenize with `padding="max_length", truncation=True, max_length=text_len,
   add_special_tokens=True` (so every prompt ends with `</s>`; an over-long prompt is cut to
   text_len tokens ending in `</s>`, as in the reference, and a warning names its token count);
3. run the encoder with the attention mask, then set every row at or beyond the prompt's token
   count to exactly 0 → `[B, text_len, text_dim]` in the encoder's dtype.
Each prompt runs alone (batch 1, always the same shape), so the batch it arrives in cannot change
its arithmetic.
"""

from __future__ import annotations

import functools
import html
import logging
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from streamdit.errors import ConfigError

log = logging.getLogger(__name__)

WAN_TEXT_LEN = 512
"""Wan2.1's text_len: umT5 output is zero-padded to 512 rows."""

UMT5_XXL_SHAPE: dict[str, Any] = {
    "d_model": 4096,
    "d_ff": 10240,
    "num_layers": 24,
    "num_heads": 64,
    "d_kv": 64,
    "vocab_size": 256384,
    "feed_forward_proj": "gated-gelu",
    "relative_attention_num_buckets": 32,
    "relative_attention_max_distance": 128,
}
"""`UMT5Config` kwargs of umT5-XXL's encoder (google/umt5-xxl, Wan2.1's text encoder)."""

_FIELD = "text_encoder"
_TOKENIZER_FILES = ("tokenizer.json", "spiece.model", "tokenizer_config.json")
_WS_RE = re.compile(r"\s+")


def _error(why: str, path: Path | str | None = None) -> ConfigError:
    where = f" ({path})" if path is not None else ""
    return ConfigError(f"{_FIELD}: {why}{where} [field={_FIELD}]")


@functools.cache
def _ftfy_fix() -> Callable[[str], str] | None:
    try:
        import ftfy
    except ImportError:
        return None
    return ftfy.fix_text


def clean_prompt(text: str) -> str:
    """Wan2.1's prompt cleaning: ftfy (when installed), html-unescape twice, collapse whitespace."""
    fix = _ftfy_fix()
    if fix is not None:
        text = fix(text)
    text = html.unescape(html.unescape(text)).strip()
    return _WS_RE.sub(" ", text).strip()


def resolve_folder(path: str | Path) -> tuple[Path, Path]:
    """(model folder, tokenizer folder) of a model folder or a diffusers pipeline root."""
    root = Path(path).expanduser()
    if not root.exists():
        raise _error("folder does not exist", root)
    if not root.is_dir():
        raise _error("need a folder in Hugging Face format (config.json + safetensors + tokenizer)", root)
    if (root / "text_encoder").is_dir():  # diffusers pipeline root
        model_dir = root / "text_encoder"
        tok_dir = root / "tokenizer" if (root / "tokenizer").is_dir() else model_dir
    else:
        model_dir = tok_dir = root
    if not (model_dir / "config.json").is_file():
        raise _error("no config.json (need a UMT5EncoderModel folder or a diffusers root)", model_dir)
    return model_dir, tok_dir


def read_config(path: str | Path, *, expect_dim: int | None = None) -> Any:
    """The `UMT5Config` of a local folder (no weights read); `expect_dim`: the d_model the caller
    needs (a DiT's text_dim), refused with a ConfigError otherwise."""
    model_dir, _ = resolve_folder(path)
    from transformers import UMT5Config

    try:
        config = UMT5Config.from_pretrained(str(model_dir), local_files_only=True)
    except Exception as exc:
        raise _error(f"cannot read config.json: {type(exc).__name__}: {exc}", model_dir) from exc
    if expect_dim is not None and config.d_model != expect_dim:
        raise _error(
            f"text_dim mismatch: the encoder outputs d_model={config.d_model}, need {expect_dim}",
            model_dir,
        )
    return config


def load_tokenizer(path: str | Path) -> Any:
    """The tokenizer of a local folder (a tokenizer folder, model folder or diffusers root)."""
    folder = Path(path).expanduser()
    if (folder / "tokenizer").is_dir():
        folder = folder / "tokenizer"
    if not folder.is_dir():
        raise _error("tokenizer folder does not exist", folder)
    if not any((folder / name).is_file() for name in _TOKENIZER_FILES):
        raise _error(f"no tokenizer files (one of {', '.join(_TOKENIZER_FILES)})", folder)
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except Exception as exc:  # transformers raises OSError/ValueError/... for unusable folders
        raise _error(f"cannot load the tokenizer: {type(exc).__name__}: {exc}", folder) from exc
    if tokenizer.pad_token_id is None:
        raise _error("the tokenizer has no pad token", folder)
    return tokenizer


class UMT5TextEncoder(nn.Module):
    """Wan2.1's umT5 text encoder: prompts → [B, text_len, text_dim], zero beyond each prompt."""

    def __init__(self, model: nn.Module, tokenizer: Any, *, text_len: int, source: str) -> None:
        super().__init__()
        if text_len <= 0:
            raise _error(f"text_len must be > 0, got {text_len}", source)
        vocab = int(model.config.vocab_size)
        if len(tokenizer) > vocab:
            raise _error(
                f"tokenizer has {len(tokenizer)} tokens but the model's vocab_size is {vocab}", source
            )
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.text_len = text_len
        self.text_dim = int(model.config.d_model)
        self.source = source

    @classmethod
    def from_folder(
        cls,
        path: str | Path,
        *,
        text_len: int = WAN_TEXT_LEN,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        expect_dim: int | None = None,
    ) -> UMT5TextEncoder:
        """Load model and tokenizer from a local folder (see the module docstring for layouts)."""
        model_dir, tok_dir = resolve_folder(path)
        from transformers import UMT5EncoderModel

        config = read_config(path, expect_dim=expect_dim)
        tokenizer = load_tokenizer(tok_dir)
        try:
            model = UMT5EncoderModel.from_pretrained(
                str(model_dir), config=config, local_files_only=True, dtype=dtype
            )
        except Exception as exc:
            raise _error(
                f"cannot load UMT5EncoderModel weights: {type(exc).__name__}: {exc}", model_dir
            ) from exc
        model.to(device=device, dtype=dtype)
        return cls(model, tokenizer, text_len=text_len, source=str(Path(path)))

    @classmethod
    def from_config(
        cls,
        config: Any,
        tokenizer_path: str | Path,
        *,
        seed: int,
        text_len: int = WAN_TEXT_LEN,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> UMT5TextEncoder:
        """Random weights of a `UMT5Config` (or a dict of its kwargs, e.g. `UMT5_XXL_SHAPE`).

        Built on meta and allocated once on `device` in `dtype`, then filled with T5's
        initialization (normal, Mesh-TensorFlow scales; norms = 1) from a generator on `device`
        seeded with `seed`: deterministic per device, not equal across devices.
        """
        from transformers import UMT5Config, UMT5EncoderModel

        if isinstance(config, Mapping):
            config = UMT5Config(**config)
        tokenizer = load_tokenizer(tokenizer_path)
        with torch.device("meta"):
            model = UMT5EncoderModel(config)
        model = model.to(dtype=dtype).to_empty(device=device)
        model.tie_weights()  # to_empty gives tied parameters separate storage
        _init_random(model, config, seed)
        return cls(model, tokenizer, text_len=text_len, source=f"random {config.model_type} seed={seed}")

    @property
    def device(self) -> torch.device:
        return self.model.shared.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.shared.weight.dtype

    def token_ids(self, prompt: str) -> list[int]:
        """The (untruncated) token ids of a cleaned prompt, `</s>` included."""
        return list(self.tokenizer(clean_prompt(prompt), add_special_tokens=True)["input_ids"])

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> Tensor:
        if isinstance(prompts, str):
            raise ConfigError("prompts: expected a list of strings, got one str [field=prompts]")
        out = torch.zeros((len(prompts), self.text_len, self.text_dim), dtype=self.dtype, device=self.device)
        for i, prompt in enumerate(prompts):
            out[i] = self._encode_one(prompt)
        return out

    def _encode_one(self, prompt: str) -> Tensor:
        text = clean_prompt(prompt)
        count = len(self.tokenizer(text, add_special_tokens=True)["input_ids"])
        if count > self.text_len:
            log.warning(
                "prompt has %d tokens, more than text_len=%d: truncated to %d (as Wan2.1 does): %.60r",
                count,
                self.text_len,
                self.text_len,
                text,
            )
        batch = self.tokenizer(
            [text],
            padding="max_length",
            truncation=True,
            max_length=self.text_len,
            add_special_tokens=True,
            return_tensors="pt",
        )
        ids = batch["input_ids"].to(self.device)
        mask = batch["attention_mask"].to(self.device)
        hidden = self.model(input_ids=ids, attention_mask=mask).last_hidden_state[0]
        n = int(mask[0].gt(0).sum())
        keep = torch.arange(self.text_len, device=self.device) < n
        return torch.where(keep[:, None], hidden, torch.zeros((), dtype=hidden.dtype, device=hidden.device))


@torch.no_grad()
def _init_random(model: nn.Module, config: Any, seed: int) -> None:
    """T5's `_init_weights` scales, drawn from one seeded generator on the model's device."""
    device = model.shared.weight.device
    gen = torch.Generator(device=device).manual_seed(seed)
    d_model, d_ff, d_kv, heads = config.d_model, config.d_ff, config.d_kv, config.num_heads
    for name, param in model.named_parameters():  # tied parameters are listed once
        leaf = name.rsplit(".", 2)[-2]  # "encoder.block.0.layer.0.SelfAttention.q.weight" -> "q"
        if name.endswith("layer_norm.weight"):
            param.fill_(1.0)
            continue
        if name == "shared.weight":
            std = 1.0
        elif leaf == "q":
            std = (d_model * d_kv) ** -0.5
        elif leaf == "o":
            std = (heads * d_kv) ** -0.5
        elif leaf == "wo":
            std = d_ff**-0.5
        else:  # k, v, wi / wi_0 / wi_1, relative_attention_bias
            std = d_model**-0.5
        param.normal_(0.0, std * config.initializer_factor, generator=gen)
