"""pp's rank0 link on CUDA: the comm threads' streams never make a send wait behind a pending recv.

NCCL semantics, emulated in one process on one GPU: a blocking `recv` leaves the calling thread's
current stream busy until the transfer lands (here a long sleep kernel stands for the pending
recv kernel), and a `send` starts only once its stream reaches it. The receiver thread posts its
recv for result k before envelope k is sent, so if both threads shared one comm stream the
envelope would queue behind that recv: on real NCCL a deadlock (the leader never gets the
envelope it must answer). These tests assert the ordering, not a duration: envelope 0 goes out
while recv 0 is still pending, and the main thread's hand-over waits for its own result's
transfer, not for the next recv the receiver thread has already queued.

CUDA only (run on the GPU machine: `python -m pytest tests/unit/test_pp_link_streams.py`).
"""

from __future__ import annotations

import dataclasses
import queue
import threading
import time

import pytest
import torch

from factories import control, pp_infer, pp_result
from streamdit.protocol.header import Action
from streamdit.protocol.messages import PPEnvelopeV1, PPResultV1
from streamdit.runtime.pp_link import StageLink

pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA stream ordering needs a GPU"),
    pytest.mark.timeout(60),
]
PENDING_CYCLES = 2_000_000_000  # ~1 s at H100/H200 clocks: far longer than a send takes


class NcclLikeWire:
    """Both channels of the link, with the leader answering every envelope at once."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.answers: queue.Queue[PPResultV1] = queue.Queue()
        self.pending: list[torch.cuda.Event] = []  # end of each posted recv's stand-in kernel
        self.posted = threading.Semaphore(0)
        self.sent_after_recv_done: list[bool] = []

    def send(self, envelope: PPEnvelopeV1) -> None:  # the sender thread, on its current stream
        waiting_on = self.pending[-1] if self.pending else None
        reached = torch.cuda.Event()
        reached.record()
        reached.synchronize()  # the transfer starts when the stream gets here
        self.sent_after_recv_done.append(waiting_on is not None and waiting_on.query())
        if envelope.action is Action.INFER:
            self.answers.put(pp_result(call_id=envelope.call_id, chunk_index=envelope.chunk_index))
        else:
            self.answers.put(control(PPResultV1, envelope.action, envelope.call_id))

    def recv(self) -> PPResultV1:  # the receiver thread, on its current stream
        torch.cuda._sleep(PENDING_CYCLES)  # the recv kernel, busy until the data lands
        end = torch.cuda.Event()
        end.record()
        self.pending.append(end)
        self.posted.release()
        result = self.answers.get(timeout=30)
        if result.latents_out is None:
            return result
        landed = result.latents_out.to(self.device, non_blocking=True)  # queued behind the recv
        return dataclasses.replace(result, latents_out=landed)


def test_envelope_goes_out_while_the_result_recv_is_pending_and_hand_over_skips_the_next_recv() -> None:
    device = torch.device("cuda", torch.cuda.current_device())
    # Load the consumer's kernels first: a lazily loaded CUDA module waits for running kernels,
    # which would look like a hand-over waiting behind the pending recv.
    (pp_result().latents_out.to(device) * 2).cpu()
    wire = NcclLikeWire(device)
    link = StageLink(wire, wire, depth=2, device=device, timeout_s=20, now=time.monotonic)  # type: ignore[arg-type]
    link.start()
    try:
        assert wire.posted.acquire(timeout=10)  # recv 0 is pending before envelope 0 exists
        link.submit(pp_infer(call_id=0, chunk_index=0))
        assert wire.posted.acquire(timeout=20)  # result 0 arrived on the host; recv 1 is queued
        arrival = link.take()
        doubled = arrival.result.latents_out * 2  # the consumer's read, on the main stream
        torch.cuda.current_stream().synchronize()
        assert not wire.sent_after_recv_done[0], "envelope 0 waited behind the pending recv of result 0"
        assert not wire.pending[1].query(), "the hand-over waited for the next result's recv"
        assert torch.equal(doubled.cpu(), pp_result(call_id=0, chunk_index=0).latents_out * 2)
    finally:
        joined = link.close(control(PPEnvelopeV1, Action.SHUTDOWN, call_id=1))
        torch.cuda.synchronize()
    assert joined
