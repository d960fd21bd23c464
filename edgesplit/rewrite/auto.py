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
from edgesplit.place import balance
from edgesplit.rewrite.base import Editor, SplitRequest
from edgesplit.rewrite.fused import channel_pair, lip_units, lop_units, spatial_runs

STRATEGIES = ("vertical", "horizontal", "hybrid")
SPLITS = ("channels", "spatial", "auto")
MIN_SHARE = 0.01  # layers below this share of the model's MACs are not worth a synchronisation


def choose(graph: Graph, cluster: Cluster, strategy: str, split: str,
           ) -> tuple[list[SplitRequest], dict[str, str] | None]:
    """Requests plus a base placement for everything outside the regions (None: follow the producers)."""
    if strategy not in STRATEGIES[1:]:
        raise EdgesplitError(f"expected --strategy one of {list(STRATEGIES)}, got {strategy!r}")
    if split not in SPLITS:
        raise EdgesplitError(f"expected --split one of {list(SPLITS)}, got {split!r}")
    if len(cluster.devices) < 2:
        raise EdgesplitError(f"a {strategy} plan needs at least 2 devices, the cluster has {len(cluster.devices)}")
    everything = {l.name for l in graph.layers}
    if strategy == "horizontal":
        return select(graph, cluster, cluster.names, everything, split), None
    groups = device_groups(cluster)
    group_cluster = Cluster(tuple(
        Device(f"group{i}", sum(d.cores for d in g), sum(d.memory for d in g), sum(d.speed for d in g))
        for i, g in enumerate(groups)
    ), cluster.default_link)
    by_group = balance(graph, group_cluster)
    requests: list[SplitRequest] = []
    base: dict[str, str] = {}
    for i, g in enumerate(groups):
        mine = {l for l, grp in by_group.items() if grp == f"group{i}"}
        base.update({l: g[0].name for l in mine})
        if len(g) >= 2 and mine:
            requests.extend(select(graph, cluster, tuple(d.name for d in g), mine, split))
    return requests, base


def device_groups(cluster: Cluster) -> list[list[Device]]:
    """Pairs of devices (a last single one stays alone): each pair is one vertical stage split horizontally."""
    devices = list(cluster.devices)
    if len(devices) <= 3:
        return [devices]
    return [devices[i: i + 2] for i in range(0, len(devices), 2)]


def select(graph: Graph, cluster: Cluster, devices: Sequence[str], allowed: Collection[str],
           split: str) -> list[SplitRequest]:
    if split == "channels":
        return channel_requests(graph, devices, allowed)
    if split == "spatial":
        return spatial_requests(graph, cluster, devices, allowed)
    cut = boundary(graph)
    early = {n for n in allowed if graph.position(n) < cut}
    return spatial_requests(graph, cluster, devices, early) + channel_requests(graph, devices, set(allowed) - early)


def boundary(graph: Graph) -> int:
    """Position of the first weighted layer whose weights outweigh its input activation."""
    for layer in graph.layers:
        if layer.op_type in ("Conv", "Gemm", "MatMul") and layer.weights:
            if layer.param_bytes > graph.tensors[layer.inputs[0]].nbytes:
                return graph.position(layer.name)
    return len(graph.layers)


def channel_requests(graph: Graph, devices: Sequence[str], allowed: Collection[str]) -> list[SplitRequest]:
    k, floor = len(devices), MIN_SHARE * graph.total_macs
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
            out.append(SplitRequest("fused-channels", tuple(pair), tuple(devices)))
            used.update(pair)
        else:
            out.append(SplitRequest("lop", (name,), tuple(devices)))
            used.add(name)
    return out


def spatial_requests(graph: Graph, cluster: Cluster, devices: Sequence[str],
                     allowed: Collection[str]) -> list[SplitRequest]:
    ed = Editor(graph)
    floor = MIN_SHARE * graph.total_macs
    out = []
    for run in spatial_runs(graph, cluster, devices, allowed, ed=ed):
        if sum(graph.layer(n).macs for n in run) < floor:
            continue
        out.append(SplitRequest("fused-spatial" if len(run) > 1 else "height", tuple(run), tuple(devices)))
    return out
