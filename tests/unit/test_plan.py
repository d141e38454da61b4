"""The phase plan: formula, consistency checks, and the observed-call assertion."""

from __future__ import annotations

import pytest
import torch

from streamdit.errors import PlanError
from streamdit.runtime.plan import ChunkIds, GeneratorInputs, PhasePlan, mix_seed, seeded_normal

IDS = ChunkIds(call_id=7, chunk_index=3, cache_epoch=1)


@pytest.mark.parametrize(("recompute", "steps", "calls"), [(False, 4, 4), (True, 4, 5), (True, 1, 2)])
def test_build_follows_the_formula(recompute: bool, steps: int, calls: int) -> None:
    plan = PhasePlan.build(do_kv_recompute=recompute, num_denoise_steps=steps)
    assert plan.expected_generator_calls == calls
    plan.check(steps, IDS)


@pytest.mark.parametrize("delta", [-1, 1])
def test_expected_calls_off_by_one_is_rejected_with_ids(delta: int) -> None:
    plan = PhasePlan(do_kv_recompute=True, num_denoise_steps=4, expected_generator_calls=5 + delta)
    with pytest.raises(PlanError) as err:
        plan.check(4, IDS)
    msg = str(err.value)
    assert "expected_generator_calls" in msg and "call_id=7" in msg and "chunk_index=3" in msg
    assert "cache_epoch=1" in msg


def test_steps_must_match_step_list() -> None:
    plan = PhasePlan.build(do_kv_recompute=False, num_denoise_steps=3)
    with pytest.raises(PlanError, match="num_denoise_steps=3 != len"):
        plan.check(4, IDS)


def test_observed_calls_must_match() -> None:
    plan = PhasePlan.build(do_kv_recompute=True, num_denoise_steps=4)
    plan.assert_observed(5, IDS)
    with pytest.raises(PlanError, match="made 6 generator calls"):
        plan.assert_observed(6, IDS)


def _inputs(**over: object) -> GeneratorInputs:
    base: dict = dict(
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
    with pytest.raises(PlanError, match="context_frames_override required"):
        _inputs(context_frames_override=None).check(IDS)
    with pytest.raises(PlanError, match="context_frames_override forbidden"):
        _inputs(do_kv_recompute=False, expected_generator_calls=2).check(IDS)


def test_seeds_are_stable_and_distinct() -> None:
    assert mix_seed(1, 2, 3) == mix_seed(1, 2, 3)
    assert len({mix_seed(0, e, k) for e in range(4) for k in range(50)}) == 200
    a = seeded_normal(5, (4, 4), device=torch.device("cpu"), dtype=torch.float32)
    b = seeded_normal(5, (4, 4), device=torch.device("cpu"), dtype=torch.float32)
    assert torch.equal(a, b) and not torch.equal(a, seeded_normal(6, (4, 4), device=a.device, dtype=a.dtype))


def test_latent_anchor_forbids_a_shipped_context() -> None:
    """recompute r0: the generator builds the anchor, so the envelope never carries one."""
    _inputs(context_frames_override=None).check(IDS, latent_anchor=True)
    with pytest.raises(PlanError, match="forbidden under recompute r0"):
        _inputs().check(IDS, latent_anchor=True)
