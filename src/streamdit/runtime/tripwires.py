"""Drift tripwires of the generator group (docs/protocol.md §10), shared by the tp and pp topologies.

Owns: `Tripwires` — input digest parity (every rank digests the Phase B inputs it acts on),
output digest parity of the generator's latents, and weight fingerprints re-checked on every
later chunk that re-initializes the cache (OM-11, OM-12). Every comparison is an all-gather on
the Phase B group ("tp", or "mesh" under pp) and raises on EVERY rank, with the ids and the
differing fields, when any rank differs.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from streamdit.config import RunConfig
from streamdit.errors import DriftError
from streamdit.parallel.collectives import all_gather_int64
from streamdit.parallel.groups import GroupHandle
from streamdit.parallel.parity import check_replicated_fingerprints, tensor_digest
from streamdit.protocol.header import Ids
from streamdit.runtime.faults import FaultPlan
from streamdit.runtime.plan import GENERATOR_INPUT_FIELDS, GeneratorInputs, id_kwargs

log = logging.getLogger(__name__)


class Tripwires:
    """Input / output digest parity and weight fingerprints across one Phase B group."""

    def __init__(
        self,
        cfg: RunConfig,
        handle: GroupHandle | None,
        model: nn.Module,
        *,
        faults: FaultPlan,
        world: GroupHandle,
    ) -> None:
        if handle is None:
            raise ValueError("tripwires need the Phase B group handle")
        self.input_every = cfg.input_digest_every
        self.output_every = cfg.output_digest_every
        self.fingerprint_on_init_cache = cfg.fingerprint_on_init_cache
        self.handle = handle
        self.allowed = handle.name  # "tp" or "mesh": fixed here, checked by every wrapper call
        self.model = model
        self.faults = faults
        self.world = world  # only for the OM-08 hook: a collective deliberately on the wrong group

    def inputs(self, ids: Ids, inputs: GeneratorInputs) -> None:
        # Every rank acts on the same envelope, so all of them take (or skip) these collectives.
        if self.fingerprint_on_init_cache and inputs.init_cache and ids.chunk_index > 0:
            check_replicated_fingerprints(self.model, self.handle, allowed=self.allowed, log=log)
        if self.input_every and ids.chunk_index % self.input_every == 0:
            self._compare("input", ids, [_field_digest(inputs, name) for name in GENERATOR_INPUT_FIELDS])

    def output(self, ids: Ids, latents: torch.Tensor) -> None:
        if self.output_every and ids.chunk_index % self.output_every == 0:
            self._compare("output", ids, [tensor_digest(latents)])

    def _compare(self, what: str, ids: Ids, mine: list[int]) -> None:
        handle = self.world if self.faults.wrong_group_at_chunk == ids.chunk_index else self.handle
        every = all_gather_int64(mine, handle, allowed=self.allowed)
        bad = [r for r, theirs in enumerate(every) if theirs != every[0]]
        if not bad:
            return
        names = GENERATOR_INPUT_FIELDS if what == "input" else ("latents_out",)
        fields = sorted(
            {names[i] for r in bad for i, (a, b) in enumerate(zip(every[0], every[r], strict=True)) if a != b}
        )
        table = "; ".join(f"rank{r}: " + ",".join(f"{v:016x}" for v in d) for r, d in enumerate(every))
        raise DriftError(
            f"{what} digest mismatch on ranks {bad} vs rank 0 (fields {fields}); {table}",
            field=fields[0] if fields else what,
            group=self.allowed,
            **id_kwargs(ids),
        )


def _field_digest(inputs: GeneratorInputs, name: str) -> int:
    value = getattr(inputs, name)
    if isinstance(value, torch.Tensor):
        return tensor_digest(value)
    if isinstance(value, str):  # the cache policy
        return tensor_digest(torch.tensor(list(value.encode("utf-8")), dtype=torch.int64))
    return tensor_digest(torch.tensor([float(value if value is not None else -1)], dtype=torch.float64))
