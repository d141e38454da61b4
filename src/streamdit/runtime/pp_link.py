"""Stage 0's transport to the mesh leader under `pp`: two comm threads and two bounded queues.

Owns: `StageLink`. Envelopes go out on a `P2PChannel` over the world group, results come back on
a second `P2PChannel` over the `link` group ({rank0, leader}). Each channel is owned by one
thread for its whole life (docs/protocol.md §2): the sender thread takes envelopes from `D_in`, the
receiver thread puts results into `D_out`. Two directions on two threads is what lets envelope
k+1 travel while result k is on its way back: one thread doing blocking sends and receives in a
fixed order would deadlock as soon as the next envelope depends on the previous result (r0a).

On CUDA each thread runs its transfers on its own comm stream: an envelope is sent only after an
event recorded by the producing stream, and a received result is handed over with an event the
receiver thread recorded right after that transfer (plus `record_stream`, so the caching
allocator never reuses its memory while the decode stream still reads it). Two streams, not one:
a blocking NCCL `recv` leaves its stream waiting for the transfer, and a send issued on that
same stream would wait behind it; with the receiver posting its `recv` for result k before
envelope k is sent, one shared stream is a deadlock. For the same reason the hand-over event is
recorded by the receiver thread, never later on the stream's tail (by then the `recv` of the
next result may be queued there).

Failure posture: every error a thread meets (including a TransportError when the peer dies or the
process-group timeout fires) is put into `D_out`, so the main thread wakes with it; an ERROR
result from the leader becomes `PeerAbort` there. `close()` joins both threads with a deadline
and reports a thread that did not join (the caller then treats the process as poisoned).
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass

import torch

from streamdit.errors import PeerAbort, Poisoned, StreamditError
from streamdit.protocol.channel import P2PChannel
from streamdit.protocol.errors import TransportError
from streamdit.protocol.header import Action
from streamdit.protocol.messages import PPEnvelopeV1, PPResultV1

log = logging.getLogger(__name__)

LEADER = 1  # global rank of the mesh leader = its rank in both the world and the link group
JOIN_S = 5.0
EXPLAIN_S = 2.0  # after a transport error, how long to wait for the leader's ERROR result


def _peer_abort(result: PPResultV1) -> PeerAbort:
    return PeerAbort(
        f"mesh leader aborted the stream at call_id={result.call_id} cache_epoch={result.cache_epoch}: "
        f"{result.reason}"
    )


@dataclass(frozen=True, slots=True)
class Arrival:
    """One result as the main thread receives it, with the local time it arrived and (CUDA)
    the event that marks its transfer done on the receiver's comm stream."""

    result: PPResultV1
    t_arrived: float
    done: torch.cuda.Event | None = None


class StreamGate:
    """One comm thread's CUDA stream and its cross-stream hand-overs (no-op on CPU)."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.stream = torch.cuda.Stream(device) if self.cuda else None

    def ready_event(self) -> torch.cuda.Event | None:
        """Recorded on the producer's current stream: what the comm stream must wait for."""
        if not self.cuda:
            return None
        event = torch.cuda.Event()
        event.record()
        return event

    def run(self, fn: Callable[[], object], wait: torch.cuda.Event | None = None) -> object:
        if not self.cuda:
            return fn()
        assert self.stream is not None
        with torch.cuda.stream(self.stream):
            if wait is not None:
                self.stream.wait_event(wait)
            return fn()

    def done_event(self) -> torch.cuda.Event | None:
        """Recorded on this gate's stream by its owning thread right after a transfer."""
        if not self.cuda:
            return None
        assert self.stream is not None
        event = torch.cuda.Event()
        event.record(self.stream)
        return event

    @staticmethod
    def hand_over(arrival: Arrival) -> PPResultV1:
        """Make the consumer's stream wait for the result's transfer before it reads it."""
        result = arrival.result
        if arrival.done is not None and result.latents_out is not None:
            torch.cuda.current_stream().wait_event(arrival.done)
            result.latents_out.record_stream(torch.cuda.current_stream())
        return result


