"""Prompt timeline: which prompt drives each chunk, and how the stream changes between prompts.

Owns: parsing and validating timeline files (TOML or JSON), and answering, per chunk, the
prompt state Phase A needs: the prompt (or the two prompts being blended and the chunk's step j
of an N-chunk blend; the recipe turns (j, N) into a weight), and whether this chunk is a hard
cut. Hard cuts bump `cache_epoch` and reset every cache; soft transitions blend the conditioning
over `blend_chunks` chunks (default: the run's, which the recipe sets) and may de-weight cached
keys (the recipe decides).
A "hard" cut is scheduled: every chunk before it is shown. A "cut" is a hard cut that takes
effect at once, like a live user's: under `pp`, chunks of the old scene still in flight are
dropped (never decoded); in the other topologies nothing is in flight, so it equals "hard".

File format (JSON shown; TOML uses `[[entries]]` tables with the same keys):

    {"entries": [
        {"chunk": 0, "prompt": "a fox in snow"},
        {"chunk": 4, "prompt": "a fox at night", "transition": "soft", "blend_chunks": 2},
        {"chunk": 8, "prompt": "a city street", "transition": "hard"}
    ]}
"""

from __future__ import annotations

import json
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from streamdit.errors import ConfigError

TRANSITIONS = ("hard", "soft", "cut")
ENTRY_KEYS = {"chunk", "prompt", "transition", "blend_chunks"}
MAX_TIMELINE_BYTES = 1 << 20  # a timeline is a script of prompts, not a data set
MAX_CHUNK = 2**31 - 1  # chunk numbers travel as int64 ids; far past any stream's length


@dataclass(frozen=True, kw_only=True, slots=True)
class TimelineEntry:
    chunk: int
    prompt: str
    transition: str = "hard"
    blend_chunks: int | None = None  # None: the run's default (the recipe's, or --blend-chunks)


@dataclass(frozen=True, kw_only=True, slots=True)
class PromptState:
    """What Phase A needs for one chunk."""

    prompt: str
    previous: str | None  # prompt blended from during a soft transition, else None
    hard_cut: bool  # a hard transition starts at this chunk (not chunk 0)
    drop_in_flight: bool = False  # the hard cut is immediate ("cut"): stale chunks are dropped
    soft_active: bool  # a soft transition is blending at this chunk
    blend_step: int = 0  # chunk j (0-based) of the soft transition in progress
    blend_chunks: int = 1  # its length N; the recipe turns (j, N) into the blend weight

    @property
    def alpha(self) -> float:
        """The default blend weight of `prompt`: (j + 1) / N (1.0 when not blending)."""
        return (self.blend_step + 1) / self.blend_chunks if self.soft_active else 1.0

    @property
    def key(self) -> tuple[str, str | None, int, int]:
        """Identity of the conditioning tensor: equal keys give equal embeddings."""
        return (self.prompt, self.previous, self.blend_step, self.blend_chunks)


class PromptSource(Protocol):
    """What Phase A asks per chunk: a file timeline, or a live one steered by a user (serve)."""

    def state(self, chunk: int, blend_chunks: int = 2) -> PromptState: ...


class Timeline:
    """Ordered entries starting at chunk 0; immutable after construction."""

    def __init__(self, entries: list[TimelineEntry]) -> None:
        if not entries or entries[0].chunk != 0:
            raise ConfigError("the timeline must start with an entry at chunk 0 [field=entries[0].chunk]")
        self.entries = tuple(entries)

    @classmethod
    def single(cls, prompt: str) -> Timeline:
        return cls([TimelineEntry(chunk=0, prompt=prompt)])

    @classmethod
    def load(cls, path: Path) -> Timeline:
        """Read and validate a .json or .toml timeline; any malformed file is a ConfigError
        naming it (too large, not UTF-8, not parseable, nested too deep, a number too long), and
        a file of another suffix is refused, not guessed at (YAML would parse as broken JSON)."""
        if path.suffix not in (".json", ".toml"):
            raise ConfigError(
                f"timeline {path}: {path.suffix or 'no suffix'} is not a timeline format (write it "
                "as .toml or .json) [field=timeline]"
            )
        try:
            if path.stat().st_size > MAX_TIMELINE_BYTES:
                raise ConfigError(
                    f"timeline {path} is {path.stat().st_size} bytes, over {MAX_TIMELINE_BYTES} "
                    "[field=timeline]"
                )
            text = path.read_bytes().decode("utf-8")
        except OSError as exc:
            raise ConfigError(f"cannot read timeline {path}: {exc.strerror} [field=timeline]") from exc
        except UnicodeDecodeError as exc:
            raise ConfigError(f"timeline {path} is not UTF-8 text: {exc} [field=timeline]") from exc
        kind = "TOML" if path.suffix == ".toml" else "JSON"
        try:
            data = tomllib.loads(text) if kind == "TOML" else json.loads(text)
        except (ValueError, RecursionError) as exc:  # decode errors, int digit limit, depth
            why = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)
            raise ConfigError(f"timeline {path} is not valid {kind}: {why} [field=timeline]") from exc
        return cls(parse_entries(data, path))

    def state(self, chunk: int, blend_chunks: int = 2) -> PromptState:
        return state_at(self.entries, chunk, blend_chunks)


