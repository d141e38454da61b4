"""Precomputed text embeddings: file format round trip, single-embedding files, every error path."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from streamdit.errors import ConfigError
from streamdit.model.text import TextEncoder
from streamdit.model.text_embeddings import PrecomputedTextEncoder, save_text_embeddings

DIM, LEN = 8, 6


def _embeds(rows: int, seed: int) -> torch.Tensor:
    return torch.randn(rows, DIM, generator=torch.Generator().manual_seed(seed))


def _load(path: Path, **kwargs: object) -> PrecomputedTextEncoder:
    return PrecomputedTextEncoder.load(path, **{"text_len": LEN, "text_dim": DIM, **kwargs})  # type: ignore[arg-type]


def test_round_trip_pads_and_looks_up_by_prompt(tmp_path: Path) -> None:
    a, b = _embeds(3, 0), _embeds(LEN, 1)
    path = tmp_path / "e.safetensors"
    save_text_embeddings(path, {"a red fox": a, "a city at night": b[None]})  # [L, D] and [1, L, D]
    enc = _load(path)
    assert isinstance(enc, TextEncoder) and not enc.is_single
    assert enc.text_len == LEN and enc.text_dim == DIM
    assert enc.known_prompts() == ("a red fox", "a city at night")
    out = enc.encode(["a city at night", "a red fox", "a red fox"])
    assert out.shape == (3, LEN, DIM) and out.dtype == torch.float32
    assert torch.equal(out[0], b) and torch.equal(out[1, :3], a) and torch.equal(out[2], out[1])
    assert torch.count_nonzero(out[1, 3:]) == 0
    # whitespace differences still match; results are fresh tensors, not the stored ones
    assert torch.equal(enc.encode(["  a   red\tfox "])[0], out[1])
    out[1].fill_(7.0)
    assert torch.equal(enc.encode(["a red fox"])[0, :3], a)
    enc.check_prompts(["a red fox", "a city at night"])
    assert enc.encode([]).shape == (0, LEN, DIM)


def test_dtype_device_and_bf16_files(tmp_path: Path) -> None:
    path = tmp_path / "e.safetensors"
    save_text_embeddings(path, {"p": _embeds(2, 0).to(torch.bfloat16)})
    out = _load(path, dtype=torch.float32, device="cpu").encode(["p"])
    assert out.dtype == torch.float32
    assert torch.equal(out[0, :2], _embeds(2, 0).to(torch.bfloat16).float())
    assert _load(path, dtype=torch.bfloat16).encode(["p"]).dtype == torch.bfloat16


def test_single_embedding_file_serves_every_prompt(tmp_path: Path) -> None:
    e = _embeds(4, 2)
    written = tmp_path / "written.safetensors"
    save_text_embeddings(written, e)
    foreign = tmp_path / "foreign.safetensors"
    save_file({"prompt_embeds": e[None].contiguous()}, str(foreign))  # any name, no metadata
    for path in (written, foreign):
        enc = _load(path)
        assert enc.is_single and enc.known_prompts() == ()
        out = enc.encode(["anything", "something else"])
        assert torch.equal(out[0, :4], e) and torch.equal(out[1], out[0])
        assert torch.count_nonzero(out[:, 4:]) == 0
        enc.check_prompts(["whatever"])


def test_unknown_prompt_names_it_and_lists_known_ones(tmp_path: Path) -> None:
    path = tmp_path / "e.safetensors"
    save_text_embeddings(path, {f"prompt {i}": _embeds(2, i) for i in range(8)})
    enc = _load(path)
    with pytest.raises(ConfigError, match=r"'a blue fox'.*'prompt 0', 'prompt 1'.*\(8 in all\)") as info:
        enc.encode(["prompt 0", "a blue fox"])
    assert "prompt 7" not in str(info.value) and "[field=prompt]" in str(info.value)
    with pytest.raises(ConfigError, match="'nope'"):
        enc.check_prompts(["prompt 3", "nope"])


def test_wrong_width_and_too_long_name_the_key(tmp_path: Path) -> None:
    path = tmp_path / "e.safetensors"
    save_text_embeddings(path, {"ok": _embeds(2, 0), "bad": _embeds(LEN + 1, 1)})
    with pytest.raises(
        ConfigError, match=r"embeds\.1: 7 rows is more than text_len=6.*\[field=text_embeddings\]"
    ):
        _load(path)
    save_text_embeddings(path, {"ok": _embeds(2, 0)})
    with pytest.raises(ConfigError, match=r"embeds\.0: width D=8 != text_dim=16"):
        _load(path, text_dim=16)


def test_bad_files_and_metadata(tmp_path: Path) -> None:
    e = _embeds(2, 0)
    path = tmp_path / "e.safetensors"

    def write(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None) -> None:
        save_file({k: v.clone() for k, v in tensors.items()}, str(path), metadata=metadata)

    cases: list[tuple[dict[str, torch.Tensor], dict[str, str] | None, str]] = [
        ({"embeds.0": e, "embeds.1": e}, None, "2 tensors but no 'prompts' metadata"),
        ({"embeds.0": e}, {"prompts": "[not json"}, "is not JSON"),
        ({"embeds.0": e}, {"prompts": json.dumps({"a": 0})}, "JSON list of strings"),
        ({"embeds.0": e}, {"prompts": json.dumps([1])}, "JSON list of strings"),
        ({"embeds.0": e}, {"prompts": "[]"}, "lists no prompts"),
        ({"embeds.0": e}, {"prompts": json.dumps(["a", "b"])}, r"missing \['embeds.1'\]"),
        ({"embeds.0": e, "x": e}, {"prompts": json.dumps(["a"])}, r"unexpected \['x'\]"),
        ({"embeds.0": e, "embeds.1": e}, {"prompts": json.dumps(["a b", "a  b"])}, "appears twice"),
        ({"embeds.0": torch.zeros(2, DIM, dtype=torch.int32)}, None, "floating point"),
        ({"embeds.0": torch.randn(2, 2, DIM)}, None, r"need \[L, D\] or \[1, L, D\]"),
        ({"embeds.0": torch.full((2, DIM), float("nan"))}, None, "non-finite"),
        ({"embeds.0": torch.zeros(0, DIM)}, None, "empty embedding"),
    ]
    for tensors, metadata, match in cases:
        write(tensors, metadata)
        with pytest.raises(ConfigError, match=match) as info:
            _load(path)
        assert "[field=text_embeddings]" in str(info.value) and str(path) in str(info.value)

    path.write_bytes(b"not a safetensors file at all")
    with pytest.raises(ConfigError, match="not a readable .safetensors file"):
        _load(path)
    with pytest.raises(ConfigError, match="file does not exist"):
        _load(tmp_path / "missing.safetensors")
    with pytest.raises(ConfigError, match="not a file"):
        _load(tmp_path)


def test_save_rejects_bad_input(tmp_path: Path) -> None:
    path = tmp_path / "e.safetensors"
    with pytest.raises(ConfigError, match="no embeddings"):
        save_text_embeddings(path, {})
    with pytest.raises(ConfigError, match="different widths"):
        save_text_embeddings(path, {"a": torch.randn(2, 4), "b": torch.randn(2, 5)})
    with pytest.raises(ConfigError, match="differ only in whitespace"):
        save_text_embeddings(path, {"a b": torch.randn(2, 4), " a b": torch.randn(2, 4)})
    assert not path.exists()


def test_prompts_argument_must_be_a_list(tmp_path: Path) -> None:
    path = tmp_path / "e.safetensors"
    save_text_embeddings(path, {"p": _embeds(2, 0)})
    with pytest.raises(ConfigError, match="prompts"):
        _load(path).encode("p")  # type: ignore[arg-type]
