"""Phase A's output is exactly an envelope: every chunk Stage0 prepares (start, recompute chunks,
soft and hard transitions) converts to a `TPEnvelopeV1` that passes validation and preflight,
and converting back gives Phase B the same inputs. This is the seam TP and PP will cut at."""

from __future__ import annotations

from pathlib import Path

import torch

from streamdit.config import RunConfig
from streamdit.protocol.codec import Limits
from streamdit.protocol.header import Action
from streamdit.protocol.preflight import prepare
from streamdit.runtime.build import build_generator, validate_run
from streamdit.runtime.plan import GENERATOR_INPUT_FIELDS, GeneratorInputs
from streamdit.runtime.single import build_stage0
from streamdit.runtime.stage0 import rehearse
from streamdit.runtime.tp import tp_envelope


def test_every_prepared_chunk_is_a_valid_envelope_and_round_trips(tmp_path: Path) -> None:
    tl = tmp_path / "tl.json"
    tl.write_text(
        '{"entries": [{"chunk": 0, "prompt": "a"}, {"chunk": 2, "prompt": "b", "transition": "soft"},'
        ' {"chunk": 4, "prompt": "c", "transition": "hard"}]}'
    )
    cfg = RunConfig(height=32, width=48, chunks=6, timeline=tl)
    run = validate_run(cfg)
    runner = build_generator(run)
    stage0, _ = build_stage0(run)
    seen_recompute = seen_bias = seen_cut = False
    for k in range(cfg.chunks):
        ids, inputs, _ = stage0.prepare(k)
        msg = tp_envelope(Action.INFER, ids, inputs)
        msg.validate()
        prepared = prepare(msg, Limits(), torch.device("cpu"))
        assert prepared.header.ids.chunk_index == k
        back = GeneratorInputs(**msg.payload())
        for name in GENERATOR_INPUT_FIELDS:
            a, b = getattr(inputs, name), getattr(back, name)
            assert torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b, name
        seen_recompute |= inputs.do_kv_recompute
        seen_bias |= inputs.kv_cache_attention_bias < 1.0
        seen_cut |= inputs.init_cache and k > 0
        stage0.finish(runner.run(back, ids))
    assert seen_recompute and seen_bias and seen_cut


def test_conditioning_cache_is_bounded_over_many_prompt_changes(tmp_path: Path, monkeypatch) -> None:
    from streamdit.runtime import stage0 as stage0_mod

    entries = ",".join(
        f'{{"chunk": {k}, "prompt": "prompt number {k}", "transition": "soft"}}' for k in range(1, 30)
    )
    tl = tmp_path / "many.json"
    tl.write_text('{"entries": [{"chunk": 0, "prompt": "start"},' + entries + "]}")
    cfg = RunConfig(height=32, width=48, chunks=30, timeline=tl, recompute="off")
    run = validate_run(cfg)
    stage0, _ = build_stage0(run)
    first_embeds = []
    for k in range(cfg.chunks):
        _, inputs, _ = stage0.prepare(k)
        first_embeds.append(inputs.conditioning_embeds)
        assert len(stage0._cond_cache) <= stage0_mod.COND_CACHE_SIZE
    # eviction never changes what a chunk gets: an unbounded cache hands out the same tensors
    monkeypatch.setattr(stage0_mod, "COND_CACHE_SIZE", 10_000)
    again, _ = build_stage0(run)
    for k in range(cfg.chunks):
        assert torch.equal(again.prepare(k)[1].conditioning_embeds, first_embeds[k])
    assert len(again._cond_cache) > 8  # the comparison run really kept more than the bound


def test_rehearsal_walks_every_stage0_path_on_a_twin_and_leaves_the_stream_untouched() -> None:
    """pp's rank0 rehearses Stage 0 before any NCCL transfer is pending (see `rehearse`)."""
    cfg = RunConfig(height=32, width=48, chunks=6)
    run = validate_run(cfg)
    stage0, _ = build_stage0(run)
    calls = {"re-encode": 0, "text": 0}
    vae_encode, text_encode = stage0.vae.encode, stage0.text_encoder.encode

    def count(name, fn):
        def wrapped(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)

        return wrapped

    stage0.vae.encode = count("re-encode", vae_encode)
    stage0.text_encoder.encode = count("text", text_encode)
    assert rehearse(stage0, max_chunks=2) == 2  # bounded by the stream (an input video's length)
    n = rehearse(stage0, max_chunks=cfg.chunks)
    assert n == -(-cfg.local_attn_frames // cfg.frames_per_chunk) + 2  # until the window evicts
    assert calls["re-encode"] >= 1  # r0a's anchor re-encode of a decoded frame ran
    assert calls["text"] >= 2  # both prompts of the soft blend were encoded
    untouched = (stage0.next_call_id, stage0.cache_epoch, stage0.next_start_frame, len(stage0._cond_cache))
    assert untouched == (0, 0, 0, 0) and stage0.first_latent is None
    assert stage0.decoder.latent_frames_seen == 0
    fresh, _ = build_stage0(run)
    for k in range(3):  # the stream itself runs exactly as if there had been no rehearsal
        a, b = stage0.prepare(k)[1], fresh.prepare(k)[1]
        assert torch.equal(a.latents, b.latents) and torch.equal(a.conditioning_embeds, b.conditioning_embeds)
        stage0.finish(a.latents)
        fresh.finish(b.latents)
