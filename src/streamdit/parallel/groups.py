"""Process groups from the torchrun environment, as explicit handles (no module globals).

Owns: `GroupHandle` (a process group plus the name callers must use for it), `Groups` (the
handles of one job: `world` for control traffic and the startup handshake, `tp` for every
collective of Phase B, `startup` for waits on peers' long startup work), `init_groups` and
`destroy_groups`. gloo on CPU, NCCL on CUDA; the timeout is short and explicit, so a lost peer
surfaces as an error, not a hang; only `startup` has the longer startup bound.
Imports torch, streamdit.config and streamdit.errors only.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import time
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from streamdit.config import LaunchEnv, apply_environment, loopback_socket_defaults, nccl_environment_defaults
from streamdit.errors import ConfigError, PeerLost

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class GroupHandle:
    pg: dist.ProcessGroup
    name: str  # "world" | "tp" | "mesh" | "link" | "startup": what collective wrappers check callers against
    rank: int  # rank within the group
    size: int
    device: torch.device  # where this rank's collective buffers live (cpu for gloo)


@dataclass(frozen=True, slots=True)
class Groups:
    world: GroupHandle
    tp: GroupHandle | None  # tp topology: every rank
    backend: str
    device: torch.device
    global_rank: int
    world_size: int
    # every rank, under the longer startup timeout: for waits on peers' long startup work (the
    # compile warm-up; pp's rank0 waits for the whole mesh's warm-up)
    startup: GroupHandle
    mesh: GroupHandle | None = None  # pp: ranks 1..N-1 (None on rank0, which is never in it)
    link: GroupHandle | None = None  # pp: ranks {0, 1}, results leader -> rank0

    @property
    def phase_b(self) -> GroupHandle:
        """The group every Phase B collective runs on: `tp` (tp) or `mesh` (pp mesh ranks)."""
        handle = self.tp if self.tp is not None else self.mesh
        if handle is None:
            raise ConfigError(f"rank {self.global_rank} runs no Phase B (pp Stage 0) [field=group]")
        return handle


def init_groups(
    launch: LaunchEnv,
    *,
    device: torch.device,
    timeout_s: float,
    topology: str = "tp",
    startup_timeout_s: float | None = None,
) -> Groups:
    """Join the job's process group and create the Phase B group(s).

    `tp`: a TP group of all ranks. `pp`: `mesh` = ranks 1..N-1 (rank0 is asserted out of it)
    and `link` = ranks {0, 1} for the leader's results, so envelopes (on world) and results
    flow in both directions at once without one blocking send waiting on the other.

    gloo for a CPU `device`, NCCL for CUDA. On CUDA an index-less device becomes
    `cuda:LOCAL_RANK` and is made current BEFORE the process group exists (NCCL binds its
    communicator to the current device). The NCCL environment defaults (NVLS off, async error
    handling on) are applied through `config.apply_environment`, the one writer of os.environ.
    Every collective gives up after `timeout_s`, except on `startup` (every rank), which waits
    up to max(`startup_timeout_s`, `timeout_s`): it is created whatever the config says, since a
    config-dependent `new_group` would hang on a mismatch the parity handshake has yet to report.
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
    if is_loopback(launch.master_addr):  # one host: nothing listens beyond loopback
        apply_environment(loopback_socket_defaults())
    store = rendezvous(launch, bound_s=max(startup_timeout_s or 0.0, timeout_s))
    dist.init_process_group(
        backend,
        store=store,
        rank=launch.rank,
        world_size=launch.world_size,
        timeout=timeout,
        device_id=device if backend == "nccl" else None,
    )
    world_pg = dist.group.WORLD
    assert world_pg is not None
    world = GroupHandle(world_pg, "world", dist.get_rank(world_pg), dist.get_world_size(world_pg), device)
    log.info(
        "groups: rank %d/%d backend=%s timeout=%.0fs", launch.rank, launch.world_size, backend, timeout_s
    )
    everyone = list(range(launch.world_size))
    long = timedelta(seconds=max(startup_timeout_s or 0.0, timeout_s))
    startup = _subgroup("startup", everyone, launch.rank, long, backend, device)
    assert startup is not None
    if topology == "pp":
        mesh = _subgroup("mesh", list(range(1, launch.world_size)), launch.rank, timeout, backend, device)
        link = _subgroup("link", [0, 1], launch.rank, timeout, backend, device)
        return Groups(
            world, None, backend, device, launch.rank, launch.world_size, startup, mesh=mesh, link=link
        )
    # A distinct TP group even when it spans the world: wrappers can then tell a TP collective
    # issued on the world group (OM-08) from a correct one.
    tp = _subgroup("tp", everyone, launch.rank, timeout, backend, device)
    assert tp is not None
    return Groups(world, tp, backend, device, launch.rank, launch.world_size, startup)


