"""Process groups from the torchrun environment, as explicit handles (no module globals).

Owns: `GroupHandle` (a process group plus the name callers must use for it), `Groups` (the
handles of one job: `world` for control traffic and the startup handshake, `tp` for every
collective of Phase B), `init_groups` and `destroy_groups`. gloo on CPU, NCCL on CUDA; the
timeout is short and explicit, so a lost peer surfaces as an error, not a hang.
Imports torch, streamdit.config and streamdit.errors only.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from streamdit.config import LaunchEnv, apply_environment, nccl_environment_defaults
from streamdit.errors import ConfigError

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class GroupHandle:
    pg: dist.ProcessGroup
    name: str  # "world" | "tp" | "mesh": what collective wrappers check callers against
    rank: int  # rank within the group
    size: int
    device: torch.device  # where this rank's collective buffers live (cpu for gloo)


@dataclass(frozen=True, slots=True)
class Groups:
    world: GroupHandle
    tp: GroupHandle
    backend: str
    device: torch.device
    global_rank: int
    world_size: int


def init_groups(launch: LaunchEnv, *, device: torch.device, timeout_s: float) -> Groups:
    """Join the job's process group and create the TP group (= all ranks for `tp`).

    gloo for a CPU `device`, NCCL for CUDA. On CUDA an index-less device becomes
    `cuda:LOCAL_RANK` and is made current BEFORE the process group exists (NCCL binds its
    communicator to the current device). The NCCL environment defaults (NVLS off, async error
    handling on) are applied through `config.apply_environment`, the one writer of os.environ.
    Every collective of either group gives up after `timeout_s`.
    """
    backend = "nccl" if device.type == "cuda" else "gloo"
    if not 0 <= launch.rank < launch.world_size:
        raise ConfigError(f"rank {launch.rank} outside world of {launch.world_size} [field=RANK]")
    if timeout_s <= 0:
        raise ConfigError(f"dist timeout must be > 0 s, got {timeout_s} [field=dist_timeout_s]")
    if backend == "nccl":
        if device.index is None:
            device = torch.device("cuda", launch.local_rank)
        changed = apply_environment(nccl_environment_defaults())
        if changed:
            log.info("NCCL environment set: %s", ", ".join(changed))
        torch.cuda.set_device(device)
    timeout = timedelta(seconds=timeout_s)
    dist.init_process_group(
        backend,
        init_method=f"tcp://{launch.master_addr}:{launch.master_port}",
        rank=launch.rank,
        world_size=launch.world_size,
        timeout=timeout,
        device_id=device if backend == "nccl" else None,
    )
    world_pg = dist.group.WORLD
    assert world_pg is not None
    # A distinct TP group even when it spans the world: wrappers can then tell a TP collective
    # issued on the world group (OM-08) from a correct one.
    tp_pg = dist.new_group(ranks=list(range(launch.world_size)), timeout=timeout, backend=backend)
    world = GroupHandle(world_pg, "world", dist.get_rank(world_pg), dist.get_world_size(world_pg), device)
    tp = GroupHandle(tp_pg, "tp", dist.get_rank(tp_pg), dist.get_world_size(tp_pg), device)
    log.info(
        "groups: rank %d/%d backend=%s timeout=%.0fs", launch.rank, launch.world_size, backend, timeout_s
    )
    return Groups(world, tp, backend, device, launch.rank, launch.world_size)


def destroy_groups(groups: Groups | None) -> None:
    """Best effort, never raises and never barriers (a barrier on exit is how jobs hang)."""
    if groups is None or not dist.is_initialized():
        return
    try:
        dist.destroy_process_group()
    except Exception as exc:  # the process is exiting anyway
        log.warning("destroy_process_group failed: %s", exc)
