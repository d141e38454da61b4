"""`streamdit matrix`: run the operator test matrix (docs/test-matrix.md) on this machine.

Owns: `run_matrix` over `ROWS` (rows.py: every row of the matrix and the extra rows, each
mapped to the break-it tests that prove it); `chaos.py` is `--chaos`. A row runs its tests in
a fresh pytest process under the row's timeout (its whole process group is killed at the
bound, so a hang is a `fail`, never a wait); the row passes only if every test passed. A row
that needs what this machine lacks (NCCL, a number of GPUs, a feature not built yet) is a
`skip` with the reason, never a pass.

The tests live in the source checkout (`tests/`): the break-it tests and this command are one
source of truth. `--backend nccl` runs the rows that launch real ranks with `--device cuda`
(one GPU per rank); rows built on the in-process gloo harness are skipped there, with why.
`--emulate-hosts` runs those rows on a machine with fewer GPUs than ranks: every rank is its own
emulated host (LOCAL_RANK 0, its own NCCL host id) on GPU 0, so NCCL builds real communicators
over loopback sockets (no NVLink, no shared memory): the protocol, stream and thread behaviour
of the NCCL path, not its speed.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from streamdit.config import child_environment
from streamdit.errors import ConfigError
from streamdit.matrix.rows import ROWS, Row

ROW_TIMEOUT_S = 20.0


@dataclass(frozen=True, slots=True)
class RowResult:
    id: str
    status: str  # pass | fail | skip
    seconds: float
    detail: str


def select(only: str | None) -> list[Row]:
    if not only:
        return list(ROWS)
    wanted = [w.strip() for w in only.split(",") if w.strip()]
    known = {r.id for r in ROWS}
    unknown = [w for w in wanted if w not in known and not any(k.startswith(w + "/") for k in known)]
    if unknown:
        raise ConfigError(f"unknown matrix rows {unknown} (known: {sorted(known)}) [field=only]")
    return [r for r in ROWS if r.id in wanted or r.id.split("/")[0] in wanted]


def repo_root() -> Path:
    root = Path(__file__).resolve().parents[3]
    if not (root / "tests" / "dist").is_dir():
        raise ConfigError(
            f"streamdit matrix runs the break-it tests of a source checkout; none at {root} [field=tests]"
        )
    return root


def run_row(
    row: Row,
    *,
    backend: str,
    gpus: int,
    timeout_s: float,
    root: Path,
    emulate_hosts: bool = False,
    logs: Path | None = None,
) -> RowResult:
    if row.unavailable:
        return RowResult(row.id, "skip", 0.0, row.unavailable)
    if backend == "nccl" and not row.nccl:
        return RowResult(row.id, "skip", 0.0, "built on the in-process gloo harness: CPU/gloo only")
    if backend == "nccl" and gpus < row.ranks and not emulate_hosts:
        return RowResult(row.id, "skip", 0.0, f"needs {row.ranks} GPUs, this machine has {gpus}")
    timeout_s = max(timeout_s, row.min_timeout_s)
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-p",
        "no:cacheprovider",
        "--timeout",
        str(int(timeout_s)),
        *row.tests,
    ]
    extra = {"STREAMDIT_MATRIX_BACKEND": backend, "STREAMDIT_MATRIX_EMULATE_HOSTS": str(int(emulate_hosts))}
    row_logs = logs / row.id.replace("/", "_") if logs is not None else None
    if row_logs is not None:  # every rank's log of every test of the row lands here (tests/ranks.py)
        row_logs.mkdir(parents=True, exist_ok=True)
        extra["STREAMDIT_MATRIX_LOG_DIR"] = str(row_logs)
    t0 = time.monotonic()
    proc = subprocess.Popen(
        cmd,
        cwd=root,
        env=child_environment(extra),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        out, _ = proc.communicate(timeout=timeout_s + 15)  # + interpreter and torch start-up
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out = proc.communicate()[0]
        _keep(row_logs, out + f"\n<killed by streamdit matrix at the row bound {timeout_s + 15:.0f} s>")
        return RowResult(
            row.id, "fail", time.monotonic() - t0, f"no result within {timeout_s + 15:.0f} s (hang)"
        )
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    seconds = time.monotonic() - t0
    _keep(row_logs, out)
    summary = _summary(out)
    if proc.returncode == 0 and " passed" in summary:
        return RowResult(row.id, "pass", seconds, summary)
    if proc.returncode == 0:
        return RowResult(row.id, "skip", seconds, summary)
    where = f" (logs: {row_logs})" if row_logs is not None else ""
    return RowResult(row.id, "fail", seconds, (_first_error(out) or summary) + where)


def _keep(row_logs: Path | None, out: str) -> None:
    """The row's pytest output beside its ranks' logs (`--logs`)."""
    if row_logs is not None:
        (row_logs / "pytest.log").write_text(out)


def _summary(out: str) -> str:
    lines = [
        ln.strip("= ")
        for ln in out.splitlines()
        if " in " in ln and ("passed" in ln or "failed" in ln or "skipped" in ln or "error" in ln)
    ]
    return lines[-1] if lines else (out.strip().splitlines() or ["no output"])[-1][:200]


def _first_error(out: str) -> str:
    for line in out.splitlines():
        if line.startswith(("E ", "FAILED", "ERROR")):
            return line[:300]
    return ""


def run_matrix(
    *,
    only: str | None,
    backend: str,
    json_path: Path | None,
    timeout_s: float,
    gpus: int,
    emulate_hosts: bool = False,
    logs: Path | None = None,
) -> int:
    rows, root = select(only), repo_root()
    results: list[RowResult] = []
    print(f"{'row':<11} {'status':<6} {'s':>6}  detail", flush=True)
    for row in rows:
        result = run_row(
            row,
            backend=backend,
            gpus=gpus,
            timeout_s=timeout_s,
            root=root,
            emulate_hosts=emulate_hosts,
            logs=logs,
        )
        results.append(result)
        print(
            f"{result.id:<11} {result.status:<6} {result.seconds:>6.1f}  {row.title}: {result.detail}",
            flush=True,
        )
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps([asdict(r) for r in results], indent=1) + "\n")
    counts = {s: sum(r.status == s for r in results) for s in ("pass", "fail", "skip")}
    total = sum(r.seconds for r in results)
    print(f"{counts['pass']} pass, {counts['fail']} fail, {counts['skip']} skip in {total:.0f} s")
    return 1 if counts["fail"] else 0
