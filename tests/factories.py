"""Valid protocol messages for tests, with small tensors; override any field by keyword.

`tp_infer()` / `pp_infer()` / `pp_result()` build a message that passes `validate()`; tests then
break exactly one thing (keyword overrides) and assert the named rejection. `dit_caches()`: a
tiny DiT's KV and cross-attention caches for one call on an 8x8 latent.
"""

from __future__ import annotations

from typing import Any

import torch

from streamdit.model.kv_cache import CrossAttnCache, KVCache
from streamdit.model.presets import DiTConfig
from streamdit.protocol.messages import Action, PPEnvelopeV1, PPResultV1, TPEnvelopeV1
from streamdit.protocol.rules import ENVELOPE_VERSION

H, W = 32, 48  # smallest-ish geometry that obeys "multiple of 16": latents [B, F, 16, 4, 6]


def dit_caches(
    cfg: DiTConfig, *, dtype: torch.dtype, device: torch.device | str
) -> tuple[KVCache, CrossAttnCache]:
    """Caches for `cfg` at 8x8 latents (16 tokens a frame), a 6-frame window, no sink frames."""
    kv = KVCache(
        num_layers=cfg.num_layers,
        batch=1,
        heads=cfg.num_heads,
        head_dim=cfg.head_dim,
        tokens_per_frame=16,
        capacity_frames=6,
        sink_frames=0,
        dtype=dtype,
        device=device,
    )
    return kv, CrossAttnCache(cfg.num_layers)


def latents(frames: int = 3, dtype: torch.dtype = torch.bfloat16, *, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn((1, frames, 16, H // 8, W // 8), generator=gen).to(dtype)


def payload(
    *, recompute: bool = True, steps: int = 4, seed: int = 0, policy: str = "rank0_anchor", **over: Any
) -> dict[str, Any]:
    gen = torch.Generator().manual_seed(seed + 1)
    ships = recompute and policy == "rank0_anchor"
    extra = 1 if recompute or policy == "append" else 0
    base: dict[str, Any] = {
        "cache_policy": policy,
        "height": H,
        "width": W,
        "current_start_frame": 3,
        "init_cache": False,
        "reset_kv_cache": False,
        "reset_crossattn_cache": False,
        "conditioning_updated": True,
        "kv_cache_attention_bias": 0.3,
        "do_kv_recompute": recompute,
        "num_denoise_steps": steps,
        "expected_generator_calls": steps + extra,
        "base_seed": 1234567890123,
        "denoising_step_list": torch.tensor([1000, 750, 500, 250, 125, 60][:steps], dtype=torch.int64),
        "latents": latents(seed=seed),
        "conditioning_embeds": torch.randn((1, 8, 32), generator=gen, dtype=torch.float32),
        "context_frames_override": latents(seed=seed + 7) if ships else None,
    }
    base.update(over)
    return base


def ids(
    call_id: int = 5, chunk_index: int = 2, cache_epoch: int = 1, control_epoch: int = 0
) -> dict[str, Any]:
    return {
        "call_id": call_id,
        "chunk_index": chunk_index,
        "cache_epoch": cache_epoch,
        "control_epoch": control_epoch,
    }


def tp_infer(call_id: int = 5, chunk_index: int = 2, cache_epoch: int = 1, **over: Any) -> TPEnvelopeV1:
    recompute = over.pop("recompute", True)
    fields = {
        "tp_plan": "generator_only",
        "tp_envelope_version": ENVELOPE_VERSION,
        **payload(recompute=recompute),
    }
    fields.update(over)
    return TPEnvelopeV1(action=Action.INFER, **ids(call_id, chunk_index, cache_epoch), **fields)


def pp_infer(
    call_id: int = 5,
    chunk_index: int = 2,
    cache_epoch: int = 1,
    mode: str = "rank0_anchor",  # the cache policy
    **over: Any,
) -> PPEnvelopeV1:
    recompute = over.pop("recompute", mode in ("rank0_anchor", "latent_anchor"))
    fields = {"pp_envelope_version": ENVELOPE_VERSION, **payload(recompute=recompute, policy=mode)}
    fields.update(over)
    return PPEnvelopeV1(action=Action.INFER, **ids(call_id, chunk_index, cache_epoch), **fields)


def pp_result(call_id: int = 5, chunk_index: int = 2, cache_epoch: int = 1, **over: Any) -> PPResultV1:
    out = latents(dtype=torch.float32, seed=call_id)
    fields: dict[str, Any] = {
        "pp_result_version": 1,
        "observed_generator_calls": 5,
        "mesh_current_start_frame": 6,
        "output_digest": -(2**62),
        "stage1_ms": 12.5,
        "mesh_idle_ms": 0.0,
        "latents_out": out,
    }
    fields.update(over)
    return PPResultV1(action=Action.INFER, **ids(call_id, chunk_index, cache_epoch), **fields)


def control(cls: type, action: Action, call_id: int, cache_epoch: int = 1, reason: str | None = None) -> Any:
    """A NOOP / SHUTDOWN / ERROR message of any kind (no payload; ERROR may carry a reason)."""
    return cls(action=action, call_id=call_id, chunk_index=-1, cache_epoch=cache_epoch, reason=reason)


def same(a: Any, b: Any) -> bool:
    """Field-by-field equality, tensors compared bitwise with dtype and shape."""
    for name in a.__dataclass_fields__:
        x, y = getattr(a, name), getattr(b, name)
        if isinstance(x, torch.Tensor) or isinstance(y, torch.Tensor):
            if not (isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor)):
                return False
            if x.dtype != y.dtype or x.shape != y.shape or not torch.equal(x, y):
                return False
        elif x != y:
            return False
    return type(a) is type(b)
