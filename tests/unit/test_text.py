"""Hash text encoder: determinism (in and across processes), padding/truncation, blend, pad_text."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import streamdit
from streamdit.errors import ConfigError
from streamdit.model.text import (
    EOS_ID,
    HashTextEncoder,
    TextEncoder,
    blend,
    pad_text,
    token_id,
    tokenize,
)

DIM, LEN, SEED = 64, 16, 3


@pytest.fixture(scope="module")
def enc() -> HashTextEncoder:
    return HashTextEncoder(DIM, LEN, seed=SEED)


def test_satisfies_protocol_and_shape(enc: HashTextEncoder) -> None:
    assert isinstance(enc, TextEncoder)
    out = enc.encode(["a cat", "a dog on the beach"])
    assert out.shape == (2, LEN, DIM) and out.dtype == torch.float32
    assert torch.isfinite(out).all()


def test_tokenizer_and_stable_ids() -> None:
    assert tokenize("A Cat, walking!") == ["a", "cat", ",", "walking", "!"]
    # pins the hash function itself: changing it would silently change every conditioning
    assert token_id("cat", 4096) == 2099
    assert 2 <= token_id("", 4096) < 4096


def test_same_prompt_is_bit_identical_across_calls_and_batches(enc: HashTextEncoder) -> None:
    alone = enc.encode(["a red fox jumps"])
    batched = enc.encode(["something longer first, with more words", "a red fox jumps"])
    assert torch.equal(alone[0], batched[1])
    again = HashTextEncoder(DIM, LEN, seed=SEED).encode(["a red fox jumps"])
    assert torch.equal(alone, again)


def test_different_prompts_and_seeds_differ(enc: HashTextEncoder) -> None:
    a, b = enc.encode(["a red fox", "a blue fox"])
    assert (a - b).abs().max() > 0.1
    other_seed = HashTextEncoder(DIM, LEN, seed=SEED + 1).encode(["a red fox"])[0]
    assert (a - other_seed).abs().max() > 0.1
    # case and spacing are normalized away
    assert torch.equal(enc.encode(["A  Red FOX"])[0], a)


def test_zero_padding_and_truncation(enc: HashTextEncoder) -> None:
    out = enc.encode(["a cat", ""])
    n = len(enc.token_ids("a cat"))
    assert n == 3 and enc.token_ids("a cat")[-1] == EOS_ID
    assert (out[0, :n].abs().sum(-1) > 0).all()
    assert torch.count_nonzero(out[0, n:]) == 0
    assert (out[1, 0].abs().sum() > 0) and torch.count_nonzero(out[1, 1:]) == 0
    long_prompt = " ".join(f"w{i}" for i in range(40))
    ids = enc.token_ids(long_prompt)
    assert len(ids) == LEN and ids[-1] == EOS_ID
    assert (enc.encode([long_prompt])[0].abs().sum(-1) > 0).all()


def test_stable_across_processes_with_different_hash_seeds(enc: HashTextEncoder) -> None:
    """Python's hash() is salted per process; ids and embeddings must not depend on it."""
    prompt = "a cat, walking on the beach at sunset"
    code = (
        "import hashlib, torch; torch.set_num_threads(1);"
        "from streamdit.model.text import HashTextEncoder;"
        f"e = HashTextEncoder({DIM}, {LEN}, seed={SEED});"
        f"t = e.encode([{prompt!r}]).contiguous();"
        "print(e.token_ids(" + repr(prompt) + "));"
        "print(hashlib.sha256(t.numpy().tobytes()).hexdigest())"
    )
    src = str(Path(streamdit.__file__).resolve().parents[1])
    outputs = []
    # Two fresh processes with different hash salts: comparing against this process instead
    # would also compare whatever thread-pool state earlier tests left behind.
    for salt in ("1", "12345"):
        env = {**os.environ, "PYTHONHASHSEED": salt, "PYTHONPATH": src}
        proc = subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60
        )
        assert proc.returncode == 0, proc.stderr
        outputs.append(proc.stdout.strip().splitlines())
    assert outputs[0] == outputs[1]
    assert outputs[0][0] == str(enc.token_ids(prompt))


def test_bfloat16_is_finite() -> None:
    out = HashTextEncoder(DIM, LEN, seed=SEED, dtype=torch.bfloat16).encode(["a cat"])
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    assert out.float().std() > 0.1


def test_blend(enc: HashTextEncoder) -> None:
    a, b = enc.encode(["a red fox", "a city at night"])
    assert torch.equal(blend(a, b, 0.0), a)
    assert torch.equal(blend(a, b, 1.0), b)
    torch.testing.assert_close(blend(a, b, 0.25), 0.75 * a + 0.25 * b)
    with pytest.raises(ConfigError, match="alpha"):
        blend(a, b, 1.5)
    with pytest.raises(ConfigError, match="shapes"):
        blend(a, b[:4], 0.5)


def test_rejects_bad_arguments(enc: HashTextEncoder) -> None:
    with pytest.raises(ConfigError, match="prompts"):
        enc.encode("a cat")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="text"):
        HashTextEncoder(0, LEN, seed=0)


def test_pad_text_pads_rows_with_exact_zeros() -> None:
    x = torch.randn(3, DIM)
    out = pad_text(x, LEN)
    assert out.shape == (LEN, DIM) and out.dtype == x.dtype
    assert torch.equal(out[:3], x) and torch.count_nonzero(out[3:]) == 0
    batched = pad_text(torch.randn(2, 5, DIM, dtype=torch.bfloat16), LEN)
    assert batched.shape == (2, LEN, DIM) and batched.dtype == torch.bfloat16
    assert torch.count_nonzero(batched[:, 5:]) == 0
    # already text_len rows: equal values, but a new tensor (never a view of the input)
    full = torch.randn(LEN, DIM)
    same = pad_text(full, LEN)
    assert torch.equal(same, full) and same.data_ptr() != full.data_ptr()


def test_pad_text_rejects_too_long_and_bad_shapes() -> None:
    with pytest.raises(ConfigError, match=r"17 rows is more than text_len=16.*\[field=text_embeddings\]"):
        pad_text(torch.randn(LEN + 1, DIM), LEN)
    with pytest.raises(ConfigError, match=r"\[field=embeds\.3\]"):
        pad_text(torch.randn(1, LEN + 1, DIM), LEN, field="embeds.3")
    with pytest.raises(ConfigError, match=r"need \[L, D\] or \[B, L, D\].*\[field=text_embeddings\]"):
        pad_text(torch.randn(DIM), LEN)
    with pytest.raises(ConfigError, match="text_len must be > 0"):
        pad_text(torch.randn(2, DIM), 0)


def test_hash_encoder_output_is_already_padded(enc: HashTextEncoder) -> None:
    out = enc.encode(["a cat", "a dog on the beach"])
    assert torch.equal(pad_text(out, LEN), out)
