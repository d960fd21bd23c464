"""The planner: (graph, cluster, layout) -> Plan, and the layout transformations around it.

A layout is the rewritten graph's regions plus a device for every node. `plan` checks it (every problem at once),
checks every device's memory, and cuts it into stages; `with_replicas` adds replicas of parts' units on other
devices (graph surgery by edgesplit.rewrite.replicas, placement here).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from edgesplit.cluster import Cluster
from edgesplit.errors import PlacementError
from edgesplit.graph import Graph
from edgesplit.layout import Layout
from edgesplit.place import check_memory
from edgesplit.plan import Plan, cut
from edgesplit.rewrite.replicas import ReplicaRequest, add_replicas


def with_replicas(graph: Graph, placement: Mapping[str, str],
                  requests: Sequence[ReplicaRequest]) -> tuple[Graph, dict[str, str]]:
    """The graph with the requested replicas, and the placement with every replica node on its device."""
    out = add_replicas(graph, requests)
    where = dict(placement)
    for region in out.regions:
        for rep in region.replicas:
            where.update(dict.fromkeys(rep.nodes, rep.device))
    return out, where


def plan(graph: Graph, cluster: Cluster, placement: Mapping[str, str]) -> Plan:
    """Check the layout, every device's memory budget, and cut it into a Plan."""
    layout = Layout(graph.regions, placement)
    problems = layout.validate(cluster.names, (layer.name for layer in graph.layers))
    unplaced = [layer.name for layer in graph.layers if layer.name not in placement]
    if unplaced:
        problems.append(f"{len(unplaced)} node(s) have no device: {unplaced[:5]}")
    if problems:
        raise PlacementError("invalid layout:\n  " + "\n  ".join(problems))
    check_memory(graph, cluster, placement)
    return cut(graph, cluster, placement)
