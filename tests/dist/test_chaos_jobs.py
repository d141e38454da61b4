"""`streamdit matrix --chaos 2 --seed 2` end to end: real jobs, real faults from outside.

Seed 2 draws a pp job whose rank0 is SIGKILLed mid-stream (both mesh ranks orphaned, exit 4)
and a pp job whose rank0 is SIGSTOPped with the store it hosts (mesh ranks exit 4 within the
window; rank0, resumed, finds them gone: 6, and `inspect` names rank0). The command must exit
0 and its JSON must hold each case's per-rank codes, seconds and a whole video that holds
exactly what the metrics claim.

A full disk on rank0 of tp and pp (the chaos run that found it: seed 7, case 33): rank0
exits 1 naming the failed write, every other rank 5, and rank0 leaves with its code even
when a comm thread is still blocked in the backend (it used to die of SIGABRT in C++
teardown at exit: "terminate called without an active exception").
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from ranks import BACKEND, EMULATE_HOSTS, env
from streamdit.matrix.chaos import CHUNKS, WINDOW_S, Case, Launch, Reference, draw_cases, run_case
from streamdit.config import RunConfig
from streamdit.media import NPY_HEADER_LEN
from streamdit.model.vae import pixel_frames

pytestmark = pytest.mark.timeout(600)


def test_two_seeded_faults_end_within_their_bounds_with_the_documented_codes(tmp_path: Path) -> None:
    out = tmp_path / "chaos.json"
    cmd = [sys.executable, "-m", "streamdit", "matrix", "--chaos", "2", "--seed", "2", "--json", str(out)]
    cmd += ["--backend", BACKEND, *(["--emulate-hosts"] if EMULATE_HOSTS else [])]
    proc = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=560, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    doc = json.loads(out.read_text())
    assert doc["summary"]["cases"] == doc["summary"]["passed"] == 2, proc.stdout
    drawn = draw_cases(2, 2)
    assert [c["case"]["label"] for c in doc["cases"]] == [c.label() for c in drawn]
    killed, frozen = doc["cases"]
    assert killed["codes"] == {"0": -9, "1": 4, "2": 4}, killed
    assert frozen["codes"] == {"0": 6, "1": 4, "2": 4}, frozen
    for c in doc["cases"]:
        assert c["status"] == "pass" and not c["problems"], c
        assert all(s < WINDOW_S + 5.0 for s in c["seconds"].values()), c
        assert c["frames"] == c["claimed"] > 0 and c["chunks"] >= c["chunks_at_fault"] >= 1, c
        assert c["inspect"].startswith("0: "), c


@pytest.mark.parametrize("topology", ["tp", "pp"])
def test_a_full_disk_on_rank0_ends_every_rank_with_its_code(tmp_path: Path, topology: str) -> None:
    f = RunConfig().frames_per_chunk
    frames = (pixel_frames(f, first_chunk=True),) + (pixel_frames(f, first_chunk=False),) * (CHUNKS - 1)
    npy_bytes = NPY_HEADER_LEN + 32 * 48 * 3 * sum(frames)  # the default geometry's .npy, exactly
    reference = Reference({"npy": npy_bytes, "mp4": 0}, frames)
    case = Case(0, topology, "disk-full", 0, 8, 0.0, "npy")
    result = run_case(case, Launch(backend=BACKEND, emulate_hosts=EMULATE_HOSTS), reference, tmp_path)
    world = 2 if topology == "tp" else 3
    assert result.codes == {0: 1, **{r: 5 for r in range(1, world)}}, result
    assert result.status == "pass", result.problems
    assert result.chunks == 8 and result.frames == result.claimed == sum(frames[:8])
    log0 = (tmp_path / "rank0.log").read_text()
    assert "output: writing failed: [Errno 27] File too large; 8 chunks" in log0, log0[-3000:]
    assert "terminate called" not in log0 and "Traceback" not in log0, log0[-3000:]
    assert result.inspect.startswith("0: OutputError"), result.inspect
