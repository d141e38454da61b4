"""The committed plots are drawn from the committed JSON by bench/plot_results.py: the script
runs, draws every plot README shows, and README shows every plot it draws."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.timeout(180)


def test_every_readme_plot_is_drawn_from_its_json(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "plot_results.py"), "--out", str(tmp_path)],
        capture_output=True, text=True, env=env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    drawn = sorted(p.name for p in tmp_path.glob("*.svg"))
    shown = sorted(set(re.findall(r"\]\(bench/results/([\w.]+\.svg)\)", (ROOT / "README.md").read_text())))
    assert drawn == shown
    for name in drawn:
        ET.parse(tmp_path / name)  # well-formed SVG
        assert (ROOT / "bench" / "results" / name).exists(), f"{name} is not committed"
        assert "<text" in (tmp_path / name).read_text() or "<path" in (tmp_path / name).read_text()
