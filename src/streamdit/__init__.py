"""streamdit: chunk-by-chunk causal video diffusion that crashes fast instead of hanging.

The Python API (`Stream`, `Chunk`, `RunConfig`, `RunSummary`; see streamdit/api.py) loads on
first use, so `import streamdit` and the CLI's `--help` stay free of torch.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["Chunk", "RunConfig", "RunSummary", "Stream", "__version__"]
_API = {
    "Chunk": "streamdit.api",
    "Stream": "streamdit.api",
    "RunConfig": "streamdit.config",
    "RunSummary": "streamdit.runtime.driver",
}


def __getattr__(name: str) -> Any:
    if name not in _API:
        raise AttributeError(f"module 'streamdit' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(_API[name]), name)


def __dir__() -> list[str]:
    return sorted(__all__)
