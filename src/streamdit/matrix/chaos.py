"""`streamdit matrix --chaos N --seed S`: N seeded random faults over single, tp and pp.

Owns: `EXPECTED` (what every rank must do after each fault, as a table), `draw_cases` (N cases
from one seed), `Launch` (how a case's ranks start), `run_case` and `run_chaos`.
A case is one `streamdit run` job (tiny preset, CPU/gloo unless `--backend nccl`) started as
torchrun would start it (rank0 hosts the store on loopback), each rank in its own session. The
fault comes from outside, as an operator's or a kernel's would, once rank0's metrics show the
drawn chunk, after a drawn delay (so it lands anywhere in a chunk: in Phase B, in a
collective, between chunks):

| fault        | hits                 | the hit rank                     | every other rank   |
|--------------|----------------------|----------------------------------|--------------------|
| kill         | any rank             | SIGKILL (-9)                     | 4 if rank0, else 6 |
| stop         | a worker             | resumed after the verdict: 4     | 6                  |
| stop         | the single process   | resumed after a window: 0        |                    |
| store-frozen | rank0 (the store)    | resumed after the verdict: 6     | 4                  |
| term, hup    | any rank             | 0 (the job drains)               | 0                  |
| disk-full    | rank0 (a size limit) | 1, naming the failed write       | 5                  |

A stopped worker resumes to find its store host gone (4); a resumed rank0 finds its peers gone
(6). The disk-full limit falls half way through the drawn chunk.

Every rank must end within its bound (counted from the fault, or from its resume): a verdict
within the watchdog window + `VERDICT_SLACK_S`, a drain within `DRAIN_BOUND_S`. Rank0's video
must then be whole (`media.strict_frames`), hold exactly the frames its metrics claim, in
chunk order from 0, and at least the chunks written when the fault came; a failed job's flight
records must make `streamdit inspect` name the hit rank. Two clean reference runs (.npy, .mp4)
come first: they check the no-fault path and size the disk-full limits.
"""

from __future__ import annotations

import json
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from streamdit.config import TEST_HOOK_PREFIX, child_environment, rank_environment
from streamdit.media import NPY_HEADER_LEN, strict_frames
from streamdit.runtime.inspect import inspect_records
from streamdit.runtime.launch import die_with_parent, emulated_host_environment, free_port, kill_group
from streamdit.runtime.metrics import read_metrics

WORLD = {"single": 1, "tp": 2, "pp": 3}
WINDOW_S = 3.0
DIST_TIMEOUT_S = 10.0
CHUNKS = 12
SLOW_CHUNK_MS = 200  # rank0 rests after each chunk: the stream outlives the fault's slack
VERDICT_SLACK_S = 5.0  # a heartbeat, the judge's tick, exiting, on a loaded 2-core machine
DRAIN_BOUND_S = 30.0
STARTUP_BOUND_S = 180.0  # importing torch on every rank of a loaded machine, then the chunks
_NONE: frozenset[int] = frozenset()  # a single process has no other rank

# (fault, role of the hit rank) -> (signal, the hit rank's codes, every other rank's codes).
# role: "alone" (single), "rank0" or "worker"; a missing pair is a fault that cannot hit there.
EXPECTED: dict[tuple[str, str], tuple[int | None, frozenset[int], frozenset[int]]] = {
    ("kill", "alone"): (signal.SIGKILL, frozenset({-9}), _NONE),
    ("kill", "rank0"): (signal.SIGKILL, frozenset({-9}), frozenset({4})),
    ("kill", "worker"): (signal.SIGKILL, frozenset({-9}), frozenset({6})),
    ("stop", "alone"): (signal.SIGSTOP, frozenset({0}), _NONE),
    ("stop", "worker"): (signal.SIGSTOP, frozenset({4}), frozenset({6})),
    ("store-frozen", "rank0"): (signal.SIGSTOP, frozenset({6}), frozenset({4})),
    **{
        (kind, role): (sig, frozenset({0}), _NONE if role == "alone" else frozenset({0}))
        for kind, sig in (("term", signal.SIGTERM), ("hup", signal.SIGHUP))
        for role in ("alone", "rank0", "worker")
    },
    ("disk-full", "alone"): (None, frozenset({1}), _NONE),
    ("disk-full", "rank0"): (None, frozenset({1}), frozenset({5})),
}
KINDS = tuple(dict.fromkeys(kind for kind, _ in EXPECTED))


@dataclass(frozen=True, slots=True)
class Case:
    index: int
    topology: str
    kind: str
    rank: int
    chunk: int  # the fault comes once rank0's metrics hold this many chunks
    delay_s: float  # ... and this long after
    suffix: str  # "npy" | "mp4"

    @property
    def role(self) -> str:
        return "alone" if self.topology == "single" else ("rank0" if self.rank == 0 else "worker")

    def expected(self, rank: int) -> frozenset[int]:
        _, hit, others = EXPECTED[(self.kind, self.role)]
        return hit if rank == self.rank else others

    def label(self) -> str:
        return f"{self.topology}/{self.kind}/rank{self.rank}@{self.chunk}.{self.suffix}"


