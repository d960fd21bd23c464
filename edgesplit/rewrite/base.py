"""What every split family shares: the request, share arithmetic, the model editor and the region record."""

from __future__ import annotations

import heapq
import math
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import onnx
from onnx import helper, numpy_helper

from edgesplit import layout
from edgesplit.errors import EdgesplitError
from edgesplit.graph import Graph, from_model, node_references
from edgesplit.layout import Combine, Fill, Part, Region, SplitKind

CHANNEL_KINDS = tuple(k.value for k in layout.CHANNEL_KINDS)
SPATIAL_KINDS = tuple(k.value for k in layout.SPATIAL_KINDS)
KINDS = CHANNEL_KINDS + SPATIAL_KINDS


class SplitError(EdgesplitError):
    """A horizontal split cannot be applied as asked; the message names the layer and the limit."""


@dataclass(frozen=True)
class SplitRequest:
    """One horizontal region asked for: which layers, how, in how many parts, with which shares (no devices).

    `weights` are per-part shares (default: equal); `points` are interior split points along the split axis
    (AutoDiCE); `grid` is [rows, cols] of a grid split. For fused kinds `layers` is the ordered run of layers the
    region covers; `axis` tiles a fused-spatial run by height (the default), width or grid. Part i of the region
    takes weight i (or the i-th range between the points). A kind given by name is parsed.
    """

    kind: SplitKind
    layers: tuple[str, ...]
    parts: int
    weights: tuple[float, ...] | None = None
    points: tuple[int, ...] | None = None
    grid: tuple[int, int] | None = None
    axis: SplitKind | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "kind", _split_kind(self.kind, "split kind"))
        object.__setattr__(self, "axis", _split_kind(self.axis, "fused-spatial axis") if self.axis else None)


def _split_kind(value: SplitKind | str, what: str) -> SplitKind:
    try:
        return SplitKind.parse(value, what)
    except ValueError as exc:
        raise SplitError(str(exc)) from None


def weights_for(request: SplitRequest) -> list[float]:
    if request.weights is not None:
        return [float(w) for w in request.weights]
    return [1.0] * request.parts


def sizes(total: int, weights: Sequence[float], what: str, allow_idle: bool = False, remedy: str = "") -> list[int]:
    """Integer sizes summing to `total`, proportional to `weights` (largest remainder), each >= 1.

    With more parts than units, `allow_idle` gives the parts with the smallest due 0 instead of raising; `remedy`
    says in the error how else to get there (the caller knows its options).
    """
    k = len(weights)
    if k < 1:
        raise SplitError(f"{what}: expected at least one device, got none")
    if any(not w > 0 for w in weights):
        raise SplitError(f"{what}: expected positive device weights, got {list(weights)}")
    idle = k > total
    if idle and not allow_idle:
        raise SplitError(f"{what}: {k} parts asked but it has only {total}; expected at most {total} parts, else a "
                         f"part would be empty" + (f". {remedy}" if remedy else ""))
    raw = [total * w / sum(weights) for w in weights]
    base = [math.floor(r) if idle else max(1, math.floor(r)) for r in raw]
    while sum(base) < total:  # largest remainder first
        i = max(range(k), key=lambda j: (raw[j] - base[j], -j))
        base[i] += 1
    while sum(base) > total:  # only when the one-each floor pushed us over
        i = max((j for j in range(k) if base[j] > 1), key=lambda j: (base[j] - raw[j], j))
        base[i] -= 1
    return base


