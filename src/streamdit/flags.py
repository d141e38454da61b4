"""The `run` / `serve` flags and their translation into one `RunConfig`.

Owns: `add_run_flags` (every flag `run` and `serve` share), `config_from_args` (the recipe's
defaults, then the flags the user gave on top: a flag left out takes the recipe's value),
`NO_EFFECT` + `check_no_effect` (a flag the user gave that the chosen mode would ignore is an
exit-2 error naming it, never silently dropped), `LOG_LEVELS` and `SERVE_OUT`. Imports config
and recipes only.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

from streamdit.config import (
    COMPILE_BACKENDS,
    COMPILE_MODES,
    DEFAULT_V2V_STEP_LIST,
    LATENT_NORMS,
    RECOMPUTE,
    TOPOLOGIES,
    VAE_DECODERS,
    WARMUP,
    RunConfig,
    is_tty_allowed,
    read_test_hooks,
)
from streamdit.errors import ConfigError
from streamdit.recipes import RECIPES

SERVE_OUT = Path("out/serve/stream.mp4")  # serve without --out: flight records go beside it
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")

# A flag that does nothing unless its condition holds: (flag dest, condition over the parsed
# flags, what the flag needs). Given by the user when its condition fails: exit 2 naming it.
NO_EFFECT: tuple[tuple[str, Callable[[argparse.Namespace], bool], str], ...] = (
    ("nproc", lambda a: a.topology != "single", "--topology tp or pp (single runs one process)"),
    ("queue_depth", lambda a: a.topology == "pp", "--topology pp (envelopes in flight to the mesh)"),
    ("prompt", lambda a: a.timeline is None, "no --timeline (the timeline's entries name the prompts)"),
    ("chunks", lambda a: a.command != "serve", "run (serve generates until stopped or its input ends)"),
    ("compile_backend", lambda a: a.compile, "--compile"),
    ("compile_mode", lambda a: a.compile, "--compile"),
    ("graph_break_budget", lambda a: a.compile, "--compile"),
    ("checkpoint_select", lambda a: a.checkpoint is not None, "--checkpoint"),
    ("use_ema", lambda a: a.checkpoint is not None, "--checkpoint"),
)


class DefaultsHelp(argparse.HelpFormatter):
    """Help that shows each flag's default (left out where there is none to show)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        shown = action.default not in (None, False, argparse.SUPPRESS) and action.option_strings
        return f"{text} (default: %(default)s)" if shown and "%(default)" not in text else text


def check_no_effect(args: argparse.Namespace, given: set[str]) -> None:
    """ConfigError for the first flag the user gave that would do nothing here."""
    for dest, holds, needs in NO_EFFECT:
        if dest in given and not holds(args):
            flag = "--" + dest.replace("_", "-")
            raise ConfigError(f"{flag} has no effect here: it needs {needs} [field={dest}]")


def port_number(text: str) -> int:
    port = int(text)
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{port} is not a TCP port (0-65535; 0 = any free port)")
    return port


def _int_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from exc


