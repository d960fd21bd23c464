"""The state of one Transformer rewrite: the editor, the sample run, the parts under construction, side inputs.

A part is computed in a *slot*: part p of device group g. Slots stand where devices will: names and caches are
keyed by slot, so the rewrite is correct for any assignment of slots to devices, and costs least when every slot
of a group lands on a device of its own and what no part holds runs on the group's slot 0 (its root).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper

from edgesplit.graph import Graph
from edgesplit.layout import Combine, Part, Region, SplitKind
from edgesplit.probe import Concrete
from edgesplit.rewrite.base import Editor

INT_MAX = np.iinfo(np.int64).max
SIDE_WEIGHT_LIMIT = 1 << 20  # side computations with bigger constants are sent, not recomputed per slot
GATHER = "gather"  # the name prefix of a region that concatenates a split tensor read outside (a KV cache)


@dataclass(frozen=True, order=True)
class Slot:
    """Part `part` of device group `group`; part 0 is the group's root."""

    group: int
    part: int

    @property
    def label(self) -> str:
        return f"g{self.group}p{self.part}"


def region_name(prefix: SplitKind | str, layer: str) -> str:
    return f"{prefix}:{layer}"


@dataclass
class Piece:
    """A part under construction: its slot, the label classes (head groups / neurons) it takes, its nodes."""

    slot: Slot
    classes: frozenset[int]
    share: float
    nodes: list[str] = field(default_factory=list)
    output: str = ""


@dataclass(frozen=True)
class Built:
    """A typed region (parts unplaced) and the slot of each of its parts."""

    region: Region
    slots: tuple[Slot, ...]


