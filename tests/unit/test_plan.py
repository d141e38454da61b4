"""The phase plan: the call count of every cache policy, the one rulebook, the observed calls.

`GeneratorInputs.check` runs the protocol's `check_generator_plan` (the rules the receiver also
runs from the meta), so these tests exercise the rulebook through the runtime's own object.
"""

from __future__ import annotations

import pytest
import torch

from streamdit.errors import PlanError
from streamdit.protocol.errors import EnvelopeError
from streamdit.protocol.header import Ids
from streamdit.protocol.policy import CachePolicy
from streamdit.runtime.plan import GeneratorInputs, PhasePlan, mix_seed, seeded_normal

IDS = Ids(call_id=7, chunk_index=3, cache_epoch=1)
P = CachePolicy


@pytest.mark.parametrize(
    ("policy", "init", "steps", "calls", "recompute"),
    [
        (P.OFF, False, 4, 4, False),
        (P.RANK0_ANCHOR, False, 4, 5, True),
        (P.RANK0_ANCHOR, True, 4, 4, False),  # an epoch's first chunk never recomputes
        (P.LATENT_ANCHOR, False, 1, 2, True),
        (P.APPEND, False, 4, 5, False),  # the clean write after the chunk
        (P.APPEND, True, 5, 6, False),  # ... also on the first chunk
    ],
)
def test_build_follows_the_policy(policy: P, init: bool, steps: int, calls: int, recompute: bool) -> None:
    plan = PhasePlan.build(cache_policy=policy, init=init, num_denoise_steps=steps)
    assert (plan.expected_generator_calls, plan.do_kv_recompute) == (calls, recompute)
    ctx = torch.zeros(1, 3, 16, 4, 6) if recompute and policy.ships_context else None
    _inputs(
        cache_policy=policy.value,
        init_cache=init,
        do_kv_recompute=recompute,
        num_denoise_steps=steps,
        expected_generator_calls=calls,
        denoising_step_list=torch.tensor([1000, 750, 500, 250, 0][:steps]),
        context_frames_override=ctx,
    ).check(IDS)


@pytest.mark.parametrize("delta", [-1, 1])
def test_expected_calls_off_by_one_is_rejected_with_ids(delta: int) -> None:
    with pytest.raises(PlanError) as err:
        _inputs(expected_generator_calls=3 + delta).check(IDS)
    msg = str(err.value)
    assert "expected_generator_calls" in msg and "call_id=7" in msg and "chunk_index=3" in msg
    assert "cache_epoch=1" in msg


def test_steps_must_match_step_list() -> None:
    with pytest.raises(PlanError, match="num_denoise_steps=3 != len"):
        _inputs(num_denoise_steps=3, expected_generator_calls=4).check(IDS)


def test_observed_calls_must_match() -> None:
    plan = PhasePlan.build(cache_policy=P.RANK0_ANCHOR, init=False, num_denoise_steps=4)
    plan.assert_observed(5, IDS)
    with pytest.raises(PlanError, match="made 6 generator calls"):
        plan.assert_observed(6, IDS)


def _inputs(**over: object) -> GeneratorInputs:
    base: dict = dict(
        cache_policy="rank0_anchor",
        height=32,
        width=48,
        current_start_frame=3,
        init_cache=False,
        reset_kv_cache=False,
        reset_crossattn_cache=False,
        conditioning_updated=False,
        kv_cache_attention_bias=1.0,
        do_kv_recompute=True,
        num_denoise_steps=2,
        expected_generator_calls=3,
        base_seed=1,
        denoising_step_list=torch.tensor([1000, 500]),
        latents=torch.zeros(1, 3, 16, 4, 6),
        conditioning_embeds=torch.zeros(1, 8, 16),
        context_frames_override=torch.zeros(1, 3, 16, 4, 6),
    )
    base.update(over)
    return GeneratorInputs(**base)


def test_context_required_iff_recompute() -> None:
    _inputs().check(IDS)
    with pytest.raises(PlanError, match=r"required when do_kv_recompute.*field=context_frames_override"):
        _inputs(context_frames_override=None).check(IDS)
    with pytest.raises(PlanError, match=r"forbidden without do_kv_recompute.*field=context_frames_override"):
        _inputs(do_kv_recompute=False, expected_generator_calls=2).check(IDS)


def test_latent_anchor_forbids_a_shipped_context() -> None:
    """recompute r0: the generator builds the anchor, so the envelope never carries one."""
    _inputs(cache_policy="latent_anchor", context_frames_override=None).check(IDS)
    with pytest.raises(PlanError, match="forbidden under cache_policy=latent_anchor"):
        _inputs(cache_policy="latent_anchor").check(IDS)


@pytest.mark.parametrize("policy", ["off", "append"])
def test_policies_without_recompute_refuse_one(policy: str) -> None:
    with pytest.raises(PlanError, match=f"do_kv_recompute under cache_policy={policy}"):
        _inputs(cache_policy=policy, context_frames_override=None).check(IDS)


def test_recompute_on_a_cache_init_is_refused() -> None:
    with pytest.raises(PlanError, match="inits the cache"):
        _inputs(init_cache=True).check(IDS)


def test_unknown_policy_names_the_field() -> None:
    with pytest.raises(EnvelopeError, match=r"unknown cache_policy 'r0'.*field=cache_policy"):
        _inputs(cache_policy="r0").check(IDS)


def test_seeds_are_stable_and_distinct() -> None:
    assert mix_seed(1, 2, 3) == mix_seed(1, 2, 3)
    assert len({mix_seed(0, e, k) for e in range(4) for k in range(50)}) == 200
    a = seeded_normal(5, (4, 4), device=torch.device("cpu"), dtype=torch.float32)
    b = seeded_normal(5, (4, 4), device=torch.device("cpu"), dtype=torch.float32)
    assert torch.equal(a, b) and not torch.equal(a, seeded_normal(6, (4, 4), device=a.device, dtype=a.dtype))
