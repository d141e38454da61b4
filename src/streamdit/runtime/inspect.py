"""`streamdit inspect DIR`: read a failed job's flight records and name where it started.

Owns: `inspect_records(dir)` and `format_report`. Every rank of a tp / pp job writes
`<out dir>/flight/rank<N>.json` on a fatal error (the last protocol events with ids and the
fatal error). Ranks that merely followed a failure end with a *symptom* — a transport error, a
peer's ERROR (PeerAbort), an orphan or lost-peer verdict, a poisoned half-send — while the rank
where it began ends with a *cause* (a plan, drift, parity, group, protocol or injected fault).
The report names the first rank whose fatal event is a cause (by wall-clock time, the ranks of
one host share it); when every record is a symptom, it names the rank they point at (the peer
that stopped heartbeating, or rank0 for orphans), including ranks that left no record at all
(killed or stopped).

Only one job is judged: records carry their job's run id, and the job of the newest record
wins; an earlier job's records (a rank that did not start this time) are listed as ignored.
Each rank moves its previous record to `flight/previous/` when it starts, so a job that
succeeded leaves no record to be mistaken for its own. Reading is bounded: a record over
`MAX_RECORD_BYTES`, truncated or not JSON is reported as unreadable, and a world size over
`MAX_WORLD` is not believed.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path

from streamdit.errors import ConfigError

SYMPTOMS = (
    "TransportError",
    "ChannelBroken",
    "PeerAbort",
    "OrphanedError",
    "PeerLost",
    "Poisoned",
    "DistBackendError",
    "DistNetworkError",
    "RuntimeError",
)


@dataclass(frozen=True, kw_only=True, slots=True)
class RankRecord:
    rank: int
    outcome: str  # "cause" | "symptom" | "none" (a record without a fatal event)
    error: str  # error type of the fatal event ("" if none)
    detail: str
    t_wall: float | None
    last_events: list[str]


@dataclass(frozen=True, kw_only=True, slots=True)
class Report:
    world_size: int | None
    run_id: str
    ranks: list[RankRecord]
    missing: list[int]  # ranks with no record (killed / stopped / never started)
    first_failing: int | None
    why: str
    ignored: list[str]  # records not judged: another job's, or unreadable


MAX_RECORD_BYTES = 4 << 20  # a flight record is a ring of 256 small events
MAX_WORLD = 4096
_RANK_FILE = re.compile(r"rank(\d{1,6})\.json")


@dataclass(frozen=True, slots=True)
class _Loaded:
    rank: int
    run_id: str
    mtime: float
    events: list[dict]


def inspect_records(directory: Path) -> Report:
    folder = directory / "flight" if (directory / "flight").is_dir() else directory
    files = sorted(p for p in folder.glob("rank*.json") if _RANK_FILE.fullmatch(p.name))
    if not files:
        raise ConfigError(f"no flight records (rank<N>.json) in {folder} [field=dir]")
    loaded, ignored = [], []
    for path in files:
        record = _load(path)
        if isinstance(record, str):
            ignored.append(record)
        else:
            loaded.append(record)
    if not loaded:
        raise ConfigError(f"no readable flight record in {folder}: {'; '.join(ignored)} [field=dir]")
    newest = max(loaded, key=lambda r: r.mtime).run_id
    for r in loaded:
        if r.run_id != newest:
            ignored.append(f"rank{r.rank}.json: an earlier job's (run id {r.run_id or 'none'})")
    job = [r for r in loaded if r.run_id == newest]
    world = next((w for r in job if (w := _world_size(r.events)) is not None), None)
    ranks = sorted((_rank_record(r.rank, r.events) for r in job), key=lambda r: r.rank)
    missing = sorted(set(range(world or 0)) - {r.rank for r in ranks})
    first, why = _first_failing(ranks, missing)
    return Report(
        world_size=world,
        run_id=newest,
        ranks=ranks,
        missing=missing,
        first_failing=first,
        why=why,
        ignored=ignored,
    )


def _load(path: Path) -> _Loaded | str:
    """One record, or why it is not judged."""
    rank = int(_RANK_FILE.fullmatch(path.name).group(1))  # type: ignore[union-attr]
    try:
        stat = path.stat()
        if stat.st_size > MAX_RECORD_BYTES:
            return f"{path.name}: {stat.st_size} bytes, over {MAX_RECORD_BYTES} (not a flight record?)"
        data = json.loads(path.read_bytes().decode("utf-8"))
    except (OSError, ValueError, RecursionError) as exc:
        return f"{path.name}: unreadable ({type(exc).__name__}: {str(exc)[:80]}; truncated?)"
    events = data.get("events") if isinstance(data, dict) else None
    if not isinstance(events, list) or not all(isinstance(e, dict) for e in events):
        return f"{path.name}: not a flight record (no event list)"
    return _Loaded(rank, str(data.get("run_id") or ""), stat.st_mtime, events)


def _world_size(events: list[dict]) -> int | None:
    for e in events:
        found = re.search(r"world_size=(\d{1,6})\b", str(e.get("detail", "")))
        if e.get("name") == "start" and found and 0 < int(found.group(1)) <= MAX_WORLD:
            return int(found.group(1))
    return None


def rotate_record(path: Path) -> None:
    """At a rank's start: move its previous record (an earlier job's) to `previous/`, so this
    job's folder only ever holds this job's records. Best effort: a failure is not fatal."""
    if path.exists():
        try:
            (path.parent / "previous").mkdir(parents=True, exist_ok=True)
            path.replace(path.parent / "previous" / path.name)
        except OSError:
            pass


def _rank_record(rank: int, events: list[dict]) -> RankRecord:
    fatal = next((e for e in reversed(events) if e.get("name") in ("fatal", "watchdog")), None)
    tail = [_describe(e) for e in events[-6:]]
    if fatal is None:
        return RankRecord(rank=rank, outcome="none", error="", detail="", t_wall=None, last_events=tail)
    detail = str(fatal.get("detail", ""))
    error = "WatchdogVerdict" if fatal["name"] == "watchdog" else detail.split(":", 1)[0]
    outcome = "symptom" if fatal["name"] == "watchdog" or error in SYMPTOMS else "cause"
    return RankRecord(
        rank=rank, outcome=outcome, error=error, detail=detail, t_wall=fatal.get("t_wall"), last_events=tail
    )


def _describe(e: dict) -> str:
    ids = "" if "call_id" not in e else f" call_id={e['call_id']} chunk={e.get('chunk_index')}"
    return f"{e.get('name')}{ids} {str(e.get('detail', ''))[:80]}".strip()


def _first_failing(ranks: list[RankRecord], missing: list[int]) -> tuple[int | None, str]:
    causes = [r for r in ranks if r.outcome == "cause"]
    if causes:
        first = min(causes, key=lambda r: (r.t_wall if r.t_wall is not None else float("inf"), r.rank))
        return first.rank, f"{first.error} (the first cause; others followed)"
    for r in ranks:  # a rank that stood still past the window: its peers' verdicts followed it
        stalled = re.search(r"after this rank itself stalled (\S+) s", r.detail)
        if stalled:
            return r.rank, f"stalled {stalled.group(1)} s past the watchdog window (stopped or starved)"
    for r in ranks:
        aborted = re.search(r"rank (\d+) aborted: (\S+)", r.detail)
        if aborted:
            return int(aborted.group(1)), f"{aborted.group(2).rstrip(':')} (announced to rank {r.rank})"
    for r in ranks:
        silent = re.search(r"rank (\d+) has not heartbeat", r.detail)
        if silent:
            return int(silent.group(1)), f"stopped heartbeating (seen by rank {r.rank}); it left no cause"
    if any("orphaned" in r.detail for r in ranks):
        return 0, "rank0 stopped heartbeating (every other rank was orphaned)"
    if missing:
        return missing[0], "left no flight record (killed or stopped?)"
    return None, "every record is a symptom (a timeout or a lost peer)"


def format_report(report: Report) -> str:
    lines = [f"{'rank':>4}  {'outcome':<8} {'error':<18} detail"]
    for r in report.ranks:
        lines.append(f"{r.rank:>4}  {r.outcome:<8} {r.error:<18} {r.detail[:110]}")
    for m in report.missing:
        lines.append(f"{m:>4}  {'missing':<8} {'':<18} no flight record (killed, stopped or never started)")
    who = "unknown" if report.first_failing is None else f"rank {report.first_failing}"
    lines.append(f"first failing: {who}: {report.why}")
    lines.extend(f"ignored: {why}" for why in report.ignored)
    return "\n".join(lines)


def report_json(report: Report) -> str:
    return json.dumps(asdict(report), indent=1)
