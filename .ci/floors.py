"""Print the declared minimum of every runtime dependency as a pin (`numpy==1.26 av==12 ...`).

`.ci/run` installs these in a scratch venv and smoke-tests `run` and `serve` there, so a floor in
pyproject.toml that the code outgrew fails CI. torch is the exception: CI has one CPU build on
local disk (2.13.0), and the GPU machines run 2.11; both are above its floor.
"""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path

SKIP = {"torch"}


def floors(pyproject: Path) -> list[str]:
    pins = []
    for requirement in tomllib.loads(pyproject.read_text())["project"]["dependencies"]:
        match = re.fullmatch(r"\s*([A-Za-z0-9_.\-]+)\s*>=\s*([0-9][0-9A-Za-z.]*)\s*", requirement)
        if match is None:
            raise SystemExit(f"{requirement!r}: every runtime dependency declares a floor as name>=X")
        name, version = match.groups()
        if name.lower() not in SKIP:
            pins.append(f"{name}=={version}")
    return pins


if __name__ == "__main__":
    print(" ".join(floors(Path(sys.argv[1] if len(sys.argv) > 1 else "pyproject.toml"))))
