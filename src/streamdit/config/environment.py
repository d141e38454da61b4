"""The process environment: the ONLY module of streamdit that reads or writes `os.environ`.

Owns: the test-hook settings (`STREAMDIT_TEST_*`), the launch environment (`LaunchEnv`,
torchrun-compatible), the NCCL / CUDA / socket / CPU-thread defaults every process runs with,
the environment of the ranks and children streamdit starts, and whether terminal decorations are
allowed. Imports errors and the test-hook prefix (config.checks).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass

from streamdit.config.checks import TEST_HOOK_PREFIX
from streamdit.errors import ConfigError


def read_test_hooks(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The STREAMDIT_TEST_* settings of this process (they become parity keys)."""
    env = os.environ if environ is None else environ
    return {k: v for k, v in env.items() if k.startswith(TEST_HOOK_PREFIX)}


@dataclass(frozen=True, kw_only=True, slots=True)
class LaunchEnv:
    """The torchrun-compatible launch environment of this process."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int = 29500
    launched: bool = False
    """True when a launcher (torchrun, `--nproc`, SLURM by hand) set RANK for this process."""
    agent_store: bool = False
    """True when the launcher's agent hosts the rendezvous store (torch elastic), not rank0."""

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None) -> LaunchEnv:
        env = os.environ if environ is None else environ
        try:
            return cls(
                rank=int(env.get("RANK", "0")),
                world_size=int(env.get("WORLD_SIZE", "1")),
                local_rank=int(env.get("LOCAL_RANK", "0")),
                master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
                master_port=int(env.get("MASTER_PORT", "29500")),
                launched="RANK" in env,
                agent_store=env.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true",
            )
        except ValueError as exc:
            raise ConfigError(f"malformed launch environment: {exc} [field=RANK/WORLD_SIZE]") from exc


def nccl_environment_defaults() -> dict[str, str]:
    """NCCL / PyTorch settings every streamdit process runs with.

    NVLink multicast (NVLS) stays off: on shared hosts it can take GPUs out of service. Async
    error handling turns a failed NCCL collective into an exception instead of a hang. After a
    collective times out, PyTorch's NCCL watchdog waits for a debug dump before it takes the
    process down: 60 s by default (measured on torch 2.11: timeout + 60 s), 1 s here (measured:
    timeout + 3.5 s), so `--dist-timeout` is the bound an operator sees.
    """
    return {
        "NCCL_NVLS_ENABLE": "0",
        "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
        "NVSHMEM_DISABLE_NVLS": "1",
        "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1",
        "TORCH_NCCL_WAIT_TIMEOUT_DUMP_MILSEC": "1000",
    }


def cuda_loading_defaults(topology: str) -> dict[str, str]:
    """CUDA_MODULE_LOADING=EAGER under pp, unless the user set it (applied before CUDA starts).

    pp's rank0 keeps NCCL kernels pending on its comm threads' streams (the recv of the next
    result, an envelope the leader has not taken yet) while its main thread runs Stage 0. With
    lazy loading, the first launch of a kernel whose module is not loaded yet loads it under
    the CUDA context lock and waits for the device's running kernels, the pending NCCL ones
    included; those wait for a send the comm thread cannot launch past that lock: a hang until
    the NCCL timeout (seen on NCCL with 2 ranks). Eager loading does all module loads at CUDA
    start-up, before any NCCL kernel exists. tp and single run one thread per rank: no cycle.
    """
    if topology != "pp" or "CUDA_MODULE_LOADING" in os.environ:
        return {}
    return {"CUDA_MODULE_LOADING": "EAGER"}


def loopback_socket_defaults() -> dict[str, str]:
    """gloo's and NCCL's sockets on loopback for a one-host job (MASTER_ADDR is loopback),
    unless the user chose interfaces: nothing of a local job listens on other interfaces."""
    return {k: "lo" for k in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME") if k not in os.environ}


def cpu_thread_defaults(nproc: int) -> dict[str, str]:
    """OMP_NUM_THREADS for `nproc` local ranks (as torchrun does), unless the user set it.

    Ranks run concurrently under pp (Stage 0 decodes while the mesh denoises): with every
    process spinning OpenMP threads on every core, each phase slows down several times.
    """
    if "OMP_NUM_THREADS" in os.environ:
        return {}
    return {"OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // max(1, nproc)))}


def rank_environment(
    rank: int, world_size: int, master_port: int, *, base: Mapping[str, str] | None = None
) -> dict[str, str]:
    """The torchrun environment of local rank `rank` of `world_size` (rank0 hosts the store on
    loopback at `master_port`), over `base` (default: this process's own, test hooks included:
    ranks of one job must agree on them), with the NCCL and CPU-thread defaults."""
    env = dict(os.environ if base is None else base)
    env.update(nccl_environment_defaults())
    env.update(cpu_thread_defaults(world_size))
    env.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(master_port),
    )
    return env


def child_environment(extra: Mapping[str, str]) -> dict[str, str]:
    """This process's environment for a child process, minus test hooks, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(TEST_HOOK_PREFIX)}
    env.update(extra)
    return env


def apply_environment(values: Mapping[str, str]) -> list[str]:
    """Set process environment variables (inherited by ranks we start); warn on overwrite.

    The one place streamdit writes os.environ. Returns the names that changed.
    """
    changed = []
    for key, value in values.items():
        old = os.environ.get(key)
        if old == value:
            continue
        if old is not None:
            logging.getLogger(__name__).warning("overriding %s=%s with %s", key, old, value)
        os.environ[key] = value
        changed.append(key)
    return changed


def is_tty_allowed(environ: Mapping[str, str] | None = None) -> bool:
    """False when the environment asks for no terminal decorations (CI, NO_COLOR-style)."""
    env = os.environ if environ is None else environ
    return env.get("CI", "").lower() not in ("1", "true") and "STREAMDIT_NO_PROGRESS" not in env
