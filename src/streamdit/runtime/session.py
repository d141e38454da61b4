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
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from streamdit.config import LaunchEnv, RunConfig
from streamdit.errors import OrphanedError, PeerAbort, PeerLost, Poisoned, mark_hard_exit
from streamdit.parallel.collectives import all_gather_bytes, gather_at_startup
from streamdit.parallel.groups import Groups, destroy_groups, init_groups
from streamdit.runtime.build import ValidatedRun, validate_run
from streamdit.runtime.faults import FaultPlan
from streamdit.runtime.flight import FlightRecorder
from streamdit.runtime.inspect import rotate_record
from streamdit.runtime.liveness import StopFlag, Watchdog, exit_on_verdict, transport_like
from streamdit.runtime.output import OutputGuard

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
    guard: OutputGuard = field(default_factory=OutputGuard)  # output writes vs a verdict
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

    def peer_went_silent(self, exc: BaseException) -> bool:
        """Was `exc` caused by a dead, stopped or hung peer? For a transport-like error, wait
        up to one watchdog window for its verdict (which normally ends the process itself,
        naming the silent rank); False for any other error or when every peer keeps beating."""
        return transport_like(exc) and self.watchdog.peer_lost(
            self.run.cfg.watchdog_window_s + 2 * self.watchdog.interval_s
        )

    def wire_drain(self, stop: StopFlag) -> None:
        """A drain request on any rank drains the job: a worker's goes to rank0 through the
        store, and rank0 drains as for its own signal (SHUTDOWN to every peer, all exit 0)."""
        if self.launch.rank == 0:
            self.watchdog.on_drain = lambda why: None if stop.requested else stop.request(why)
        else:
            stop.forward(self.watchdog.request_drain)

    def abort_peers(self, exc: BaseException) -> bool:
        """This rank is failing on its own: tell every peer now, out of band (the watchdog's
        store), so a peer blocked in a collective with it exits 5 naming this rank and the
        error instead of waiting out --dist-timeout. Idempotent; never for a follower's error
        (a peer's abort, a silent peer: those peers already know). True once it is in the store."""
        told = getattr(exc, "peers_told", False)  # every peer already got an ERROR in band
        if told or isinstance(exc, PeerAbort | OrphanedError | PeerLost) or transport_like(exc):
            return False  # a symptom of a peer's failure: the watchdog (or --dist-timeout) decides
        return self.watchdog.announce_abort(f"{type(exc).__name__}: {exc}")

    def _poison_exit(self, code: int) -> None:
        """A send failed after its commitment point. When the transfer failed because a watched
        peer died, the watchdog's verdict is the truer exit (orphan / peer lost) and ends the
        process itself; otherwise flight record, then the poison code."""
        exc = sys.exc_info()[1]
        if exc is not None and not self.peer_went_silent(exc):
            self.abort_peers(exc)
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
    rotate_record(flight_path)  # an earlier job's record must not be read as this job's
    flight.record({"name": "start", "detail": f"topology={topology} world_size={launch.world_size}"})
    try:
        groups = init_groups(
            launch,
            device=run.device,
            timeout_s=cfg.dist_timeout_s,
            topology=topology,
            startup_timeout_s=cfg.startup_timeout_s,
        )
        run_id = agree_run_id(groups, bound_s=cfg.startup_timeout_s)
        flight.run_id = run_id
    except BaseException as exc:  # a peer that never came: this rank still leaves a record
        flight.record({"name": "fatal", "detail": f"{type(exc).__name__}: {str(exc)[:500]}"})
        log.error("flight record: %s", flight.dump(flight_path))
        raise
    guard = OutputGuard()

    def record_verdict(message: str) -> None:
        flight.record({"name": "watchdog", "detail": message})
        flight.dump(flight_path)

    watchdog = Watchdog(
        launch,
        window_s=cfg.watchdog_window_s,
        on_verdict=exit_on_verdict(record_verdict, guard),
        run_id=run_id,
    )
    session = RankSession(run, launch, faults, flight, flight_path, groups, watchdog, guard)
    try:
        flight.record({"name": "run_id", "detail": run_id})
        watchdog.start()
        yield session
    except BaseException as exc:
        cause: BaseException = exc
        if session.peer_went_silent(exc):
            lost = OrphanedError if watchdog.verdict_message.startswith("orphaned") else PeerLost
            cause = lost(watchdog.verdict_message)
        else:
            session.abort_peers(exc)
        # The first failing rank is told from the ranks that merely followed by these records.
        flight.record({"name": "fatal", "detail": f"{type(cause).__name__}: {str(cause)[:500]}"})
        log.error("flight record: %s", flight.dump(flight_path))
        if not session.destroy_groups:
            mark_hard_exit(cause)
        if cause is not exc:
            raise cause from exc
        raise
    finally:
        watchdog.stop(done=session.done)
        if session.destroy_groups:
            destroy_groups(groups)
        else:
            log.critical("poisoned: process groups left as they are (no further dist calls)")
    if not session.destroy_groups:  # a clean stream whose comm threads did not join
        raise mark_hard_exit(Poisoned("the stream ended but its comm threads did not join"))


def agree_run_id(groups: Groups, *, bound_s: float) -> str:
    """rank0's fresh run id, known to every rank of this job: it names the job's liveness keys
    (another job's or a stale client's keys in the same store cannot mark a rank alive or done)
    and its flight records (`inspect` ignores an earlier job's)."""
    mine = uuid.uuid4().hex[:12].encode() if groups.global_rank == 0 else b""
    t0 = time.perf_counter()
    try:
        return all_gather_bytes(mine, groups.startup, allowed="startup")[0].decode("ascii")
    except RuntimeError as exc:  # a peer died or never came: name it, not a raw backend error
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise PeerLost(
            f"run id agreement on group 'startup' failed on rank {groups.global_rank} after "
            f"{time.perf_counter() - t0:.1f} s (a peer died, or did not start within "
            f"--startup-timeout {bound_s:g} s): {first}"
        ) from exc


def liveness_of(session: RankSession) -> Callable[[], list[dict[str, object]]]:
    """rank0's view for a status page: itself, then every peer its watchdog watches."""

    def view() -> list[dict[str, object]]:
        return [{"rank": session.launch.rank, "state": "alive", "silent_s": 0.0}, *session.watchdog.peers()]

    return view
