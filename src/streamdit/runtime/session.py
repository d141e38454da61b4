"""One rank's life in a multi-process job (tp, pp): startup, liveness, the fatal path, teardown.

Owns: `rank_session(cfg, launch, topology=...)`, a context manager shared by the topologies:
validate the run (workers skip what only rank0 touches), pick the device, parse the test hooks,
create the groups, start the heartbeat watchdog; on any fatal error tell a peer-caused failure
from a local one (a transport error while a watched peer went silent becomes `OrphanedError` on
workers, `PeerLost` on rank0) and write this rank's flight record; on exit stop the watchdog
(marking a clean end) and destroy the groups unless the process is poisoned.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from streamdit.config import LaunchEnv, RunConfig
from streamdit.errors import OrphanedError, PeerLost
from streamdit.parallel.collectives import gather_at_startup
from streamdit.parallel.groups import Groups, destroy_groups, init_groups
from streamdit.runtime.build import ValidatedRun, validate_run
from streamdit.runtime.faults import FaultPlan
from streamdit.runtime.flight import FlightRecorder
from streamdit.runtime.liveness import Watchdog, exit_on_verdict, transport_like

log = logging.getLogger(__name__)


@dataclass
class RankSession:
    run: ValidatedRun
    launch: LaunchEnv
    faults: FaultPlan
    flight: FlightRecorder
    flight_path: Path
    groups: Groups
    watchdog: Watchdog
    guard: threading.Lock = field(default_factory=threading.Lock)  # output writes vs a verdict
    done: bool = False  # set on a clean end: watchers then stop watching this rank
    destroy_groups: bool = True  # False once poisoned: no further dist call

    def channel_kw(self) -> dict[str, object]:
        """Device, flight observer and poison exit shared by every channel of this rank."""
        return {"device": self.run.device, "observer": self.flight, "exit_fn": self._poison_exit}

    def all_ready(self) -> None:
        """Wait until every rank has finished its startup work (bounded by --startup-timeout).

        Called by every rank right before its first data-plane transfer. Startup work differs
        by role (pp: the mesh builds and shards the generator while rank0 builds only Stage 0),
        so without this rendezvous rank0's first wait would count a large preset's load against
        the short per-chunk `--dist-timeout`.
        """
        t0 = time.perf_counter()
        gather_at_startup(
            [self.groups.global_rank],
            self.groups.startup,
            allowed="startup",
            what="startup rendezvous",
            bound_s=self.run.cfg.startup_timeout_s,
            error=PeerLost,
        )
        waited = time.perf_counter() - t0
        self.flight({"name": "all_ready", "detail": f"waited {waited:.3f} s"})
        log.info("every rank is ready (waited %.1f s)", waited)

    def _poison_exit(self, code: int) -> None:
        """A send failed after its commitment point. When the transfer failed because a watched
        peer died (rank0 for a worker), the watchdog's verdict is the truer exit (orphan / peer
        lost) and ends the process itself; otherwise flight record, then the poison code."""
        exc = sys.exc_info()[1]
        if exc is not None and transport_like(exc):
            self.watchdog.peer_lost(self.run.cfg.watchdog_window_s + 2 * self.watchdog.interval_s)
        self.flight.exit_after_dump(self.flight_path)(code)


@contextmanager
def rank_session(cfg: RunConfig, launch: LaunchEnv, *, topology: str) -> Iterator[RankSession]:
    run = validate_run(cfg, generator_only=launch.rank != 0)
    if run.device.type == "cuda":
        run = dataclasses.replace(run, device=torch.device("cuda", launch.local_rank))
    faults = FaultPlan.from_config(cfg)
    run = dataclasses.replace(run, attn_backend=faults.effective_backend(run.attn_backend, launch.rank))
    flight = FlightRecorder(label=f"rank{launch.rank}")
    flight_path = cfg.out.parent / "flight" / f"rank{launch.rank}.json"
    groups = init_groups(
        launch,
        device=run.device,
        timeout_s=cfg.dist_timeout_s,
        topology=topology,
        startup_timeout_s=cfg.startup_timeout_s,
    )
    guard = threading.Lock()

    def record_verdict(message: str) -> None:
        flight.record({"name": "watchdog", "detail": message})
        flight.dump(flight_path)

    watchdog = Watchdog(
        launch, window_s=cfg.watchdog_window_s, on_verdict=exit_on_verdict(record_verdict, guard)
    )
    session = RankSession(run, launch, faults, flight, flight_path, groups, watchdog, guard)
    try:
        flight.record({"name": "start", "detail": f"topology={topology} world_size={launch.world_size}"})
        watchdog.start()
        yield session
    except BaseException as exc:
        cause: BaseException = exc
        if transport_like(exc) and watchdog.peer_lost(cfg.watchdog_window_s + 2 * watchdog.interval_s):
            lost = PeerLost if launch.rank == 0 else OrphanedError
            cause = lost(watchdog.verdict_message)
        # The first failing rank is told from the ranks that merely followed by these records.
        flight.record({"name": "fatal", "detail": f"{type(cause).__name__}: {str(cause)[:500]}"})
        log.error("flight record: %s", flight.dump(flight_path))
        if cause is not exc:
            raise cause from exc
        raise
    finally:
        watchdog.stop(done=session.done)
        if session.destroy_groups:
            destroy_groups(groups)
        else:
            log.critical("poisoned: process groups left as they are (no further dist calls)")


def liveness_of(session: RankSession) -> Callable[[], list[dict[str, object]]]:
    """rank0's view for a status page: itself, then every peer its watchdog watches."""

    def view() -> list[dict[str, object]]:
        return [{"rank": session.launch.rank, "state": "alive", "silent_s": 0.0}, *session.watchdog.peers()]

    return view