@dataclass(slots=True)
class CaseResult:
    case: Case
    status: str = "fail"  # pass | fail
    codes: dict[int, int | None] = field(default_factory=dict)
    seconds: dict[int, float] = field(default_factory=dict)  # each rank's exit after its fault
    chunks_at_fault: int = 0
    chunks: int = 0
    frames: int = 0
    claimed: int = 0
    inspect: str = ""
    problems: list[str] = field(default_factory=list)


def draw_cases(n: int, seed: int) -> list[Case]:
    """N cases from `seed` alone: the same seed draws the same faults on every machine."""
    rng = random.Random(seed)
    cases = []
    for index in range(n):
        kind = rng.choice(KINDS)
        topology = rng.choice([t for t in sorted(WORLD) if _roles(kind, t)])
        role = rng.choice(_roles(kind, topology))
        rank = rng.randrange(1, WORLD[topology]) if role == "worker" else 0
        chunk = rng.randrange(1, CHUNKS - 3)
        delay_s = round(rng.uniform(0.0, 0.3), 3)
        cases.append(Case(index, topology, kind, rank, chunk, delay_s, rng.choice(("npy", "mp4"))))
    return cases


def _roles(kind: str, topology: str) -> list[str]:
    wanted = ("alone",) if topology == "single" else ("rank0", "worker")
    return [role for role in wanted if (kind, role) in EXPECTED]


@dataclass(frozen=True, slots=True)
class Reference:
    """A clean run's file per suffix: its size and its chunks' frame counts."""

    sizes: dict[str, int]
    frames: tuple[int, ...]

    def byte_limit(self, suffix: str, chunk: int) -> int:
        """A file-size limit half way through chunk `chunk` (0-based) of the stream."""
        before, total = sum(self.frames[:chunk]), sum(self.frames)
        at = before + self.frames[chunk] // 2
        if suffix == "npy":
            frame_bytes = (self.sizes["npy"] - NPY_HEADER_LEN) // total
            return NPY_HEADER_LEN + frame_bytes * at
        return self.sizes["mp4"] * at // total


def run_chaos(
    *, n: int, seed: int, backend: str, emulate_hosts: bool, json_path: Path | None, keep: Path | None
) -> int:
    """Run N cases of `seed`; every case's files stay under `keep` (else a failed case's only).
    The JSON is rewritten after every case, so a run cut short keeps what it measured."""
    work = keep or Path(tempfile.mkdtemp(prefix="streamdit-chaos-"))
    launch = Launch(backend=backend, emulate_hosts=emulate_hosts)
    t0 = time.monotonic()
    reference = _reference(launch, work)
    print(f"reference: sizes {reference.sizes}, frames per chunk {list(reference.frames)}", flush=True)
    results: list[CaseResult] = []
    for case in draw_cases(n, seed):
        case_dir = work / f"case{case.index:03d}"
        result = run_case(case, launch, reference, case_dir)
        results.append(result)
        if keep is None and result.status == "pass":
            shutil.rmtree(case_dir, ignore_errors=True)
        codes = " ".join(f"{r}:{c}" for r, c in sorted(result.codes.items()))
        secs = " ".join(f"{s:.1f}" for _, s in sorted(result.seconds.items()))
        why = "; ".join(result.problems)
        print(f"{case.index:>3} {result.status:<4} {case.label():<34} codes {codes:<14} s {secs:<14} {why}")
        sys.stdout.flush()
        if json_path is not None:
            _write_json(json_path, results, n=n, seed=seed, backend=backend, t0=t0)
    passed = sum(r.status == "pass" for r in results)
    if keep is None and passed == n:
        shutil.rmtree(work, ignore_errors=True)
    print(f"{passed} of {n} cases pass in {time.monotonic() - t0:.0f} s (seed {seed})")
    return 0 if passed == n else 1


def _write_json(path: Path, results: list[CaseResult], *, n: int, seed: int, backend: str, t0: float) -> None:
    passed = sum(r.status == "pass" for r in results)
    doc = {
        "command": " ".join(["streamdit", *sys.argv[1:]]),
        "seed": seed,
        "backend": backend,
        "window_s": WINDOW_S,
        "chunks": CHUNKS,
        "summary": {
            "cases": n,
            "run": len(results),
            "passed": passed,
            "seconds": round(time.monotonic() - t0, 1),
        },
        "cases": [{**asdict(r), "case": {**asdict(r.case), "label": r.case.label()}} for r in results],
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=1) + "\n")


