"""Named fault-injection points for break-it tests, switched by STREAMDIT_TEST_* settings.

Owns: `FaultPlan`, parsed once from `RunConfig.test_hooks`. The hooks are parity keys (equal on
every rank), so a hook can never create a conditional collective. Production code asks the
plan at a named point; with no hooks set every point is inert.
"""

from __future__ import annotations

from dataclasses import dataclass

from streamdit.config import RunConfig
from streamdit.errors import ConfigError


class InjectedFault(RuntimeError):
    """Raised at a named injection point; tests assert on this type."""


@dataclass(frozen=True, kw_only=True, slots=True)
class FaultPlan:
    crash_at_chunk: int | None = None
    """Raise InjectedFault in Phase B of this chunk (after earlier chunks were written)."""
    extra_generator_calls: int = 0
    """Make Phase B issue this many calls beyond its plan (the plan assertion must fire)."""
    slow_chunk_ms: int = 0
    """Sleep this long after each chunk is written (gives signal tests a window)."""

    @classmethod
    def from_config(cls, cfg: RunConfig) -> FaultPlan:
        return cls(
            crash_at_chunk=_int(cfg, "CRASH_AT_CHUNK"),
            extra_generator_calls=_int(cfg, "EXTRA_GENERATOR_CALLS") or 0,
            slow_chunk_ms=_int(cfg, "SLOW_CHUNK_MS") or 0,
        )

    def before_generator(self, chunk_index: int) -> None:
        if self.crash_at_chunk is not None and chunk_index == self.crash_at_chunk:
            raise InjectedFault(f"injected crash at chunk {chunk_index} (STREAMDIT_TEST_CRASH_AT_CHUNK)")


def _int(cfg: RunConfig, name: str) -> int | None:
    raw = cfg.hook(name)
    if raw is None:
        return None
    try:
        return int(raw)
    except ValueError as exc:
        raise ConfigError(
            f"STREAMDIT_TEST_{name}={raw!r} is not an integer [field=STREAMDIT_TEST_{name}]"
        ) from exc
