"""Where the parts of horizontal regions run: the devices of each request's parts, then a device for every node of
the rewritten graph (parts on their devices, scatters at the producer, combines where they cost least)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

from edgesplit.cluster import Cluster
from edgesplit.errors import MappingError
from edgesplit.graph import Graph
from edgesplit.layout import Region
from edgesplit.rewrite.base import SplitRequest


@dataclass(frozen=True)
class HorizontalSpec:
    """Horizontal regions asked for and where their parts go: the parts of `requests[i]` run on `devices[i]`, in
    part order; `base` places every layer outside the regions (None: each follows its producer)."""

    requests: tuple[SplitRequest, ...]
    devices: tuple[tuple[str, ...], ...]
    base: Mapping[str, str] | None = None

    def device_problems(self, cluster: Cluster) -> list[str]:
        """Every request has one known device per part, at least 2, none twice."""
        problems = []
        for r, devices in zip(self.requests, self.devices):
            where = f"{r.kind} region at {list(r.layers[:1])}"
            problems += [f"{where}: device {d!r} is not in the cluster {list(cluster.names)}"
                         for d in devices if d not in cluster.names]
            if len(devices) < 2:
                problems.append(f"{where}: expected at least 2 devices, got {list(devices)}")
            elif len(devices) != r.parts:
                problems.append(f"{where}: {len(devices)} devices for {r.parts} parts")
            if len(set(devices)) != len(devices):
                problems.append(f"{where}: a device is listed twice in {list(devices)}; expected one part per device")
        return problems

    def by_speed(self, cluster: Cluster) -> HorizontalSpec:
        """The requests without weights get their devices' speeds as shares."""
        requests = tuple(r if r.weights is not None else replace(r, weights=tuple(cluster.device(d).speed for d in ds))
                         for r, ds in zip(self.requests, self.devices))
        return replace(self, requests=requests)

    def region_devices(self, graph: Graph) -> dict[str, tuple[str, ...]]:
        """The devices of each region of `graph` (rewritten from these requests): a request's region is the one
        holding its first layer; requests merged into one region must ask for the same devices."""
        owner = {layer: r for r in graph.regions for layer in r.layers}
        found: dict[str, tuple[str, ...]] = {}
        first: dict[str, str] = {}
        for request, devices in zip(self.requests, self.devices):
            region = owner[request.layers[0]]
            if region.name in found and found[region.name] != tuple(devices):
                raise MappingError(
                    f"the regions at {first[region.name]!r} and {request.layers[0]!r} meet at one node with the same "
                    f"split, so they are one region ({region.name!r}); expected the same devices for both, got "
                    f"{list(found[region.name])} and {list(devices)}")
            found.setdefault(region.name, tuple(devices))
            first.setdefault(region.name, request.layers[0])
        return found


def place(graph: Graph, cluster: Cluster, devices: Mapping[str, Sequence[str]],
          base: Mapping[str, str] | None = None) -> tuple[Graph, dict[str, str]]:
    """The graph with its regions' parts on `devices` (region name -> one device per part), and every node's
    device (see `placement`)."""
    placed = assign(graph, devices)
    return placed, placement(placed, cluster, base)


def assign(graph: Graph, devices: Mapping[str, Sequence[str]]) -> Graph:
    """The graph with part i of region `name` on `devices[name][i]`; a region not named keeps its devices."""
    problems = [f"devices given for {name!r}, which is not a region of the graph" for name in devices
                if name not in {r.name for r in graph.regions}]
    regions = []
    for region in graph.regions:
        given = devices.get(region.name)
        if given is not None and len(given) != len(region.parts):
            problems.append(f"region {region.name!r}: {len(given)} devices for {len(region.parts)} parts")
        elif given is not None:
            region = region.with_parts(replace(p, device=d) for p, d in zip(region.parts, given))
        if any(p.device is None for p in region.parts):
            problems.append(f"region {region.name!r}: expected a device for each of its {len(region.parts)} parts")
        regions.append(region)
    if problems:
        raise MappingError("invalid part devices:\n  " + "\n  ".join(problems))
    return replace(graph, regions=tuple(regions))


def placement(graph: Graph, cluster: Cluster, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """Every node of `graph` gets a device; every region's parts must have theirs (`assign`).

    Part nodes go to their part's device, replica nodes to their replica's. A scatter (Slice of a region input)
    runs where its input is produced, so only the slice crosses the wire. A combine runs on the device the result
    goes to next (from `base`) when that device holds a part, else on the device with the largest share, unless
    `base` names a device for it. Any other
    node takes `base[node]`, else its first input's device, else the first device.
    """
    unplaced = [r.name for r in graph.regions if any(p.device is None for p in r.parts)]
    if unplaced:
        raise MappingError(f"regions {unplaced[:3]} have parts without a device; expected every part placed (assign)")
    base = dict(base or {})
    device: dict[str, str] = {}
    scatter: set[str] = set()
    combine_of: dict[str, Region] = {}
    for region in graph.regions:
        for part in region.parts:
            device.update(dict.fromkeys(part.nodes, part.device))
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
                device[n] = _part_device(graph, consumers.get(layer.outputs[0], [])) or first
        elif n in combine_of:  # one device for all of a region's combine nodes (a grid's row concats, a bias add)
            region = combine_of[n]
            last = graph.layer((region.combine_nodes or (region.combine_node,))[-1])
            device[n] = base.get(n) or _combine_device(region, last.outputs[0], base, consumers)
        elif n in base:
            device[n] = base[n]
        else:
            src = next((producers[t] for t in layer.inputs if t in producers and producers[t] in device), None)
            device[n] = device[src] if src else first
    return device


def _part_device(graph: Graph, users: list[str]) -> str | None:
    for region in graph.regions:
        for part in region.parts:
            if any(u in part.nodes for u in users):
                return part.device
    return None


def _combine_device(region: Region, tensor: str, base: Mapping[str, str], consumers) -> str:
    devices = [p.device for p in region.parts]
    for user in consumers.get(tensor, []):
        if base.get(user) in devices:
            return base[user]
    best = max(range(len(devices)), key=lambda i: (region.parts[i].share, -i))
    return devices[best]
