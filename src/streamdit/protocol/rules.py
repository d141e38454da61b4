"""The rules of docs/protocol.md §4, over scalar fields and tensor specs.

Owns: the INFER rules of each message kind (`check_tp_envelope`, `check_pp_envelope`,
`check_pp_result`): versions, plan names, and `check_generator_plan`, THE rulebook of a chunk's
Phase B plan (the cache policy, plan consistency OM-03, the context rule OM-10) that the runtime
also runs on its own `GeneratorInputs` before shipping or running one; plus the geometry that can
be checked without the model. They read only scalars and `TensorSpec`s, so the receiver runs them
from the meta alone, before allocating any tensor.
Must not import anything but streamdit.errors and streamdit.protocol.{errors,codec,policy}.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from streamdit.protocol.codec import FLOAT_DTYPES, ErrCtx, TensorSpec
from streamdit.protocol.errors import EnvelopeError, PlanMismatchError
from streamdit.protocol.policy import CachePolicy, context_required, implied_calls

TP_PLANS = frozenset({"generator_only"})
ENVELOPE_VERSION = 2  # 2: the cache policy travels in every envelope (was pp-only recompute_mode)
LATENT_CHANNELS = 16
CONTEXT = "context_frames_override"

Fields = Mapping[str, object]
Specs = Mapping[str, TensorSpec]


def check_tp_envelope(fields: Fields, specs: Specs, ctx: ErrCtx) -> None:
    _check_version(fields, "tp_envelope_version", ctx)
    plan = fields["tp_plan"]
    if plan not in TP_PLANS:
        why = f"unknown tp_plan {plan!r} (known: {sorted(TP_PLANS)})"
        raise EnvelopeError(why, field="tp_plan", **ctx)
    _check_envelope(fields, specs, ctx)


def check_pp_envelope(fields: Fields, specs: Specs, ctx: ErrCtx) -> None:
    _check_version(fields, "pp_envelope_version", ctx)
    _check_envelope(fields, specs, ctx)


def check_generator_plan(fields: Fields, specs: Specs, ctx: ErrCtx) -> None:
    """A chunk's Phase B plan: its cache policy, the call count (OM-03), the context rule (OM-10).

    - `num_denoise_steps` == len(`denoising_step_list`);
    - `expected_generator_calls` == `implied_calls(steps, do_kv_recompute, cache_policy)`;
    - `do_kv_recompute` only under a recomputing policy, never on a chunk that inits the cache;
    - `context_frames_override` present exactly when `context_required` (no fallback path on the
      receiver: a missing one is never improvised, a stale one never silently ignored).
    """
    policy = _policy(fields, ctx)
    _check_steps(fields, specs["denoising_step_list"], ctx)
    recompute = bool(fields["do_kv_recompute"])
    if recompute and not policy.recomputes:
        raise PlanMismatchError(
            f"do_kv_recompute under cache_policy={policy}", field="do_kv_recompute", **ctx
        )
    if recompute and fields["init_cache"]:
        raise PlanMismatchError(
            "do_kv_recompute on a chunk that inits the cache", field="do_kv_recompute", **ctx
        )
    want = implied_calls(int(fields["num_denoise_steps"]), recompute, policy)  # type: ignore[call-overload]
    got = fields["expected_generator_calls"]
    if got != want:
        why = f"expected_generator_calls={got} but the plan implies {want} (cache_policy={policy})"
        raise PlanMismatchError(why, field="expected_generator_calls", **ctx)
    has = CONTEXT in specs
    if context_required(policy, recompute) and not has:
        raise PlanMismatchError("required when do_kv_recompute (no fallback)", field=CONTEXT, **ctx)
    if has and not context_required(policy, recompute):
        why = (
            f"forbidden under cache_policy={policy} (the generator builds its own anchor)"
            if policy.recomputes and not policy.ships_context
            else "forbidden without do_kv_recompute (stale override)"
        )
        raise PlanMismatchError(why, field=CONTEXT, **ctx)


def _policy(fields: Fields, ctx: ErrCtx) -> CachePolicy:
    raw = fields["cache_policy"]
    try:
        return CachePolicy(raw)
    except ValueError:
        known = [p.value for p in CachePolicy]
        raise EnvelopeError(
            f"unknown cache_policy {raw!r} (known: {known})", field="cache_policy", **ctx
        ) from None


def check_pp_result(fields: Fields, specs: Specs, ctx: ErrCtx) -> None:
    _check_version(fields, "pp_result_version", ctx, speaks=1)
    for name in (
        "observed_generator_calls",
        "mesh_current_start_frame",
        "stage1_ms",
        "mesh_idle_ms",
    ):
        value = fields[name]
        if not (isinstance(value, int | float) and math.isfinite(value) and value >= 0):
            raise EnvelopeError(f"{name}={value!r} must be finite and >= 0", field=name, **ctx)
    _check_latents(specs["latents_out"], None, ctx)


def _check_version(fields: Fields, name: str, ctx: ErrCtx, speaks: int = ENVELOPE_VERSION) -> None:
    if fields[name] != speaks:
        raise EnvelopeError(f"unknown {name} {fields[name]} (this build speaks {speaks})", field=name, **ctx)


def _check_envelope(fields: Fields, specs: Specs, ctx: ErrCtx) -> None:
    """Geometry and plan consistency shared by TP and PP envelopes."""
    height, width = int(fields["height"]), int(fields["width"])  # type: ignore[call-overload]
    for name, value in (("height", height), ("width", width)):
        if value <= 0 or value % 16:
            raise EnvelopeError(f"{name}={value} must be a positive multiple of 16", field=name, **ctx)
    if int(fields["current_start_frame"]) < 0:  # type: ignore[call-overload]
        raise EnvelopeError("must be >= 0", field="current_start_frame", **ctx)
    check_generator_plan(fields, specs, ctx)
    lat = _check_latents(specs["latents"], (height // 8, width // 8), ctx)
    emb = specs["conditioning_embeds"]
    if emb.dtype not in FLOAT_DTYPES or len(emb.shape) != 3 or emb.shape[0] != lat.shape[0]:
        why = f"must be float [B={lat.shape[0]}, L, D], got {emb.dtype} {list(emb.shape)}"
        raise EnvelopeError(why, field=emb.name, **ctx)
    anchor = specs.get(CONTEXT)
    if anchor is not None:
        dims = (anchor.shape[0], *anchor.shape[2:]) if len(anchor.shape) == 5 else None
        if anchor.dtype not in FLOAT_DTYPES or dims != (lat.shape[0], *lat.shape[2:]):
            why = f"must be float [B, F', C, H/8, W/8] like latents {list(lat.shape)}"
            raise EnvelopeError(f"{why}, got {anchor.dtype} {list(anchor.shape)}", field=CONTEXT, **ctx)


def _check_steps(fields: Fields, steps: TensorSpec, ctx: ErrCtx) -> None:
    if steps.dtype != "int64" or len(steps.shape) != 1:
        why = f"must be 1-D int64, got {steps.dtype} {list(steps.shape)}"
        raise EnvelopeError(why, field=steps.name, **ctx)
    n = int(fields["num_denoise_steps"])  # type: ignore[call-overload]
    if n < 1 or n != steps.shape[0]:
        why = f"num_denoise_steps={n} != len(denoising_step_list)={steps.shape[0]}"
        raise PlanMismatchError(why, field="num_denoise_steps", **ctx)


def _check_latents(spec: TensorSpec, hw: tuple[int, int] | None, ctx: ErrCtx) -> TensorSpec:
    """[B, F, 16, h, w] floating latents; h, w = H/8, W/8 when the geometry is known."""
    shape = spec.shape
    ok = spec.dtype in FLOAT_DTYPES and len(shape) == 5 and shape[0] >= 1 and shape[1] >= 1
    if not ok or shape[2] != LATENT_CHANNELS or (hw is not None and tuple(shape[3:]) != hw):
        want = f"[B, F, {LATENT_CHANNELS}, {'H/8, W/8 = ' + str(hw) if hw else 'h, w'}]"
        raise EnvelopeError(f"must be float {want}, got {spec.dtype} {list(shape)}", field=spec.name, **ctx)
    return spec
