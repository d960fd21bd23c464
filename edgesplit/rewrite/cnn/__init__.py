"""The CNN family of horizontal rewrites: channel splits (lop, lip, fused pairs) and spatial tiles (height, width,
grid, fused runs), as graph surgery only.

`apply(graph, requests)` runs the spatial requests, then the channel requests, and returns a Graph that computes
the same outputs, carries the source model's hash, and lists every region (`edgesplit.layout.Region`) with its parts
in the request's part order and no devices (`edgesplit.place.parts` places them). A region's `layers[0]` is its
request's first layer; requests whose splits meet at one node (an Add of two identically split tensors) become one
region that keeps the first one's name.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace

from edgesplit.graph import Graph
from edgesplit.layout import CHANNEL_KINDS, CNN_KINDS, SPATIAL_KINDS, SplitKind
from edgesplit.rewrite.base import SplitError, SplitRequest
from edgesplit.rewrite.cnn import channels, spatial
from edgesplit.rewrite.cnn.fused import region_stats

__all__ = ["apply", "check", "problems", "SplitError", "SplitRequest"]


def apply(graph: Graph, requests: Sequence[SplitRequest], dims: Mapping[str, int] | None = None) -> Graph:
    check(graph, requests)
    out = graph
    spatial_reqs = [r for r in requests if r.kind in SPATIAL_KINDS]
    channel_reqs = [r for r in requests if r.kind in CHANNEL_KINDS]
    if spatial_reqs:
        out = spatial.rewrite(out, spatial_reqs, dims)
    if channel_reqs:
        claimed = {n for r in out.regions for n in r.nodes} | {l for r in out.regions for l in r.layers}
        for r in channel_reqs:
            taken = [l for l in r.layers if l in claimed or not out.has_layer(l)]
            if taken:
                raise SplitError(f"layer(s) {taken} of the {r.kind} region at {r.layers[0]!r} are already in a spatial "
                                 f"region; expected each layer in at most one region")
        out = channels.rewrite(out, channel_reqs, dims)
    if out is graph:
        return graph
    new = tuple(r if r.stats is not None else replace(r, stats=region_stats(graph, out, r)) for r in out.regions)
    return replace(out, regions=new)


def check(graph: Graph, requests: Sequence[SplitRequest]) -> None:
    found = problems(graph, requests)
    if found:
        raise SplitError("invalid horizontal split:\n  " + "\n  ".join(found))


def problems(graph: Graph, requests: Sequence[SplitRequest]) -> list[str]:
    """Every problem at once: a CNN kind, known layers, each layer in at most one request, at least 2 parts, one
    weight per part, a fused-spatial axis of height, width or grid."""
    found, seen = [], {}
    for r in requests:
        where = f"{r.kind} region at {list(r.layers[:1])}"
        if r.kind not in CNN_KINDS:
            found.append(f"{where}: {r.kind} is not a CNN split; expected one of {[str(k) for k in CNN_KINDS]}")
        if not r.layers:
            found.append(f"{r.kind} region: expected at least one layer, got none")
        for l in r.layers:
            if not graph.has_layer(l):
                found.append(f"{r.kind} region: unknown layer {l!r}")
            elif l in seen:
                found.append(f"layer {l!r} is in two regions ({seen[l]} and {r.kind}); expected at most one")
            seen[l] = r.kind
        if r.parts < 2:
            found.append(f"{where}: expected at least 2 parts, got {r.parts}")
        if r.weights is not None and len(r.weights) != r.parts:
            found.append(f"{where}: {len(r.weights)} weights for {r.parts} parts")
        if r.axis is not None and r.axis not in (SplitKind.HEIGHT, SplitKind.WIDTH, SplitKind.GRID):
            found.append(f"{where}: expected axis height, width or grid, got {r.axis}")
    return list(dict.fromkeys(found))