def add_run_flags(p: argparse.ArgumentParser) -> None:
    d = RunConfig()
    p.add_argument(
        "--recipe",
        default=d.recipe,
        choices=list(RECIPES),
        help="the reference loop a checkpoint runs with (cache policy, steps, window, blending, "
        "VAE rule); flags below override its defaults",
    )
    p.add_argument("--topology", default=d.topology, choices=list(TOPOLOGIES), help="process layout")
    p.add_argument("--nproc", type=int, default=d.nproc, help="local ranks to start (tp, pp)")
    p.add_argument("--dist-timeout", type=float, default=d.dist_timeout_s, help="process-group timeout (s)")
    p.add_argument(
        "--startup-timeout",
        type=float,
        default=d.startup_timeout_s,
        help="bounds the wait for peers' startup work, e.g. the compile warm-up (s)",
    )
    p.add_argument(
        "--watchdog-window",
        type=float,
        default=d.watchdog_window_s,
        help="heartbeat silence that ends the job (s)",
    )
    p.add_argument("--input-digest-every", type=int, default=d.input_digest_every, help="0 = off")
    p.add_argument("--output-digest-every", type=int, default=d.output_digest_every, help="0 = off")
    p.add_argument(
        "--no-fingerprint-on-init-cache",
        action="store_true",
        help="check weight fingerprints at startup only, not again on each cache re-init",
    )
    p.add_argument("--preset", default=d.preset, help="DiT preset: tiny | wan-1.3b | wan-14b")
    p.add_argument(
        "--vae",
        default=d.vae,
        choices=list(VAE_DECODERS),
        help="Phase C decoder: wan (the Wan VAE) | tiny (TAEHV tiny decoder; the Wan VAE still encodes)",
    )
    p.add_argument("--height", type=int, default=d.height, help="pixel height, multiple of 16")
    p.add_argument("--width", type=int, default=d.width, help="pixel width, multiple of 16")
    p.add_argument("--chunks", type=int, default=d.chunks, help="chunks to generate")
    p.add_argument("--frames-per-chunk", type=int, default=None, help="latent frames per chunk")
    p.add_argument(
        "--steps", type=int, default=None, help="denoising steps (spaced by the recipe's schedule)"
    )
    p.add_argument(
        "--step-list",
        type=_int_list,
        default=None,
        help="explicit timesteps, e.g. 1000,750,500,250",
    )
    p.add_argument("--shift", type=float, default=d.shift, help="flow schedule shift")
    p.add_argument("--seed", type=int, default=d.seed, help="seed of weights and noise")
    p.add_argument("--prompt", default=d.prompt, help="prompt when no --timeline is given")
    p.add_argument("--timeline", type=Path, default=None, help="prompt timeline (.toml or .json)")
    p.add_argument("--input-video", type=Path, default=None, help="video-to-video input file")
    p.add_argument("--out", type=Path, default=d.out, help="output .mp4 or .npy (uint8 [T,H,W,3])")
    p.add_argument("--metrics", type=Path, default=None, help="per-chunk JSON-lines metrics file")
    p.add_argument("--device", default=d.device, help="cpu | cuda | cuda:N")
    p.add_argument("--dtype", default=d.dtype, choices=["float32", "bfloat16"])
    p.add_argument("--attn-backend", default=d.attn_backend, help="auto | flash | efficient | cudnn | math")
    p.add_argument(
        "--fp8",
        action="store_true",
        help="FP8 linear layers in the DiT blocks (CUDA, capability >= 8.9, bfloat16)",
    )
    p.add_argument(
        "--compile", action="store_true", help="torch.compile the generator (warmed up at startup)"
    )
    p.add_argument(
        "--compile-backend",
        default=d.compile_backend,
        choices=list(COMPILE_BACKENDS),
        help="torch.compile backend",
    )
    p.add_argument(
        "--compile-mode", default=d.compile_mode, choices=list(COMPILE_MODES), help="inductor mode"
    )
    p.add_argument(
        "--graph-break-budget",
        type=int,
        default=d.graph_break_budget,
        help="graph breaks allowed per generator call after warm-up (more fails at startup)",
    )
    p.add_argument(
        "--recompute",
        default=None,
        choices=list(RECOMPUTE),
        help="KV-cache regime: off (R1) | r0a (rank0 anchor) | r0 (generator-side latent anchor) | "
        "append (a clean write after each chunk); default: the recipe's",
    )
    p.add_argument("--no-kv-recompute", action="store_true", help="same as --recompute off")
    p.add_argument(
        "--warmup",
        default=d.warmup,
        choices=list(WARMUP),
        help="eager generator warm-up at startup (auto: tp / pp on CUDA; compile always warms up)",
    )
    p.add_argument("--queue-depth", type=int, default=d.queue_depth, help="pp: envelopes in flight (D)")
    p.add_argument("--local-attn-frames", type=int, default=None, help="KV window in frames")
    p.add_argument("--sink-frames", type=int, default=None, help="never-evicted first frames")
    p.add_argument("--soft-bias", type=float, default=None, help="KV bias value where the recipe applies one")
    p.add_argument("--blend-chunks", type=int, default=None, help="chunks a soft prompt change blends over")
    p.add_argument(
        "--checkpoint",
        type=Path,
        default=None,
        help="DiT weights: .safetensors, a sharded folder or index.json, .pt/.pth, a diffusers folder",
    )
    p.add_argument(
        "--checkpoint-select",
        default=None,
        help="which state dict of a multi-model file: a top-level key (generator, model, ...) or a "
        "key prefix ending in '.'",
    )
    p.add_argument("--use-ema", action="store_true", help="the EMA weights (generator_ema) of a checkpoint")
    p.add_argument(
        "--vae-checkpoint",
        type=Path,
        default=None,
        help="VAE weights: Wan2.1_VAE.pth, .safetensors, a diffusers AutoencoderKLWan folder",
    )
    p.add_argument(
        "--tiny-vae-checkpoint",
        type=Path,
        default=None,
        help="TAEHV decoder weights for --vae tiny (taew2_1.pth or .safetensors)",
    )
    p.add_argument(
        "--latent-norm",
        default=d.latent_norm,
        choices=list(LATENT_NORMS),
        help="VAE latent statistics (auto: wan2.1 with a VAE checkpoint, identity otherwise)",
    )
    text = p.add_mutually_exclusive_group()
    text.add_argument(
        "--text-encoder",
        type=Path,
        default=None,
        help="local umT5 folder (UMT5EncoderModel + tokenizer, or a diffusers root); default: "
        "the offline hash stand-in",
    )
    text.add_argument(
        "--text-embeddings", type=Path, default=None, help="precomputed prompt embeddings (.safetensors)"
    )
    p.add_argument("--fps", type=int, default=d.fps, help="frame rate of the .mp4")
    p.add_argument("--no-progress", action="store_true", help="never draw the progress bar")
    p.add_argument("--log-level", default="WARNING", type=str.upper, choices=LOG_LEVELS, help="log detail")