def state_at(
    entries: tuple[TimelineEntry, ...] | list[TimelineEntry], chunk: int, blend_chunks: int = 2
) -> PromptState:
    """The prompt state of `chunk` under `entries` (ordered by chunk, the first at or before it).

    `blend_chunks`: the length of a soft transition whose entry does not give one. The last
    chunk of a blend (j = N - 1) has weight 1 under every recipe and names no previous prompt.
    """
    idx = max(i for i, e in enumerate(entries) if e.chunk <= chunk)
    cur = entries[idx]
    hard_cut = cur.chunk == chunk and chunk > 0 and cur.transition in ("hard", "cut")
    n = cur.blend_chunks or blend_chunks
    if cur.transition == "soft" and idx > 0 and chunk - cur.chunk < n:
        j = chunk - cur.chunk
        prev = entries[idx - 1].prompt if j < n - 1 else None
        return PromptState(
            prompt=cur.prompt, previous=prev, hard_cut=False, soft_active=True, blend_step=j, blend_chunks=n
        )
    return PromptState(
        prompt=cur.prompt,
        previous=None,
        hard_cut=hard_cut,
        soft_active=False,
        drop_in_flight=hard_cut and cur.transition == "cut",
    )


def parse_entries(data: Any, path: Path) -> list[TimelineEntry]:
    """Validate the decoded file; every error names the file, the entry and the field."""
    if not isinstance(data, dict) or not isinstance(data.get("entries"), list):
        raise ConfigError(f"timeline {path} must hold a list named 'entries' [field=entries]")
    out: list[TimelineEntry] = []
    for i, raw in enumerate(data["entries"]):
        out.append(_parse_entry(raw, f"{path}: entries[{i}]"))
        if i and out[i].chunk <= out[i - 1].chunk:
            raise ConfigError(
                f"{path}: entries[{i}].chunk={out[i].chunk} must increase [field=entries[{i}].chunk]"
            )
    return out


def _short(value: Any) -> str:
    """A value for an error message, cut short (a 4000-digit number must not flood the log)."""
    text = repr(value)
    return text if len(text) <= 40 else f"{text[:37]}..."


def _parse_entry(raw: Any, where: str) -> TimelineEntry:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where} must be a table/object [field=entries]")
    unknown = set(raw) - ENTRY_KEYS
    if unknown:
        raise ConfigError(f"{where} has unknown keys {sorted(unknown)} [field={sorted(unknown)[0]}]")
    chunk = raw.get("chunk")
    if not isinstance(chunk, int) or isinstance(chunk, bool) or not 0 <= chunk <= MAX_CHUNK:
        raise ConfigError(
            f"{where}.chunk must be an integer in [0, {MAX_CHUNK}], got {_short(chunk)} [field=chunk]"
        )
    prompt = raw.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise ConfigError(f"{where}.prompt must be a non-empty string, got {_short(prompt)} [field=prompt]")
    transition = raw.get("transition", "hard")
    if transition not in TRANSITIONS:
        raise ConfigError(
            f"{where}.transition must be one of {TRANSITIONS}, got {transition!r} [field=transition]"
        )
    blend = raw.get("blend_chunks")
    if blend is not None and (
        not isinstance(blend, int) or isinstance(blend, bool) or not 1 <= blend <= MAX_CHUNK
    ):
        raise ConfigError(
            f"{where}.blend_chunks must be an integer in [1, {MAX_CHUNK}], got {_short(blend)} "
            "[field=blend_chunks]"
        )
    return TimelineEntry(chunk=chunk, prompt=prompt, transition=transition, blend_chunks=blend)
