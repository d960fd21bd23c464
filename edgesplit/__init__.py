"""edgesplit: split one ONNX model across several edge devices, run it, measure it, survive failures."""

from edgesplit.cluster import Cluster, Device, Link, PowerProfile
from edgesplit.errors import EdgesplitError
from edgesplit.graph import Graph, load
from edgesplit.planner import partition
from edgesplit.runtime.local import verify
from edgesplit.plan import Plan
from edgesplit.runtime.local import LocalExecutor

__all__ = [
    "Cluster", "Device", "EdgesplitError", "Graph", "Link", "LocalExecutor", "Plan", "PowerProfile",
    "load", "partition", "verify",
]
__version__ = "0.1.0"
