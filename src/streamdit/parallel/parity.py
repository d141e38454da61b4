"""Startup parity handshake, weight fingerprints and tensor digests (drift detection).

Owns: `handshake(items, handle)` — every rank gathers every rank's parity keys (canonical JSON,
no pickle) and, on any difference, EVERY rank raises `ParityError` with a per-key table, before
any inference (OM-04, OM-05, C-01, C-04); `tensor_digest` (a stable 63-bit digest of a tensor's
bytes, dtype and shape); `check_replicated_fingerprints` (OM-12: parameters TP does not shard
must be bit-identical on every rank; the sharded ones must differ). Imports torch,
streamdit.errors and streamdit.parallel only.
"""

from __future__ import annotations

import hashlib
import json
import logging

import torch
from torch import nn

from streamdit.errors import ParityError
from streamdit.parallel.collectives import MAX_GATHER_BYTES, all_gather_bytes, all_gather_int64
from streamdit.parallel.groups import GroupHandle
from streamdit.parallel.tp_plan import ROWWISE, style_of

MISSING = "<missing>"
LOCAL_ERROR = "<local-error>"  # a rank whose items cannot be offered still joins the gather


def handshake(items: dict[str, str], handle: GroupHandle, *, allowed: str, log: logging.Logger) -> None:
    """Compare every rank's parity items; on any difference raise ParityError on EVERY rank.

    Call before any inference, on the group every rank of the job belongs to. Keys and values
    are compared as strings (canonical JSON, sorted keys, no pickle). The error message and the
    log carry a table of the differing keys only (a key absent on a rank shows `<missing>`).
    A rank whose items cannot be sent (too large) still takes part with a one-key marker, so
    its peers fail at once instead of waiting out the timeout.
    """
    blob = _encode_items(items)
    every = [json.loads(b) for b in all_gather_bytes(blob, handle, allowed=allowed)]
    keys = sorted({k for d in every for k in d})
    diff = [k for k in keys if len({d.get(k, MISSING) for d in every}) > 1]
    if not diff:
        log.info("parity handshake ok: %d keys equal on %d ranks", len(keys), handle.size)
        return
    table = diff_table(diff, every)
    log.error("parity handshake FAILED on group %s:\n%s", handle.name, table)
    raise ParityError(f"startup parity mismatch in {diff} across {handle.size} ranks:\n{table}")


def _encode_items(items: dict[str, str]) -> bytes:
    blob = json.dumps({str(k): str(v) for k, v in items.items()}, sort_keys=True, separators=(",", ":"))
    if len(blob.encode()) > MAX_GATHER_BYTES:
        blob = json.dumps({LOCAL_ERROR: f"parity items are {len(blob.encode())} bytes > {MAX_GATHER_BYTES}"})
    return blob.encode()


def diff_table(keys: list[str], every: list[dict[str, str]]) -> str:
    header = ["key", *(f"rank{r}" for r in range(len(every)))]
    rows = [[k, *(str(d.get(k, MISSING)) for d in every)] for k in keys]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    return "\n".join(
        " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in [header, *rows]
    )


def tensor_digest(t: torch.Tensor) -> int:
    """A stable 63-bit digest of a tensor's dtype, shape and bytes (blake2b over a CPU copy).

    For drift detection (ranks comparing what they act on / produce), not security. Bit-exact:
    -0.0 vs 0.0 or two NaN payloads differ. Copies the tensor to the CPU, so call it on the
    sampled tripwire path only. Fits a signed int64 for `all_gather_int64`.
    """
    data = t.detach().contiguous().cpu()
    h = hashlib.blake2b(digest_size=8)
    h.update(f"{data.dtype}{tuple(data.shape)}".encode())
    h.update(data.reshape(-1).view(torch.uint8).numpy().tobytes())
    return int.from_bytes(h.digest(), "little") >> 1


_CHECKSUM_BLOCK = 1 << 24  # elements per step: bounds the int64 temporaries (128 MiB)
_INT_VIEW = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def param_checksum(t: torch.Tensor) -> tuple[int, int]:
    """Two int64 sums over a tensor's bit patterns, computed where the tensor lives.

    (sum of bits, sum of bits x position weight): any changed element changes the first, a
    swap of elements the second. Integer sums wrap deterministically, so equal bits give equal
    sums on every rank. Used for weight fingerprints, where copying a 14B model to the CPU for
    a byte hash (tensor_digest) would take many seconds on every hard cut.
    """
    flat = t.detach().reshape(-1)
    bits = flat.view(_INT_VIEW[flat.element_size()])
    total = weighted = torch.zeros((), dtype=torch.int64, device=t.device)
    for start in range(0, bits.numel(), _CHECKSUM_BLOCK):
        block = bits[start : start + _CHECKSUM_BLOCK].to(torch.int64)
        weight = torch.arange(start, start + block.numel(), device=t.device, dtype=torch.int64) % 65521 + 1
        total = total + block.sum()
        weighted = weighted + (block * weight).sum()
    return int(total), int(weighted)


def fingerprints(model: nn.Module) -> dict[str, int]:
    """One digest over the replicated parameters and one over the sharded ones."""
    parts: dict[str, hashlib.blake2b] = {
        "replicated": hashlib.blake2b(digest_size=8),
        "sharded": hashlib.blake2b(digest_size=8),
    }
    for name, param in model.named_parameters():
        module_path, _, leaf = name.rpartition(".")
        style = style_of(module_path)
        if style == ROWWISE and leaf == "bias":
            continue  # zero on ranks > 0 by design: neither replicated nor a shard
        part = "replicated" if style is None else "sharded"
        total, weighted = param_checksum(param)
        header = f"{name}{param.dtype}{tuple(param.shape)}".encode()
        parts[part].update(
            header + total.to_bytes(8, "little", signed=True) + weighted.to_bytes(8, "little", signed=True)
        )
    return {k: int.from_bytes(h.digest(), "little") >> 1 for k, h in parts.items()}


def check_replicated_fingerprints(
    model: nn.Module, handle: GroupHandle, *, allowed: str, log: logging.Logger
) -> None:
    """OM-12: replicated weights equal everywhere, shards distinct; fail on every rank otherwise.

    Row-parallel biases are zeroed on ranks > 0 by design, so they are left out of both sets.
    """
    mine = fingerprints(model)
    every = all_gather_int64([mine["replicated"], mine["sharded"]], handle, allowed=allowed)
    log.info("fingerprints rank %d: replicated=%016x sharded=%016x", handle.rank, *every[handle.rank])
    bad = [r for r, (rep, _) in enumerate(every) if rep != every[0][0]]
    table = "; ".join(f"rank{r}: replicated={a:016x} sharded={b:016x}" for r, (a, b) in enumerate(every))
    if bad:
        log.error("replicated-weight fingerprint mismatch on group %s: %s", handle.name, table)
        raise ParityError(f"replicated-weight fingerprint differs on ranks {bad} vs rank 0: {table}")
    shards = [s for _, s in every]
    twins = sorted({r for r, s in enumerate(shards) if shards.count(s) > 1})
    if handle.size > 1 and twins:
        log.error("identical weight shards on ranks %s of group %s: %s", twins, handle.name, table)
        raise ParityError(f"ranks {twins} hold identical weight shards (sharding not applied?): {table}")
