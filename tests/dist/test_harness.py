"""The multi-process harness itself: outcomes per rank, exit codes from typed errors, hung ranks.

One run, three ranks, three endings: a clean return, a typed error (exit code from the exception's
`exit_code`), and a hang that the wall clock ends with a stack dump. If this test fails, every
break-it test built on the harness is suspect.
"""

from __future__ import annotations

import time

import pytest

from harness import RankContext, run_ranks
from streamdit.errors import EXIT_BAD_INPUT, ConfigError


def rank_three_endings(ctx: RankContext) -> dict:
    if ctx.rank == 0:
        return {"rank": ctx.rank, "world": ctx.world_size}
    if ctx.rank == 1:
        raise ConfigError("bad flag [field=height]")
    while True:  # rank 2 hangs: the harness must end it, with its stack
        time.sleep(0.05)


@pytest.mark.timeout(60)
def test_outcomes_exit_codes_and_hung_rank() -> None:
    t0 = time.monotonic()
    ok, failed, hung = run_ranks(rank_three_endings, 3, timeout_s=6)
    assert time.monotonic() - t0 < 20
    assert ok.exitcode == 0 and ok.result == {"rank": 0, "world": 3} and ok.exc_type is None
    assert failed.exitcode == EXIT_BAD_INPUT and failed.exc_type == "ConfigError"
    assert "field=height" in failed.message and "Traceback" in failed.traceback
    assert hung.timed_out and hung.exitcode != 0 and not hung.reported
    assert "rank_three_endings" in hung.stacks  # the faulthandler dump names the hung frame
