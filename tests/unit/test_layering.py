"""Imports run one way (model ← parallel ← runtime, protocol ← runtime; config imports none of
them) and only config/environment.py reads os.environ. Walks the AST of every module, so a
violation fails here before it ships."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src" / "streamdit"

# package -> streamdit modules it may import (prefix match); third-party is unrestricted but
# protocol/ and model/ additionally may not import heavy runtime deps like av.
ALLOWED = {
    "model": ("streamdit.errors", "streamdit.model"),
    "protocol": ("streamdit.errors", "streamdit.protocol"),
    "parallel": ("streamdit.errors", "streamdit.config", "streamdit.model", "streamdit.parallel"),
    "config": ("streamdit.errors", "streamdit.config", "streamdit.recipes", "streamdit.protocol.policy"),
}
ENVIRON_OWNER = SRC / "config" / "environment.py"
FORBIDDEN_THIRD_PARTY = {"model": ("av",), "protocol": ("av", "safetensors", "numpy")}
WEB_STACK = ("starlette", "uvicorn", "websockets", "PIL")


def _modules() -> list[Path]:
    return sorted(SRC.rglob("*.py"))


def _imports(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.extend(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append(node.module)
    return names


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(SRC)))
def test_imports_run_one_way(path: Path) -> None:
    package = path.relative_to(SRC).parts[0]
    if package not in ALLOWED:
        return
    for name in _imports(path):
        if name.startswith("streamdit"):
            assert name.startswith(ALLOWED[package]), f"{path.name}: {package}/ may not import {name}"
        assert name.split(".")[0] not in FORBIDDEN_THIRD_PARTY.get(package, ()), f"{path.name} imports {name}"


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(SRC)))
def test_the_web_stack_stays_in_serve(path: Path) -> None:
    """`run` never loads the web stack: only serve/ imports it, only cli.py imports serve/."""
    package = path.relative_to(SRC).parts[0]
    for name in _imports(path):
        if package != "serve":
            assert name.split(".")[0] not in WEB_STACK, f"{path.name} imports {name}"
        if name.startswith("streamdit.serve"):
            assert package == "serve" or path.name == "cli.py", f"{path.name} imports {name}"


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(SRC)))
def test_only_config_reads_environ(path: Path) -> None:
    if path == ENVIRON_OWNER:
        return
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr in ("environ", "getenv", "putenv"):
            where = f"{path.relative_to(SRC)}:{node.lineno}"
            pytest.fail(f"{where} touches os.{node.attr}; only config/environment.py may")


def test_no_pickle_anywhere() -> None:
    for path in _modules():
        for name in _imports(path):
            assert name.split(".")[0] not in ("pickle", "cloudpickle", "dill"), f"{path} imports {name}"
        text = path.read_text(encoding="utf-8")
        assert "_object_list" not in text and "send_object" not in text, f"{path} uses an object collective"


# OM-06: no ad-hoc collective on the compute path. Phase B code (the model and the generator
# runner) never touches torch.distributed; the only collectives it can reach are the TP hooks
# that parallel/ installs, which go through the group-checked wrappers in parallel/collectives.py.
COMPUTE_PATH = [SRC / "model", SRC / "runtime" / "generator.py", SRC / "runtime" / "plan.py"]


def test_om06_compute_path_has_no_collectives() -> None:
    files = [p for root in COMPUTE_PATH for p in ([root] if root.is_file() else sorted(root.rglob("*.py")))]
    assert files
    for path in files:
        text = path.read_text(encoding="utf-8")
        for name in _imports(path):
            assert not name.startswith("torch.distributed"), f"{path.name} imports {name}"
        for call in ("dist.", "broadcast(", "all_reduce(", "all_gather(", "send(", "recv("):
            assert call not in text, f"{path.relative_to(SRC)} contains {call!r}"


def test_only_the_collective_wrappers_call_the_backend() -> None:
    allowed = {"collectives.py", "groups.py", "channel.py"}
    for path in _modules():
        if path.name in allowed:
            continue
        text = path.read_text(encoding="utf-8")
        for call in (
            "dist.all_reduce",
            "dist.broadcast",
            "dist.all_gather",
            "funcol.",
            "_functional_collectives",
        ):
            assert call not in text, f"{path.relative_to(SRC)} calls {call} outside the wrappers"
