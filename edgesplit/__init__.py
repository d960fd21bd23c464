"""edgesplit: split one ONNX model across several edge devices, run it, measure it, survive failures.

The names below are imported on first use, so that `import edgesplit.cli` is quick to start and a Ctrl-C while
it starts is handled by the command line (see cli.py) instead of ending in a traceback.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "Cluster": "edgesplit.cluster", "Device": "edgesplit.cluster", "Link": "edgesplit.cluster",
    "PowerProfile": "edgesplit.cluster", "EdgesplitError": "edgesplit.errors", "Graph": "edgesplit.graph",
    "load": "edgesplit.graph", "partition": "edgesplit.planner", "verify": "edgesplit.runtime.local",
    "Plan": "edgesplit.plan", "LocalExecutor": "edgesplit.runtime.local",
}
__all__ = sorted(_EXPORTS)
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    try:
        return importlib.import_module(f"{__name__}.{name}")  # a submodule, e.g. edgesplit.place
    except ModuleNotFoundError as exc:
        if exc.name != f"{__name__}.{name}":
            raise
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
