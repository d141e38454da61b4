"""Local multi-rank launch through torch's elastic launcher (the machinery behind torchrun).

Owns: `launch_local(argv, nproc)`: `streamdit run --topology tp --nproc N ...` re-runs the same
command as N local ranks with the torchrun environment (RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR, MASTER_PORT), a free rendezvous port, and no restarts (a failed rank fails the
job: crash > hang). The NCCL multicast switches and, like torchrun, OMP_NUM_THREADS (cores /
nproc) are set before the ranks start.
"""

from __future__ import annotations

import logging
import sys
import uuid

from streamdit.config import apply_environment, cpu_thread_defaults, nccl_environment_defaults

log = logging.getLogger(__name__)


def launch_local(argv: list[str], nproc: int) -> int:
    """Run `python -m streamdit <argv>` as `nproc` ranks; the worst rank exit code comes back."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    apply_environment({**nccl_environment_defaults(), **cpu_thread_defaults(nproc)})  # children inherit it
    config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=nproc,
        run_id=f"streamdit-{uuid.uuid4().hex[:8]}",
        rdzv_backend="c10d",
        rdzv_endpoint="127.0.0.1:0",  # port 0: the launcher picks a free port
        max_restarts=0,
        monitor_interval=0.2,
    )
    try:
        elastic_launch(config, entrypoint=sys.executable)("-m", "streamdit", *argv)
    except ChildFailedError as exc:
        codes = {rank: failure.exitcode for rank, failure in exc.failures.items()}
        log.error("ranks failed: %s", codes)
        first = min(exc.failures.values(), key=lambda f: f.timestamp)
        return first.exitcode if first.exitcode > 0 else 1
    return 0
