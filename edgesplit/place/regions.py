"""The automatic choice of horizontal regions for `--strategy horizontal|hybrid --split channels|spatial|auto`.

channels: every Conv/Gemm/MatMul worth splitting becomes a fused channel pair when its split can flow into the
next weighted layer (one Sum instead of two combines), else an output-channel split. spatial: greedy fused tile
runs (one Concat per run) with bounded halo cost. auto: spatial while activations outweigh weights (early
layers: the cheapest to exchange), channels after (late layers: splits the weights, which dominate memory).
hybrid: a vertical cut over groups of devices (balanced by their summed speed), each group splitting its own
layers horizontally.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

from edgesplit.cluster import Cluster, Device
from edgesplit.errors import EdgesplitError
from edgesplit.graph import Graph
from edgesplit.layout import SplitKind, Strategy
from edgesplit.place.parts import HorizontalSpec
from edgesplit.place.vertical import balance
from edgesplit.rewrite.base import Editor, SplitRequest
from edgesplit.rewrite.cnn.fused import channel_pair, lip_units, lop_units, spatial_runs

SPLITS = ("channels", "spatial", "auto")
MIN_SHARE = 0.01  # layers below this share of the model's MACs are not worth a synchronisation


def choose(graph: Graph, cluster: Cluster, strategy: Strategy | str, split: str) -> HorizontalSpec:
    """Requests, the devices of their parts (a horizontal plan: all devices; hybrid: one group's), and a base
    placement for everything outside the regions (horizontal: None, follow the producers)."""
    if strategy not in (Strategy.HORIZONTAL, Strategy.HYBRID):
        raise EdgesplitError(f"expected --strategy horizontal or hybrid for horizontal regions, got {str(strategy)!r}")
    if split not in SPLITS:
        raise EdgesplitError(f"expected --split one of {list(SPLITS)}, got {split!r}")
    if len(cluster.devices) < 2:
        raise EdgesplitError(f"a {strategy} plan needs at least 2 devices, the cluster has {len(cluster.devices)}")
    everything = {l.name for l in graph.layers}
    if strategy == Strategy.HORIZONTAL:
        requests = select(graph, _speeds(cluster.devices), everything, split)
        return HorizontalSpec(tuple(requests), (cluster.names,) * len(requests))
    groups = device_groups(cluster)
    group_cluster = Cluster(tuple(
        Device(f"group{i}", sum(d.cores for d in g), sum(d.memory for d in g), sum(d.speed for d in g))
        for i, g in enumerate(groups)
    ), cluster.default_link)
    by_group = balance(graph, group_cluster)
    requests: list[SplitRequest] = []
    devices: list[tuple[str, ...]] = []
    base: dict[str, str] = {}
    for i, g in enumerate(groups):
        mine = {l for l, grp in by_group.items() if grp == f"group{i}"}
        base.update({l: g[0].name for l in mine})
        if len(g) >= 2 and mine:
            chosen = select(graph, _speeds(g), mine, split)
            requests += chosen
            devices += [tuple(d.name for d in g)] * len(chosen)
    return HorizontalSpec(tuple(requests), tuple(devices), base)


def _speeds(devices: Sequence[Device]) -> tuple[float, ...]:
    return tuple(d.speed for d in devices)


def device_groups(cluster: Cluster) -> list[list[Device]]:
    """Pairs of devices (a last single one stays alone): each pair is one vertical stage split horizontally."""
    devices = list(cluster.devices)
    if len(devices) <= 3:
        return [devices]
    return [devices[i: i + 2] for i in range(0, len(devices), 2)]


def select(graph: Graph, weights: Sequence[float], allowed: Collection[str], split: str) -> list[SplitRequest]:
    """Requests over the `allowed` layers, one part per weight (the shares of the devices they will run on)."""
    if split == "channels":
        return channel_requests(graph, weights, allowed)
    if split == "spatial":
        return spatial_requests(graph, weights, allowed)
    cut = boundary(graph)
    early = {n for n in allowed if graph.position(n) < cut}
    return spatial_requests(graph, weights, early) + channel_requests(graph, weights, set(allowed) - early)


def boundary(graph: Graph) -> int:
    """Position of the first weighted layer whose weights outweigh its input activation."""
    for layer in graph.layers:
        if layer.op_type in ("Conv", "Gemm", "MatMul") and layer.weights:
            if layer.param_bytes > graph.tensors[layer.inputs[0]].nbytes:
                return graph.position(layer.name)
    return len(graph.layers)


def channel_requests(graph: Graph, weights: Sequence[float], allowed: Collection[str]) -> list[SplitRequest]:
    k, floor, shares = len(weights), MIN_SHARE * graph.total_macs, tuple(weights)
    used: set[str] = set()
    out = []
    for layer in graph.layers:
        name = layer.name
        if name in used or name not in allowed or layer.macs < floor or lop_units(graph, name) < k:
            continue
        node = graph.model.graph.node[graph.position(name)]
        if layer.op_type == "Conv" and any(a.name == "group" and a.i > 1 for a in node.attribute):
            continue  # grouped convs follow the split of the layer before them
        pair = channel_pair(graph, name, allowed)
        if pair and lip_units(graph, pair[-1]) >= k and not used.intersection(pair):
            out.append(SplitRequest(SplitKind.FUSED_CHANNELS, tuple(pair), k, shares))
            used.update(pair)
        else:
            out.append(SplitRequest(SplitKind.LOP, (name,), k, shares))
            used.add(name)
    return out


def spatial_requests(graph: Graph, weights: Sequence[float], allowed: Collection[str]) -> list[SplitRequest]:
    ed = Editor(graph)
    floor = MIN_SHARE * graph.total_macs
    out = []
    for run in spatial_runs(graph, weights, allowed, ed=ed):
        if sum(graph.layer(n).macs for n in run) < floor:
            continue
        kind = SplitKind.FUSED_SPATIAL if len(run) > 1 else SplitKind.HEIGHT
        out.append(SplitRequest(kind, tuple(run), len(weights), tuple(weights)))
    return out