class StageLink:
    """Rank0's side of the pp transport: submit envelopes, take results, close."""

    def __init__(
        self,
        envelopes: P2PChannel,
        results: P2PChannel,
        *,
        depth: int,
        device: torch.device,
        timeout_s: float,
        now: Callable[[], float],
    ) -> None:
        self.envelopes = envelopes
        self.results = results
        self.timeout_s = timeout_s
        self.now = now
        self.send_gate = StreamGate(device)  # owned by the sender thread
        self.recv_gate = StreamGate(device)  # owned by the receiver thread
        self.d_in: queue.Queue[tuple[PPEnvelopeV1, torch.cuda.Event | None]] = queue.Queue(maxsize=depth)
        self.d_out: queue.Queue[Arrival | BaseException] = queue.Queue()
        self.failed: BaseException | None = None  # the first error either thread met
        self._sender = threading.Thread(target=self._send_loop, name="pp-send", daemon=True)
        self._receiver = threading.Thread(target=self._recv_loop, name="pp-recv", daemon=True)

    def start(self) -> None:
        self._sender.start()
        self._receiver.start()

    # ---- main thread -----------------------------------------------------------------------

    def submit(self, envelope: PPEnvelopeV1) -> None:
        """Queue an envelope for the sender (blocks while `D_in` is full: nothing is dropped)."""
        self._raise_if_failed()
        self.d_in.put((envelope, self.send_gate.ready_event()), timeout=self.timeout_s)

    def take(self) -> Arrival:
        """The next result; raises what a comm thread met, or PeerAbort on an ERROR result."""
        try:
            item = self.d_out.get(timeout=self.timeout_s + JOIN_S)
        except queue.Empty:
            raise TransportError(
                f"no result from the mesh leader within {self.timeout_s + JOIN_S:.0f} s", field="result"
            ) from None
        if isinstance(item, BaseException):
            self._raise_failure(item)
        if item.result.action is Action.ERROR:
            raise _peer_abort(item.result)
        return Arrival(StreamGate.hand_over(item), item.t_arrived)

    def _explanation(self, wait_s: float) -> PPResultV1 | None:
        """An ERROR result from the leader arriving within `wait_s`, if any."""
        deadline = self.now() + wait_s
        while (left := deadline - self.now()) > 0:
            try:
                item = self.d_out.get(timeout=left)
            except queue.Empty:
                return None
            if isinstance(item, Arrival) and item.result.action is Action.ERROR:
                return item.result
        return None

    @property
    def poisoned(self) -> bool:
        """A comm thread died after a commitment point: no further dist call is allowed."""
        return isinstance(self.failed, Poisoned) or self._sender.is_alive() and self.failed is not None

    def depths(self) -> tuple[int, int]:
        """(D_in, D_out) queue depths right now."""
        return self.d_in.qsize(), self.d_out.qsize()

    def close(self, terminal: PPEnvelopeV1 | None) -> bool:
        """Send `terminal` (SHUTDOWN or ERROR) if the link is healthy; join both threads.

        Returns False when a thread is still alive after the deadline: it is stuck in a
        transfer, so no further `dist` call may be made by this process (poisoned).
        """
        if terminal is not None and self.failed is None and self._sender.is_alive():
            try:
                self.d_in.put((terminal, self.send_gate.ready_event()), timeout=JOIN_S)
            except queue.Full:
                log.error("could not queue %s for the mesh leader: D_in stayed full", terminal.action.name)
        self._sender.join(JOIN_S if terminal is not None else 0.1)
        if terminal is not None and terminal.action is Action.SHUTDOWN:
            self._receiver.join(self.timeout_s)  # the leader echoes SHUTDOWN when it is done
        stuck = [t.name for t in (self._sender, self._receiver) if t.is_alive()]
        if stuck:
            log.critical(
                "comm thread(s) %s did not join: the process is poisoned (no more dist calls)", stuck
            )
        return not stuck

    def _raise_if_failed(self) -> None:
        if self.failed is not None:
            self._raise_failure(self.failed)

    def _raise_failure(self, exc: BaseException) -> None:
        """A transfer failed, typically because the leader went away: if it said why (an ERROR
        result on the other channel), that is the cause to report."""
        cause = self._explanation(EXPLAIN_S)
        if cause is not None:
            raise _peer_abort(cause) from exc
        raise exc

    # ---- comm threads ---------------------------------------------------------------------

    def _send_loop(self) -> None:
        while True:
            envelope, ready = self.d_in.get()
            try:
                self.send_gate.run(lambda env=envelope: self.envelopes.send(env), wait=ready)
            except BaseException as exc:  # noqa: BLE001 - handed to the main thread
                self._fail(exc)
                return
            if envelope.action is not Action.INFER and envelope.action is not Action.NOOP:
                return

    def _recv_loop(self) -> None:
        while True:
            try:
                result = self.recv_gate.run(self.results.recv)
            except BaseException as exc:  # noqa: BLE001 - handed to the main thread
                self._fail(exc)
                return
            assert isinstance(result, PPResultV1)
            if result.action is Action.NOOP:
                continue  # the answer to an idle keepalive: nothing for the main thread
            # recorded now, before this thread queues the next recv on its stream
            self.d_out.put(Arrival(result, self.now(), self.recv_gate.done_event()))
            if result.action is not Action.INFER:
                return

    def _fail(self, exc: BaseException) -> None:
        if self.failed is None:
            self.failed = exc
        if not isinstance(exc, StreamditError):
            log.error("comm thread %s failed: %s", threading.current_thread().name, exc)
        self.d_out.put(exc)
