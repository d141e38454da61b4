"""`streamdit matrix --chaos`: the seeded draw and the expectations table (no process started).

- One seed draws one list of cases on any machine; another seed draws another.
- Every drawn case is one the table knows (a fault where it can happen: no frozen store for a
  single process, a full disk only where rank0 writes), and a long draw covers every fault on
  every topology it can hit, and both output formats.
- Every code the table expects is a documented exit code (README) or SIGKILL's.
- The disk-full limit of a chunk falls inside that chunk's bytes (so the write that fails is
  the drawn chunk's).
"""

from __future__ import annotations

import collections

from streamdit import errors
from streamdit.matrix.chaos import CHUNKS, EXPECTED, KINDS, WORLD, Case, Reference, draw_cases
from streamdit.media import NPY_HEADER_LEN


def test_a_seed_draws_the_same_cases_everywhere_and_another_seed_others() -> None:
    assert draw_cases(30, 5) == draw_cases(30, 5)
    assert draw_cases(30, 5) != draw_cases(30, 6)
    assert draw_cases(10, 5) == draw_cases(30, 5)[:10]  # a longer run extends a shorter one


def test_every_case_is_one_the_table_knows_and_a_long_draw_covers_the_table() -> None:
    cases = draw_cases(400, 1)
    for c in cases:
        assert (c.kind, c.role) in EXPECTED, c
        assert 0 <= c.rank < WORLD[c.topology] and 1 <= c.chunk < CHUNKS - 3, c
        assert c.suffix in ("npy", "mp4") and 0.0 <= c.delay_s <= 0.3
    seen = collections.Counter((c.kind, c.role) for c in cases)
    assert set(seen) == set(EXPECTED), set(EXPECTED) - set(seen)
    by_kind = {k: {c.topology for c in cases if c.kind == k} for k in KINDS}
    assert by_kind["store-frozen"] == {"tp", "pp"}
    assert all(by_kind[k] == set(WORLD) for k in KINDS if k != "store-frozen")
    assert {c.rank for c in cases if c.topology == "pp" and c.role == "worker"} == {1, 2}
    assert all(c.rank == 0 for c in cases if c.kind in ("disk-full", "store-frozen"))


def test_every_expected_code_is_documented() -> None:
    documented = {
        errors.EXIT_OK,
        errors.EXIT_FAILURE,
        errors.EXIT_ORPHANED,
        errors.EXIT_PEER_ABORT,
        errors.EXIT_PEER_LOST,
        -9,  # SIGKILL: nothing runs
    }
    for (kind, role), (_, hit, others) in EXPECTED.items():
        assert hit and hit <= documented, (kind, role)
        assert others <= documented and (role == "alone") == (not others), (kind, role)
    case = Case(0, "pp", "kill", 2, 3, 0.0, "npy")
    assert case.expected(2) == {-9} and case.expected(0) == case.expected(1) == {6}


def test_the_disk_full_limit_falls_inside_the_drawn_chunk() -> None:
    frames = (9,) + (12,) * (CHUNKS - 1)
    frame_bytes = 32 * 48 * 3
    ref = Reference({"npy": NPY_HEADER_LEN + frame_bytes * sum(frames), "mp4": 100_000}, frames)
    for k in range(1, CHUNKS):
        limit = ref.byte_limit("npy", k)
        assert (
            NPY_HEADER_LEN + frame_bytes * sum(frames[:k])
            < limit
            < NPY_HEADER_LEN + frame_bytes * sum(frames[: k + 1])
        )
        assert 0 < ref.byte_limit("mp4", k) < 100_000
