"""Compile health across ranks (protocol.md §11): graph-break budget and counter parity.

Owns: `CompileCounters` (this process's dynamo counters since a baseline: graph breaks, unique
graphs, frames compiled — recompiles included) and `check_compile_health`, which every generator
rank calls at the same point after warm-up: the counters are all-gathered on the Phase B group
FIRST, then every rank applies the same two rules to the same table, so all ranks fail together:
- C-03: the counters differ across ranks (a graph break or recompile on one rank only) —
  the ranks would run different graphs, and a collective inside one of them could strand a peer;
- C-02: graph breaks exceed the budget (e.g. a collective hidden behind `torch._dynamo.disable`,
  which fragments the graph and, in the reference system, cost >60% of throughput).
Imports torch, streamdit.errors and streamdit.parallel only.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from streamdit.errors import ParityError
from streamdit.parallel.collectives import all_gather_int64
from streamdit.parallel.groups import GroupHandle

FIELDS = ("graph_breaks", "unique_graphs", "frames")


class CompileHealthError(ParityError):
    """The compiled generator broke the graph-break budget or differs across ranks."""


@dataclass(frozen=True, slots=True)
class CompileCounters:
    graph_breaks: int
    unique_graphs: int
    frames: int
    break_reasons: tuple[str, ...] = ()

    @classmethod
    def now(cls) -> CompileCounters:
        from torch._dynamo.utils import counters

        breaks = counters["graph_break"]
        reasons = tuple(sorted({r.splitlines()[0][:120] for r in breaks}))
        return cls(
            graph_breaks=int(sum(breaks.values())),
            unique_graphs=int(counters["stats"]["unique_graphs"]),
            frames=int(counters["frames"]["total"]),
            break_reasons=reasons,
        )

    def since(self, base: CompileCounters) -> CompileCounters:
        """Counters accumulated after `base` (dynamo's are process-wide and cumulative)."""
        return CompileCounters(
            graph_breaks=self.graph_breaks - base.graph_breaks,
            unique_graphs=self.unique_graphs - base.unique_graphs,
            frames=self.frames - base.frames,
            break_reasons=tuple(r for r in self.break_reasons if r not in base.break_reasons),
        )

    def values(self) -> list[int]:
        return [self.graph_breaks, self.unique_graphs, self.frames]


def check_compile_health(
    mine: CompileCounters,
    *,
    budget: int,
    handle: GroupHandle | None,
    allowed: str,
    log: logging.Logger,
    where: str,
) -> list[list[int]]:
    """Gather, then judge (see module doc). `handle` None = a single process (budget only)."""
    every = [mine.values()] if handle is None else all_gather_int64(mine.values(), handle, allowed=allowed)
    table = "; ".join(
        f"rank{r}: " + " ".join(f"{k}={v}" for k, v in zip(FIELDS, row, strict=True))
        for r, row in enumerate(every)
    )
    log.info("compile health %s: %s", where, table)
    bad = [r for r, row in enumerate(every) if row != every[0]]
    if bad:
        raise CompileHealthError(
            f"compile counters differ on ranks {bad} vs rank 0 after warm-up ({where}): {table} "
            f"(a graph break or recompile on some ranks only) [field=compile_counters, group={allowed}]"
        )
    over = [r for r, row in enumerate(every) if row[0] > budget]
    if over:
        reasons = "; ".join(mine.break_reasons) or "see TORCH_LOGS=graph_breaks"
        raise CompileHealthError(
            f"{every[over[0]][0]} graph breaks in the compiled generator exceed the budget of {budget} "
            f"({where}): {table}; reasons: {reasons} [field=graph_breaks, group={allowed}]"
        )
    return every
