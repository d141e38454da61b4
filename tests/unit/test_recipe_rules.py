"""Recipes as data: their step schedules, their defaults under flags, and the Stage 0 / Phase B
rules they switch (the whole loops are tested against reference loops in tests/dist/test_recipes.py).
"""

from __future__ import annotations

import pytest
import torch

from streamdit.cli import build_parser
from streamdit.config import RunConfig
from streamdit.errors import ConfigError, PlanError
from streamdit.flags import config_from_args
from streamdit.protocol.header import Ids
from streamdit.protocol.policy import CachePolicy
from streamdit.recipes import RECIPES, get_recipe
from streamdit.runtime.build import build_generator, validate_run
from streamdit.runtime.single import build_stage0
from streamdit.runtime.timeline import Timeline, TimelineEntry


def test_krea_schedule_is_torch_linspace_truncated() -> None:
    krea = get_recipe("krea-realtime")
    for n in range(2, 40):
        assert list(krea.step_list(n)) == torch.linspace(1000, 0, n).long().tolist()
    assert krea.step_list(5) == (1000, 750, 500, 250, 0) and krea.steps == 5
    with pytest.raises(ConfigError, match="steps"):
        krea.step_list(1)  # the last step is t = 0: one step would never denoise


def test_even_schedule_and_unknown_recipe() -> None:
    assert get_recipe("streamdit").step_list(4) == (1000, 750, 500, 250)
    assert get_recipe("self-forcing").step_list(3) == (1000, 667, 333)
    with pytest.raises(ConfigError, match=r"field=recipe"):
        get_recipe("longlive")
    with pytest.raises(ConfigError, match=r"field=recipe"):
        RunConfig(recipe="longlive")


@pytest.mark.parametrize("name", list(RECIPES))
def test_every_recipe_gives_a_valid_config_and_is_a_parity_key(name: str) -> None:
    cfg = RunConfig.for_recipe(name, height=32, width=48)
    assert cfg.recipe == name and cfg.parity_items()["recipe"] == name
    assert cfg.denoising_step_list == RECIPES[name].step_list(RECIPES[name].steps)


def test_blend_weights() -> None:
    alpha, lerp = get_recipe("streamdit"), get_recipe("krea-realtime")
    assert [alpha.blend_weight(j, 4) for j in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert [lerp.blend_weight(j, 4) for j in range(4)] == [0.0, 1 / 3, 2 / 3, 1.0]
    assert lerp.blend_weight(0, 1) == 1.0  # Krea's N = 1 never applies the prompt; we apply it


def _cfg(*argv: str) -> RunConfig:
    return config_from_args(build_parser().parse_args(["run", *argv]))


def test_flags_override_only_what_they_name() -> None:
    krea = _cfg("--recipe", "krea-realtime")
    assert (
        krea.denoising_step_list == (1000, 750, 500, 250, 0) and krea.cache_policy is CachePolicy.RANK0_ANCHOR
    )
    assert krea.blend_chunks == 4 and krea.local_attn_frames == 6
    four = _cfg("--recipe", "krea-realtime", "--steps", "4")
    assert four.denoising_step_list == (1000, 666, 333, 0)  # the recipe's schedule, not "even"
    sf = _cfg("--recipe", "self-forcing")
    assert sf.cache_policy is CachePolicy.APPEND and sf.local_attn_frames == 21
    assert _cfg("--recipe", "self-forcing", "--recompute", "r0").cache_policy is CachePolicy.LATENT_ANCHOR
    assert _cfg().recipe == "streamdit" and _cfg().denoising_step_list == (1000, 750, 500, 250)


def _stage0(recipe: str, timeline: Timeline) -> object:
    run = validate_run(RunConfig.for_recipe(recipe, height=32, width=48, chunks=8))
    run = type(run)(**{**{f: getattr(run, f) for f in run.__dataclass_fields__}, "timeline": timeline})
    return build_stage0(run)[0]


CUT = Timeline([TimelineEntry(chunk=0, prompt="a"), TimelineEntry(chunk=2, prompt="b", transition="hard")])


def test_krea_replays_the_stream_after_a_cut_and_hides_its_first_frames() -> None:
    for recipe, replays in (("krea-realtime", True), ("streamdit", False)):
        stage0 = _stage0(recipe, CUT)
        prepared, shown = [], []
        for k in range(3):
            prepared.append(stage0.prepare(k))
            shown.append(stage0.finish(prepared[-1][1].latents).shape[0])
        first, cut = prepared[0][1], prepared[2][1]
        assert torch.equal(first.latents, cut.latents) == replays, recipe
        assert prepared[2][0].cache_epoch == 1
        # a stream start decodes 9 pixel frames (then 12): Krea shows 6 of them, at every start
        assert shown == ([6, 12, 6] if recipe == "krea-realtime" else [9, 12, 9])


def test_scope_biases_every_chunk_krea_none_streamdit_soft_only() -> None:
    soft = Timeline(
        [TimelineEntry(chunk=0, prompt="a"), TimelineEntry(chunk=2, prompt="b", transition="soft")]
    )
    biases = {}
    for recipe in ("scope-krea", "krea-realtime", "streamdit"):
        stage0 = _stage0(recipe, soft)
        biases[recipe] = []
        for k in range(5):
            biases[recipe].append(stage0.prepare(k)[1].kv_cache_attention_bias)
            stage0.finish(torch.zeros(1, 3, 16, 4, 6))
    assert biases["scope-krea"] == [1.0, 0.3, 0.3, 0.3, 0.3]
    assert biases["krea-realtime"] == [1.0] * 5
    assert biases["streamdit"] == [1.0, 1.0, 0.3, 0.3, 1.0]  # a 2-chunk blend at chunks 2, 3


def test_krea_blends_from_the_embedding_in_use() -> None:
    """A second soft change before the first finished: Krea lerps from what was in use."""
    tl = Timeline(
        [
            TimelineEntry(chunk=0, prompt="a"),
            TimelineEntry(chunk=1, prompt="b", transition="soft", blend_chunks=4),
            TimelineEntry(chunk=3, prompt="c", transition="soft", blend_chunks=2),
        ]
    )
    stage0 = _stage0("krea-realtime", tl)
    embeds = []
    for k in range(5):
        embeds.append(stage0.prepare(k)[1].conditioning_embeds)
        stage0.finish(torch.zeros(1, 3, 16, 4, 6))
    enc = {p: stage0.text_encoder.encode([p]) for p in "abc"}
    torch.testing.assert_close(embeds[2], torch.lerp(enc["a"], enc["b"], 1 / 3))
    torch.testing.assert_close(embeds[3], embeds[2])  # weight 0 of the new blend: the one in use
    torch.testing.assert_close(embeds[4], enc["c"])


def test_recompute_on_previous_text_needs_that_text_cached() -> None:
    run = validate_run(RunConfig.for_recipe("krea-realtime", height=32, width=48))
    stage0 = build_stage0(run)[0]
    _, first, _ = stage0.prepare(0)
    stage0.finish(first.latents)
    ids, second, _ = stage0.prepare(1)
    fresh = build_generator(run)  # never ran chunk 0: no previous text in its cache
    with pytest.raises(PlanError, match="previous chunk's text"):
        fresh.run(second, ids)
    runner = build_generator(run)
    runner.run(first, Ids(call_id=0, chunk_index=0, cache_epoch=0))
    assert runner.run(second, ids).shape == first.latents.shape
