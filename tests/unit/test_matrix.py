"""`streamdit matrix`: row selection, skips with reasons, a real row run, the JSON report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from streamdit.cli import main
from streamdit.errors import ConfigError
from streamdit.matrix import ROWS, run_matrix, select


def test_rows_cover_the_matrix_and_selection_by_id_and_family() -> None:
    ids = {r.id for r in ROWS}
    for want in [f"OM-{i:02d}" for i in range(1, 13)] + [
        "C-01",
        "C-02",
        "C-03",
        "C-04",
        "O-01",
        "O-02",
        "O-03",
    ]:
        assert want in ids, want
    assert {r.id for r in select("OM-13")} == {"OM-13/tp", "OM-13/pp", "OM-13/stop"}
    assert {r.id for r in select("C-03")} == {"C-03", "C-03/pp"}
    assert [r.id for r in select("OM-01, C-04")] == ["OM-01", "C-04"]
    with pytest.raises(ConfigError, match="OM-99"):
        select("OM-99")
    # every runnable row names tests; the others say why they cannot run
    assert all(r.tests or r.unavailable for r in ROWS)


def test_matrix_runs_rows_and_writes_json(tmp_path: Path, capsys) -> None:
    out, logs = tmp_path / "m.json", tmp_path / "logs"
    assert main(["matrix", "--only", "OM-06,C-02", "--json", str(out), "--logs", str(logs)]) == 0
    rows = {r["id"]: r for r in json.loads(out.read_text())}
    assert rows["OM-06"]["status"] == "pass" and "passed" in rows["OM-06"]["detail"]
    assert rows["C-02"]["status"] == "pass" and "passed" in rows["C-02"]["detail"]
    assert "2 pass, 0 fail, 0 skip" in capsys.readouterr().out
    # --logs keeps each row's pytest output and every rank's log of the jobs it started
    assert "passed" in (logs / "OM-06" / "pytest.log").read_text()
    ranks = sorted(p.name for p in (logs / "C-02").glob("*.log") if p.name != "pytest.log")
    test = "test_c02_graph_break_around_every_collective_fails_the_budget"
    assert ranks == [f"{test}-0-rank{r}.log" for r in (0, 1)]
    assert "CompileHealthError" in (logs / "C-02" / ranks[1]).read_text()


def test_rows_that_cannot_run_here_skip_with_their_reason(tmp_path: Path, capsys) -> None:
    out = tmp_path / "m.json"
    # as on a 2-GPU host: OM-01 lives on the in-process gloo harness, C-03/pp needs 3 GPUs
    code = run_matrix(only="OM-01,C-03/pp", backend="nccl", json_path=out, timeout_s=20, gpus=2)
    assert code == 0
    rows = {r["id"]: r for r in json.loads(out.read_text())}
    assert rows["OM-01"]["status"] == "skip" and "gloo only" in rows["OM-01"]["detail"]
    assert rows["C-03/pp"]["status"] == "skip" and "needs 3 GPUs" in rows["C-03/pp"]["detail"]
    assert "0 pass, 0 fail, 2 skip" in capsys.readouterr().out


def test_emulated_hosts_need_nccl_and_lift_the_gpu_count(tmp_path: Path, capsys) -> None:
    assert main(["matrix", "--emulate-hosts", "--only", "OM-06"]) == 2
    assert "--emulate-hosts needs --backend nccl" in capsys.readouterr().err
    # one GPU is enough when every rank is its own emulated host; gloo-harness rows still skip
    out = tmp_path / "m.json"
    code = run_matrix(only="OM-01", backend="nccl", json_path=out, timeout_s=20, gpus=1, emulate_hosts=True)
    assert code == 0
    assert json.loads(out.read_text())[0]["status"] == "skip"
