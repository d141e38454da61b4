"""parallel/ pieces that need no second process: the group check (OM-08), the plan table,
digests and the parity diff table. The multi-rank behaviour is in tests/dist/test_tp.py."""

from __future__ import annotations

import pytest
import torch

from streamdit.errors import GroupError
from streamdit.parallel.collectives import all_gather_bytes, all_gather_int64, all_reduce_sum
from streamdit.parallel.groups import GroupHandle
from streamdit.parallel.parity import diff_table, tensor_digest
from streamdit.parallel.tp import style_of


class ExplodingGroup:
    """Stands in for a process group; any use by a backend call fails the test."""

    def __getattr__(self, name: str) -> object:
        raise AssertionError(f"the backend was reached ({name}) before the group check")


WORLD = GroupHandle(ExplodingGroup(), "world", 0, 2, torch.device("cpu"))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "call",
    [
        lambda: all_reduce_sum(torch.ones(2), WORLD, allowed="tp"),
        lambda: all_gather_int64([1], WORLD, allowed="tp"),
        lambda: all_gather_bytes(b"x", WORLD, allowed="tp"),
    ],
    ids=["all_reduce", "all_gather_int64", "all_gather_bytes"],
)
def test_om08_wrong_group_raises_before_the_backend(call) -> None:
    with pytest.raises(GroupError, match=r"group 'world'.*only use 'tp'"):
        call()


def test_plan_table_styles() -> None:
    assert style_of("blocks.3.self_attn.q") == "colwise"
    assert style_of("blocks.0.cross_attn.v") == "colwise"
    assert style_of("blocks.0.self_attn.norm_k") == "norm"
    assert style_of("blocks.12.ffn.2") == "rowwise"
    assert style_of("blocks.1.cross_attn.o") == "rowwise"
    for replicated in (
        "blocks.0.norm3",
        "blocks.0.modulation",
        "head.head",
        "patch_embedding",
        "text_embedding.0",
    ):
        assert style_of(replicated) is None, replicated


def test_tensor_digest_sees_bytes_dtype_and_shape() -> None:
    x = torch.arange(12, dtype=torch.float32)
    assert tensor_digest(x) == tensor_digest(x.clone())
    assert tensor_digest(x) != tensor_digest(x.reshape(3, 4))
    assert tensor_digest(x) != tensor_digest(x.to(torch.float64))
    y = x.clone()
    y[5] += 1e-6
    assert tensor_digest(x) != tensor_digest(y)


def test_diff_table_lists_only_given_keys_with_every_rank() -> None:
    table = diff_table(["steps"], [{"steps": "4", "preset": "tiny"}, {"preset": "tiny"}])
    lines = table.splitlines()
    assert lines[0].split(" | ")[0].strip() == "key" and "rank1" in lines[0]
    assert "4" in lines[1] and "<missing>" in lines[1] and "preset" not in table
