"""Startup stages are shown while they run: on a terminal a line redrawn with the elapsed time,
closed with the duration; elsewhere an INFO line per finished stage."""

from __future__ import annotations

import io
import logging
import time

import pytest

from streamdit.runtime import startup
from streamdit.runtime.startup import StartupProgress


def test_a_stage_is_drawn_while_it_runs_and_closed_with_its_duration(monkeypatch, caplog) -> None:
    monkeypatch.setattr(startup, "TICK_S", 0.02)
    out = io.StringIO()
    progress = StartupProgress(enabled=True, stream=out)
    with caplog.at_level(logging.INFO, logger="streamdit.runtime.startup"), progress.stage("compiling"):
        deadline = time.monotonic() + 10
        while "compiling ... 0 s" not in out.getvalue():  # the ticker redrew the line
            assert time.monotonic() < deadline, out.getvalue()
            time.sleep(0.01)
    text = out.getvalue()
    assert text.startswith("\r\033[Kstreamdit: compiling ...")
    assert text.endswith(" s\n") and "streamdit: compiling: " in text.rsplit("\r", 1)[-1]
    assert "startup: compiling: " in caplog.text
    with progress.stage(None):  # nothing to show
        pass
    assert out.getvalue() == text


def test_off_a_terminal_only_the_log_says_it(caplog) -> None:
    out = io.StringIO()
    with caplog.at_level(logging.INFO, logger="streamdit.runtime.startup"):
        with StartupProgress(enabled=False, stream=out).stage("building the DiT"):
            pass
        with pytest.raises(RuntimeError), StartupProgress(enabled=False, stream=out).stage("loading"):
            raise RuntimeError("bad file")
    assert out.getvalue() == ""
    assert "startup: building the DiT: " in caplog.text and "startup: loading: " in caplog.text
