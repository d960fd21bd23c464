"""Fused regions: which layers can share one synchronisation, and what the fusion costs.

Channel pairs: an output-channel split whose parts flow through followers (BatchNorm, activations, pooling,
depthwise Conv, Flatten) straight into the input-channel split of the next Conv/Gemm/MatMul, one Sum at the end.
Spatial runs: L consecutive spatially splittable layers tiled once, each tile carrying its growing halo; the
redundant MACs the halos cost are reported per region (`redundant_macs`).
"""

from __future__ import annotations

import math
from collections.abc import Collection, Sequence

from edgesplit.graph import Graph
from edgesplit.layout import Region, RegionStats, SplitKind
from edgesplit.rewrite.base import Editor, SplitError, SplitRequest, attr
from edgesplit.rewrite.cnn.channel_rules import BINARY, POOLS, UNARY, fan_closure
from edgesplit.rewrite.cnn.spatial import GLOBAL, WINDOWED, SpatialPlanner, supported

CHANNEL_FOLLOWERS = UNARY | POOLS | {"BatchNormalization", "InstanceNormalization", "Flatten", "Reshape"}


def lop_units(graph: Graph, name: str) -> int:
    """How many output slices a layer allows (channels, groups for grouped Conv, neurons); 0 if it cannot be split."""
    layer = graph.layer(name)
    node = graph.model.graph.node[graph.position(name)]
    if layer.op_type not in ("Conv", "Gemm", "MatMul") or len(node.input) < 2 or node.input[1] not in layer.weights:
        return 0
    w = graph.tensors[node.input[1]]
    if layer.op_type == "Conv":
        return attr(node, "group", 1) if attr(node, "group", 1) > 1 else int(w.shape[0])
    if layer.op_type == "Gemm":
        return int(w.shape[0] if attr(node, "transB", 0) else w.shape[1])
    return int(w.shape[-1]) if len(w.shape) == 2 else 0


def lip_units(graph: Graph, name: str) -> int:
    layer = graph.layer(name)
    node = graph.model.graph.node[graph.position(name)]
    if layer.op_type not in ("Conv", "Gemm", "MatMul") or len(node.input) < 2 or node.input[1] not in layer.weights:
        return 0
    w = graph.tensors[node.input[1]].shape
    if layer.op_type == "Conv":
        return int(w[1]) if attr(node, "group", 1) == 1 else 0
    if layer.op_type == "Gemm":
        return 0 if attr(node, "transA", 0) else int(w[1] if attr(node, "transB", 0) else w[0])
    return int(w[0]) if len(w) == 2 else 0


def channel_pair(graph: Graph, head: str, allowed: Collection[str] | None = None) -> list[str] | None:
    """The chain head .. partner for a fused-channels region, or None if the head's split cannot reach a lip layer."""
    consumers, outputs = graph.consumers(), set(graph.outputs)
    chain = [head]
    while True:
        out = graph.layer(chain[-1]).outputs[0]
        users = consumers.get(out, [])
        if len(users) > 1 and out not in outputs and (fan := fan_closure(graph, out, consumers, outputs)):
            if allowed is not None and not set(fan) <= set(allowed):
                return None
            chain.extend(fan)  # e.g. GELU or x * sigmoid(x): several consumers that reconverge
            continue
        if out in outputs or len(users) != 1 or (allowed is not None and users[0] not in allowed):
            return None
        nxt = graph.layer(users[0])
        sides = [t for t in nxt.inputs if t != out]
        if sides and not (nxt.op_type in BINARY and all(_per_channel(graph, t, nxt.outputs[0]) for t in sides)):
            return None
        node = graph.model.graph.node[graph.position(nxt.name)]
        if nxt.op_type in ("Conv", "Gemm", "MatMul") and lip_units(graph, nxt.name):
            return chain + [nxt.name]
        grouped = nxt.op_type == "Conv" and attr(node, "group", 1) > 1
        if nxt.op_type not in CHANNEL_FOLLOWERS | BINARY and not grouped:
            return None
        chain.append(nxt.name)


