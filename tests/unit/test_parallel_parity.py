"""tensor_digest (stable, sensitive to bytes, dtype and shape), the parity diff table, and the
replicated / sharded fingerprint split of a TP-sharded model (computed locally per rank)."""

from __future__ import annotations

import pytest
import torch

from streamdit.model.dit import CausalWanDiT
from streamdit.model.presets import get_dit_config
from streamdit.parallel import parity
from streamdit.parallel.groups import GroupHandle
from streamdit.parallel.parity import MISSING, diff_table, fingerprints, param_checksum, tensor_digest
from streamdit.parallel.tp import apply_tp

CPU = torch.device("cpu")


def test_tensor_digest_is_stable_and_63_bit() -> None:
    t = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    d = tensor_digest(t)
    assert d == tensor_digest(t.clone()) == tensor_digest(t.t().contiguous().t())  # same values, layout-free
    assert 0 <= d < 2**63  # fits a signed int64 for all_gather_int64
    # Pinned: the digest must not change between runs or processes (no salted hash).
    assert d == tensor_digest(torch.arange(12, dtype=torch.float32).reshape(3, 4))


def test_tensor_digest_sees_bytes_dtype_and_shape() -> None:
    t = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    bumped = t.clone()
    bumped[2, 3] = torch.nextafter(bumped[2, 3], torch.tensor(100.0))  # one ulp
    digests = {
        tensor_digest(t),
        tensor_digest(bumped),
        tensor_digest(t.reshape(4, 3)),  # same bytes, other shape
        tensor_digest(t.view(torch.int32)),  # same bytes, other dtype
        tensor_digest(t.to(torch.bfloat16)),
        tensor_digest(torch.tensor(-0.0)),
        tensor_digest(torch.tensor(0.0)),
    }
    assert len(digests) == 7
    assert tensor_digest(t.t()) != tensor_digest(t)  # a transpose is other values in row order
    assert tensor_digest(torch.zeros(0)) == tensor_digest(torch.zeros(0))
    assert tensor_digest(torch.ones(3, requires_grad=True)) == tensor_digest(torch.ones(3))


def test_diff_table_lists_keys_and_every_rank() -> None:
    every = [{"preset": "tiny", "steps": "4"}, {"preset": "wan-14b", "steps": "4", "STREAMDIT_TEST_X": "1"}]
    table = diff_table(["STREAMDIT_TEST_X", "preset"], every)
    lines = table.splitlines()
    assert lines[0].split(" | ")[0].strip() == "key" and "rank1" in lines[0]
    assert [c.strip() for c in lines[1].split(" | ")] == ["STREAMDIT_TEST_X", MISSING, "1"]
    assert [c.strip() for c in lines[2].split(" | ")] == ["preset", "tiny", "wan-14b"]


def _sharded(rank: int, size: int) -> CausalWanDiT:
    model = CausalWanDiT(get_dit_config("tiny"), CPU, torch.float32, "math")
    model.init_weights(0)
    handle = GroupHandle(pg=None, name="tp", rank=rank, size=size, device=CPU)  # type: ignore[arg-type]
    apply_tp(model, handle)
    return model


def test_fingerprints_split_replicated_from_sharded() -> None:
    ranks = [_sharded(r, 2) for r in range(2)]
    fp = [fingerprints(m) for m in ranks]
    assert fp[0]["replicated"] == fp[1]["replicated"]  # row biases (rank0-only) are left out
    assert fp[0]["sharded"] != fp[1]["sharded"]
    with torch.no_grad():
        ranks[1].blocks[0].norm3.weight[0] += 1e-3  # a replicated parameter
    assert fingerprints(ranks[1])["replicated"] != fp[0]["replicated"]
    assert fingerprints(ranks[1])["sharded"] == fp[1]["sharded"]
    with torch.no_grad():
        ranks[1].blocks[1].self_attn.q.weight[0, 0] += 1e-3  # a shard
    assert fingerprints(ranks[1])["sharded"] != fp[1]["sharded"]


def test_param_checksum_sees_every_element_and_its_position(monkeypatch: pytest.MonkeyPatch) -> None:
    gen = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        t = torch.randn(3, 1000, generator=gen).to(dtype)
        base = param_checksum(t)
        assert base == param_checksum(t.clone())
        bumped = t.clone()
        bits = bumped.view(torch.int32 if dtype == torch.float32 else torch.int16)
        bits[2, 999] += 1  # the smallest change: one bit of one element
        assert param_checksum(bumped)[0] != base[0]
        swapped = t.clone()
        swapped[0, 0], swapped[1, 5] = t[1, 5], t[0, 0]
        assert t[0, 0] != t[1, 5] and param_checksum(swapped)[1] != base[1]
    # the sums are what the docstring says, also across checksum blocks
    big = torch.arange(70, dtype=torch.int32)
    expected = (sum(range(70)), sum(i * (i + 1) for i in range(70)))
    assert param_checksum(big) == expected
    monkeypatch.setattr(parity, "_CHECKSUM_BLOCK", 16)
    assert param_checksum(big) == expected
