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


def test_the_python_api_example_runs_as_written(tmp_path: Path) -> None:
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Python API") :]
    code = section[section.index("```python\n") + len("```python\n") : section.index("\n```\n")]
    src = str(ROOT / "src")
    env = {**os.environ, "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert [ln.split()[0] for ln in lines[:-1]] == ["0", "1", "2", "3"], proc.stdout
    frames = strict_frames(tmp_path / "out" / "api.mp4")
    assert lines[-1].startswith(f"{frames} frames, ") and " FPS, first frame after " in lines[-1], lines[-1]
    soft = [
        ln for ln in (tmp_path / "out" / "api.jsonl").read_text().splitlines() if '"transition": "soft"' in ln
    ]
    assert soft, "the prompt change reached the stream"


def test_ci_installs_the_declared_floors_and_smoke_tests_them() -> None:
    import tomllib

    sys.path.insert(0, str(ROOT / ".ci"))
    try:
        from floors import floors
    finally:
        sys.path.pop(0)
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    pins = floors(ROOT / "pyproject.toml")
    assert [pin.replace("==", ">=") for pin in pins] == [d for d in declared if not d.startswith("torch")]
    ci = (ROOT / ".ci" / "run").read_text()
    assert ".venv-floors/bin/pip install -q torch==2.13.0 $(python3 .ci/floors.py)" in ci
    assert ".venv-floors/bin/python .ci/smoke.py" in ci
    assert ci.index(".ci/smoke.py") < ci.index("python -m pytest -q")