def _per_channel(graph: Graph, tensor: str, like: str) -> bool:
    """One value per sample and channel (an SE block's scale): cheap to slice for every part."""
    shape, out = graph.tensors[tensor].shape, graph.tensors[like].shape
    return len(shape) == len(out) >= 2 and shape[1] in (1, out[1]) and all(d == 1 for d in shape[2:])


def spatial_runs(graph: Graph, weights: Sequence[float], allowed: Collection[str],
                 max_windows: int = 4, max_overhead: float = 0.35, ed: Editor | None = None) -> list[list[str]]:
    """Greedy fused-spatial regions tiled by `weights` (one per part): contiguous topological runs with one exit,
    at most `max_windows` windowed layers and redundant MACs within `max_overhead` of the region's own."""
    ed = ed or Editor(graph)
    layers = [l.name for l in graph.layers]
    ok = [n in allowed and supported(graph.layer(n).op_type) for n in layers]
    regions, i = [], 0
    while i < len(layers):
        if not ok[i] or graph.layer(layers[i]).op_type not in WINDOWED:
            i += 1
            continue
        best, windows = None, 0
        j = i
        while j < len(layers) and ok[j]:
            op = graph.layer(layers[j]).op_type
            windows += op in WINDOWED
            if windows > max_windows:
                break
            cand = layers[i: j + 1]
            stats = _try(graph, ed, cand, weights)
            if stats is not None and stats <= max_overhead:
                best = j
            if op in GLOBAL:
                break
            j += 1
        if best is None:
            i += 1
            continue
        regions.append(layers[i: best + 1])
        i = best + 1
    return regions


def _try(graph: Graph, ed: Editor, layers: list[str], weights: Sequence[float]) -> float | None:
    request = SplitRequest(SplitKind.FUSED_SPATIAL, tuple(layers), len(weights), tuple(weights))
    try:
        planner = SpatialPlanner(graph, ed, request)
    except SplitError:
        return None
    return planned_overhead(graph, planner)


def planned_overhead(graph: Graph, planner: SpatialPlanner) -> float:
    """Redundant MACs / the region's MACs, from the planned tile boxes (before rewriting)."""
    own = sum(graph.layer(n).macs for n in planner.layers)
    if not own:
        return 0.0
    done = 0.0
    for box in planner.tiles:
        need, _ = planner.needs(box)
        for n in planner.layers:
            layer = graph.layer(n)
            out = need.get(layer.outputs[0])
            if layer.macs and out:
                shape = graph.tensors[layer.outputs[0]].shape
                done += layer.macs * math.prod((b - a) / shape[ax] for ax, (a, b) in out.items())
    return done / own - 1.0


def region_stats(original: Graph, rewritten: Graph, region: Region) -> RegionStats:
    """MACs of the parts against the covered layers' own (redundant MACs = halo cost), and halo bytes."""
    own = sum(original.layer(n).macs for n in region.layers if original.has_layer(n))
    done = sum(rewritten.layer(n).macs for n in region.nodes if rewritten.has_layer(n))
    scatter = [rewritten.layer(n) for n in region.scatter if rewritten.has_layer(n)]
    scattered = sum(rewritten.tensors[layer.outputs[0]].nbytes for layer in scatter)
    whole = sum(rewritten.tensors[t].nbytes for t in {layer.inputs[0] for layer in scatter})
    halo = max(0, scattered - whole) if region.kind.spatial else 0
    nodes = [rewritten.layer(n) for n in region.nodes if rewritten.has_layer(n)]
    inside = {t for n in nodes for t in n.outputs}
    reads = {t for n in nodes for t in n.inputs}
    return RegionStats(int(own), int(done), int(halo), tuple(sorted(reads - inside)))