def ranges_from(total: int, weights: Sequence[float], points: Sequence[int] | None, what: str,
                unit: int = 1) -> list[tuple[int, int]]:
    """Split [0, total) into len(weights) ranges, from explicit points or by weight; `unit` aligns to groups."""
    k = len(weights)
    if points is not None and len(points):
        pts = [int(p) for p in points]
        if len(pts) == k + 1 and pts[0] == 0 and pts[-1] == total:
            pts = pts[1:-1]
        if len(pts) != k - 1:
            raise SplitError(f"{what}: expected {k - 1} split points for {k} parts (interior points of 0..{total}), "
                             f"got {len(pts)}: {pts}")
        bounds = [0, *pts, total]
        if any(not (0 < p < total) for p in pts):
            raise SplitError(f"{what}: split points must lie strictly between 0 and {total}, got {pts}")
        if any(b >= c for b, c in zip(bounds, bounds[1:])):
            raise SplitError(f"{what}: split points must be strictly increasing, got {pts}")
        if any(p % unit for p in pts):
            raise SplitError(f"{what}: split points must be multiples of {unit} (its group size), got {pts}")
        return list(zip(bounds, bounds[1:]))
    n = sizes(total // unit, weights, what)
    bounds = np.concatenate([[0], np.cumsum(n)]) * unit
    return [(int(a), int(b)) for a, b in zip(bounds, bounds[1:])]


@dataclass
class PartRecord:
    """A part under construction (see `edgesplit.layout.Part`)."""

    share: float
    device: str | None = None  # None: the rewrite leaves placing to edgesplit.place
    nodes: list[str] = field(default_factory=list)
    output: str = ""
    units: tuple[int, ...] = ()


@dataclass
class RegionRecord:
    """A region under construction; `freeze` gives the `edgesplit.layout.Region` it becomes."""

    name: str
    kind: SplitKind
    layers: list[str]
    parts: list[PartRecord]
    combine: str = ""
    combine_nodes: list[str] = field(default_factory=list)  # all combine nodes (grid: row concats + final)
    scatter: list[str] = field(default_factory=list)  # Slice nodes that cut a region input (run at the producer)
    axis: int = 1
    units: int = 0
    merge: Combine = Combine.CONCAT

    def set_units(self, ranges: Sequence[tuple[int, int]]) -> None:
        for p, (a, b) in zip(self.parts, ranges):
            p.units = tuple(range(a, b))
        self.units = max(b for _, b in ranges)

    def freeze(self) -> Region:
        parts = tuple(Part(p.units, p.output, tuple(p.nodes), p.device, p.share) for p in self.parts)
        return Region(self.name, SplitKind(self.kind), tuple(self.layers), self.units, self.merge, self.combine,
                      parts, self.axis, Fill.ZEROS, tuple(self.combine_nodes or [self.combine]), tuple(self.scatter))


class Editor:
    """A mutable copy of a model's graph: replace nodes, add initializers, then build a new Graph."""

    def __init__(self, graph: Graph) -> None:
        self.graph = graph
        self.model = onnx.ModelProto()
        self.model.CopyFrom(graph.model)
        self.inits: dict[str, onnx.TensorProto] = {t.name: t for t in self.model.graph.initializer}
        self.nodes: list[onnx.NodeProto] = list(self.model.graph.node)
        self.names: set[str] = {n.name for n in self.nodes} | set(graph.tensors)
        self.regions: list[Region] = list(graph.regions)
        self.claimed: set[str] = {n for r in graph.regions for n in r.nodes}
        self.covered: set[str] = {layer for r in graph.regions for layer in r.layers}  # original layers replaced

    def node(self, name: str) -> onnx.NodeProto:
        for n in self.nodes:
            if n.name == name:
                return n
        raise SplitError(f"unknown layer {name!r}")

    def fresh(self, base: str) -> str:
        name, k = base, 1
        while name in self.names:
            k += 1
            name = f"{base}_{k}"
        self.names.add(name)
        return name

    def const(self, base: str, array: np.ndarray) -> str:
        name = self.fresh(base)
        self.inits[name] = numpy_helper.from_array(np.ascontiguousarray(array), name)
        return name

    def array(self, name: str) -> np.ndarray:
        return numpy_helper.to_array(self.inits[name])

    def is_const(self, name: str) -> bool:
        return name in self.inits

    def make(self, op: str, inputs: Sequence[str], base: str, attrs: Mapping | None = None,
             outputs: Sequence[str] | None = None) -> onnx.NodeProto:
        name = self.fresh(base)
        outs = list(outputs) if outputs is not None else [self.fresh(f"{name}_out")]
        return helper.make_node(op, list(inputs), outs, name=name, **dict(attrs or {}))

    def clone(self, node: onnx.NodeProto, base: str, inputs: Sequence[str],
              attrs: Mapping | None = None) -> onnx.NodeProto:
        """A copy of `node` with new inputs, a fresh name and output, and some attributes overridden."""
        new = onnx.NodeProto()
        new.CopyFrom(node)
        new.name = self.fresh(base)
        del new.input[:]
        new.input.extend(inputs)
        del new.output[:]
        new.output.append(self.fresh(f"{new.name}_out"))
        for key, value in (attrs or {}).items():
            for a in list(new.attribute):
                if a.name == key:
                    new.attribute.remove(a)
            if value is not None:
                new.attribute.append(helper.make_attribute(key, value))
        return new

    def slice_node(self, tensor: str, axes: Sequence[int], starts: Sequence[int], ends: Sequence[int],
                   base: str) -> onnx.NodeProto:
        s = self.const(f"{base}_starts", np.array(starts, dtype=np.int64))
        e = self.const(f"{base}_ends", np.array(ends, dtype=np.int64))
        a = self.const(f"{base}_axes", np.array(axes, dtype=np.int64))
        return self.make("Slice", [tensor, s, e, a], base)

    def replace(self, removed: Iterable[str], added: Sequence[onnx.NodeProto]) -> None:
        """Remove the named nodes and insert `added` where the first removed one stood."""
        removed = set(removed)
        pos = next((i for i, n in enumerate(self.nodes) if n.name in removed), len(self.nodes))
        keep = [n for n in self.nodes if n.name not in removed]
        before = sum(1 for n in self.nodes[:pos] if n.name not in removed)
        self.nodes = keep[:before] + list(added) + keep[before:]

    def build(self, new_regions: Sequence[RegionRecord], dims: Mapping[str, int] | None = None) -> Graph:
        """Sort, prune unused initializers, record the regions and re-infer: a new Graph, same source hash."""
        g = self.model.graph
        nodes = topological_order(self.nodes)
        used = {r for n in nodes for r in n.input}
        del g.node[:]
        g.node.extend(nodes)
        del g.initializer[:]
        g.initializer.extend(t for name, t in self.inits.items() if name in used)
        del g.value_info[:]
        regions = (*self.regions, *(r.freeze() for r in new_regions))
        new = self._reloaded(dims)
        return replace(new, path=self.graph.path, regions=regions)

    def _reloaded(self, dims: Mapping[str, int] | None) -> Graph:
        """The edited model as a graph, at the original graph's dims unless others are given."""
        return from_model(self.model, dims=self.graph.dims if dims is None else dims, name=self.graph.name,
                          sha256=self.graph.sha256)

    def add(self, *nodes: onnx.NodeProto) -> str:
        """Append nodes named by the caller (their names taken from now on); `finish` sorts them into place.
        Returns the last node's first output."""
        for n in nodes:
            self.names.add(n.name)
            self.names.update(o for o in n.output if o)
        self.nodes.extend(nodes)
        return nodes[-1].output[0]

    def remove(self, names: Iterable[str]) -> None:
        drop = set(names)
        self.nodes = [n for n in self.nodes if n.name not in drop]

    def define(self, name: str, array: np.ndarray) -> str:
        """An initializer under exactly `name` (a tensor the graph already reads, now a constant)."""
        self.names.add(name)
        self.inits[name] = numpy_helper.from_array(np.ascontiguousarray(array), name)
        return name

    def finish(self, regions: Sequence[Region] = (), dims: Mapping[str, int] | None = None) -> Graph:
        """A new Graph (same source hash) for rewrites that record typed regions themselves: nodes and initializers
        nobody reads are dropped (and with them from the regions' parts), and the shapes inference found for the
        tensors the source's own nodes still produce are kept."""
        g = self.model.graph
        nodes = live_nodes(topological_order(self.nodes), {o.name for o in g.output})
        used = {r for n in nodes for r in node_references(n)}
        source = {layer.name for layer in self.graph.layers}
        shaped = {o for n in nodes if n.name in source for o in n.output}
        kept = [v for v in g.value_info if v.name in shaped]
        del g.node[:]
        g.node.extend(nodes)
        del g.initializer[:]
        g.initializer.extend(t for name, t in self.inits.items() if name in used)
        del g.value_info[:]
        g.value_info.extend(kept)
        alive = {n.name for n in nodes}
        trimmed = tuple(r.with_parts([replace(p, nodes=tuple(n for n in p.nodes if n in alive)) for p in r.parts])
                        for r in regions)
        new = self._reloaded(dims)
        return replace(new, path=self.graph.path, regions=(*self.regions, *trimmed))


def topological_order(nodes: Sequence[onnx.NodeProto]) -> list[onnx.NodeProto]:
    """Stable Kahn sort: keeps the given order wherever the dependencies allow."""
    producer = {o: i for i, n in enumerate(nodes) for o in n.output if o}
    deps = [{producer[r] for r in node_references(n) if r in producer} for n in nodes]
    users: dict[int, list[int]] = defaultdict(list)
    for i, d in enumerate(deps):
        for j in d:
            users[j].append(i)
    indeg = [len(d) for d in deps]
    ready = [i for i, d in enumerate(indeg) if d == 0]
    heapq.heapify(ready)
    out = []
    while ready:
        i = heapq.heappop(ready)
        out.append(nodes[i])
        for j in users[i]:
            indeg[j] -= 1
            if indeg[j] == 0:
                heapq.heappush(ready, j)
    if len(out) != len(nodes):
        raise SplitError("internal error: the rewritten graph has a cycle")
    return out


def live_nodes(nodes: Sequence[onnx.NodeProto], outputs: Iterable[str]) -> list[onnx.NodeProto]:
    """The nodes (topologically ordered) that some later node or a graph output reads, in their order."""
    needed = set(outputs)
    keep = []
    for n in reversed(nodes):
        if any(o in needed for o in n.output if o):
            keep.append(n)
            needed.update(node_references(n))
    return keep[::-1]


def attr(node: onnx.NodeProto, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def weight_axes(node: onnx.NodeProto, rank: int) -> tuple[int, int]:
    """(output axis, input axis) of the weight (input 1) of a Conv, Gemm or MatMul of weight rank `rank`."""
    if node.op_type == "Conv":
        return 0, 1
    if node.op_type == "Gemm":
        return (0, 1) if attr(node, "transB", 0) else (1, 0)
    return rank - 1, rank - 2  # MatMul: x @ W


def static_shape(graph: Graph, tensor: str) -> tuple[int, ...]:
    shape = graph.tensors[tensor].shape
    return tuple(d if isinstance(d, int) else -1 for d in shape)
