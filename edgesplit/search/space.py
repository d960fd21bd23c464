"""The layouts the search walks: contiguous layer ranges, one per device, some of them joined into groups that split
their layers horizontally; and the plan each layout stands for.

A layout gives each device one range of layers in topological order (a range may be empty): `cuts` are the k-1
range boundaries and `order` says which device takes each range. `joined[s]` joins range s+1 to range s: a *group*
of joined ranges computes all their layers together, every layer worth a synchronisation split by channels over the
group's devices (shares by speed, edgesplit.place.regions), the rest on the group's first device (its lead).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from edgesplit.cluster import Cluster
from edgesplit.errors import EdgesplitError
from edgesplit.graph import Graph
from edgesplit.plan import Plan


@dataclass(frozen=True)
class Group:
    first: int  # layers [first, end)
    end: int
    devices: tuple[int, ...]  # the lead first

    @property
    def lead(self) -> int:
        return self.devices[0]


@dataclass(frozen=True)
class Vertical:
    """Contiguous layer ranges: range s is layers [bounds[s], bounds[s+1]) on device order[s], with a standby copy
    on device standby[s] (-1: none; no entries: no standbys at all) that runs only while order[s] is down;
    `joined[s]` (no entries: none) makes ranges s and s+1 one horizontally split group."""

    cuts: tuple[int, ...]
    order: tuple[int, ...]
    standby: tuple[int, ...] = ()
    joined: tuple[bool, ...] = ()

    def bounds(self, n: int) -> tuple[int, ...]:
        return (0, *self.cuts, n)

    @property
    def horizontal(self) -> bool:
        return any(self.joined)

    def groups(self, n: int) -> list[Group]:
        """The groups with at least one layer, in order (without joins: one per non-empty range)."""
        b, out, start = self.bounds(n), [], 0
        for s in range(len(self.order)):
            if s + 1 < len(self.order) and self.joined and self.joined[s]:
                continue
            if b[s + 1] > b[start]:
                out.append(Group(b[start], b[s + 1], self.order[start: s + 1]))
            start = s + 1
        return out

    def standby_requests(self, n: int, cluster: Cluster) -> list[str]:
        """`partition --standby` requests: DEVICE=DEVICE for every range that has a standby (each device holds one)."""
        b = self.bounds(n)
        return [f"{cluster.devices[d].name}={cluster.devices[e].name}" for s, (d, e) in
                enumerate(zip(self.order, self.standby)) if e >= 0 and b[s + 1] > b[s]]

    def placement(self, graph: Graph, cluster: Cluster) -> dict[str, str]:
        """Every layer on its group's lead (a vertical layout: on its range's device)."""
        return {layer.name: cluster.devices[g.lead].name
                for g in self.groups(len(graph.layers)) for layer in graph.layers[g.first: g.end]}

    def to_dict(self, graph: Graph, cluster: Cluster) -> dict:
        standby = self.standby or (-1,) * len(self.order)
        stages = []
        for g in self.groups(len(graph.layers)):
            s = self.order.index(g.lead)
            stages.append({"device": cluster.devices[g.lead].name, "first": graph.layers[g.first].name,
                           "last": graph.layers[g.end - 1].name, "layers": g.end - g.first,
                           "standby": cluster.devices[standby[s]].name if standby[s] >= 0 else None,
                           **({"split_over": [cluster.devices[d].name for d in g.devices]} if len(g.devices) > 1
                              else {})})
        return {"stages": stages}


class Splits:
    """The channel splits a group may use, chosen once for the whole model (edgesplit.place.regions, with as many
    parts as devices so that each fits any group) and rewritten once to see what each covers: the layers its parts
    compute (the cheap ones after a split layer follow it into the parts) and the tensor its parts are combined
    into. A group splits those that lie wholly inside it."""

    def __init__(self, graph: Graph, k: int) -> None:
        from dataclasses import replace

        from edgesplit.place.regions import channel_requests
        from edgesplit.rewrite import cnn

        try:
            requests = channel_requests(graph, (1.0,) * k, {layer.name for layer in graph.layers})
            rewritten = cnn.apply(graph, [replace(r, parts=2, weights=(1.0, 1.0)) for r in requests])
        except EdgesplitError:
            requests, rewritten = [], graph
        regions = rewritten.regions
        owner = {layer: r for r in regions for layer in r.layers}
        position = {layer.name: i for i, layer in enumerate(graph.layers)}
        found = [(r, owner[r.layers[0]]) for r in requests if r.layers[0] in owner]
        self.requests = tuple(r for r, _ in found)
        self.layers = [np.array(sorted(position[n] for n in region.layers), dtype=np.int64) for _, region in found]
        self.first = np.array([p.min() for p in self.layers], dtype=np.int64)
        self.last = np.array([p.max() for p in self.layers], dtype=np.int64)
        self.partial_sums = np.array([region.combine.value == "sum" for _, region in found], dtype=bool)
        # what a synchronisation moves: all parts (concatenated) or one whole partial sum; a region's combine
        # may join other tensors too (an Inception block's Concat joins its branches)
        part_bytes = [[rewritten.tensors[p.output].nbytes for p in region.parts] for _, region in found]
        self.sync_bytes = np.array([max(b) if s else sum(b) for b, s in zip(part_bytes, self.partial_sums)],
                                   dtype=np.int64)
        self._readers(graph)

    def _readers(self, graph: Graph) -> None:
        """Who reads each split's result, as the exchange rewrite (edgesplit.rewrite.exchange) decides: its combine
        and the cheap ops after it (its *closure*) are copied onto every device whose layers read them, so the
        parts go to the devices of the first heavy layers after it (its *frontier*: another split's parts run on
        every member of the group, an unsplit layer on the lead); a tensor from outside the split that a copied
        op reads (a residual shortcut) goes to those devices too. Flat arrays, one row per (split, frontier
        layer) and per (split, side tensor)."""
        from edgesplit.rewrite.exchange import HEAVY

        n = len(graph.layers)
        position = {layer.name: i for i, layer in enumerate(graph.layers)}
        consumers, producer = graph.consumers(), graph.producers()
        self.split_of = np.full(n, -1, dtype=np.int64)
        for i, members in enumerate(self.layers):
            self.split_of[members] = i
        closures: list[tuple[int, int]] = []
        frontier: list[tuple[int, int]] = []
        sides: dict[tuple[int, str, int, int], None] = {}  # split, tensor, its producer, a frontier layer
        for i, members in enumerate(self.layers):
            own = set(members.tolist())
            closure: set[int] = set()
            stack = [t for p in own for t in graph.layers[p].outputs]
            while stack:
                t = stack.pop()
                if t in graph.outputs:
                    frontier.append((i, n))
                for q in (position[c] for c in consumers.get(t, ())):
                    if q in own or q in closure:
                        continue
                    if graph.layers[q].op_type in HEAVY or self.split_of[q] >= 0:
                        frontier.append((i, q))
                    else:
                        closure.add(q)
                        stack.extend(graph.layers[q].outputs)
            for q in closure:
                closures.append((i, q))
                reached = _reached(graph, q, closure, consumers, position, n)
                for t in graph.layers[q].inputs:
                    p = position.get(producer.get(t, ""), -1)
                    if p >= 0 and p not in own and p not in closure:
                        sides.update(((i, t, p, f), None) for f in reached)
        pairs = np.array(sorted(closures), dtype=np.int64).reshape(-1, 2)
        self.closure_split, self.closure_layer = pairs[:, 0], pairs[:, 1]
        pairs = np.array(sorted(set(frontier)), dtype=np.int64).reshape(-1, 2)
        self.frontier_split, self.frontier_layer = pairs[:, 0], pairs[:, 1]
        rows = list(sides)
        self.side_names = tuple(sorted({t for _, t, _, _ in rows}))
        index = {t: j for j, t in enumerate(self.side_names)}
        self.side_split = np.array([i for i, _, _, _ in rows], dtype=np.int64)
        self.side_tensor = np.array([index[t] for _, t, _, _ in rows], dtype=np.int64)  # into side_names
        self.side_layer = np.array([p for _, _, p, _ in rows], dtype=np.int64)
        self.side_reader = np.array([f for _, _, _, f in rows], dtype=np.int64)

    def inside(self, first: int, end: int) -> np.ndarray:
        return (self.first >= first) & (self.last < end)

    def mapping(self, v: Vertical, graph: Graph, cluster: Cluster) -> dict[str, Any]:
        """The layout as a hybrid mapping (`regions:` and `devices:`, edgesplit.place.mapping)."""
        names = cluster.names
        regions: list[dict[str, Any]] = []
        devices: dict[str, list[str]] = {}
        for g in v.groups(len(graph.layers)):
            split = np.flatnonzero(self.inside(g.first, g.end)) if len(g.devices) > 1 else []
            covered = {n for i in split for n in self.requests[i].layers}
            devices.setdefault(names[g.lead], []).extend(
                layer.name for layer in graph.layers[g.first: g.end] if layer.name not in covered)
            for i in split:
                r = self.requests[i]
                regions.append({"layers": list(r.layers), "split": r.kind.value,
                                "devices": [names[d] for d in g.devices],
                                "weights": [cluster.devices[d].speed for d in g.devices]})
        return {"regions": regions, "devices": devices}


def _reached(graph: Graph, start: int, closure: set[int], consumers: Mapping[str, list[str]],
             position: Mapping[str, int], n: int) -> set[int]:
    """The layers outside `closure` that read `start`'s outputs through closure layers (n: a graph output)."""
    found: set[int] = set()
    seen, stack = {start}, [start]
    while stack:
        for t in graph.layers[stack.pop()].outputs:
            if t in graph.outputs:
                found.add(n)
            for q in (position[c] for c in consumers.get(t, ())):
                if q in closure and q not in seen:
                    seen.add(q)
                    stack.append(q)
                elif q not in closure:
                    found.add(q)
    return found