def rendezvous(launch: LaunchEnv, *, bound_s: float) -> dist.Store:
    """The job's rendezvous store, once every rank has arrived (bounded by `bound_s`, the
    startup timeout: ranks start with any skew up to it, however short --dist-timeout is).

    rank0 hosts the TCPStore (unless the launcher's agent does); for a loopback MASTER_ADDR it
    listens on loopback only (a socket bound here, handed to the store), not on every
    interface. A rank that does not come raises `PeerLost` naming the missing ranks, the
    address and the bound, on every rank that did, instead of a raw store error.
    """
    timeout = timedelta(seconds=bound_s)
    where = f"{launch.master_addr}:{launch.master_port}"
    t0 = time.monotonic()
    try:
        if launch.rank == 0 and not launch.agent_store:
            fd = _loopback_listener(launch.master_port) if is_loopback(launch.master_addr) else None
            store = dist.TCPStore(
                launch.master_addr,
                launch.master_port,
                launch.world_size,
                True,
                timeout,
                wait_for_workers=False,
                master_listen_fd=fd,
                use_libuv=fd is None,
            )
        else:
            store = dist.TCPStore(launch.master_addr, launch.master_port, launch.world_size, False, timeout)
    except (RuntimeError, OSError) as exc:  # DistStoreError / DistNetworkError: no store there
        raise PeerLost(
            f"rank {launch.rank}: no rendezvous store at {where} after {time.monotonic() - t0:.1f} s "
            f"(rank0 did not start within --startup-timeout {bound_s:g} s, or the address is wrong): "
            f"{_first_line(exc)}"
        ) from exc
    store.set(f"{_ARRIVED}/{launch.rank}", "1")
    arrived = store.add(_ARRIVED, 1)  # once per rank
    while arrived < launch.world_size:
        if time.monotonic() > t0 + bound_s:
            missing = [r for r in range(launch.world_size) if not store.check([f"{_ARRIVED}/{r}"])]
            raise PeerLost(
                f"rank {launch.rank}: ranks {missing} did not reach the rendezvous at {where} within "
                f"--startup-timeout {bound_s:g} s (never started, or crashed while starting)"
            )
        time.sleep(0.05)
        arrived = store.add(_ARRIVED, 0)
    return store


_ARRIVED = "streamdit/rendezvous/arrived"


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(socket.gethostbyname(host)).is_loopback
    except (OSError, ValueError):
        return False


def _loopback_listener(port: int) -> int:
    """A listening socket on 127.0.0.1:port; its fd is handed over to the TCPStore (detached:
    Python must never close it under the store's running server)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    sock.listen(1024)
    return sock.detach()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _subgroup(
    name: str, ranks: list[int], rank: int, timeout: timedelta, backend: str, device: torch.device
) -> GroupHandle | None:
    """Every rank calls new_group (a collective); only members get a handle."""
    if name == "mesh" and (0 in ranks or not ranks):
        raise ConfigError(f"mesh_pg must be ranks 1..N-1 and never rank0, got {ranks} [field=mesh]")
    pg = dist.new_group(ranks=ranks, timeout=timeout, backend=backend)
    if rank not in ranks:
        return None
    return GroupHandle(pg, name, dist.get_rank(pg), dist.get_world_size(pg), device)


def destroy_groups(groups: Groups | None) -> None:
    """Best effort, never raises and never barriers (a barrier on exit is how jobs hang)."""
    if groups is None or not dist.is_initialized():
        return
    try:
        dist.destroy_process_group()
    except Exception as exc:  # the process is exiting anyway
        log.warning("destroy_process_group failed: %s", exc)