@dataclass(frozen=True, slots=True)
class Launch:
    """How a case's ranks start: torchrun's environment, gloo on CPU or NCCL on GPUs."""

    backend: str
    emulate_hosts: bool

    def start(self, case: Case, out_dir: Path, byte_limit: int | None) -> list[subprocess.Popen]:
        world, port = WORLD[case.topology], free_port()
        out_dir.mkdir(parents=True, exist_ok=True)
        flags = ["--topology", case.topology, "--height", "32", "--width", "48", "--no-progress"]
        flags += ["--chunks", str(CHUNKS), "--out", str(out_dir / f"v.{case.suffix}")]
        flags += ["--metrics", str(out_dir / "m.jsonl")]
        if case.topology != "single":  # a single process has no peers to time out or watch
            flags += ["--watchdog-window", str(WINDOW_S), "--dist-timeout", str(DIST_TIMEOUT_S)]
        if self.backend == "nccl":
            flags += ["--device", "cuda"]
        procs = []
        hooks = {f"{TEST_HOOK_PREFIX}SLOW_CHUNK_MS": str(SLOW_CHUNK_MS), "PYTHONUNBUFFERED": "1"}
        for rank in range(world):
            env = child_environment(hooks)  # this process's hooks never reach the job
            if case.topology != "single":
                env.update(rank_environment(rank, world, port, base=env))
            if self.emulate_hosts:
                env.update(emulated_host_environment(rank))
            limit = byte_limit if rank == 0 else None
            with open(out_dir / f"rank{rank}.log", "wb") as log:
                procs.append(
                    subprocess.Popen(
                        [sys.executable, "-m", "streamdit", "run", *flags],
                        env=env,
                        stdout=log,
                        stderr=subprocess.STDOUT,
                        start_new_session=True,
                        preexec_fn=lambda limit=limit: _child_setup(limit),
                    )
                )
        return procs


def _child_setup(byte_limit: int | None) -> None:
    die_with_parent()
    if byte_limit is not None:  # a full disk: writes past the limit fail (EFBIG, as ENOSPC would)
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (byte_limit, byte_limit))


def _reference(launch: Launch, work: Path) -> Reference:
    sizes, frames = {}, ()
    for suffix in ("npy", "mp4"):
        out = work / f"reference-{suffix}"
        procs = launch.start(Case(-1, "single", "none", 0, 0, 0.0, suffix), out, None)
        codes, _ = _wait(procs, time.monotonic() + STARTUP_BOUND_S)
        rows = _rows(out / "m.jsonl")
        if codes != {0: 0} or len(rows) != CHUNKS:
            log = (out / "rank0.log").read_text(errors="replace")[-2000:]
            raise RuntimeError(f"the clean reference run ({suffix}) failed: exit {codes}:\n{log}")
        sizes[suffix] = (out / f"v.{suffix}").stat().st_size
        frames = tuple(r["frames"] for r in rows)
    return Reference(sizes, frames)


def run_case(case: Case, launch: Launch, reference: Reference, out_dir: Path) -> CaseResult:
    result = CaseResult(case)
    sig = EXPECTED[(case.kind, case.role)][0]
    limit = reference.byte_limit(case.suffix, case.chunk) if case.kind == "disk-full" else None
    procs = launch.start(case, out_dir, limit)
    stopped = sig == signal.SIGSTOP
    bound = DRAIN_BOUND_S if case.kind in ("term", "hup") else WINDOW_S + VERDICT_SLACK_S
    try:
        if sig is None:  # disk-full: the fault's moment is rank0's failed write
            codes, at = _wait(procs[:1], time.monotonic() + STARTUP_BOUND_S, ranks=[0])
            t_fault = at[0]
            _record(result, codes, at, t_fault)
            rest = list(range(1, len(procs)))
        else:
            t_fault = _inject(case, procs, out_dir / "m.jsonl", sig, result)
            if t_fault is None:  # what every rank did without the fault is the evidence
                codes, at = _wait(procs, time.monotonic() + DRAIN_BOUND_S)
                _record(result, codes, at, time.monotonic())
                return _finish(result, out_dir)
            rest = [r for r in range(len(procs)) if not (stopped and r == case.rank)]
        codes, at = _wait([procs[r] for r in rest], t_fault + bound, ranks=rest)
        _record(result, codes, at, t_fault)
        if stopped:  # resumed once its peers ruled (a single process: after a window's stall)
            if case.role == "alone":
                time.sleep(WINDOW_S + 1.0)
            t_cont = time.monotonic()
            os.killpg(procs[case.rank].pid, signal.SIGCONT)
            resume_bound = DRAIN_BOUND_S if case.role == "alone" else WINDOW_S + VERDICT_SLACK_S
            codes, at = _wait([procs[case.rank]], t_cont + resume_bound, ranks=[case.rank])
            _record(result, codes, at, t_cont)
        return _finish(result, out_dir)
    finally:
        for p in procs:
            kill_group(p)


