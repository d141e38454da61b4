"""README's first commands stay true: the quick start's run works as written (in a scratch
folder, with this checkout's code) and the test command is exactly what `.ci/run` runs."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from streamdit.media import strict_frames

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.timeout(180)


def _commands() -> list[str]:
    """The README's indented command lines, in order."""
    return [ln.strip() for ln in (ROOT / "README.md").read_text().splitlines() if ln.startswith("    ")]


def test_the_quick_start_installs_without_test_tooling_and_its_run_writes_a_video(tmp_path: Path) -> None:
    install = _commands()[0]
    assert "pip install torch==2.13.0 -e . &&" in install and "[test]" not in install, install
    run = shlex.split(install.split("&&")[-1])
    assert run[:2] == ["streamdit", "run"], run
    src = str(ROOT / "src")
    env = {**os.environ, "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run(
        [sys.executable, "-m", "streamdit", *run[1:]], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / run[run.index("--out") + 1]
    assert strict_frames(out) > 0


def test_the_test_command_is_the_one_ci_runs() -> None:
    test = _commands()[1]
    assert test == "python -m pytest -q"
    ci = [ln.strip() for ln in (ROOT / ".ci" / "run").read_text().splitlines() if ln.strip()]
    assert ci[-1] == test, ci[-1]
