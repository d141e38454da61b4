"""The per-chunk phase plan and the exact inputs of Phase B.

Owns: `PhasePlan` (computed once on the driving side and asserted against the calls actually
made), `ChunkIds` (the ids every message and log line carries), `GeneratorInputs` (exactly the
scalars and tensors that protocol.md lists for an envelope, nothing else), and `mix_seed`.
Imports torch and streamdit.errors only, so every topology can share it.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass, fields

import torch

from streamdit.errors import PlanError


@dataclass(frozen=True, kw_only=True, slots=True)
class ChunkIds:
    """Identity of one unit of work (see architecture.md, "Identity of work")."""

    call_id: int
    chunk_index: int
    cache_epoch: int
    control_epoch: int = 0

    def as_kwargs(self) -> dict[str, int]:
        return {
            "call_id": self.call_id,
            "chunk_index": self.chunk_index,
            "cache_epoch": self.cache_epoch,
        }


@dataclass(frozen=True, kw_only=True, slots=True)
class PhasePlan:
    """How many generator calls a chunk makes, decided once by the driver."""

    do_kv_recompute: bool
    num_denoise_steps: int
    expected_generator_calls: int

    @classmethod
    def build(cls, *, do_kv_recompute: bool, num_denoise_steps: int) -> PhasePlan:
        calls = num_denoise_steps + (1 if do_kv_recompute else 0)
        return cls(
            do_kv_recompute=do_kv_recompute,
            num_denoise_steps=num_denoise_steps,
            expected_generator_calls=calls,
        )

    def check(self, step_list_len: int, ids: ChunkIds | None = None) -> None:
        """Raise PlanError unless the plan is self-consistent and matches the step list."""
        kw = ids.as_kwargs() if ids else {}
        if self.num_denoise_steps != step_list_len:
            raise PlanError(
                f"num_denoise_steps={self.num_denoise_steps} != len(denoising_step_list)={step_list_len}",
                field="num_denoise_steps",
                **kw,
            )
        want = self.num_denoise_steps + (1 if self.do_kv_recompute else 0)
        if self.expected_generator_calls != want:
            raise PlanError(
                f"expected_generator_calls={self.expected_generator_calls} but the plan implies {want}",
                field="expected_generator_calls",
                **kw,
            )

    def assert_observed(self, observed: int, ids: ChunkIds | None = None) -> None:
        if observed != self.expected_generator_calls:
            raise PlanError(
                f"made {observed} generator calls, plan expected {self.expected_generator_calls}",
                field="expected_generator_calls",
                **(ids.as_kwargs() if ids else {}),
            )


@dataclass(frozen=True, kw_only=True, slots=True)
class GeneratorInputs:
    """Everything Phase B receives: the payload fields of a TP envelope (protocol.md §4).

    Ids travel beside it in `ChunkIds`; pixel video never appears here.
    """

    height: int
    width: int
    current_start_frame: int
    init_cache: bool
    reset_kv_cache: bool
    reset_crossattn_cache: bool
    conditioning_updated: bool
    kv_cache_attention_bias: float
    do_kv_recompute: bool
    num_denoise_steps: int
    expected_generator_calls: int
    base_seed: int
    denoising_step_list: torch.Tensor
    latents: torch.Tensor
    conditioning_embeds: torch.Tensor
    context_frames_override: torch.Tensor | None

    @property
    def plan(self) -> PhasePlan:
        return PhasePlan(
            do_kv_recompute=self.do_kv_recompute,
            num_denoise_steps=self.num_denoise_steps,
            expected_generator_calls=self.expected_generator_calls,
        )

    def check(self, ids: ChunkIds | None = None, *, latent_anchor: bool = False) -> None:
        """Plan consistency and the override rule; Phase B runs this before any model call.

        `latent_anchor` (recompute r0): the generator builds the context itself, so a shipped
        override is forbidden whether or not the chunk recomputes.
        """
        self.plan.check(int(self.denoising_step_list.numel()), ids)
        has_ctx = self.context_frames_override is not None
        if has_ctx != (self.do_kv_recompute and not latent_anchor):
            why = (
                "forbidden under recompute r0 (the generator builds its own anchor)"
                if latent_anchor
                else "required when do_kv_recompute"
                if self.do_kv_recompute
                else "forbidden without do_kv_recompute"
            )
            raise PlanError(
                f"context_frames_override {why}",
                field="context_frames_override",
                **(ids.as_kwargs() if ids else {}),
            )


GENERATOR_INPUT_FIELDS: tuple[str, ...] = tuple(f.name for f in fields(GeneratorInputs))


def mix_seed(*parts: int) -> int:
    """A stable 63-bit seed from integers (no Python hash salt, same on every rank)."""
    blob = b"".join(struct.pack("<q", int(p)) for p in parts)
    return int.from_bytes(hashlib.blake2b(blob, digest_size=8).digest(), "little") >> 1


def seeded_normal(
    seed: int, shape: tuple[int, ...], *, device: torch.device, dtype: torch.dtype
) -> torch.Tensor:
    """Standard normal noise drawn on the CPU from `seed`, so bits do not depend on the device."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randn(shape, generator=gen, dtype=torch.float32).to(device=device, dtype=dtype)
