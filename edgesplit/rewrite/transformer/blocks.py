"""Find the sub-blocks of a Transformer graph that split tensor-parallel: column-split entries -> ... -> one
row-split exit.

No exporter pattern is matched by name or shape: a candidate exit is any MatMul/Gemm with a 2-D weight; walking
back from its input until MatMuls/Gemms with weights (the entries) gives the sub-block, which must read one
activation `x` (the normalised hidden state) and survive label propagation (`labels`). Attention (a sub-block
with a Softmax) is split by heads, the rest (MLP, SwiGLU) by neurons. Sub-blocks that hold a Softmax but fail are
reported with the node and the reason, so the caller can leave them whole (split vertically).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import onnx

from edgesplit.graph import Graph
from edgesplit.layout import SplitKind
from edgesplit.probe import Concrete
from edgesplit.rewrite.transformer.labels import SHAPE_ONLY, Labels, Rejected, propagate

# a Softmax marks unfused attention; fused attention ops (ONNX 23, com.microsoft) have no splitting rule yet, so
# they are reported as not recognised and left whole
ATTENTION = frozenset({"Softmax", "Attention", "MultiHeadAttention", "GroupQueryAttention", "PackedAttention"})


@dataclass(frozen=True)
class SubBlock:
    """An attention (kind HEADS) or MLP (kind NEURONS) sub-block of the source graph, labelled for splitting."""

    kind: SplitKind
    entries: tuple[str, ...]
    exit: str
    x: str
    nodes: tuple[str, ...]  # topological order, entries and exit included
    outputs: tuple[str, ...]  # split tensors read outside the sub-block (KV cache outputs), gathered by Concat
    labels: Labels
    shape_reads: tuple[str, ...] = ()  # outside Shape nodes reading a split tensor: re-pointed to part 0
    exit_input: str = ""  # the exit's split input (its rows are the partial sums)


@dataclass(frozen=True)
class Skipped:
    node: str
    reason: str

    def __str__(self) -> str:
        return f"{self.node}: {self.reason}"


class TransformerSplitWarning(UserWarning):
    """Part of the model was left unsplit (e.g. an attention pattern not recognised); it runs vertically."""


def weight_input(node: onnx.NodeProto, inits: Mapping[str, onnx.TensorProto]) -> bool:
    """A MatMul or Gemm of an activation by a 2-D weight (Gemm: no transA)."""
    if node.op_type not in ("MatMul", "Gemm") or len(node.input) < 2:
        return False
    w = inits.get(node.input[1])
    if w is None or len(w.dims) != 2 or node.input[0] in inits:
        return False
    return not any(a.name == "transA" and a.i for a in node.attribute)


@dataclass
class _Index:
    """The source graph, looked up by node and tensor."""

    graph: Graph
    concrete: Concrete

    def __post_init__(self) -> None:
        model = self.graph.model
        self.inits = {t.name: t for t in model.graph.initializer}
        self.nodes = list(model.graph.node)
        self.by_name = {n.name: n for n in self.nodes}
        self.pos = {n.name: i for i, n in enumerate(self.nodes)}
        self.producer = {o: n for n in self.nodes for o in n.output if o}
        self.consumers: dict[str, list[str]] = defaultdict(list)
        for n in self.nodes:
            for i in n.input:
                self.consumers[i].append(n.name)
        self.graph_outputs = set(self.graph.outputs)


def find(graph: Graph, concrete: Concrete) -> tuple[list[SubBlock], list[Skipped]]:
    """Every sub-block that splits, in graph order, and the attention left whole (with the node and the reason)."""
    ix = _Index(graph, concrete)
    used: set[str] = set()
    found: list[SubBlock] = []
    failures: dict[str, Skipped] = {}
    for exit_node in ix.nodes:
        if not weight_input(exit_node, ix.inits) or exit_node.name in used:
            continue
        entries, seen = _walk_back(exit_node, ix.producer, ix.inits)
        if not entries or len({ix.by_name[e].input[0] for e in entries}) != 1 or seen & used or entries & used:
            continue
        inside = _descendants(entries, seen | {exit_node.name}, ix.nodes, ix.by_name)
        nodes = sorted(inside, key=ix.pos.__getitem__)
        kind = SplitKind.HEADS if any(ix.by_name[n].op_type in ATTENTION for n in nodes) else SplitKind.NEURONS
        try:
            sub = _label(ix, kind, exit_node, entries, nodes)
        except Rejected as exc:
            if kind == SplitKind.HEADS:
                softmax = next(n for n in nodes if ix.by_name[n].op_type in ATTENTION)
                failures.setdefault(softmax, Skipped(exc.node, f"attention not recognised ({exc.reason}); "
                                                               "left unsplit"))
            continue
        found.append(sub)
        used.update(nodes)
    skipped = [s for softmax, s in failures.items() if softmax not in used]
    for n in ix.nodes:  # attention that no candidate sub-block even reached
        if n.op_type in ATTENTION and n.name not in used and n.name not in failures:
            skipped.append(Skipped(n.name, "attention not recognised (no projection MatMul with a 2-D weight reads "
                                           "its result); left unsplit"))
    return found, skipped


def _label(ix: _Index, kind: SplitKind, exit_node: onnx.NodeProto, entries: set[str],
           nodes: Sequence[str]) -> SubBlock:
    """The sub-block with its labels, or `Rejected` saying which node stops the split and why."""
    inside = set(nodes)
    outputs = _outputs(nodes, exit_node.name, ix.by_name, ix.consumers, ix.graph_outputs)
    # tensors whose shape only is read outside: part 0 sends its shape, corrected; the rest are gathered
    outside = {t: [c for c in ix.consumers[t] if c not in inside] for t in outputs}
    shaped = [t for t in outputs if t not in ix.graph_outputs and all(ix.by_name[c].op_type == "Shape"
                                                                      for c in outside[t])]
    shape_reads = [c for t in shaped for c in outside[t]]
    outputs = [t for t in outputs if t not in shaped]
    inner = [t for t in outputs if t not in ix.graph_outputs]
    if inner:  # e.g. a residual stream running through: gathering it would undo the split
        raise Rejected(ix.producer[inner[0]].name, f"its split output {inner[0]!r} is read outside the region")
    first, offsets = 0, {}
    ordered = sorted(entries, key=ix.pos.__getitem__)
    for e in ordered:
        offsets[e] = first
        first += ix.concrete.shapes[ix.by_name[e].output[0]][-1]
    labels = propagate([ix.by_name[n] for n in nodes], offsets, exit_node.name, ix.concrete.shapes,
                       ix.concrete.values, ix.inits, first)
    if len(set(labels.classes(labels.tensors[exit_node.input[0]].labels).tolist())) < 2:
        raise Rejected(exit_node.name, "every head/neuron is tied to every other (e.g. heads mixed across "
                                       "the head axis), so nothing can be split")
    unsplit = [t for t in outputs + [ix.by_name[c].input[0] for c in shape_reads] if t not in labels.tensors]
    if unsplit:
        raise Rejected(ix.producer[unsplit[0]].name, f"its output {unsplit[0]!r} is read outside the region "
                                                     "but is not split along heads/neurons")
    x = ix.by_name[ordered[0]].input[0]
    return SubBlock(kind, tuple(ordered), exit_node.name, x, tuple(nodes), tuple(outputs), labels,
                    tuple(shape_reads), exit_node.input[0])


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
