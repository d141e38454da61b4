"""serve's live controls without a server: the live timeline, the paused boundary, the status."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from streamdit.errors import ConfigError
from streamdit.runtime.live import LiveFrames, LiveStream, LiveTimeline, PendingChange
from streamdit.runtime.liveness import StopFlag
from streamdit.runtime.metrics import ChunkMetrics


def test_a_submission_takes_effect_at_the_next_chunk_and_only_there() -> None:
    tl = LiveTimeline("a fox")
    assert tl.state(0).prompt == "a fox" and tl.state(1).prompt == "a fox"
    tl.submit("a city", "hard")
    s2 = tl.state(2)
    assert s2.prompt == "a city" and s2.hard_cut and s2.drop_in_flight  # a live hard cut is immediate
    assert tl.state(2) == s2  # asked twice for one chunk (pp asks before prepare): same answer
    tl.submit("a beach", "soft")
    tl.submit("a harbour", "soft", replace=True)  # replaces the pending one, as asked
    assert tl.state(2) == s2  # never rewrites a chunk already asked for
    s3, s4 = tl.state(3), tl.state(4)
    assert (s3.prompt, s3.previous, s3.alpha, s3.soft_active) == ("a harbour", "a city", 0.5, True)
    assert (s4.prompt, s4.previous, s4.alpha, s4.hard_cut) == ("a harbour", None, 1.0, False)
    assert tl.current() == ("a harbour", None)


@pytest.mark.parametrize(
    ("prompt", "transition", "needle"),
    [
        ("", "hard", "empty"),
        ("x" * 2001, "soft", "at most 2000"),
        ("ok", "fade", "fade"),
        (None, "hard", "string"),
    ],
)
def test_bad_submissions_are_refused_naming_the_field(
    prompt: object, transition: object, needle: str
) -> None:
    with pytest.raises(ConfigError, match=needle):
        LiveStream("a", StopFlag(), keepalive_s=1).submit(prompt, transition)


def _record(k: int) -> ChunkMetrics:
    return ChunkMetrics(
        chunk_index=k, cache_epoch=0, call_id=k, frames=12, generator_calls=4, phase_a_ms=1.0,
        phase_b_ms=1.0, phase_c_ms=1.0, transition="none", kv_recompute=False,
    )  # fmt: skip


def test_paused_boundary_keeps_peers_alive_until_resumed() -> None:
    live = LiveStream("a", StopFlag(), keepalive_s=0.1, start_paused=True)
    beats: list[float] = []
    t = threading.Thread(target=live.boundary, args=(lambda: beats.append(time.monotonic()),))
    t.start()
    time.sleep(0.6)
    assert t.is_alive() and live.status()["idle"] and len(beats) >= 3
    live.resume()
    t.join(timeout=2)
    assert not t.is_alive() and not live.status()["idle"]


def test_a_stop_while_paused_releases_the_boundary_at_once() -> None:
    stop = StopFlag()
    live = LiveStream("a", stop, keepalive_s=60, start_paused=True)
    t = threading.Thread(target=live.boundary, args=(None,))
    t.start()
    time.sleep(0.2)
    stop.request("SIGTERM")  # as a signal handler does: no notify
    t.join(timeout=2)
    assert not t.is_alive() and live.status()["state"] == "stopping"


def test_status_counts_frames_fps_and_period_percentiles() -> None:
    live = LiveStream("a", StopFlag(), keepalive_s=1)
    got = []
    live.sinks.append(lambda frames, rec: got.append(rec.chunk_index))
    assert live.status()["state"] == "starting"
    for k in range(5):
        live.emitted(np.zeros((12, 4, 4, 3), np.uint8), _record(k))
        time.sleep(0.02)
    st = live.status()
    assert got == [0, 1, 2, 3, 4] and st["frames_total"] == 60 and st["chunk_index"] == 4
    assert st["state"] == "running" and 0 < st["fps"] <= 12 / 0.02  # sleeps make periods >= 20 ms
    assert 15 < st["period_ms_p50"] <= st["period_ms_p99"]


def test_a_prompt_without_a_precomputed_embedding_is_refused_at_submit() -> None:
    """With --text-embeddings, serve refuses a prompt the file does not hold (a 4xx naming
    the prompt), before it can reach Phase A, and the stream goes on with the current one."""

    known = {"a city", "a harbour"}

    def check(prompt: str) -> None:
        if prompt not in known:
            raise ConfigError(f"no embedding for prompt {prompt!r} [field=prompt]")

    tl = LiveTimeline("a city", check)
    with pytest.raises(ConfigError, match="a forest"):
        tl.submit("a forest", "soft")
    assert tl.current() == ("a city", None)
    tl.submit("a harbour", "hard")
    assert tl.current() == ("a city", ("a harbour", "cut"))


def test_a_waiting_change_is_replaced_only_when_asked_and_can_be_withdrawn() -> None:
    tl = LiveTimeline("a fox")
    tl.submit("a city", "hard")
    with pytest.raises(PendingChange, match=r"already waiting .*\(cut: 'a city'\).*\[field=replace\]"):
        tl.submit("a beach", "soft")
    assert tl.current() == ("a fox", ("a city", "cut"))  # the cut was not overwritten
    tl.submit("a beach", "soft", replace=True)
    assert tl.current() == ("a fox", ("a beach", "soft"))
    assert tl.cancel() == "a beach" and tl.cancel() is None
    s1 = tl.state(1)
    assert (s1.prompt, s1.hard_cut, s1.soft_active) == ("a fox", False, False)  # nothing applied
    live = LiveStream("a fox", StopFlag(), keepalive_s=1)
    live.submit("a city", "hard")
    status = live.status()
    assert (status["pending_prompt"], status["pending_transition"]) == ("a city", "hard")
    assert live.cancel() == {"cancelled": "a city"} and live.status()["pending_prompt"] is None


def test_live_frames_give_phase_a_the_newest_frames_and_never_block() -> None:
    frames = LiveFrames(4, 6)
    gray = frames.read(3)
    assert gray.shape == (3, 4, 6, 3) and (gray == 128).all()  # before the first frame
    for k in range(10):
        frames.push(np.full((4, 6, 3), k, dtype=np.uint8))
    assert [int(f[0, 0, 0]) for f in frames.read(4)] == [6, 7, 8, 9]  # the newest, older dropped
    frames.push(np.full((4, 6, 3), 20, dtype=np.uint8))
    assert [int(f[0, 0, 0]) for f in frames.read(3)] == [20, 20, 20]  # fewer arrived: the last held
    assert [int(f[0, 0, 0]) for f in frames.read(2)] == [20, 20]
    assert frames.stats() == {"received": 11, "used": 5, "waiting": 0}
    with pytest.raises(ValueError, match=r"expected \(4, 6, 3\) uint8"):
        frames.push(np.zeros((4, 7, 3), dtype=np.uint8))
    for _ in range(LiveFrames.KEPT + 5):
        frames.push(np.zeros((4, 6, 3), dtype=np.uint8))
    assert frames.stats()["waiting"] == LiveFrames.KEPT  # bounded
    assert (frames.fresh().read(1) == 128).all()  # a rehearsal never takes the viewer's frames
