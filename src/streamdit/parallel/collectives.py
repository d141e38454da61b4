"""Collective wrappers: every call names its group handle AND the group its caller may use.

Owns: `check_group` (OM-08: e.g. a TP collective issued on the world group raises GroupError
before the backend is called, so the mistake is a local exception, not a cross-rank hang),
`all_reduce_sum` (a functional collective: returns a new tensor and traces under torch.compile;
checked to work eagerly on gloo/CPU with torch 2.13, so no gloo fallback is needed),
`all_gather_int64` and `all_gather_bytes` (fixed-size tensors, no pickle: used by the parity
handshake and the drift digests), `gather_at_startup` (a gather that waits on peers' startup
work and names a peer that never came). No module-level groups: the handle is always an argument.
Imports torch, streamdit.errors and streamdit.parallel only.
"""

from __future__ import annotations

import time

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol

from streamdit.errors import GroupError, StreamditError
from streamdit.parallel.groups import GroupHandle

MAX_GATHER_BYTES = 1 << 16


def check_group(handle: GroupHandle, allowed: str) -> None:
    """Raise GroupError unless `handle` is the group named `allowed` (no backend call)."""
    if handle.name != allowed:
        raise GroupError(
            f"collective issued on group {handle.name!r}, caller may only use {allowed!r}",
            field="group",
            group=handle.name,
        )


def all_reduce_sum(t: torch.Tensor, handle: GroupHandle, *, allowed: str) -> torch.Tensor:
    """Sum of `t` over the group, as a new tensor (`t` is not modified).

    Eagerly the result is an AsyncCollectiveTensor that waits on first use; under
    torch.compile the collective is a graph node (no graph break, docs/protocol.md §11).
    """
    check_group(handle, allowed)
    return funcol.all_reduce(t, "sum", handle.pg)


def all_reduce_sum_inplace(t: torch.Tensor, handle: GroupHandle, *, allowed: str) -> torch.Tensor:
    """Sum of `t` over the group, written into `t` (c10d in-place; eager only).

    For measuring eager mode against the functional form (docs/protocol.md §11 asks for both): it
    avoids the AsyncCollectiveTensor wrapper but breaks a torch.compile graph.
    """
    check_group(handle, allowed)
    t = t.contiguous()
    dist.all_reduce(t, group=handle.pg)
    return t


def pair_warmup(handle: GroupHandle, peer: int, *, send: bool, allowed: str) -> None:
    """One int64 from or to `peer` on `handle`, in a fixed order on both sides at startup.

    NCCL creates a point-to-point communicator lazily on the first send/recv of a pair; two
    comm threads doing their first transfers on two groups at once could initialize those
    communicators in different orders on the two ranks and wait on each other. A warm-up on
    the main thread, world pair first, link pair second, creates them deterministically.
    """
    check_group(handle, allowed)
    t = torch.zeros(1, dtype=torch.int64, device=handle.device)
    if send:
        dist.send(t, group=handle.pg, group_dst=peer)
    else:
        dist.recv(t, group=handle.pg, group_src=peer)


def all_gather_int64(values: list[int], handle: GroupHandle, *, allowed: str) -> list[list[int]]:
    """Every rank's list of ints, indexed by group rank.

    Every rank must pass a list of the same length (callers gather fixed-layout records such as
    digests and counters); values must fit int64.
    """
    check_group(handle, allowed)
    mine = torch.tensor(values, dtype=torch.int64, device=handle.device)
    out = [torch.empty_like(mine) for _ in range(handle.size)]
    dist.all_gather(out, mine, group=handle.pg)
    return [t.tolist() for t in out]


def gather_at_startup(
    values: list[int],
    handle: GroupHandle,
    *,
    allowed: str,
    what: str,
    bound_s: float,
    error: type[StreamditError],
) -> list[list[int]]:
    """`all_gather_int64` at a startup rendezvous: a peer that never arrives (its startup ran
    past `bound_s`, the group's timeout) or died raises `error` naming the gather, the group,
    this rank and the bound, instead of a bare backend error."""
    t0 = time.perf_counter()
    try:
        return all_gather_int64(values, handle, allowed=allowed)
    except RuntimeError as exc:  # gloo / NCCL timeouts and closed connections
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise error(
            f"{what} on group {handle.name!r} failed on rank {handle.rank} after "
            f"{time.perf_counter() - t0:.1f} s (a peer's startup exceeded --startup-timeout "
            f"{bound_s:g} s, or it died): {first}"
        ) from exc


def all_gather_bytes(
    data: bytes, handle: GroupHandle, *, allowed: str, max_bytes: int = MAX_GATHER_BYTES
) -> list[bytes]:
    """Every rank's bytes, indexed by group rank: lengths first, then payloads padded to the longest.

    A payload over `max_bytes` is refused before any collective; a peer announcing one makes
    every rank raise after the length gather (all ranks see the same lengths, so none is left
    waiting in the payload gather).
    """
    check_group(handle, allowed)
    if len(data) > max_bytes:
        raise GroupError(f"gather of {len(data)} bytes exceeds {max_bytes}", field="bytes", group=handle.name)
    lengths = [row[0] for row in all_gather_int64([len(data)], handle, allowed=allowed)]
    longest = max(lengths)
    if longest > max_bytes:
        raise GroupError(f"a peer offers {longest} bytes > {max_bytes}", field="bytes", group=handle.name)
    buf = torch.zeros(max(longest, 1), dtype=torch.uint8)
    if data:
        buf[: len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    buf = buf.to(handle.device)
    out = [torch.empty_like(buf) for _ in range(handle.size)]
    dist.all_gather(out, buf, group=handle.pg)
    return [t[:n].cpu().numpy().tobytes() for t, n in zip(out, lengths, strict=True)]
