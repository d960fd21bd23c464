"""Synchronisation by exchange: every device of a split region combines the parts itself.

With `--sync gather` (the layout as placed), a region's parts go to the combine device, which merges them, runs
the cheap ops after the merge (bias, residual add, norm, activation) and sends the result to every device that
reads it: two hops and a serial step per synchronisation. This rewrite gives each such reading device its own
copy of the combine and of the cheap ops between the combine and what it reads, fed by the parts' outputs: each
device sends its part to the others and nobody waits on a root (one exchange, an all-gather of the parts, as
Megatron-style tensor parallelism does). Only ops without weights-heavy compute are copied; everything else
still crosses as before. Lost parts are stood in for by tensor, so fills and replicas work on the copies too.
"""

from __future__ import annotations

from collections.abc import Mapping

import onnx

from edgesplit.graph import Graph
from edgesplit.rewrite.base import Editor

# ops whose compute grows with weights or with a second activation: never worth running twice
HEAVY = frozenset({"Conv", "ConvInteger", "ConvTranspose", "Gemm", "MatMul", "MatMulInteger", "QLinearConv",
                   "QLinearMatMul", "Einsum", "Attention", "LSTM", "GRU", "RNN", "If", "Loop", "Scan"})


def copy_name(name: str, device: str) -> str:
    return f"{name}@{device}"


def exchange(graph: Graph, placement: Mapping[str, str]) -> tuple[Graph, dict[str, str]]:
    """The graph with the combines (and the cheap ops after them) copied onto every device that reads their
    result, and the placement with each copy on its device. A graph without regions is returned as it is."""
    if not graph.regions:
        return graph, dict(placement)
    producer = graph.producers()
    devices = sorted(set(placement.values()))
    computed = _computed_where_read(graph, placement, producer, devices)
    needed = _needed(graph, placement, producer, computed)
    if not needed:
        return graph, dict(placement)
    ed = Editor(graph)
    where = dict(placement)
    nodes: list[onnx.NodeProto] = []
    for node in ed.nodes:
        source = list(node.input)
        for dev in (d for d in devices if (node.name, d) in needed):
            twin = onnx.NodeProto()
            twin.CopyFrom(node)
            twin.name = copy_name(node.name, dev)
            del twin.input[:]
            twin.input.extend(copy_name(t, dev) if computed.get((t, dev)) else t for t in source)
            del twin.output[:]
            twin.output.extend(copy_name(t, dev) if t else "" for t in node.output)
            nodes.append(twin)
            where[twin.name] = dev
        dev = placement[node.name]
        del node.input[:]
        node.input.extend(copy_name(t, dev) if computed.get((t, dev)) else t for t in source)
        nodes.append(node)
    ed.nodes = nodes
    return ed.build([]), where


def _computed_where_read(graph: Graph, placement: Mapping[str, str], producer: Mapping[str, str],
                         devices: list[str]) -> dict[tuple[str, str], bool]:
    """(tensor, device) -> should the device compute the tensor itself rather than receive it: a cheap op on
    another device whose inputs lead back, through cheap ops only, to a region's combine."""
    combines = {n for r in graph.regions for n in (r.combine_nodes or (r.combine_node,))}
    part_outputs = {p.output for r in graph.regions for p in r.parts} | \
        {x.output for r in graph.regions for x in (*r.replicas, *((r.coded,) if r.coded else ()))}
    out: dict[tuple[str, str], bool] = {}
    for layer in graph.layers:
        cheap = layer.op_type not in HEAVY
        for dev in devices:
            if dev == placement[layer.name]:
                continue
            wanted = cheap and (layer.name in combines or any(
                out.get((t, dev), False) for t in layer.inputs if t in producer))
            for t in layer.outputs:
                out[(t, dev)] = wanted and t not in part_outputs
    return out


def _needed(graph: Graph, placement: Mapping[str, str], producer: Mapping[str, str],
            computed: Mapping[tuple[str, str], bool]) -> set[tuple[str, str]]:
    """(node, device) of every copy some node on that device reads, directly or through other copies."""
    stack = [(t, placement[layer.name]) for layer in graph.layers for t in layer.inputs
             if t in producer and placement[producer[t]] != placement[layer.name]
             and computed.get((t, placement[layer.name]))]
    needed: set[tuple[str, str]] = set()
    while stack:
        t, dev = stack.pop()
        node = producer[t]
        if (node, dev) in needed:
            continue
        needed.add((node, dev))
        stack += [(i, dev) for i in graph.layer(node).inputs if i in producer and computed.get((i, dev))]
    return needed
