"""rewrite: horizontal splits as graph rewrites (parts + combine), recorded as typed regions (`edgesplit.layout`).

`apply(graph, cluster, requests)` runs the spatial requests, then the channel requests, and returns a Graph that
computes the same outputs, carries the source model's hash, and lists every region with its parts and devices.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace

from edgesplit.cluster import Cluster
from edgesplit.graph import Graph
from edgesplit.rewrite import channels, spatial
from edgesplit.rewrite.base import CHANNEL_KINDS, KINDS, SPATIAL_KINDS, SplitError, SplitRequest
from edgesplit.rewrite.fused import region_stats

__all__ = ["apply", "SplitRequest", "SplitError", "KINDS"]


def apply(graph: Graph, cluster: Cluster, requests: Sequence[SplitRequest],
          dims: Mapping[str, int] | None = None) -> Graph:
    check(graph, cluster, requests)
    out = graph
    spatial_reqs = [r for r in requests if r.kind in SPATIAL_KINDS]
    channel_reqs = [r for r in requests if r.kind in CHANNEL_KINDS]
    if spatial_reqs:
        out = spatial.rewrite(out, cluster, spatial_reqs, dims)
    if channel_reqs:
        claimed = {n for r in out.regions for n in r.nodes} | {l for r in out.regions for l in r.layers}
        for r in channel_reqs:
            taken = [l for l in r.layers if l in claimed or not out.has_layer(l)]
            if taken:
                raise SplitError(f"layer(s) {taken} of the {r.kind} region at {r.layers[0]!r} are already in a spatial "
                                 f"region; expected each layer in at most one region")
        out = channels.rewrite(out, cluster, channel_reqs, dims)
    if out is graph:
        return graph
    new = tuple(r if r.stats is not None else replace(r, stats=region_stats(graph, out, r)) for r in out.regions)
    return replace(out, regions=new)


def check(graph: Graph, cluster: Cluster, requests: Sequence[SplitRequest]) -> None:
    """Every request names known layers, known devices and a known kind; each layer in at most one request."""
    problems, seen = [], {}
    for r in requests:
        if r.kind not in KINDS:
            problems.append(f"region at {r.layers[:1]}: unknown split kind {r.kind!r}; expected one of {list(KINDS)}")
        if not r.layers:
            problems.append(f"{r.kind} region: expected at least one layer, got none")
        for l in r.layers:
            if not graph.has_layer(l):
                problems.append(f"{r.kind} region: unknown layer {l!r}")
            elif l in seen:
                problems.append(f"layer {l!r} is in two regions ({seen[l]} and {r.kind}); expected at most one")
            seen[l] = r.kind
        for d in r.devices:
            if d not in cluster.names:
                problems.append(f"{r.kind} region at {r.layers[:1]}: device {d!r} is not in the cluster "
                                f"{list(cluster.names)}")
        if len(r.devices) < 2:
            problems.append(f"{r.kind} region at {r.layers[:1]}: expected at least 2 devices, got {list(r.devices)}")
        if r.weights is not None and len(r.weights) != len(r.devices):
            problems.append(f"{r.kind} region at {r.layers[:1]}: {len(r.weights)} weights for {len(r.devices)} devices")
    if problems:
        raise SplitError("invalid horizontal split:\n  " + "\n  ".join(dict.fromkeys(problems)))
