"""Command line: `streamdit run ...` (also `python -m streamdit run ...`).

Owns: flag parsing into one `RunConfig`, exit codes (bad input → 2, Ctrl-C/SIGTERM → 130 with
the video closed and valid, typed errors → their code) and logging setup. Imports runtime.
"""

from __future__ import annotations

import argparse
import contextlib
import faulthandler
import logging
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from streamdit import __version__
from streamdit.config import (
    COMPILE_BACKENDS,
    COMPILE_MODES,
    DEFAULT_STEP_LIST,
    DEFAULT_V2V_STEP_LIST,
    RECOMPUTE,
    TOPOLOGIES,
    WARMUP,
    LaunchEnv,
    RunConfig,
    apply_environment,
    cuda_loading_defaults,
    is_tty_allowed,
    read_test_hooks,
    step_list_for,
)
from streamdit.errors import EXIT_BAD_INPUT, EXIT_INTERRUPTED, EXIT_OK, ConfigError, StreamditError
from streamdit.runtime.live import STOP_OVER_HTTP
from streamdit.runtime.liveness import StopFlag

if TYPE_CHECKING:
    from streamdit.runtime.driver import RunSummary
    from streamdit.runtime.live import LiveStream

SERVE_OUT = Path("out/serve/stream.mp4")  # serve without --out: flight records go beside it

log = logging.getLogger("streamdit")


def _int_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from exc


def _add_run_flags(p: argparse.ArgumentParser) -> None:
    d = RunConfig()
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
    p.add_argument("--vae", default=None, help="VAE preset: tiny | wan (default follows --preset)")
    p.add_argument("--height", type=int, default=d.height, help="pixel height, multiple of 16")
    p.add_argument("--width", type=int, default=d.width, help="pixel width, multiple of 16")
    p.add_argument("--chunks", type=int, default=d.chunks, help="chunks to generate")
    p.add_argument("--frames-per-chunk", type=int, default=d.frames_per_chunk, help="latent frames per chunk")
    p.add_argument("--steps", type=int, default=None, help="denoising steps (evenly spaced from 1000)")
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
        default=d.recompute,
        choices=list(RECOMPUTE),
        help="KV recompute: off (R1) | r0a (rank0 anchor) | r0 (generator-side latent anchor)",
    )
    p.add_argument("--no-kv-recompute", action="store_true", help="same as --recompute off")
    p.add_argument(
        "--warmup",
        default=d.warmup,
        choices=list(WARMUP),
        help="eager generator warm-up at startup (auto: tp / pp on CUDA; compile always warms up)",
    )
    p.add_argument("--queue-depth", type=int, default=d.queue_depth, help="pp: envelopes in flight (D)")
    p.add_argument("--local-attn-frames", type=int, default=d.local_attn_frames, help="KV window in frames")
    p.add_argument("--sink-frames", type=int, default=d.sink_frames, help="never-evicted first frames")
    p.add_argument("--soft-bias", type=float, default=d.soft_bias, help="KV bias on soft transitions")
    p.add_argument("--checkpoint", type=Path, default=None, help="DiT weights (.safetensors)")
    p.add_argument("--vae-checkpoint", type=Path, default=None, help="VAE weights (.safetensors)")
    p.add_argument("--fps", type=int, default=d.fps, help="frame rate of the .mp4")
    p.add_argument("--no-progress", action="store_true", help="never draw the progress bar")
    p.add_argument("--log-level", default="WARNING", help="DEBUG | INFO | WARNING | ERROR")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="streamdit", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"streamdit {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="generate a video chunk by chunk")
    _add_run_flags(run)
    matrix = sub.add_parser("matrix", help="run the operator test matrix (break-it rows) here")
    matrix.add_argument("--only", default=None, help="comma-separated row ids, e.g. OM-01,OM-13")
    matrix.add_argument("--json", type=Path, default=None, help="write the results as JSON")
    matrix.add_argument("--backend", default="gloo", choices=["gloo", "nccl"], help="nccl: ranks on GPUs")
    matrix.add_argument("--row-timeout", type=float, default=20.0, help="seconds per row")
    matrix.add_argument(
        "--logs",
        type=Path,
        default=None,
        help="keep every row's pytest output and each rank's log under DIR/<row>/",
    )
    matrix.add_argument(
        "--emulate-hosts",
        action="store_true",
        help="nccl: every rank its own emulated host on GPU 0 (NCCL over loopback sockets): "
        "real NCCL communicators on a machine with fewer GPUs than ranks",
    )
    serve = sub.add_parser("serve", help="live generation in a browser, steered while it runs")
    _add_run_flags(serve)
    serve.set_defaults(out=None)  # serve records a video only when --out is given
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (rank0)")
    serve.add_argument("--port", type=int, default=8000, help="port to listen on (0 = any free port)")
    serve.add_argument("--start-paused", action="store_true", help="wait for start on the page")
    inspect = sub.add_parser("inspect", help="name the first failing rank of a failed job")
    inspect.add_argument("dir", type=Path, help="the job's output folder (holding flight/) or flight/")
    inspect.add_argument("--json", action="store_true", help="machine-readable report")
    return parser


