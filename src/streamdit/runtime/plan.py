"""The per-chunk phase plan and the exact inputs of Phase B.

Owns: `PhasePlan` (computed once on the driving side and asserted against the calls actually
made), `GeneratorInputs` (exactly the scalars and tensors that docs/protocol.md lists for an envelope,
nothing else), `mix_seed`, `seeded_normal` and `to_device`. The rules a plan must obey are not coded here:
`GeneratorInputs.check` runs the protocol's one rulebook (`protocol.rules.check_generator_plan`)
on its own fields, so rank0 before shipping, the receiver from the meta and the generator before
its first call all judge a chunk by the same rules. Work is identified by protocol's `Ids`.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass, fields

import torch

from streamdit.config import RunConfig
from streamdit.errors import PlanError
from streamdit.protocol.codec import TensorSpec
from streamdit.protocol.header import Ids
from streamdit.protocol.policy import CachePolicy, implied_calls
from streamdit.protocol.rules import check_generator_plan


def id_kwargs(ids: Ids | None) -> dict[str, int]:
    """The ids an IdError names (field-less): call_id, chunk_index, cache_epoch."""
    if ids is None:
        return {}
    return {"call_id": ids.call_id, "chunk_index": ids.chunk_index, "cache_epoch": ids.cache_epoch}


@dataclass(frozen=True, kw_only=True, slots=True)
class PhasePlan:
    """How many generator calls a chunk makes, decided once by the driver."""

    cache_policy: CachePolicy
    do_kv_recompute: bool
    num_denoise_steps: int
    expected_generator_calls: int

    @classmethod
    def build(cls, *, cache_policy: CachePolicy, init: bool, num_denoise_steps: int) -> PhasePlan:
        """The plan of a chunk: recompute on every chunk but an epoch's first, if the policy does."""
        recompute = cache_policy.recomputes and not init
        return cls(
            cache_policy=cache_policy,
            do_kv_recompute=recompute,
            num_denoise_steps=num_denoise_steps,
            expected_generator_calls=implied_calls(num_denoise_steps, recompute, cache_policy),
        )

    def assert_observed(self, observed: int, ids: Ids | None = None) -> None:
        if observed != self.expected_generator_calls:
            raise PlanError(
                f"made {observed} generator calls, plan expected {self.expected_generator_calls}",
                field="expected_generator_calls",
                **id_kwargs(ids),
            )


def chunk_plan(cfg: RunConfig, *, init: bool, soft_active: bool) -> tuple[PhasePlan, float]:
    """A chunk's plan and KV bias from the run's cache policy and recipe: the one derivation
    Phase A and the synthetic warm-up chunks share."""
    plan = PhasePlan.build(
        cache_policy=cfg.cache_policy, init=init, num_denoise_steps=len(cfg.denoising_step_list)
    )
    rule = cfg.recipe_spec.kv_bias
    biased = not init and (rule == "always" or (rule == "soft" and soft_active))
    return plan, cfg.soft_bias if biased else 1.0


@dataclass(frozen=True, kw_only=True, slots=True)
class GeneratorInputs:
    """Everything Phase B receives: the payload fields of an envelope (docs/protocol.md §4).

    Ids travel beside it in `Ids`; pixel video never appears here.
    """

    cache_policy: str
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
    def policy(self) -> CachePolicy:
        return CachePolicy(self.cache_policy)

    @property
    def plan(self) -> PhasePlan:
        return PhasePlan(
            cache_policy=self.policy,
            do_kv_recompute=self.do_kv_recompute,
            num_denoise_steps=self.num_denoise_steps,
            expected_generator_calls=self.expected_generator_calls,
        )

    def check(self, ids: Ids | None = None) -> None:
        """The protocol's plan rules on these inputs; Phase B runs this before any model call."""
        scalars = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in _TENSORS}
        specs = {
            name: TensorSpec.of(name, value)
            for name in _TENSORS
            if isinstance(value := getattr(self, name), torch.Tensor)
        }
        check_generator_plan(scalars, specs, id_kwargs(ids))


_TENSORS = ("denoising_step_list", "latents", "conditioning_embeds", "context_frames_override")
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
    return to_device(torch.randn(shape, generator=gen, dtype=torch.float32), device, dtype)


def to_device(host: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """A host tensor on `device` without waiting for it: through pinned memory on CUDA.

    A copy from pageable memory makes the host wait until the device has drained the work
    queued before it, and then the device idles while the host queues the next launches
    (~1 ms per re-noise draw of a wan-14b chunk, the whole previous decode for Phase A's noise:
    bench/results/profile_wan14b_bf16_h200.json). The pinned block is not reused before the
    copy ran (PyTorch's caching host allocator records it on the stream)."""
    if torch.device(device).type == "cuda":
        host = host.pin_memory().to(device, non_blocking=True)
    return host.to(device=device, dtype=dtype)
