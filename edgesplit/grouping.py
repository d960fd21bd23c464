"""Which layers of a placed graph form one stage: the grouping step of `edgesplit.plan.cut`."""

from __future__ import annotations

import heapq
from collections import defaultdict
from collections.abc import Mapping

from edgesplit.errors import PlanError
from edgesplit.graph import Graph


def stage_groups(graph: Graph, placement: Mapping[str, str]) -> list[tuple[str, list[str]]]:
    """Group layers into stages: same device, connected, and the stage graph acyclic.

    rank(n) counts device changes along the longest path into n, and tensors sent to another device: a stage ends
    where it sends, so the receiver starts while the sender goes on (a region's parts run at once). Edges only go
    to equal-or-higher rank, and between devices to strictly higher rank, so grouping by (device, rank) is
    acyclic. Then same-device neighbours are merged while the stage graph stays acyclic and no send is delayed
    for a receiver that does not wait for the merged work anyway.
    """
    producer = graph.producers()
    rank = _ranks(graph, placement, producer)
    # connected components within each (device, rank)
    parent = {layer.name: layer.name for layer in graph.layers}

    def find(x: str) -> str:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for layer in graph.layers:
        for t in layer.inputs:
            p = producer.get(t)
            if p and placement[p] == placement[layer.name] and rank[p] == rank[layer.name]:
                parent[find(layer.name)] = find(p)
    group_of = {layer.name: find(layer.name) for layer in graph.layers}
    edges: dict[str, set[str]] = defaultdict(set)
    for layer in graph.layers:
        for t in layer.inputs:
            p = producer.get(t)
            if p and group_of[p] != group_of[layer.name]:
                edges[group_of[p]].add(group_of[layer.name])
    roots = list(dict.fromkeys(group_of[layer.name] for layer in graph.layers))
    device = {r: placement[r] for r in roots}
    merged = _merge_same_device(roots, edges, device)
    members: dict[str, list[str]] = defaultdict(list)
    for layer in graph.layers:
        members[merged[group_of[layer.name]]].append(layer.name)
    stage_edges: dict[str, set[str]] = defaultdict(set)
    for a, bs in edges.items():
        stage_edges[merged[a]].update(merged[b] for b in bs if merged[b] != merged[a])
    order = _topological(list(members), stage_edges, [graph.position(m[0]) for m in members.values()])
    return [(placement[members[g][0]], members[g]) for g in order]


def _merge_same_device(roots: list[str], edges: Mapping[str, set[str]], device: Mapping[str, str]) -> dict[str, str]:
    """Contract edges between same-device groups when the contraction keeps the group graph acyclic."""
    rep = {r: r for r in roots}
    succ: dict[str, set[str]] = {r: set(edges.get(r, ())) for r in roots}

    def find(x: str) -> str:
        while rep[x] != x:
            x = rep[x]
        return x

    def reaches(a: str, b: str, skip_direct: bool) -> bool:
        """Is there a path a -> ... -> b of length >= 2 (through another group)?"""
        stack = [s for s in succ[a] if not (skip_direct and s == b)]
        seen = set(stack)
        while stack:
            x = stack.pop()
            if x == b:
                return True
            for y in succ[x]:
                if y not in seen:
                    seen.add(y)
                    stack.append(y)
        return False

    def serialises(a: str, b: str) -> bool:
        """Would one stage of a and b hold up a's output to another device whose stage does not need b, or hold
        a back until b's input from another device arrives, which a does not need?"""
        late_send = any(device[c] != device[a] and not reaches(b, c, skip_direct=False) for c in succ[a])
        return late_send or any(device[p] != device[b] and b in succ[p] and not reaches(p, a, skip_direct=False)
                                for p in succ)

    changed = True
    while changed:
        changed = False
        for a in list(succ):
            for b in list(succ.get(a, ())):
                if a == b or device[a] != device[b] or reaches(a, b, skip_direct=True) or serialises(a, b):
                    continue
                # merge b into a
                rep[b] = a
                succ[a] = (succ[a] | succ.pop(b)) - {a, b}
                for x in succ:
                    if b in succ[x]:
                        succ[x] = (succ[x] - {b}) | ({a} if x != a else set())
                changed = True
                break
            if changed:
                break
    return {r: find(r) for r in roots}


def _topological(nodes: list[str], succ: Mapping[str, set[str]], key: list[int]) -> list[str]:
    priority = dict(zip(nodes, key))
    indeg = {n: 0 for n in nodes}
    for a in nodes:
        for b in succ.get(a, ()):
            indeg[b] += 1
    heap = [(priority[n], n) for n in nodes if indeg[n] == 0]
    heapq.heapify(heap)
    out = []
    while heap:
        _, n = heapq.heappop(heap)
        out.append(n)
        for b in succ.get(n, ()):
            indeg[b] -= 1
            if indeg[b] == 0:
                heapq.heappush(heap, (priority[b], b))
    if len(out) != len(nodes):
        raise PlanError("internal error: stage graph is cyclic after grouping")
    return out


def _ranks(graph: Graph, placement: Mapping[str, str], producer: Mapping[str, str]) -> dict[str, int]:
    """Each layer's rank: device changes and sends along the longest path into it (see stage_groups)."""
    sent = {t for layer in graph.layers for t in layer.inputs
            if t in producer and placement[producer[t]] != placement[layer.name]}
    rank: dict[str, int] = {}
    for layer in graph.layers:
        dev = placement[layer.name]
        rank[layer.name] = max(
            (rank[producer[t]] + (placement[producer[t]] != dev or t in sent) for t in layer.inputs if t in producer),
            default=0,
        )
    # a layer fed by the model inputs alone (a constant, a relay of a past_* KV input) joins its readers' stage:
    # as early as possible it would hold the reader's device back, and split a KV cache's Concat from its relay
    consumers = graph.consumers()
    for layer in graph.layers:
        readers = [r for t in layer.outputs for r in consumers.get(t, ())]
        if readers and not any(t in producer for t in layer.inputs):
            sends = any(t in sent for t in layer.outputs)
            rank[layer.name] = max(0, min(rank[r] - (placement[r] != placement[layer.name] or sends) for r in readers))
    return rank