def _matrix(args: argparse.Namespace) -> int:
    import torch

    from streamdit.matrix import run_matrix

    gpus = torch.cuda.device_count() if args.backend == "nccl" else 0
    need = 1 if args.emulate_hosts else 2
    if args.backend == "nccl" and gpus < need:
        print(
            f"streamdit: error: --backend nccl needs >= {need} GPUs, found {gpus} [field=backend]",
            file=sys.stderr,
        )
        return EXIT_BAD_INPUT
    if args.emulate_hosts and args.backend != "nccl":
        print("streamdit: error: --emulate-hosts needs --backend nccl [field=emulate_hosts]", file=sys.stderr)
        return EXIT_BAD_INPUT
    try:
        return run_matrix(
            only=args.only,
            backend=args.backend,
            json_path=args.json,
            timeout_s=args.row_timeout,
            gpus=gpus,
            emulate_hosts=args.emulate_hosts,
            logs=args.logs,
        )
    except ConfigError as exc:
        print(f"streamdit: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT


def _inspect(args: argparse.Namespace) -> int:
    from streamdit.runtime.inspect import format_report, inspect_records, report_json

    try:
        report = inspect_records(args.dir)
    except ConfigError as exc:
        print(f"streamdit: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(report_json(report) if args.json else format_report(report))
    return EXIT_OK


def config_from_args(args: argparse.Namespace) -> RunConfig:
    if args.step_list is not None:
        steps = args.step_list
    elif args.steps is not None:
        steps = step_list_for(args.steps)
    else:
        steps = DEFAULT_V2V_STEP_LIST if args.input_video else DEFAULT_STEP_LIST
    return RunConfig(
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
        frames_per_chunk=args.frames_per_chunk,
        denoising_step_list=tuple(steps),
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
        compile=args.compile,
        compile_backend=args.compile_backend,
        compile_mode=args.compile_mode,
        graph_break_budget=args.graph_break_budget,
        warmup=args.warmup,
        recompute="off" if args.no_kv_recompute else args.recompute,
        queue_depth=args.queue_depth,
        local_attn_frames=args.local_attn_frames,
        sink_frames=args.sink_frames,
        soft_bias=args.soft_bias,
        checkpoint=args.checkpoint,
        vae_checkpoint=args.vae_checkpoint,
        fps=args.fps,
        progress=not args.no_progress and is_tty_allowed() and getattr(args, "command", "run") != "serve",
        test_hooks=read_test_hooks(),
    )


def _install_drain_handlers(stop: StopFlag) -> dict[int, object]:
    """First SIGINT/SIGTERM drains at the next chunk boundary; a second one aborts at once.

    Returns the previous handlers so an in-process caller (tests) gets them back.
    """

    def handler(signum: int, frame: object) -> None:
        stop.request(signal.Signals(signum).name)

    return {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    if args.command == "inspect":
        return _inspect(args)
    if args.command == "matrix":
        return _matrix(args)
    launch = LaunchEnv.from_environ()
    prefix = f"[rank{launch.rank}] " if launch.launched else ""
    logging.basicConfig(
        level=args.log_level.upper(), format=f"%(asctime)s {prefix}%(levelname)s %(name)s: %(message)s"
    )
    # `kill -USR1 <pid>` prints every thread's Python stack (a rank that looks stuck says where)
    with contextlib.suppress(AttributeError, ValueError, OSError):  # no real stderr: no dump
        faulthandler.register(signal.SIGUSR1, file=sys.__stderr__, all_threads=True)
    stop = StopFlag()
    previous = _install_drain_handlers(stop)
    try:
        cfg = config_from_args(args)
        apply_environment(cuda_loading_defaults(cfg.topology))  # before anything starts CUDA
        if cfg.topology == "pp" and not launch.launched and cfg.nproc < 2:
            raise ConfigError(
                f"--topology pp needs --nproc >= 2 (rank0 + a mesh), got {cfg.nproc} [field=nproc]"
            )
        if cfg.topology != "single" and not launch.launched:
            from streamdit.runtime.launch import launch_local

            return launch_local(argv, cfg.nproc)
        if args.command == "serve" and launch.rank == 0:
            from streamdit.serve.main import serve_rank0

            summary = serve_rank0(
                cfg,
                stop,
                lambda live: _run(cfg, launch, stop, live),
                host=args.host,
                port=args.port,
                start_paused=args.start_paused,
                record_video=args.out is not None,
            )
        else:
            summary = _run(cfg, launch, stop)
    except ConfigError as exc:
        print(f"streamdit: {prefix}error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("streamdit: interrupted; frames written so far are in the output file", file=sys.stderr)
        return EXIT_INTERRUPTED
    except StreamditError as exc:
        log.error("%s: %s", type(exc).__name__, exc)
        return exc.exit_code
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
    return _report(summary)


def _run(
    cfg: RunConfig, launch: LaunchEnv, stop: StopFlag, live: LiveStream | None = None
) -> RunSummary | None:
    # heavy imports only after the flags validated
    if cfg.topology == "tp":
        from streamdit.runtime.tp import run_tp

        return run_tp(cfg, launch, stop, live)
    if cfg.topology == "pp":
        from streamdit.runtime.pp import run_pp

        return run_pp(cfg, launch, stop, live)
    from streamdit.runtime.single import run_single

    return run_single(cfg, stop, live)


def _report(summary: RunSummary | None) -> int:
    if summary is None:  # a generator-only rank: rank0 reports for the job
        return 0
    if summary.stopped_early:
        where = f"in {summary.out}" if summary.out is not None else "served"
        print(
            f"streamdit: interrupted ({summary.stopped_early}); drained after {summary.chunks} chunks, "
            f"{summary.frames} frames {where}",
            file=sys.stderr,
        )
        # SIGTERM is how service managers stop a job, the stop button how a viewer does: a
        # completed drain is a success
        return EXIT_OK if summary.stopped_early in ("SIGTERM", STOP_OVER_HTTP) else EXIT_INTERRUPTED
    pp = ""
    if summary.overlap_score is not None or summary.dropped_stale:
        score = "n/a" if summary.overlap_score is None else f"{summary.overlap_score:.3f}"
        pp = f"; overlap_score={score} dropped_stale={summary.dropped_stale}"
    where = f"wrote {summary.frames} frames ({summary.chunks} chunks) to {summary.out}"
    if summary.out is None:
        where = f"served {summary.frames} frames ({summary.chunks} chunks)"
    print(f"{where} in {summary.seconds:.1f} s{pp}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
