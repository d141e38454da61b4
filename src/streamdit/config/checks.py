"""The rules a `RunConfig` must satisfy, field by field and across fields.

Owns: `check_run_config` (called by `RunConfig.__post_init__`; a broken rule is a ConfigError
naming the field, which the CLI turns into exit 2). An enumeration is checked against the
`choices` its setting declares; the rest are written out here. Imports errors and settings.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from streamdit.config.settings import declared
from streamdit.errors import ConfigError

if TYPE_CHECKING:
    from streamdit.config.run import RunConfig

OUTPUT_SUFFIXES = (".mp4", ".npy")
TEST_HOOK_PREFIX = "STREAMDIT_TEST_"


def check_run_config(cfg: RunConfig) -> None:
    for d in declared(type(cfg)):  # first: the rules below read enumerations (cache_policy)
        choices = d.setting.choices
        value = getattr(cfg, d.name)
        _check(choices is None or value in choices, d.name, f"{value!r} is not one of {choices}")
    _check_ranges(cfg)
    _check_sampler(cfg)
    _check_pairs(cfg)
    for key in cfg.test_hooks:
        _check(key.startswith(TEST_HOOK_PREFIX), "test_hooks", f"{key} lacks the {TEST_HOOK_PREFIX} prefix")


def _check_ranges(cfg: RunConfig) -> None:
    for name in (
        "nproc",
        "chunks",
        "frames_per_chunk",
        "blend_chunks",
        "queue_depth",
        "fps",
        "profile_chunks",
    ):
        _check(getattr(cfg, name) >= 1, name, f"must be >= 1, got {getattr(cfg, name)}")
    for name in ("graph_break_budget", "input_digest_every", "output_digest_every", "profile_from"):
        _check(getattr(cfg, name) >= 0, name, f"must be >= 0, got {getattr(cfg, name)}")
    for name in ("startup_timeout_s", "dist_timeout_s", "watchdog_window_s", "shift"):
        _check(getattr(cfg, name) > 0, name, f"must be > 0, got {getattr(cfg, name)}")
    for name in ("height", "width"):
        value = getattr(cfg, name)
        _check(value > 0 and value % 16 == 0, name, f"{value} is not a positive multiple of 16")
    _check(0.0 < cfg.soft_bias <= 1.0, "soft_bias", f"must be in (0, 1], got {cfg.soft_bias}")
    _check(0 <= cfg.port <= 65535, "port", f"{cfg.port} is not a TCP port (0-65535; 0 = any free port)")
    _check(cfg.out.suffix in OUTPUT_SUFFIXES, "out", f"{cfg.out} must end in one of {OUTPUT_SUFFIXES}")


def _check_sampler(cfg: RunConfig) -> None:
    steps = cfg.denoising_step_list
    _check(len(steps) >= 1, "denoising_step_list", "must not be empty")
    _check(
        all(0 <= t <= 1000 for t in steps) and 0 not in steps[:-1],
        "denoising_step_list",
        f"{steps} must lie in [0, 1000] (a 0 only as the last step)",
    )
    _check(
        all(a > b for a, b in zip(steps, steps[1:], strict=False)),
        "denoising_step_list",
        f"{steps} must be strictly decreasing",
    )
    ctx = cfg.context_frames
    _check(
        cfg.local_attn_frames >= cfg.frames_per_chunk + (ctx if cfg.cache_policy.recomputes else 0),
        "local_attn_frames",
        f"{cfg.local_attn_frames} cannot hold the context ({ctx}) plus a chunk ({cfg.frames_per_chunk})",
    )
    _check(
        cfg.sink_frames >= 0 and cfg.sink_frames + cfg.frames_per_chunk < cfg.local_attn_frames,
        "sink_frames",
        f"{cfg.sink_frames} leaves no evictable frame in a window of {cfg.local_attn_frames}",
    )


def _check_pairs(cfg: RunConfig) -> None:
    _check(
        cfg.text_encoder is None or cfg.text_embeddings is None,
        "text_encoder",
        "give --text-encoder or --text-embeddings, not both",
    )
    _check(
        cfg.input_video is None or not cfg.browser_input,
        "browser_input",
        "give --input-video or --browser-input, not both",
    )
    _check(
        cfg.tiny_vae_checkpoint is None or cfg.vae == "tiny",
        "tiny_vae_checkpoint",
        "--tiny-vae-checkpoint has no effect without --vae tiny",
    )
    _check(
        cfg.compile_mode == "default" or cfg.compile_backend == "inductor",
        "compile_mode",
        f"{cfg.compile_mode!r} needs compile_backend inductor, got {cfg.compile_backend!r}",
    )


def _check(ok: bool, name: str, why: str) -> None:
    if not ok:
        raise ConfigError(f"invalid {name}: {why} [field={name}]")
