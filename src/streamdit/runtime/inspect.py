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
    ranks: list[RankRecord]
    missing: list[int]  # ranks with no record (killed / stopped / never started)
    first_failing: int | None
    why: str


def inspect_records(directory: Path) -> Report:
    folder = directory / "flight" if (directory / "flight").is_dir() else directory
    files = sorted(folder.glob("rank*.json"))
    if not files:
        raise ConfigError(f"no flight records (rank*.json) in {folder} [field=dir]")
    ranks, world = [], None
    for path in files:
        data = json.loads(path.read_text(encoding="utf-8"))
        events = data.get("events", [])
        world = world or _world_size(events)
        ranks.append(_rank_record(int(re.sub(r"\D", "", path.stem)), events))
    ranks.sort(key=lambda r: r.rank)
    missing = sorted(set(range(world or 0)) - {r.rank for r in ranks})
    first, why = _first_failing(ranks, missing)
    return Report(world_size=world, ranks=ranks, missing=missing, first_failing=first, why=why)


def _world_size(events: list[dict]) -> int | None:
    for e in events:
        found = re.search(r"world_size=(\d+)", str(e.get("detail", "")))
        if e.get("name") == "start" and found:
            return int(found.group(1))
    return None


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
    return "\n".join(lines)


def report_json(report: Report) -> str:
    return json.dumps(asdict(report), indent=1)
