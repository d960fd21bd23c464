"""Placement of a rewritten graph: parts on their devices, scatters at the producer, combines where they cost least."""

from __future__ import annotations

from collections.abc import Mapping

from edgesplit.cluster import Cluster
from edgesplit.graph import Graph
from edgesplit.layout import Region


def placement(graph: Graph, cluster: Cluster, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """Every node of `graph` gets a device.

    Part nodes go to their part's device. A scatter (Slice of a region input) runs where its input is produced,
    so only the slice crosses the wire. A combine runs on the device the result goes to next (from `base`) when
    that device holds a part, else on the device with the largest share. Any other node takes `base[node]`, else
    its first input's device, else the first device.
    """
    base = dict(base or {})
    device: dict[str, str] = {}
    scatter: set[str] = set()
    combine_of: dict[str, Region] = {}
    for region in graph.regions:
        for part in region.parts:
            for n in part.nodes:
                device[n] = part.device
            for r in part.replicas:
                device.update(dict.fromkeys(r.nodes, r.device))
        scatter.update(region.scatter)
        for n in region.combine_nodes or (region.combine_node,):
            combine_of[n] = region
    producers, consumers = graph.producers(), graph.consumers()
    first = cluster.devices[0].name
    for layer in graph.layers:
        n = layer.name
        if n in device:
            continue
        if n in scatter:
            src = producers.get(layer.inputs[0])
            if src is not None and src in device:
                device[n] = device[src]
            else:  # a model input: the requester sends the slice straight to the part
                users = consumers.get(layer.outputs[0], [])
                device[n] = _part_device(graph, users)
            continue
        if n in combine_of:
            device[n] = _combine_device(graph, combine_of[n], layer.outputs[0], base, consumers)
            continue
        if n in base:
            device[n] = base[n]
            continue
        src = next((producers[t] for t in layer.inputs if t in producers and producers[t] in device), None)
        device[n] = device[src] if src else first
    for n in scatter:  # a scatter of a model input consumed by a part placed after it in order
        if n in device and device[n] is None:
            device[n] = first
    return device


def _part_device(graph: Graph, users: list[str]) -> str | None:
    for region in graph.regions:
        for part in region.parts:
            if any(u in part.nodes for u in users):
                return part.device
    return None


def _combine_device(graph: Graph, region: Region, tensor: str, base: Mapping[str, str], consumers) -> str:
    devices = [p.device for p in region.parts]
    for user in consumers.get(tensor, []):
        if base.get(user) in devices:
            return base[user]
    best = max(range(len(devices)), key=lambda i: (region.parts[i].share, -i))
    return devices[best]