def _recipe_overrides(args: argparse.Namespace) -> dict[str, object]:
    """The recipe-defaulted settings the user gave explicitly (the rest come from the recipe)."""
    recipe = RECIPES[args.recipe]
    given: dict[str, object] = {}
    if args.step_list is not None:
        given["denoising_step_list"] = tuple(args.step_list)
    elif args.steps is not None:
        given["denoising_step_list"] = recipe.step_list(args.steps)
    elif args.input_video and args.recipe == "streamdit":
        given["denoising_step_list"] = DEFAULT_V2V_STEP_LIST
    if args.no_kv_recompute:
        given["recompute"] = "off"
    for name in (
        "recompute",
        "frames_per_chunk",
        "local_attn_frames",
        "sink_frames",
        "soft_bias",
        "blend_chunks",
    ):
        if getattr(args, name) is not None:  # the flag's dest is the RunConfig field's name
            given[name] = getattr(args, name)
    return given


def _checkpoint_select(args: argparse.Namespace) -> str | None:
    if args.use_ema and args.checkpoint_select not in (None, "ema"):
        raise ConfigError("--use-ema and --checkpoint-select name different weights [field=use_ema]")
    return "ema" if args.use_ema else args.checkpoint_select


def config_from_args(args: argparse.Namespace) -> RunConfig:
    return RunConfig.for_recipe(
        args.recipe,
        **_recipe_overrides(args),
        topology=args.topology,
        nproc=args.nproc,
        dist_timeout_s=args.dist_timeout,
        startup_timeout_s=args.startup_timeout,
        watchdog_window_s=args.watchdog_window,
        input_digest_every=args.input_digest_every,
        output_digest_every=args.output_digest_every,
        fingerprint_on_init_cache=not args.no_fingerprint_on_init_cache,
        preset=args.preset,
        vae=args.vae,
        height=args.height,
        width=args.width,
        chunks=args.chunks,
        shift=args.shift,
        seed=args.seed,
        prompt=args.prompt,
        timeline=args.timeline,
        input_video=args.input_video,
        out=args.out if args.out is not None else SERVE_OUT,
        metrics=args.metrics,
        device=args.device,
        dtype=args.dtype,
        attn_backend=args.attn_backend,
        fp8=args.fp8,
        compile=args.compile,
        compile_backend=args.compile_backend,
        compile_mode=args.compile_mode,
        graph_break_budget=args.graph_break_budget,
        warmup=args.warmup,
        queue_depth=args.queue_depth,
        checkpoint=args.checkpoint,
        checkpoint_select=_checkpoint_select(args),
        vae_checkpoint=args.vae_checkpoint,
        tiny_vae_checkpoint=args.tiny_vae_checkpoint,
        latent_norm=args.latent_norm,
        text_encoder=args.text_encoder,
        text_embeddings=args.text_embeddings,
        fps=args.fps,
        progress=not args.no_progress and is_tty_allowed() and getattr(args, "command", "run") != "serve",
        test_hooks=read_test_hooks(),
    )