class Surgery:
    """Accumulates part nodes, new weights and combines on an `Editor` of the source graph."""

    def __init__(self, graph: Graph, sample: Concrete, kv_shard: bool = False) -> None:
        self.edit = Editor(graph)
        self.sample, self.kv_shard = sample, kv_shard
        self.source = {n.name: n for n in self.edit.nodes}
        self.producer = {o: n for n in self.edit.nodes for o in n.output if o}
        self.consumers = graph.consumers()
        self.graph_inputs, self.graph_outputs = set(graph.inputs), set(graph.outputs)
        # cache input/output -> (per-part name, axis, indices of the part's elements along it)
        self.new_inputs: dict[str, list[tuple[str, int, np.ndarray]]] = {}
        self.new_outputs: dict[str, list[tuple[str, int, np.ndarray]]] = {}
        self.argmax_outputs: dict[str, str] = {}  # logits -> token ids, for lm_head="argmax"
        self.added: dict[str, onnx.NodeProto] = {}
        self.removed: set[str] = set()
        self.local: dict[tuple[str, Slot], str | None] = {}  # a side input's copy computed or received in a slot

    def arr(self, name: str) -> np.ndarray:
        return self.edit.array(name)

    def const(self, name: str, array: np.ndarray) -> str:
        return self.edit.const(name, array)

    def emit(self, piece: Piece | None, node: onnx.NodeProto) -> str:
        """Add `node` (to `piece`'s nodes, if it belongs to a part); its first output."""
        self.added[node.name] = node
        if piece is not None:
            piece.nodes.append(node.name)
        return self.edit.add(node)

    def node(self, piece: Piece | None, op: str, inputs: Sequence[str], output: str, **attrs) -> str:
        """A node named as its single output."""
        return self.emit(piece, helper.make_node(op, list(inputs), [output], name=output, **attrs))

    def localise(self, piece: Piece, x: str) -> None:
        """Side inputs of a part (masks, rotary tables, shape vectors) computed in its own slot when they derive
        cheaply from model inputs and `x`, so only `x` and the partial sum cross the wire. The root's parts read
        what the root computes anyway."""
        if piece.slot.part == 0:
            return
        nodes = [self.added[n] for n in piece.nodes]
        here = {o for n in nodes for o in n.output} | {x}
        for n in nodes:
            for k, t in enumerate(n.input):
                if t and t not in here and not self.edit.is_const(t):
                    n.input[k] = self._replica(t, piece, x, 0) or self._relay(t, piece)

    def _relay(self, tensor: str, piece: Piece) -> str:
        """A side input that cannot be recomputed here (e.g. a mask built from the embeddings' shape) is received
        once per slot, by the first part that needs it, and kept there for the later blocks."""
        key = (f"relay:{tensor}", piece.slot)
        if key not in self.local:
            out = f"{tensor}@{piece.slot.label}"
            self.emit(piece, helper.make_node("Identity", [tensor], [out], name=f"{out}.relay"))
            self.local[key] = out
        return self.local[key]

    def _replicable(self, node: onnx.NodeProto | None, x: str, depth: int) -> bool:
        return node is not None and node.name not in self.removed and depth < 64 and not any(
            self.edit.is_const(i) and self.edit.inits[i].ByteSize() > SIDE_WEIGHT_LIMIT for i in node.input) and not (
            node.op_type in ("Shape", "Size") and node.input[0] not in (x, *self.graph_inputs))  # not the model again

    def _replica(self, tensor: str, piece: Piece, x: str, depth: int) -> str | None:
        """`tensor` recomputed in the piece's slot from model inputs, `x` and constants, or None if it cannot be."""
        key = (tensor, piece.slot)
        if key in self.local:
            return self.local[key]
        node = self.producer.get(tensor)
        ok = self._replicable(node, x, depth)
        inputs = []
        for i in node.input if ok else ():
            if not i or self.edit.is_const(i) or i in self.graph_inputs or i == x:
                inputs.append(i)
            elif (r := self._replica(i, piece, x, depth + 1)) is not None:
                inputs.append(r)
            else:
                ok = False
                break
        if not ok:
            self.local[key] = None
            return None
        label = piece.slot.label
        new = onnx.NodeProto()
        new.CopyFrom(node)
        new.name = f"{node.name}@{label}"
        del new.input[:]
        new.input.extend(inputs)
        del new.output[:]
        new.output.extend(f"{o}@{label}" if o else "" for o in node.output)
        self.emit(piece, new)
        for o in node.output:
            if o:
                self.local[(o, piece.slot)] = f"{o}@{label}"
        return self.local[key]

    def finish(self, built: Sequence[Built]) -> Graph:
        self.edit.remove(self.removed)
        g = self.edit.model.graph
        _reinterface(g.input, self.new_inputs)
        _reinterface(g.output, self.new_outputs)
        for vi in g.output:
            if vi.name in self.argmax_outputs:  # logits [..., vocab] -> token ids [...]
                vi.name = self.argmax_outputs[vi.name]
                vi.type.tensor_type.elem_type = onnx.TensorProto.INT64
                del vi.type.tensor_type.shape.dim[-1]
        # replicas of side inputs that ended up unused are dropped with the dead code
        return self.edit.finish([b.region for b in built])


def _reinterface(values, changes: Mapping[str, list[tuple[str, int, np.ndarray]]]) -> None:
    """Replace model inputs/outputs by one per part, the split axis resized (the per-slot KV cache)."""
    for vi in [v for v in values if v.name in changes]:
        at = list(values).index(vi)
        values.remove(vi)
        for k, (name, axis, keep) in enumerate(changes[vi.name]):
            new = onnx.ValueInfoProto()
            new.CopyFrom(vi)
            new.name = name
            dim = new.type.tensor_type.shape.dim[axis]
            dim.Clear()
            dim.dim_value = len(keep)
            values.insert(at + k, new)


def record(name: str, kind: SplitKind, layers: Sequence[str], combine: str, pieces: Sequence[Piece],
           block: int | None, merge: Combine = Combine.SUM, units: Sequence[tuple[int, ...]] | None = None,
           combine_nodes: Sequence[str] = ()) -> Built:
    """The typed region; a part's units are the indices of its head groups / neurons among the region's."""
    if units is None:
        index = {c: i for i, c in enumerate(sorted({c for p in pieces for c in p.classes}))}
        units = [tuple(sorted(index[c] for c in p.classes)) for p in pieces]
    parts = tuple(Part(u, p.output, tuple(p.nodes), None, round(p.share, 6)) for p, u in zip(pieces, units))
    region = Region(name, kind, tuple(layers), sum(len(u) for u in units), merge, combine, parts, axis=-1,
                    combine_nodes=tuple(combine_nodes or (combine,)), block=block)
    return Built(region, tuple(p.slot for p in pieces))
