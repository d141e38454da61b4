"""The public Python API (`streamdit.Stream`): chunks in order and lossless, steering, pause,
early stop, errors raised where the caller is; `run` and `serve` are built on it."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest

import streamdit
from streamdit.config import LaunchEnv
from streamdit.errors import ConfigError
from streamdit.runtime.faults import InjectedFault
from streamdit.runtime.metrics import read_metrics

pytestmark = pytest.mark.timeout(120)
GEOM = {"height": 32, "width": 48}


def _config(tmp_path: Path, name: str, **kw: object) -> streamdit.RunConfig:
    return streamdit.RunConfig(out=tmp_path / f"{name}.npy", metrics=tmp_path / f"{name}.jsonl", **GEOM, **kw)


def test_the_package_exports_the_api_lazily() -> None:
    assert dir(streamdit) == ["Chunk", "RunConfig", "RunSummary", "Stream", "__version__"]
    assert streamdit.Stream.__module__ == "streamdit.api"
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        _ = streamdit.nope  # type: ignore[attr-defined]


def test_iteration_yields_every_chunk_in_order_equal_to_the_video(tmp_path: Path) -> None:
    cfg = _config(tmp_path, "it", chunks=4)
    with streamdit.Stream(cfg) as stream:
        chunks = list(stream)
    assert [c.index for c in chunks] == [0, 1, 2, 3]
    frames = np.concatenate([c.frames for c in chunks])
    assert frames.dtype == np.uint8 and frames.shape == (9 + 3 * 12, 32, 48, 3)
    np.testing.assert_array_equal(frames, np.load(cfg.out))
    assert [c.metrics.chunk_index for c in chunks] == [
        r["chunk_index"] for r in read_metrics(cfg.metrics).chunks
    ]
    assert stream.summary is not None and (stream.summary.chunks, stream.summary.frames) == (4, 45)
    # run() on the calling thread gives the same stream, bit for bit
    again = _config(tmp_path, "run", chunks=4)
    summary = streamdit.Stream(again).run()
    assert summary is not None and summary.outcome == "completed"
    np.testing.assert_array_equal(np.load(again.out), frames)


def test_set_prompt_steers_the_stream_from_the_next_boundary(tmp_path: Path) -> None:
    plain = np.load(_run(_config(tmp_path, "plain", chunks=5)))
    cfg = _config(tmp_path, "steered", chunks=5)
    with streamdit.Stream(cfg) as stream:
        for chunk in stream:
            if chunk.index == 0:
                reply = stream.set_prompt("a lighthouse at dusk", transition="hard")
    assert reply["accepted"] and reply["after_chunk"] == 0
    rows = read_metrics(cfg.metrics).chunks
    cut = next(r["chunk_index"] for r in rows if r["transition"] == "hard")
    assert cut in (1, 2) and [r["cache_epoch"] for r in rows][cut] == 1  # the chunk Phase A prepares next
    steered = np.load(cfg.out)
    first = 9 + 12 * (cut - 1)
    np.testing.assert_array_equal(steered[:first], plain[:first])  # before the boundary: unchanged
    assert not np.array_equal(steered[first:], plain[first:])


def _run(cfg: streamdit.RunConfig) -> Path:
    assert streamdit.Stream(cfg).run() is not None
    return cfg.out


def test_leaving_the_loop_early_drains_to_a_whole_video(tmp_path: Path) -> None:
    cfg = _config(tmp_path, "early", chunks=40)
    stream = streamdit.Stream(cfg)
    for chunk in stream:
        if chunk.index == 1:
            break
    summary = stream.summary
    assert (
        summary is not None
        and summary.outcome == "drained"
        and summary.stopped_early == "stopped by the caller"
    )
    assert 2 <= summary.chunks < 40
    assert (
        np.load(cfg.out).shape[0]
        == summary.frames
        == sum(r["frames"] for r in read_metrics(cfg.metrics).chunks)
    )


def test_a_failure_of_the_stream_is_raised_to_the_iterating_caller(tmp_path: Path) -> None:
    cfg = _config(tmp_path, "crash", chunks=4, test_hooks={"STREAMDIT_TEST_CRASH_AT_CHUNK": "2"})
    seen = []
    with pytest.raises(InjectedFault, match="injected crash at chunk 2"), streamdit.Stream(cfg) as stream:
        seen.extend(chunk.index for chunk in stream)
    assert seen == [0, 1]
    assert np.load(cfg.out).shape[0] == 9 + 12  # the chunks written before the crash stay


def test_pause_holds_at_a_boundary_and_is_not_counted_as_slow_generation(tmp_path: Path) -> None:
    cfg = _config(tmp_path, "pause", chunks=4)
    with streamdit.Stream(cfg) as stream:
        for chunk in stream:
            if chunk.index == 1:
                stream.pause()
                threading.Timer(1.5, stream.resume).start()
    rows = read_metrics(cfg.metrics).chunks
    paused = [r["paused_ms"] for r in rows]
    assert max(paused) >= 1000 and sorted(paused)[:-1] == [0.0] * 3, paused  # one boundary waited
    summary = stream.summary
    assert summary is not None and summary.period_ms_p99 is not None and summary.period_ms_p99 < max(paused)


def test_bad_use_is_refused_with_the_field_named(tmp_path: Path) -> None:
    timeline = tmp_path / "tl.json"
    timeline.write_text('{"entries": [{"chunk": 0, "prompt": "a harbour"}]}')
    stream = streamdit.Stream(_config(tmp_path, "tl", chunks=2, timeline=timeline))
    with pytest.raises(ConfigError, match="follows its --timeline file.*field=prompt"):
        stream.set_prompt("something else")
    with pytest.raises(ConfigError, match="field=transition"):
        streamdit.Stream(_config(tmp_path, "x")).set_prompt("a fox", transition="fade")
    with pytest.raises(ConfigError, match="start the ranks with a launcher.*field=topology"):
        streamdit.Stream(_config(tmp_path, "tp", topology="tp"), launch=LaunchEnv()).run()