def _inject(
    case: Case, procs: list[subprocess.Popen], metrics: Path, sig: int, result: CaseResult
) -> float | None:
    """Wait for the drawn chunk, then deliver the fault; its time, or None if the job ended first."""
    deadline = time.monotonic() + STARTUP_BOUND_S
    while len(_rows(metrics)) < case.chunk:
        if any(p.poll() is not None for p in procs) or time.monotonic() > deadline:
            result.problems.append(f"the job ended or stalled before chunk {case.chunk}")
            return None
        time.sleep(0.02)
    time.sleep(case.delay_s)
    result.chunks_at_fault = len(_rows(metrics))
    os.killpg(procs[case.rank].pid, sig)
    return time.monotonic()


def _wait(
    procs: list[subprocess.Popen], deadline: float, ranks: list[int] | None = None
) -> tuple[dict[int, int | None], dict[int, float]]:
    """Exit codes (None: still running at the deadline, then killed) and exit times per rank."""
    ranks = ranks if ranks is not None else list(range(len(procs)))
    codes: dict[int, int | None] = {}
    at: dict[int, float] = {}
    while len(codes) < len(procs) and time.monotonic() < deadline:
        for rank, p in zip(ranks, procs, strict=True):
            if rank not in codes and p.poll() is not None:
                codes[rank], at[rank] = p.returncode, time.monotonic()
        time.sleep(0.02)
    for rank, p in zip(ranks, procs, strict=True):
        if rank not in codes:
            kill_group(p)
            codes[rank], at[rank] = None, time.monotonic()
    return codes, at


def _record(result: CaseResult, codes: dict[int, int | None], at: dict[int, float], t0: float) -> None:
    for rank, code in codes.items():
        result.codes[rank] = code
        result.seconds[rank] = round(at[rank] - t0, 2)
        if code is None:
            result.problems.append(f"rank {rank} still running at its bound: killed")
        elif code not in result.case.expected(rank):
            result.problems.append(
                f"rank {rank} exited {code}, expected {sorted(result.case.expected(rank))}"
            )


def _finish(result: CaseResult, out_dir: Path) -> CaseResult:
    case = result.case
    metrics = out_dir / "m.jsonl"
    read = read_metrics(metrics) if metrics.exists() else None
    rows = read.chunks if read is not None else []
    result.chunks, result.claimed = len(rows), sum(r["frames"] for r in rows)
    try:
        result.frames = strict_frames(out_dir / f"v.{case.suffix}")
    except (ValueError, OSError) as exc:
        result.problems.append(f"the video is not whole: {exc}")
    if result.frames != result.claimed:
        result.problems.append(f"the video holds {result.frames} frames, the metrics claim {result.claimed}")
    if [r["chunk_index"] for r in rows] != list(range(len(rows))):
        result.problems.append("the metrics' chunks are not 0..n-1 in order")
    if result.chunks < result.chunks_at_fault:
        result.problems.append(
            f"{result.chunks} chunks kept, {result.chunks_at_fault} were written at the fault"
        )
    _check_summary(result, read.summary if read is not None else None)
    if case.kind == "stop" and case.role == "alone" and result.chunks != CHUNKS:
        result.problems.append(f"a resumed single run kept {result.chunks} of {CHUNKS} chunks")
    failed_job = any(c != 0 for c in result.codes.values())
    if failed_job and case.role != "alone":
        report = inspect_records(out_dir)
        result.inspect = f"{report.first_failing}: {report.why}"
        if report.first_failing != case.rank:
            result.problems.append(f"inspect names rank {report.first_failing}, not rank {case.rank}")
    if not result.problems:
        result.status = "pass"
    else:
        result.problems.append(f"logs: {out_dir}")
    return result


def _check_summary(result: CaseResult, summary: dict | None) -> None:
    """rank0's summary line: there whenever rank0 ended by itself (a clean drain or a verdict;
    not a SIGKILL, and a full disk may refuse it), and true to the chunk lines."""
    if summary is None:
        if result.codes.get(0) == 0:
            result.problems.append("rank0 exited 0 without a summary line")
        return
    if (summary["chunks"], summary["frames"]) != (result.chunks, result.claimed):
        result.problems.append(
            f"the summary says {summary['chunks']} chunks / {summary['frames']} frames, the lines "
            f"{result.chunks} / {result.claimed}"
        )
    if (summary["outcome"] == "failed") != (result.codes.get(0) not in (0, None)):
        result.problems.append(
            f"summary outcome {summary['outcome']!r} but rank0 exited {result.codes.get(0)}"
        )


def _rows(metrics: Path) -> list[dict]:
    """The complete lines of a metrics file (a line being written is not read)."""
    if not metrics.exists():
        return []
    return read_metrics(metrics).chunks
