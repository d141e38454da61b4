"""Command line: `streamdit run ...` (also `python -m streamdit run ...`).

Owns: the subcommands (run, serve, encode-text, matrix, inspect), exit codes (bad input → 2,
Ctrl-C/SIGTERM → 130 with the video closed and valid, typed errors → their code), the one-line
note of a run on stand-in parts, and logging setup. The run flags and their translation into a
`RunConfig` live in flags.py. Imports runtime.
"""

from __future__ import annotations

import argparse
import contextlib
import faulthandler
import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from streamdit import __version__
from streamdit.config import (
    TEST_HOOK_PREFIX,
    LaunchEnv,
    RunConfig,
    apply_environment,
    cuda_loading_defaults,
    read_test_hooks,
)
from streamdit.errors import (
    EXIT_BAD_INPUT,
    EXIT_FAILURE,
    EXIT_INTERRUPTED,
    EXIT_OK,
    ConfigError,
    StreamditError,
    needs_hard_exit,
)
from streamdit.flags import DefaultsHelp, add_run_flags, check_no_effect, config_from_args
from streamdit.runtime.live import STOP_OVER_HTTP
from streamdit.runtime.liveness import StopFlag

if TYPE_CHECKING:
    from streamdit.runtime.driver import RunSummary


log = logging.getLogger("streamdit")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="streamdit", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"streamdit {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="generate a video chunk by chunk", formatter_class=DefaultsHelp)
    add_run_flags(run, "run")
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
    matrix.add_argument(
        "--chaos",
        type=int,
        default=None,
        metavar="N",
        help="instead of the rows: N seeded random faults (kill / stop / term / hup of a random "
        "rank at a random chunk, a full disk, the store host frozen) over single, tp and pp",
    )
    matrix.add_argument("--seed", type=int, default=0, help="--chaos: the seed that draws the faults")
    serve = sub.add_parser(
        "serve", help="live generation in a browser, steered while it runs", formatter_class=DefaultsHelp
    )
    add_run_flags(serve, "serve")
    serve.set_defaults(out=None)  # serve records a video only when --out is given
    enc = sub.add_parser(
        "encode-text", help="precompute prompt embeddings with a local umT5 (for --text-embeddings)"
    )
    enc.add_argument("--text-encoder", type=Path, required=True, help="local umT5 folder")
    enc.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    enc.add_argument("--timeline", type=Path, default=None, help="also every prompt of this timeline")
    enc.add_argument("--preset", default=RunConfig().preset, help="the DiT the embeddings are for")
    enc.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    enc.add_argument("--out", type=Path, required=True, help="embeddings file (.safetensors)")
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
    if args.chaos is not None:
        return _chaos(args, gpus)
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


def _chaos(args: argparse.Namespace, gpus: int) -> int:
    from streamdit.matrix.chaos import WORLD, run_chaos

    problem = ""
    if args.chaos < 1:
        problem = f"--chaos {args.chaos}: the number of faults must be >= 1 [field=chaos]"
    elif args.only:
        problem = "--chaos draws its own cases; it takes no --only [field=only]"
    elif args.backend == "nccl" and not args.emulate_hosts and gpus < max(WORLD.values()):
        problem = (
            f"--chaos --backend nccl needs {max(WORLD.values())} GPUs or --emulate-hosts [field=backend]"
        )
    if problem:
        print(f"streamdit: error: {problem}", file=sys.stderr)
        return EXIT_BAD_INPUT
    return run_chaos(
        n=args.chaos,
        seed=args.seed,
        backend=args.backend,
        emulate_hosts=args.emulate_hosts,
        json_path=args.json,
        keep=args.logs,
    )