def to_plan(graph: Graph, cluster: Cluster, v: Vertical, splits: Splits | None,
            dims: Mapping[str, int] | None = None) -> Plan:
    """The plan a layout stands for (its standbys included); a group without a split layer stays on its lead."""
    from edgesplit.planner import partition, plan, with_standbys

    mapping = splits.mapping(v, graph, cluster) if splits is not None and v.horizontal else None
    if mapping and mapping["regions"]:
        made = partition(graph, cluster, mapping, dims=dims)
    else:
        made = plan(graph, cluster, v.placement(graph, cluster))
    return with_standbys(made, graph, v.standby_requests(len(graph.layers), cluster))


def equal_layers(n: int, k: int) -> Vertical:
    """AutoDiCE-style: the same number of layers per device, in cluster order."""
    return Vertical(tuple(round(n * s / k) for s in range(1, k)), tuple(range(k)))


def from_placement(graph: Graph, cluster: Cluster, placement: Mapping[str, str]) -> Vertical:
    """The vertical layout of a placement of contiguous ranges (as `place.balance` gives), devices in cluster order."""
    names = cluster.names
    devices = [names.index(placement[layer.name]) for layer in graph.layers]
    if any(b < a for a, b in zip(devices, devices[1:])):
        raise ValueError("expected contiguous ranges in cluster order")
    cuts = tuple(int(np.searchsorted(devices, d, side="left")) for d in range(1, len(names)))
    return Vertical(cuts, tuple(range(len(names))))

