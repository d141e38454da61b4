"""The CLI's flags are generated from `RunConfig`'s declared settings: pinned here, so adding,
renaming or dropping a flag or a parity key is a deliberate change of this file; the committed
docs/flags.md is what the declarations generate; every no-effect rule fires."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from streamdit.cli import build_parser
from streamdit.config import ATTN_BACKENDS, DIT_PRESET_NAMES, SECTIONS, RunConfig, declared
from streamdit.errors import ConfigError
from streamdit.flags import check_no_effect, markdown_reference
from streamdit.model.attention import ATTENTION_BACKENDS
from streamdit.model.presets import DIT_PRESETS

ROOT = Path(__file__).resolve().parents[2]
SHARED = [
    "--attn-backend",
    "--blend-chunks",
    "--checkpoint",
    "--checkpoint-select",
    "--chunks",
    "--compile",
    "--compile-backend",
    "--compile-mode",
    "--device",
    "--dist-timeout",
    "--dtype",
    "--fp8",
    "--fps",
    "--frames-per-chunk",
    "--graph-break-budget",
    "--height",
    "--input-digest-every",
    "--input-video",
    "--latent-norm",
    "--local-attn-frames",
    "--log-level",
    "--metrics",
    "--no-cuda-graphs",
    "--no-fingerprint-on-init-cache",
    "--no-kv-recompute",
    "--no-progress",
    "--norm-kernels",
    "--nproc",
    "--out",
    "--output-digest-every",
    "--preset",
    "--profile",
    "--profile-chunks",
    "--profile-from",
    "--prompt",
    "--queue-depth",
    "--recipe",
    "--recompute",
    "--seed",
    "--shift",
    "--sink-frames",
    "--soft-bias",
    "--startup-timeout",
    "--step-list",
    "--steps",
    "--summary",
    "--text-embeddings",
    "--text-encoder",
    "--timeline",
    "--tiny-vae-checkpoint",
    "--topology",
    "--use-ema",
    "--vae",
    "--vae-checkpoint",
    "--warmup",
    "--watchdog-window",
    "--width",
]
FLAGS = {
    "run": sorted(SHARED),
    "serve": sorted([*SHARED, "--browser-input", "--host", "--port", "--start-paused"]),
}
PARITY = [
    "attn_backend",
    "blend_chunks",
    "compile",
    "compile_backend",
    "compile_mode",
    "denoising_step_list",
    "dist_timeout_s",
    "dtype",
    "fingerprint_on_init_cache",
    "fp8",
    "frames_per_chunk",
    "graph_break_budget",
    "height",
    "input_digest_every",
    "local_attn_frames",
    "norm_kernels",
    "output_digest_every",
    "preset",
    "queue_depth",
    "recipe",
    "recompute",
    "seed",
    "shift",
    "sink_frames",
    "soft_bias",
    "startup_timeout_s",
    "topology",
    "warmup",
    "watchdog_window_s",
    "width",
]


def _subparser(command: str) -> argparse.ArgumentParser:
    return build_parser()._subparsers._group_actions[0].choices[command]  # type: ignore[union-attr]


@pytest.mark.parametrize("command", ["run", "serve"])
def test_the_flag_set_is_pinned(command: str) -> None:
    flags = sorted(
        a.option_strings[0] for a in _subparser(command)._actions if a.option_strings[1:2] != ["--help"]
    )
    assert flags == FLAGS[command]


def test_the_parity_keys_are_pinned_and_come_from_the_declarations() -> None:
    cfg = RunConfig(test_hooks={"STREAMDIT_TEST_X": "1"})
    assert sorted(cfg.parity_items()) == sorted([*PARITY, "STREAMDIT_TEST_X"])
    assert sorted(d.name for d in declared(RunConfig) if d.setting.parity) == sorted(PARITY)
    # a parity value follows its field: two configs differing in one key differ in its text only
    a, b = RunConfig().parity_items(), RunConfig(soft_bias=0.25).parity_items()
    assert {k for k in a if a[k] != b[k]} == {"soft_bias"} and b["soft_bias"] == "0.25"


def test_config_enumerations_equal_the_models_tables() -> None:
    assert tuple(DIT_PRESETS) == DIT_PRESET_NAMES
    assert ATTN_BACKENDS == ATTENTION_BACKENDS


def test_every_setting_has_help_and_a_section_and_its_group_in_help(capsys) -> None:
    for d in declared(RunConfig):
        assert d.setting.help.strip(), d.name
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--help"])
    out = capsys.readouterr().out
    positions = [out.index(f"\n{title}:\n") for title in SECTIONS.values()]
    assert positions == sorted(positions)  # one group per section, in order
    for d in declared(RunConfig):
        if d.flag is not None:
            section_start = out.index(f"\n{SECTIONS[d.section]}:\n")
            assert out.index(f"  {d.flag}", section_start) < min(
                [p for p in positions if p > section_start] + [len(out)]
            ), f"{d.flag} is not listed in its section {d.section!r}"


def test_docs_flags_md_is_what_the_declarations_generate() -> None:
    committed = (ROOT / "docs" / "flags.md").read_text(encoding="utf-8")
    assert committed == markdown_reference(), "regenerate: python -m streamdit.flags > docs/flags.md"


def test_every_no_effect_rule_fires_naming_its_flag() -> None:
    # --prompt does nothing beside a timeline; --profile nothing under pp (rank0 has no Phase B)
    configs = [RunConfig(timeline=Path("tl.json")), RunConfig(topology="pp", nproc=3)]
    fired = set()
    for cfg in configs:
        for command in ("run", "serve"):
            for d in declared(RunConfig):
                if d.setting.needs is None or d.setting.needs[0](cfg, command):
                    continue
                with pytest.raises(
                    ConfigError, match=f"{d.flag} has no effect here: it needs .*field={d.name}"
                ):
                    check_no_effect(cfg, command, {d.name})
                fired.add(d.name)
    assert fired == {d.name for d in declared(RunConfig) if d.setting.needs is not None}
    check_no_effect(configs[0], "run", {d.name for d in declared(RunConfig) if d.setting.needs is None})
