"""Message types of docs/protocol.md §4: frozen dataclasses, their wire schemas and `validate()`.

Owns: `TPEnvelopeV1`, `PPEnvelopeV1`, `PPResultV1`, `MESSAGE_TYPES`; re-exports `Action`, `Kind`.
Ids (`call_id`, `chunk_index`, `cache_epoch`, `control_epoch`) and `action` travel in the header
and live on the object; every other field travels in the meta. All payload fields default to None:
which are required depends on the action (INFER needs them; NOOP / SHUTDOWN carry none; ERROR
carries at most `reason`, a short text). `video` exists on the envelopes only so that a caller who
sets it gets a named rejection ("forbidden on the worker plan") instead of a silent strip.

The INFER rules live in rules.py and read scalars plus tensor specs, so `check_payload` runs on the
receiver from the meta alone (before allocation) and `validate()` runs on the full object.
Must not import anything but torch, streamdit.errors and streamdit.protocol.*.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import ClassVar

import torch

from streamdit.protocol.codec import (
    ErrCtx,
    FieldType,
    Limits,
    Schema,
    TensorSpec,
    check_dtype,
    check_scalar,
)
from streamdit.protocol.errors import EnvelopeError
from streamdit.protocol.header import Action, Ids, Kind, check_ids
from streamdit.protocol.rules import CONTEXT, check_pp_envelope, check_pp_result, check_tp_envelope

__all__ = ["Action", "Kind", "Message", "PPEnvelopeV1", "PPResultV1", "TPEnvelopeV1"]

_I, _F, _B, _S = FieldType.INT, FieldType.FLOAT, FieldType.BOOL, FieldType.STR
# Exactly the scalar fields of the runtime's GeneratorInputs, in its order.
PAYLOAD_SCALARS: Mapping[str, FieldType] = MappingProxyType(
    {
        "cache_policy": _S,
        "height": _I,
        "width": _I,
        "current_start_frame": _I,
        "init_cache": _B,
        "reset_kv_cache": _B,
        "reset_crossattn_cache": _B,
        "conditioning_updated": _B,
        "kv_cache_attention_bias": _F,
        "do_kv_recompute": _B,
        "num_denoise_steps": _I,
        "expected_generator_calls": _I,
        "base_seed": _I,
    }
)
PAYLOAD_TENSORS = ("denoising_step_list", "latents", "conditioning_embeds", CONTEXT)
_TYPE_LIMITS = Limits()  # validate() checks types only; the caller's Limits bound sizes in preflight
Rules = Callable[[Mapping[str, object], Mapping[str, TensorSpec], ErrCtx], None]


def require_dense(name: str, value: object, ctx: ErrCtx) -> torch.Tensor:
    """A tensor field must hold one dense, strided, top-level tensor (no lists, nesting, sparse)."""
    if not isinstance(value, torch.Tensor) or value.is_nested or value.layout is not torch.strided:
        why = f"must be a dense top-level tensor, got {type(value).__name__}"
        raise EnvelopeError(why, field=name, **ctx)
    return value


@dataclass(frozen=True, kw_only=True, slots=True)
class Message:
    """Fields every message has. Subclasses add their payload, schema and rules."""

    action: Action
    call_id: int
    chunk_index: int = -1
    cache_epoch: int = 0
    control_epoch: int = 0
    reason: str | None = None

    KIND: ClassVar[Kind]
    SCHEMA: ClassVar[Schema]
    REQUIRED: ClassVar[tuple[str, ...]]  # required under INFER: scalars and tensors
    RULES: ClassVar[Rules]

    @property
    def ids(self) -> Ids:
        return Ids(self.call_id, self.chunk_index, self.cache_epoch, self.control_epoch)

    def scalars(self) -> dict[str, object]:
        return {name: getattr(self, name) for name in self.SCHEMA.scalars}

    def tensor_fields(self) -> dict[str, object]:
        """Tensor fields that are set, sorted by name (the wire order)."""
        items = ((n, getattr(self, n)) for n in sorted(self.SCHEMA.tensors))
        return {n: v for n, v in items if v is not None}

    def validate(self, group: str | None = None) -> None:
        """Every rule of docs/protocol.md §4 for this action; raises a ProtocolError naming the field."""
        ctx = self.ids.ctx(group)
        if not isinstance(self.action, Action):
            raise EnvelopeError(f"action {self.action!r} is not an Action", field="action", **ctx)
        check_ids(self.action, self.ids, group)
        self._check_forbidden(ctx)
        specs = {n: TensorSpec.of(n, require_dense(n, v, ctx)) for n, v in self.tensor_fields().items()}
        for spec in specs.values():
            check_dtype(spec, ctx)  # OM-02 is a DtypeError whichever step meets it first
        fields = self.scalars()
        for name, value in fields.items():
            if isinstance(value, torch.Tensor):
                raise EnvelopeError("tensor in a scalar field (nesting refused)", field=name, **ctx)
            if value is not None:  # an unencodable value fails here with CodecError (OM-01)
                check_scalar(name, self.SCHEMA.scalars[name], value, _TYPE_LIMITS, ctx)
        self.check_payload(self.action, fields, specs, ctx)

    def _check_forbidden(self, ctx: ErrCtx) -> None:
        """Fields that exist only to be refused by name (none by default)."""

    @classmethod
    def check_payload(
        cls,
        action: Action,
        fields: Mapping[str, object],
        specs: Mapping[str, TensorSpec],
        ctx: ErrCtx,
    ) -> None:
        """Action rules over scalars and specs; the receiver runs this before allocating tensors."""
        present = {n for n, v in fields.items() if v is not None} | set(specs)
        if fields.get("reason") is not None and action is not Action.ERROR:
            why = f"reason is only carried by ERROR, not {action.name}"
            raise EnvelopeError(why, field="reason", **ctx)
        if action is not Action.INFER:
            extra = sorted(present - {"reason"})
            if extra:
                raise EnvelopeError(f"{action.name} carries no payload", field=extra[0], **ctx)
            return
        missing = [n for n in cls.REQUIRED if n not in present]
        if missing:
            raise EnvelopeError(f"required under INFER (missing: {missing})", field=missing[0], **ctx)
        cls.RULES(fields, specs, ctx)

    @classmethod
    def from_wire(
        cls,
        action: Action,
        ids: Ids,
        fields: Mapping[str, object],
        tensors: Mapping[str, torch.Tensor],
    ) -> Message:
        """Rebuild a received message (the caller validates it afterwards)."""
        return cls(
            action=action,
            call_id=ids.call_id,
            chunk_index=ids.chunk_index,
            cache_epoch=ids.cache_epoch,
            control_epoch=ids.control_epoch,
            **fields,
            **tensors,
        )


@dataclass(frozen=True, kw_only=True, slots=True)
class _EnvelopePayload(Message):
    """The payload shared by TP and PP envelopes (= the runtime's GeneratorInputs fields)."""

    cache_policy: str | None = None
    height: int | None = None
    width: int | None = None
    current_start_frame: int | None = None
    init_cache: bool | None = None
    reset_kv_cache: bool | None = None
    reset_crossattn_cache: bool | None = None
    conditioning_updated: bool | None = None
    kv_cache_attention_bias: float | None = None
    do_kv_recompute: bool | None = None
    num_denoise_steps: int | None = None
    expected_generator_calls: int | None = None
    base_seed: int | None = None
    denoising_step_list: torch.Tensor | None = None
    latents: torch.Tensor | None = None
    conditioning_embeds: torch.Tensor | None = None
    context_frames_override: torch.Tensor | None = None
    video: torch.Tensor | None = None  # forbidden: see the module docstring

    def _check_forbidden(self, ctx: ErrCtx) -> None:
        if self.video is not None:
            raise EnvelopeError("pixel video is forbidden on the worker plan", field="video", **ctx)

    def payload(self) -> dict[str, object]:
        """The GeneratorInputs fields by name (no ids, no plan / version fields, no video)."""
        return {n: getattr(self, n) for n in (*PAYLOAD_SCALARS, *PAYLOAD_TENSORS)}


def _schema(
    scalars: Mapping[str, FieldType], tensors: tuple[str, ...], forbidden: tuple[str, ...] = ()
) -> Schema:
    return Schema(
        scalars=MappingProxyType(dict(scalars)),
        tensors=frozenset(tensors),
        forbidden=frozenset(forbidden),
    )


_REQ_ENVELOPE = tuple(n for n in (*PAYLOAD_SCALARS, *PAYLOAD_TENSORS) if n != CONTEXT)


@dataclass(frozen=True, kw_only=True, slots=True)
class TPEnvelopeV1(_EnvelopePayload):
    """rank0 -> workers, broadcast on the TP group (docs/protocol.md §4, "TP envelope")."""

    tp_plan: str | None = None
    tp_envelope_version: int | None = None

    KIND: ClassVar[Kind] = Kind.TP_ENVELOPE
    SCHEMA: ClassVar[Schema] = _schema(
        {"tp_plan": _S, "tp_envelope_version": _I, **PAYLOAD_SCALARS, "reason": _S},
        PAYLOAD_TENSORS,
        ("video",),
    )
    REQUIRED: ClassVar[tuple[str, ...]] = ("tp_plan", "tp_envelope_version", *_REQ_ENVELOPE)
    RULES: ClassVar[Rules] = staticmethod(check_tp_envelope)


@dataclass(frozen=True, kw_only=True, slots=True)
class PPEnvelopeV1(_EnvelopePayload):
    """rank0 -> mesh leader (p2p on world), leader -> mesh (broadcast on mesh_pg)."""

    pp_envelope_version: int | None = None

    KIND: ClassVar[Kind] = Kind.PP_ENVELOPE
    SCHEMA: ClassVar[Schema] = _schema(
        {"pp_envelope_version": _I, **PAYLOAD_SCALARS, "reason": _S},
        PAYLOAD_TENSORS,
        ("video",),
    )
    REQUIRED: ClassVar[tuple[str, ...]] = ("pp_envelope_version", *_REQ_ENVELOPE)
    RULES: ClassVar[Rules] = staticmethod(check_pp_envelope)


_RESULT_SCALARS = {
    "pp_result_version": _I,
    "observed_generator_calls": _I,
    "mesh_current_start_frame": _I,
    "output_digest": _I,
    "stage1_ms": _F,
    "mesh_idle_ms": _F,
}


@dataclass(frozen=True, kw_only=True, slots=True)
class PPResultV1(Message):
    """mesh leader -> rank0, p2p: the denoised latents of one envelope, its ids echoed."""

    pp_result_version: int | None = None
    observed_generator_calls: int | None = None
    mesh_current_start_frame: int | None = None
    output_digest: int | None = None
    stage1_ms: float | None = None
    mesh_idle_ms: float | None = None
    latents_out: torch.Tensor | None = None

    KIND: ClassVar[Kind] = Kind.PP_RESULT
    SCHEMA: ClassVar[Schema] = _schema({**_RESULT_SCALARS, "reason": _S}, ("latents_out",))
    REQUIRED: ClassVar[tuple[str, ...]] = (*_RESULT_SCALARS, "latents_out")
    RULES: ClassVar[Rules] = staticmethod(check_pp_result)


MESSAGE_TYPES: Mapping[Kind, type[Message]] = MappingProxyType(
    {Kind.TP_ENVELOPE: TPEnvelopeV1, Kind.PP_ENVELOPE: PPEnvelopeV1, Kind.PP_RESULT: PPResultV1}
)
