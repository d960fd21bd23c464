"""Placement of a transformer split: parts on their devices, everything else on the root of its block's group."""

from __future__ import annotations

from collections.abc import Sequence

from edgesplit.graph import Graph
from edgesplit.rewrite.tp_regions import Region


def placement(graph: Graph, base: Graph, regions: Sequence[Region], block_of, roots_by_block,
               first_root) -> dict[str, str]:
    """Part nodes on their device; everything else on the root of the block it follows (the first block's root
    for what comes before any block)."""
    device: dict[str, str] = {}
    combine_block: dict[str, int] = {}
    for r in graph.regions:
        for part in r.parts:
            for n in part.nodes:
                device[n] = part.device
            for rep in part.replicas:
                device.update(dict.fromkeys(rep.nodes, rep.device))
        if r.block is not None:
            combine_block[r.combine_node] = r.block
    region_block = {n: b for reg, b in zip(regions, block_of) for n in reg.nodes}
    pos = {n.name: i for i, n in enumerate(base.model.graph.node)}
    exits = sorted((pos[reg.exit], b) for reg, b in zip(regions, block_of))
    producers = graph.producers()
    last_root = roots_by_block[-1] if roots_by_block else first_root
    for layer in graph.layers:
        n = layer.name
        if n in device:
            continue
        if n in combine_block:
            device[n] = roots_by_block[combine_block[n]]
            continue
        if n in region_block:  # a region left whole (a one-device group)
            device[n] = roots_by_block[region_block[n]]
            continue
        p = pos.get(n)
        if p is None:  # a node the rewrite added outside parts (bias add, vocab concat): where its input is
            src = next((producers[t] for t in layer.inputs if t in producers and producers[t] in device), None)
            device[n] = device[src] if src else last_root
            continue
        before = [b for q, b in exits if q < p]
        device[n] = roots_by_block[before[-1]] if before else (roots_by_block[0] if roots_by_block else first_root)
    return device
