"""UMT5TextEncoder against transformers itself: a tiny random umT5 + a local tokenizer, no download.

The oracle is computed here directly with transformers (tokenizer with max_length padding, then
`UMT5EncoderModel(input_ids, attention_mask).last_hidden_state`, rows beyond each prompt's token
count zeroed), the way Wan2.1's `wan/modules/t5.py` + `tokenizers.py` (Self-Forcing, Krea) do.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, PreTrainedTokenizerFast, UMT5Config, UMT5EncoderModel

import streamdit
from streamdit.errors import ConfigError
from streamdit.model.text import TextEncoder
from streamdit.model.umt5 import UMT5_XXL_SHAPE, UMT5TextEncoder, clean_prompt
from word_tokenizer import word_tokenizer

TEXT_LEN = 12
D_MODEL = 32
SENTENCES = [
    "a cat walks on the beach at sunset",
    "a red fox jumps over the lazy dog & runs into the forest at night",
    "the city lights glow in the rain while people walk home",
]
SHORT = "a cat walks on the beach"
LONG = " ".join(SENTENCES[1:])  # 24 words + </s>: longer than TEXT_LEN, so truncated
TINY = {
    "d_model": D_MODEL,
    "d_ff": 64,
    "num_layers": 2,
    "num_heads": 4,
    "d_kv": 8,
    "vocab_size": 300,
    "feed_forward_proj": "gated-gelu",
    "relative_attention_num_buckets": 8,
    "relative_attention_max_distance": 16,
}


def _tokenizer() -> PreTrainedTokenizerFast:
    return word_tokenizer(" ".join(SENTENCES).split())


def _model(seed: int = 0) -> UMT5EncoderModel:
    torch.manual_seed(seed)
    model = UMT5EncoderModel(UMT5Config(**TINY)).eval()
    with torch.no_grad():  # HF's init leaves norms at 1; jitter every weight so nothing is trivial
        for param in model.parameters():
            param.add_(0.1 * torch.randn_like(param))
    return model


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("umt5")
    model, tok = _model(), _tokenizer()
    model.save_pretrained(root / "te")  # model folder: weights + tokenizer side by side
    tok.save_pretrained(root / "te")
    model.save_pretrained(root / "pipe" / "text_encoder")  # diffusers pipeline root
    tok.save_pretrained(root / "pipe" / "tokenizer")
    return {"model": root / "te", "pipe": root / "pipe", "root": root}


def _oracle(model_dir: Path, tok_dir: Path, prompts: list[str]) -> torch.Tensor:
    tok = AutoTokenizer.from_pretrained(str(tok_dir), local_files_only=True)
    model = UMT5EncoderModel.from_pretrained(
        str(model_dir), local_files_only=True, dtype=torch.float32
    ).eval()
    batch = tok(
        prompts,
        padding="max_length",
        truncation=True,
        max_length=TEXT_LEN,
        add_special_tokens=True,
        return_tensors="pt",
    )
    with torch.no_grad():
        hidden = model(batch.input_ids, batch.attention_mask).last_hidden_state
    for row, n in zip(hidden, batch.attention_mask.gt(0).sum(1).tolist(), strict=True):
        row[n:] = 0.0
    return hidden


def _token_count(folder: Path, prompt: str) -> int:
    tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    return len(tok(prompt, add_special_tokens=True)["input_ids"])


@pytest.mark.parametrize("layout", ["model", "pipe"])
def test_matches_transformers_oracle(
    folders: dict[str, Path], layout: str, caplog: pytest.LogCaptureFixture
) -> None:
    if layout == "model":
        model_dir = tok_dir = folders["model"]
    else:
        model_dir, tok_dir = folders["pipe"] / "text_encoder", folders["pipe"] / "tokenizer"
    enc = UMT5TextEncoder.from_folder(
        folders[layout], text_len=TEXT_LEN, device="cpu", dtype=torch.float32, expect_dim=D_MODEL
    )
    assert isinstance(enc, TextEncoder) and enc.text_dim == D_MODEL and enc.text_len == TEXT_LEN
    n_short, n_long = _token_count(tok_dir, SHORT), _token_count(tok_dir, LONG)
    assert n_short == 7 and n_long > TEXT_LEN

    with caplog.at_level(logging.WARNING, logger="streamdit.model.umt5"):
        out = enc.encode([SHORT, LONG])
    assert f"prompt has {n_long} tokens, more than text_len={TEXT_LEN}" in caplog.text

    ref = _oracle(model_dir, tok_dir, [SHORT, LONG])
    assert out.shape == ref.shape == (2, TEXT_LEN, D_MODEL) and out.dtype == torch.float32
    rel = (out - ref).norm() / ref.norm()
    assert rel < 1e-5, f"relative error {rel:.2e}"
    assert (out - ref).abs().max() <= 1e-5 * ref.abs().max()
    # rows at/after each prompt's token count are exactly zero; the rows before are not
    assert torch.count_nonzero(out[0, n_short:]) == 0
    assert (out[0, :n_short].abs().sum(-1) > 0).all()
    assert (out[1].abs().sum(-1) > 0).all()  # truncated: all TEXT_LEN rows are tokens

    # per prompt: the batch a prompt arrives in does not change it; and calls are deterministic
    assert torch.equal(enc.encode([LONG])[0], out[1])
    assert torch.equal(enc.encode([SHORT, LONG]), out)


def test_prompts_are_cleaned_like_wan(folders: dict[str, Path]) -> None:
    assert clean_prompt("  a  cat\n\twalks &amp;amp; runs ") == "a cat walks & runs"
    assert clean_prompt("&lt;b&gt;") == "<b>"
    enc = UMT5TextEncoder.from_folder(folders["model"], text_len=TEXT_LEN)
    messy = "  a   cat &amp;amp;\n walks\ton the beach "
    assert torch.equal(enc.encode([messy]), enc.encode(["a cat & walks on the beach"]))
    assert enc.token_ids(SHORT)[-1] == 1  # </s>


def test_bfloat16_output(folders: dict[str, Path]) -> None:
    enc = UMT5TextEncoder.from_folder(folders["model"], text_len=TEXT_LEN, dtype=torch.bfloat16)
    out = enc.encode([SHORT])
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    assert torch.count_nonzero(out[0, 7:]) == 0
    ref = _oracle(folders["model"], folders["model"], [SHORT])
    assert (out.float() - ref).norm() / ref.norm() < 0.05


def test_from_config_random_weights(folders: dict[str, Path]) -> None:
    a = UMT5TextEncoder.from_config(UMT5Config(**TINY), folders["pipe"], seed=5, text_len=TEXT_LEN)
    b = UMT5TextEncoder.from_config(TINY, folders["model"], seed=5, text_len=TEXT_LEN)
    c = UMT5TextEncoder.from_config(TINY, folders["model"], seed=6, text_len=TEXT_LEN)
    assert a.model.shared.weight is a.model.encoder.embed_tokens.weight
    out = a.encode([SHORT, LONG])
    assert out.shape == (2, TEXT_LEN, D_MODEL) and torch.isfinite(out).all()
    assert torch.count_nonzero(out[0, 7:]) == 0 and out[0, :7].std() > 0.01
    assert torch.equal(out, b.encode([SHORT, LONG]))
    assert (out - c.encode([SHORT, LONG])).abs().max() > 0.01
    bf = UMT5TextEncoder.from_config(TINY, folders["model"], seed=5, text_len=TEXT_LEN, dtype=torch.bfloat16)
    assert bf.encode([SHORT]).dtype == torch.bfloat16


def test_xxl_shape_is_a_valid_umt5_config() -> None:
    cfg = UMT5Config(**UMT5_XXL_SHAPE)  # config only: the weights would be ~5.7 B parameters
    assert (cfg.d_model, cfg.d_ff, cfg.num_layers, cfg.num_heads, cfg.d_kv) == (4096, 10240, 24, 64, 64)
    assert cfg.vocab_size == 256384 and cfg.is_gated_act and cfg.dense_act_fn == "gelu_new"
    assert (cfg.relative_attention_num_buckets, cfg.relative_attention_max_distance) == (32, 128)


def test_folder_errors_name_the_field_and_path(folders: dict[str, Path], tmp_path: Path) -> None:
    def fails(path: Path, match: str, **kwargs: object) -> None:
        with pytest.raises(ConfigError, match=match) as info:
            UMT5TextEncoder.from_folder(path, text_len=TEXT_LEN, **kwargs)  # type: ignore[arg-type]
        assert "[field=text_encoder]" in str(info.value) and str(path) in str(info.value)

    fails(tmp_path / "missing", "does not exist")
    (tmp_path / "empty").mkdir()
    fails(tmp_path / "empty", "no config.json")
    no_tok = tmp_path / "no_tok"
    _model().save_pretrained(no_tok)
    fails(no_tok, "no tokenizer files")
    fails(folders["model"], r"text_dim mismatch: the encoder outputs d_model=32, need 4096", expect_dim=4096)
    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    (no_weights / "config.json").write_text((folders["model"] / "config.json").read_text())
    _tokenizer().save_pretrained(no_weights)
    fails(no_weights, "cannot load UMT5EncoderModel weights")
    small_vocab = tmp_path / "small_vocab"
    UMT5EncoderModel(UMT5Config(**{**TINY, "vocab_size": 8})).save_pretrained(small_vocab)
    _tokenizer().save_pretrained(small_vocab)
    fails(small_vocab, "the model's vocab_size is 8")
    with pytest.raises(ConfigError, match=r"no tokenizer files.*\[field=text_encoder\]"):
        UMT5TextEncoder.from_config(TINY, tmp_path / "empty", seed=0, text_len=TEXT_LEN)


def test_importing_streamdit_does_not_import_transformers() -> None:
    code = (
        "import sys, streamdit.model.umt5, streamdit.model.text_embeddings, streamdit.model.text;"
        "assert 'transformers' not in sys.modules, 'transformers imported eagerly'"
    )
    src = str(Path(streamdit.__file__).resolve().parents[1])
    proc = subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, "PYTHONPATH": src},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
