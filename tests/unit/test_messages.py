"""Message rules of docs/protocol.md §4 and sender preflight (OM-01, OM-02, OM-03, OM-10).

Every rejection asserts the type, the field named, and the ids in the text: one log line must be
enough to find the failing chunk on every rank.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from factories import control, pp_infer, pp_result, tp_infer
from streamdit.errors import PlanError, ProtocolError
from streamdit.protocol.codec import Limits, TensorSpec
from streamdit.protocol.errors import (
    CodecError,
    DtypeError,
    EnvelopeError,
    HeaderError,
    LimitError,
    MonotonicityError,
    PlanMismatchError,
)
from streamdit.protocol.header import IdTracker
from streamdit.protocol.messages import (
    MESSAGE_TYPES,
    PAYLOAD_SCALARS,
    PAYLOAD_TENSORS,
    Action,
    PPEnvelopeV1,
    PPResultV1,
    TPEnvelopeV1,
)
from streamdit.protocol.preflight import prepare

CPU = torch.device("cpu")
IDS_TEXT = ("call_id=5", "chunk_index=2", "cache_epoch=1")


def rejects(msg: object, error: type, field: str) -> ProtocolError:
    with pytest.raises(error) as info:
        msg.validate(group="world")  # type: ignore[attr-defined]
    assert info.value.field == field, str(info.value)
    for text in (*IDS_TEXT, "group=world"):
        assert text in str(info.value), str(info.value)
    return info.value


@pytest.mark.parametrize(
    "msg",
    [
        tp_infer(),
        tp_infer(recompute=False),
        pp_infer(mode="rank0_anchor"),
        pp_infer(mode="rank0_anchor", recompute=False),
        pp_infer(mode="off"),
        pp_infer(mode="latent_anchor"),
        pp_infer(mode="latent_anchor", recompute=False),
        pp_result(),
        *(control(cls, a, 9) for cls in MESSAGE_TYPES.values() for a in (Action.NOOP, Action.SHUTDOWN)),
        *(control(cls, Action.ERROR, 9, reason="leader rejected") for cls in MESSAGE_TYPES.values()),
    ],
    ids=lambda m: f"{type(m).__name__}-{m.action.name}",
)
def test_valid_messages_pass(msg: object) -> None:
    msg.validate()  # type: ignore[attr-defined]


@pytest.mark.parametrize("name", [n for n in TPEnvelopeV1.REQUIRED])
def test_tp_every_required_field(name: str) -> None:
    rejects(tp_infer(**{name: None}), EnvelopeError, name)


@pytest.mark.parametrize("name", [n for n in PPEnvelopeV1.REQUIRED])
def test_pp_every_required_field(name: str) -> None:
    rejects(pp_infer(**{name: None}), EnvelopeError, name)


@pytest.mark.parametrize("name", [n for n in PPResultV1.REQUIRED])
def test_result_every_required_field(name: str) -> None:
    rejects(pp_result(**{name: None}), EnvelopeError, name)


@pytest.mark.parametrize("make", [tp_infer, pp_infer], ids=["tp", "pp"])
@pytest.mark.parametrize("delta", [-1, +1])
def test_om03_expected_generator_calls_off_by_one(make, delta: int) -> None:
    err = rejects(make(expected_generator_calls=5 + delta), PlanMismatchError, "expected_generator_calls")
    assert isinstance(err, PlanError) and isinstance(err, ProtocolError)


@pytest.mark.parametrize("steps", [3, 5])
def test_om03_num_denoise_steps_vs_step_list(steps: int) -> None:
    rejects(
        tp_infer(num_denoise_steps=steps, expected_generator_calls=steps + 1),
        PlanMismatchError,
        "num_denoise_steps",
    )


def test_om10_recompute_without_context_and_stale_context() -> None:
    rejects(tp_infer(context_frames_override=None), PlanMismatchError, "context_frames_override")
    stale = tp_infer(recompute=False, context_frames_override=torch.zeros(1, 3, 16, 4, 6))
    rejects(stale, PlanMismatchError, "context_frames_override")


def test_forbidden_video_on_the_worker_plan() -> None:
    rejects(tp_infer(video=torch.zeros(1, 3, 32, 48)), EnvelopeError, "video")
    rejects(pp_infer(video=torch.zeros(1)), EnvelopeError, "video")


def test_pp_recompute_modes() -> None:
    rejects(pp_infer(mode="r0"), EnvelopeError, "cache_policy")
    rejects(pp_infer(mode="off", recompute=True), PlanMismatchError, "do_kv_recompute")
    rejects(
        pp_infer(mode="rank0_anchor", context_frames_override=None),
        PlanMismatchError,
        "context_frames_override",
    )
    anchored = pp_infer(mode="latent_anchor", context_frames_override=torch.zeros(1, 3, 16, 4, 6))
    rejects(anchored, PlanMismatchError, "context_frames_override")


@pytest.mark.parametrize(
    ("over", "field"),
    [
        ({"tp_plan": "full"}, "tp_plan"),
        ({"tp_envelope_version": 1}, "tp_envelope_version"),  # the pre-cache_policy envelope
        ({"height": 40}, "height"),
        ({"width": 0}, "width"),
        ({"current_start_frame": -3}, "current_start_frame"),
        ({"latents": torch.zeros(1, 3, 16, 4, 7)}, "latents"),  # W/8 mismatch
        ({"latents": torch.zeros(1, 3, 8, 4, 6)}, "latents"),  # channels
        ({"latents": torch.zeros(3, 16, 4, 6)}, "latents"),
        ({"latents": torch.zeros(1, 3, 16, 4, 6, dtype=torch.int64)}, "latents"),
        ({"conditioning_embeds": torch.zeros(2, 8, 32)}, "conditioning_embeds"),
        ({"context_frames_override": torch.zeros(1, 3, 16, 5, 6)}, "context_frames_override"),
        ({"denoising_step_list": torch.tensor([1.0, 2.0, 3.0, 4.0])}, "denoising_step_list"),
        ({"denoising_step_list": torch.zeros(2, 2, dtype=torch.int64)}, "denoising_step_list"),
        ({"latents": [torch.zeros(1)]}, "latents"),  # non-top-level tensor
        ({"height": torch.tensor(32)}, "height"),  # nested tensor in a scalar field
    ],
)
def test_tp_rules(over: dict, field: str) -> None:
    rejects(tp_infer(**over), EnvelopeError, field)


@pytest.mark.parametrize(
    ("over", "field"),
    [
        ({"pp_result_version": 0}, "pp_result_version"),
        ({"stage1_ms": -1.0}, "stage1_ms"),
        ({"observed_generator_calls": -1}, "observed_generator_calls"),
        ({"latents_out": torch.zeros(1, 3, 4, 4, 6)}, "latents_out"),
    ],
)
def test_result_rules(over: dict, field: str) -> None:
    rejects(pp_result(**over), EnvelopeError, field)


def test_control_messages_carry_no_payload_and_no_chunk() -> None:
    noop = control(TPEnvelopeV1, Action.NOOP, 9)
    with pytest.raises(EnvelopeError) as info:
        dataclasses.replace(noop, height=32).validate()
    assert info.value.field == "height"
    with pytest.raises(EnvelopeError, match="only carried by ERROR"):
        dataclasses.replace(noop, reason="x").validate()
    with pytest.raises(EnvelopeError, match="only carried by ERROR"):
        tp_infer(reason="why").validate()
    with pytest.raises(HeaderError) as info:
        dataclasses.replace(noop, chunk_index=4).validate()
    assert info.value.field == "chunk_index"
    with pytest.raises(HeaderError):
        tp_infer(chunk_index=-1).validate()


def test_payload_matches_runtime_generator_inputs() -> None:
    from streamdit.runtime.plan import GENERATOR_INPUT_FIELDS

    assert (*PAYLOAD_SCALARS, *PAYLOAD_TENSORS) == GENERATOR_INPUT_FIELDS
    assert tuple(tp_infer().payload()) == GENERATOR_INPUT_FIELDS


# ---- preflight: steps 1-5 in order, nothing sent ------------------------------------------------


@pytest.mark.parametrize(
    ("over", "field"),
    [
        ({"base_seed": 2**64}, "base_seed"),
        ({"kv_cache_attention_bias": float("nan")}, "kv_cache_attention_bias"),
        ({"tp_plan": object()}, "tp_plan"),
        ({"init_cache": 1}, "init_cache"),
    ],
)
def test_om01_unencodable_meta_fails_in_preflight(over: dict, field: str) -> None:
    with pytest.raises(CodecError) as info:
        prepare(tp_infer(**over), Limits(), CPU, group="world")
    assert info.value.field == field and all(t in str(info.value) for t in IDS_TEXT)


def test_om01_fails_at_encode_even_without_step1() -> None:
    with pytest.raises(CodecError) as info:
        prepare(tp_infer(base_seed=2**64), Limits(), CPU, skip_validation=True)
    assert info.value.field == "base_seed"


@pytest.mark.parametrize("dtype", [torch.float64, torch.bool, torch.complex64, torch.int8])
def test_om02_dtype_outside_allowlist(dtype: torch.dtype) -> None:
    # skip_validation: even when the rules would let it through, step 4 refuses the dtype
    msg = tp_infer(conditioning_embeds=torch.zeros(1, 8, 32, dtype=dtype))
    with pytest.raises(DtypeError) as info:
        prepare(msg, Limits(), CPU, skip_validation=True)
    assert info.value.field == "conditioning_embeds" and "call_id=5" in str(info.value)


def test_om03_om10_refused_in_preflight() -> None:
    with pytest.raises(PlanMismatchError):
        prepare(tp_infer(expected_generator_calls=6), Limits(), CPU)
    with pytest.raises(PlanMismatchError):
        prepare(tp_infer(context_frames_override=None), Limits(), CPU)


def test_preflight_limits_and_layout() -> None:
    with pytest.raises(LimitError) as info:
        prepare(tp_infer(), Limits(max_tensor_bytes=1000), CPU)
    assert info.value.field == "conditioning_embeds"
    prep = prepare(tp_infer(), Limits(), CPU)
    assert [s.name for s in prep.specs] == sorted(PAYLOAD_TENSORS)
    assert prep.header.n_tensors == 4 and prep.header.meta_nbytes == len(prep.meta)
    assert all(t.is_contiguous() for t in prep.tensors)
    assert prep.specs[0] == TensorSpec.of("conditioning_embeds", tp_infer().conditioning_embeds)
    assert prepare(control(TPEnvelopeV1, Action.NOOP, 1), Limits(), CPU).meta == b""


def test_preflight_non_contiguous_tensor_is_materialized() -> None:
    lat = torch.zeros(1, 3, 16, 6, 4).transpose(3, 4)
    prep = prepare(tp_infer(latents=lat), Limits(), CPU)
    assert prep.tensors[-1].is_contiguous()


def test_preflight_monotonicity() -> None:
    tracker = IdTracker()
    first = tp_infer(call_id=5, chunk_index=2)
    prepare(first, Limits(), CPU, tracker=tracker)
    tracker.advance(first.action, first.ids)  # the channel advances at the commitment point
    for msg, field in (
        (tp_infer(call_id=5, chunk_index=3), "call_id"),
        (tp_infer(call_id=6, chunk_index=2), "chunk_index"),
        (tp_infer(call_id=6, chunk_index=3, cache_epoch=0), "cache_epoch"),
    ):
        with pytest.raises(MonotonicityError) as info:
            prepare(msg, Limits(), CPU, tracker=tracker)
        assert info.value.field == field
    prepare(tp_infer(call_id=6, chunk_index=3), Limits(), CPU, tracker=tracker)


def test_preflight_refuses_non_messages() -> None:
    with pytest.raises(EnvelopeError):
        prepare("not a message", Limits(), CPU)  # type: ignore[arg-type]