def _inspect(args: argparse.Namespace) -> int:
    from streamdit.runtime.inspect import format_report, inspect_records, report_json

    try:
        report = inspect_records(args.dir)
    except ConfigError as exc:
        print(f"streamdit: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(report_json(report) if args.json else format_report(report))
    return EXIT_OK


def _encode_text(args: argparse.Namespace) -> int:
    from streamdit.runtime.build import encode_text_file

    try:
        cfg = RunConfig(
            preset=args.preset, device=args.device, text_encoder=args.text_encoder, timeline=args.timeline
        )
        n = encode_text_file(cfg, args.prompt, args.out)
    except ConfigError as exc:
        print(f"streamdit: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(f"wrote {n} prompt embeddings to {args.out}")
    return EXIT_OK


DRAIN_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def _install_drain_handlers(stop: StopFlag) -> dict[int, object]:
    """First SIGINT/SIGTERM/SIGHUP drains at the next chunk boundary; a second one aborts at once.

    SIGHUP (the terminal or ssh session went away) drains like SIGTERM: the job's output ends
    whole and it exits 0, instead of the default of dying with a fragment unwritten.

    Returns the previous handlers so an in-process caller (tests) gets them back.
    """

    def handler(signum: int, frame: object) -> None:
        stop.request(signal.Signals(signum).name)

    return {sig: signal.signal(sig, handler) for sig in DRAIN_SIGNALS}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    if args.command == "inspect":
        return _inspect(args)
    if args.command == "matrix":
        return _matrix(args)
    if args.command == "encode-text":
        logging.basicConfig(level=logging.WARNING)
        return _encode_text(args)
    launch = LaunchEnv.from_environ()
    prefix = f"[rank{launch.rank}] " if launch.launched else ""
    logging.basicConfig(
        level=args.log_level.upper(), format=f"%(asctime)s {prefix}%(levelname)s %(name)s: %(message)s"
    )
    # what was loaded from where (file, format, keys, dtypes) is always reported
    build_log = logging.getLogger("streamdit.runtime.build")
    build_log.setLevel(min(build_log.getEffectiveLevel(), logging.INFO))
    # `kill -USR1 <pid>` prints every thread's Python stack (a rank that looks stuck says where)
    with contextlib.suppress(AttributeError, ValueError, OSError):  # no real stderr: no dump
        faulthandler.register(signal.SIGUSR1, file=sys.__stderr__, all_threads=True)
    if read_test_hooks().get(f"{TEST_HOOK_PREFIX}READY_LINE"):
        # a multi-process test starts this rank's clock here, after the imports (seconds on a
        # loaded 2-core machine), not at the spawn
        print(
            f"streamdit: ready rank={launch.rank} monotonic={time.monotonic():.3f}",
            file=sys.stderr,
            flush=True,
        )
    stop = StopFlag()
    previous = _install_drain_handlers(stop)
    try:
        cfg = config_from_args(args)
        check_no_effect(cfg, args.command, _given(argv))
        if args.command == "run":
            _check_timeline_reach(cfg)
        apply_environment(cuda_loading_defaults(cfg.topology))  # before anything starts CUDA
        if cfg.topology == "pp" and not launch.launched and cfg.nproc < 2:
            raise ConfigError(
                f"--topology pp needs --nproc >= 2 (rank0 + a mesh), got {cfg.nproc} [field=nproc]"
            )
        if cfg.topology != "single" and not launch.launched:
            from streamdit.runtime.launch import launch_local

            # the ranks' own liveness ends any failure; past rank0's exit, a window and a margin
            return launch_local(argv, cfg.nproc, grace_s=cfg.watchdog_window_s + 10.0)
        note = cfg.synthetic_note() if launch.rank == 0 else None
        if note:
            print(f"streamdit: {note}", file=sys.stderr)
        if args.command == "serve" and launch.rank == 0:
            from streamdit.serve.main import serve_rank0

            summary = serve_rank0(cfg, stop, launch, record_video=args.out is not None)
        else:
            summary = _run(cfg, launch, stop)
    except ConfigError as exc:
        print(f"streamdit: {prefix}error: {exc}", file=sys.stderr)
        return _leave(exc, EXIT_BAD_INPUT)
    except KeyboardInterrupt as exc:
        print("streamdit: interrupted; frames written so far are in the output file", file=sys.stderr)
        return _leave(exc, EXIT_INTERRUPTED)
    except StreamditError as exc:
        log.error("%s: %s", type(exc).__name__, exc)
        return _leave(exc, exc.exit_code)
    except Exception as exc:
        if needs_hard_exit(exc):
            log.exception("%s: %s", type(exc).__name__, exc)
            _leave(exc, EXIT_FAILURE)
        raise
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
    code = _report(summary)
    if note:
        print(f"streamdit: {note}", file=sys.stderr)
    return code


def _given(argv: list[str]) -> set[str]:
    """The dests of the flags the user typed (abbreviations too): `argv` parsed once more with
    every default suppressed, so only what was given lands in the namespace."""
    parser = build_parser()
    for action in parser._subparsers._group_actions:  # type: ignore[union-attr]
        for sub in action.choices.values():
            for flag in sub._actions:
                flag.default = argparse.SUPPRESS
    return set(vars(parser.parse_args(argv))) - {"command"}


def _check_timeline_reach(cfg: RunConfig) -> None:
    """A `run` timeline entry at or past --chunks would never apply: exit 2 naming it."""
    if cfg.timeline is None:
        return
    from streamdit.runtime.timeline import Timeline

    late = [e.chunk for e in Timeline.load(cfg.timeline).entries if e.chunk >= cfg.chunks]
    if late:
        raise ConfigError(
            f"timeline {cfg.timeline} has entries at chunks {late}, which a run of --chunks "
            f"{cfg.chunks} never reaches (chunks are 0..{cfg.chunks - 1}) [field=timeline]"
        )


def _leave(exc: BaseException, code: int) -> int:
    """`code`, or, for a process whose comm threads are stuck in the backend, `os._exit(code)`
    once stdio and the log are flushed (its output is already closed): a normal exit would
    tear down the process groups under those threads and abort (SIGABRT) instead."""
    if needs_hard_exit(exc):
        logging.shutdown()
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(OSError, ValueError):
                stream.flush()
        os._exit(code)
    return code


def _run(cfg: RunConfig, launch: LaunchEnv, stop: StopFlag) -> RunSummary | None:
    from streamdit.api import Stream  # heavy imports only after the flags validated

    return Stream(cfg, stop=stop, launch=launch).run()


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
        drained = (
            summary.stopped_early.startswith(("SIGTERM", "SIGHUP")) or summary.stopped_early == STOP_OVER_HTTP
        )
        return EXIT_OK if drained else EXIT_INTERRUPTED
    pp = ""
    if summary.overlap_score is not None or summary.dropped_stale:
        score = "n/a" if summary.overlap_score is None else f"{summary.overlap_score:.3f}"
        pp = f"; overlap_score={score} dropped_stale={summary.dropped_stale}"
    where = f"wrote {summary.frames} frames ({summary.chunks} chunks) to {summary.out}"
    if summary.out is None:
        where = f"served {summary.frames} frames ({summary.chunks} chunks)"
    print(f"{where} in {summary.seconds:.1f} s ({_timing(summary)}){pp}")
    return 0


def _timing(summary: RunSummary) -> str:
    """Where the time went: startup (build, load, compile, warm-up), first frame, delivered FPS."""
    parts = []
    if summary.startup_s is not None:
        parts.append(f"startup {summary.startup_s:.1f} s")
    if summary.first_frame_s is not None:
        parts.append(f"first frame after {summary.first_frame_s:.2f} s")
    if summary.fps is not None:
        parts.append(f"{summary.fps:.1f} FPS")
    return ", ".join(parts) or "no chunk written"


if __name__ == "__main__":
    sys.exit(main())
