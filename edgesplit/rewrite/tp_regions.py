"""Find the tensor-parallel regions of a Transformer graph: column-split entries -> ... -> one row-split exit.

No exporter pattern is matched by name or shape: a candidate exit is any MatMul/Gemm with a 2-D weight; walking
back from its input until MatMuls/Gemms with weights (the entries) gives the region, which must read one
activation `x` (the normalised hidden state) and survive label propagation (`shard_labels`). Attention (a region
with a Softmax) is split by heads, the rest (MLP, SwiGLU) by neurons. Regions that hold a Softmax but fail are
reported with the node and the reason, so the caller can fall back to vertical splitting for them.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass

import onnx

from edgesplit.graph import Graph
from edgesplit.rewrite.concrete import Concrete
from edgesplit.rewrite.shard_labels import SHAPE_ONLY, Labels, Rejected, propagate


# a Softmax marks unfused attention; fused attention ops (ONNX 23, com.microsoft) have no splitting rule yet, so
# they are reported as not recognised and left whole
ATTENTION = frozenset({"Softmax", "Attention", "MultiHeadAttention", "GroupQueryAttention", "PackedAttention"})


@dataclass(frozen=True)
class Region:
    kind: str  # "heads" or "neurons"
    entries: tuple[str, ...]
    exit: str
    x: str
    nodes: tuple[str, ...]  # topological order, entries and exit included
    outputs: tuple[str, ...]  # split tensors read outside the region (KV cache outputs), gathered by Concat
    labels: Labels
    shape_reads: tuple[str, ...] = ()  # outside Shape nodes reading a split tensor: re-pointed to part 0
    exit_input: str = ""  # the exit's split input (its rows are the partial sums)


@dataclass(frozen=True)
class Skipped:
    node: str
    reason: str

    def __str__(self) -> str:
        return f"{self.node}: {self.reason}"


def weight_input(node: onnx.NodeProto, inits: Mapping[str, onnx.TensorProto]) -> bool:
    """A MatMul or Gemm of an activation by a 2-D weight (Gemm: no transA)."""
    if node.op_type not in ("MatMul", "Gemm") or len(node.input) < 2:
        return False
    w = inits.get(node.input[1])
    if w is None or len(w.dims) != 2 or node.input[0] in inits:
        return False
    return not any(a.name == "transA" and a.i for a in node.attribute)


def find(graph: Graph, concrete: Concrete) -> tuple[list[Region], list[Skipped]]:
    model = graph.model
    inits = {t.name: t for t in model.graph.initializer}
    nodes = list(model.graph.node)
    by_name = {n.name: n for n in nodes}
    pos = {n.name: i for i, n in enumerate(nodes)}
    producer = {o: n for n in nodes for o in n.output if o}
    consumers: dict[str, list[str]] = defaultdict(list)
    for n in nodes:
        for i in n.input:
            consumers[i].append(n.name)
    graph_outputs = set(graph.outputs)
    used: set[str] = set()
    regions: list[Region] = []
    failures: dict[str, Skipped] = {}
    for exit_node in nodes:
        if not weight_input(exit_node, inits) or exit_node.name in used:
            continue
        entries, seen = _walk_back(exit_node, producer, inits)
        if not entries or len({by_name[e].input[0] for e in entries}) != 1 or seen & used or entries & used:
            continue
        inside = _descendants(entries, seen | {exit_node.name}, nodes, by_name)
        region_nodes = sorted(inside, key=pos.__getitem__)
        kind = "heads" if any(by_name[n].op_type in ATTENTION for n in region_nodes) else "neurons"
        try:
            outputs = _outputs(region_nodes, exit_node.name, by_name, consumers, graph_outputs)
            # tensors whose shape only is read outside: part 0 sends its shape, corrected; the rest are gathered
            outside = {t: [c for c in consumers[t] if c not in inside] for t in outputs}
            shaped = [t for t in outputs if t not in graph_outputs and all(by_name[c].op_type == "Shape"
                                                                           for c in outside[t])]
            shape_reads = [c for t in shaped for c in outside[t]]
            outputs = [t for t in outputs if t not in shaped]
            inner = [t for t in outputs if t not in graph_outputs]
            if inner:  # e.g. a residual stream running through: gathering it would undo the split
                raise Rejected(producer[inner[0]].name, f"its split output {inner[0]!r} is read outside the region")
            first, offsets = 0, {}
            for e in sorted(entries, key=pos.__getitem__):
                offsets[e] = first
                first += concrete.shapes[by_name[e].output[0]][-1]
            labels = propagate([by_name[n] for n in region_nodes], offsets, exit_node.name, concrete.shapes,
                               concrete.values, inits, first)
            if len(set(labels.classes(labels.tensors[exit_node.input[0]].labels).tolist())) < 2:
                raise Rejected(exit_node.name, "every head/neuron is tied to every other (e.g. heads mixed across "
                                               "the head axis), so nothing can be split")
            unsplit = [t for t in outputs + [by_name[c].input[0] for c in shape_reads] if t not in labels.tensors]
            if unsplit:
                raise Rejected(producer[unsplit[0]].name, f"its output {unsplit[0]!r} is read outside the region "
                                                          "but is not split along heads/neurons")
        except Rejected as exc:
            if kind == "heads":
                softmax = next(n for n in region_nodes if by_name[n].op_type in ATTENTION)
                failures.setdefault(softmax, Skipped(exc.node, f"attention not recognised ({exc.reason}); "
                                                               "left unsplit"))
            continue
        x = by_name[next(iter(entries))].input[0]
        regions.append(Region(kind, tuple(sorted(entries, key=pos.__getitem__)), exit_node.name, x,
                              tuple(region_nodes), tuple(outputs), labels, tuple(shape_reads), exit_node.input[0]))
        used.update(region_nodes)
    skipped = [s for softmax, s in failures.items() if softmax not in used]
    for n in nodes:  # attention that no candidate region even reached
        if n.op_type in ATTENTION and n.name not in used and n.name not in failures:
            skipped.append(Skipped(n.name, "attention not recognised (no projection MatMul with a 2-D weight reads "
                                           "its result); left unsplit"))
    return regions, skipped


def _walk_back(exit_node: onnx.NodeProto, producer, inits) -> tuple[set[str], set[str]]:
    """Nodes the exit's input depends on, stopping at weight MatMuls (entries), Shape/Size and graph inputs."""
    entries: set[str] = set()
    seen: set[str] = set()
    stack = [exit_node.input[0]]
    while stack:
        node = producer.get(stack.pop())
        if node is None or node.name in seen or node.name in entries:
            continue
        if weight_input(node, inits):
            entries.add(node.name)
            continue
        seen.add(node.name)
        if node.op_type not in SHAPE_ONLY:
            stack.extend(i for i in node.input if i)
    return entries, seen


def _descendants(entries: set[str], allowed: set[str], nodes, by_name) -> set[str]:
    """Entries plus the allowed nodes that read (transitively) an entry's output."""
    inside = set(entries)
    tensors = {o for e in entries for o in by_name[e].output}
    for n in nodes:
        if n.name in allowed and n.name not in inside and any(i in tensors for i in n.input):
            inside.add(n.name)
            tensors.update(n.output)
    return inside


def _outputs(region_nodes, exit_name, by_name, consumers, graph_outputs) -> list[str]:
    inside = set(region_nodes)
    outs = []
    for n in region_nodes:
        if n == exit_name:
            continue
        for o in by_name[n].output:
            if o and (o in graph_outputs or any(c not in inside for c in consumers.get(o, ()))):
                outs.append(o)
    return outs
