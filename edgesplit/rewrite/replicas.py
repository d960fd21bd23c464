"""Replicas as graph surgery: a subset of one part's units computed again, on another device.

A replica reads what its part reads and outputs its units only:
- a part that is a Conv / Gemm / MatMul with a constant weight (a plain output-channel or neuron split), then at
  most activations, is copied with its weight (and bias) cut to the replica's units: it costs
  len(units) / len(part units) of the part;
- any other Concat part (followers, spatial tiles) is copied whole, then the replica's units are gathered from it;
- a Sum part (input channels, attention heads, MLP neurons) is copied up to its last layer, whose input is gathered
  to the replica's units and whose weight is sliced to them, so its output is exactly those units' partial sum.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

import numpy as np
import onnx

from edgesplit.graph import Graph
from edgesplit.layout import Combine, Part, Region, Replica, ReplicaMode
from edgesplit.rewrite.base import Editor, SplitError, attr, weight_axes

WEIGHTED = ("Conv", "Gemm", "MatMul")
ELEMENTWISE = ("Relu", "LeakyRelu", "PRelu", "Sigmoid", "Tanh", "Clip", "HardSigmoid", "HardSwish", "Elu", "Selu",
               "Softplus", "Gelu", "Erf", "Identity", "Dropout")


@dataclass(frozen=True)
class ReplicaRequest:
    region: str
    part: int
    units: tuple[int, ...]  # of the region, all in the part
    device: str
    mode: ReplicaMode = ReplicaMode.STANDBY


def add_replicas(graph: Graph, requests: Sequence[ReplicaRequest]) -> Graph:
    """The graph with every requested replica's nodes added and recorded on its part."""
    if not requests:
        return graph
    ed = Editor(graph)
    regions = {r.name: r for r in graph.regions}
    problems = [p for req in requests for p in _check(req, regions)]
    if problems:
        raise SplitError("invalid replicas:\n  " + "\n  ".join(problems))
    added: dict[tuple[str, int], list[Replica]] = {}
    for k, req in enumerate(requests):
        region = regions[req.region]
        part = region.parts[req.part]
        nodes, output = _build(ed, region, part, req, f"~r{k}")
        ed.nodes.extend(nodes)
        added.setdefault((req.region, req.part), []).append(
            Replica(req.device, tuple(req.units), output, tuple(n.name for n in nodes), req.mode))
    new = [r.with_parts([replace(p, replicas=p.replicas + tuple(added.get((r.name, i), ())))
                         for i, p in enumerate(r.parts)]) for r in graph.regions]
    ed.regions = []
    rebuilt = ed.build([])
    return replace(rebuilt, regions=tuple(new))


def _check(req: ReplicaRequest, regions: dict[str, Region]) -> list[str]:
    region = regions.get(req.region)
    if region is None:
        return [f"replica of region {req.region!r}: no such region; expected one of {sorted(regions)}"]
    if not 0 <= req.part < len(region.parts):
        return [f"replica of region {req.region!r}: part {req.part} of {len(region.parts)}"]
    part = region.parts[req.part]
    extra = sorted(set(req.units) - set(part.units))
    problems = []
    if not req.units or extra:
        problems.append(f"replica of region {req.region!r} part {req.part}: expected a non-empty subset of the "
                        f"part's units, got {'units ' + str(extra[:5]) + ' outside it' if extra else 'none'}")
    if req.device == part.device:
        problems.append(f"replica of region {req.region!r} part {req.part}: device {req.device!r} holds the part "
                        f"itself; expected another device")
    if region.combine is Combine.ARGMAX:
        problems.append(f"replica of region {req.region!r}: a distributed-argmax part cannot be replicated in part")
    return problems


def _build(ed: Editor, region: Region, part: Part, req: ReplicaRequest, tag: str) -> tuple[list[onnx.NodeProto], str]:
    positions = [part.units.index(u) for u in req.units]
    nodes = [ed.node(n) for n in _closure(ed, part)]
    last = next(n for n in nodes if part.output in n.output)
    plain = [n.name for n in nodes] == list(part.nodes)
    if region.combine is Combine.CONCAT and plain and _sliceable(ed, nodes[0]) and \
            all(_per_element(ed, n) for n in nodes[1:]):
        head = _cut_weights(ed, nodes[0], positions, tag)
        rest, names = _copy(ed, nodes[1:], tag, {nodes[0].output[0]: head.output[0]})
        return [head, *rest], names[part.output]
    copies, names = _copy(ed, nodes, tag)
    if region.combine is Combine.CONCAT or region.combine is Combine.MAX:
        if positions == list(range(len(part.units))):
            return copies, names[part.output]
        index = ed.const(f"{part.output}{tag}/units", np.array(positions, dtype=np.int64))
        gather = ed.make("Gather", [names[part.output], index], f"{part.output}{tag}/gather",
                         {"axis": region.axis}, outputs=[f"{part.output}{tag}/units_out"])
        return copies + [gather], gather.output[0]
    exit_copy = copies[[n.name for n in nodes].index(last.name)]
    return [*copies, _slice_exit(ed, exit_copy, positions, len(part.units), region.name, tag)], names[part.output]


def _closure(ed: Editor, part: Part) -> list[str]:
    """The part's nodes, the nodes of other parts on its device that they read from (side inputs computed
    once per device, e.g. an attention mask), and the scatter Slices cutting its inputs (a spatial tile's scatter
    runs on the part's own device): the replica must not depend on the device it stands in for."""
    on_device = {o: n for r in ed.regions for p in r.parts if p.device == part.device and p is not part
                 for n in p.nodes for o in ed.node(n).output}
    on_device.update({o: n for r in ed.regions for n in r.scatter for o in ed.node(n).output})
    chosen = list(part.nodes)
    todo = list(part.nodes)
    while todo:
        for t in ed.node(todo.pop()).input:
            n = on_device.get(t)
            if n is not None and n not in chosen:
                chosen.append(n)
                todo.append(n)
    order = {n.name: i for i, n in enumerate(ed.nodes)}
    return sorted(chosen, key=order.__getitem__)


def _sliceable(ed: Editor, node: onnx.NodeProto) -> bool:
    return node.op_type in WEIGHTED and len(node.input) > 1 and ed.is_const(node.input[1]) and \
        (node.op_type != "Conv" or attr(node, "group", 1) == 1)


def _per_element(ed: Editor, node: onnx.NodeProto) -> bool:
    """An activation whose only constants are scalars: it commutes with taking some channels."""
    consts = [i for i in node.input[1:] if i]
    return node.op_type in ELEMENTWISE and all(ed.is_const(i) and ed.array(i).size == 1 for i in consts)


def _cut_weights(ed: Editor, node: onnx.NodeProto, positions: list[int], tag: str) -> onnx.NodeProto:
    axis = weight_axes(node, ed.array(node.input[1]).ndim)[0]
    ins = list(node.input)
    ins[1] = ed.const(f"{node.input[1]}{tag}", np.take(ed.array(node.input[1]), positions, axis=axis))
    if len(ins) > 2 and ins[2] and ed.is_const(ins[2]):
        bias = ed.array(ins[2])
        if bias.ndim and bias.shape[-1] > 1:
            ins[2] = ed.const(f"{node.input[2]}{tag}", np.take(bias, positions, axis=-1))
    copy = ed.clone(node, f"{node.name}{tag}", ins)
    copy.output[0] = f"{node.output[0]}{tag}"
    return copy


def _copy(ed: Editor, nodes: list[onnx.NodeProto], tag: str,
          renamed: Mapping[str, str] | None = None) -> tuple[list[onnx.NodeProto], dict[str, str]]:
    names = {**(renamed or {}), **{o: f"{o}{tag}" for n in nodes for o in n.output if o}}
    copies = []
    for n in nodes:
        c = onnx.NodeProto()
        c.CopyFrom(n)
        c.name = ed.fresh(f"{n.name}{tag}")
        del c.input[:]
        c.input.extend(names.get(i, i) for i in n.input)
        del c.output[:]
        c.output.extend(names.get(o, o) for o in n.output)
        copies.append(c)
    return copies, names


def _slice_exit(ed: Editor, node: onnx.NodeProto, positions: list[int], units: int, region: str,
                tag: str) -> onnx.NodeProto:
    """Cut the last layer of a Sum part to the replica's units: its input gathered to their channels / rows and its
    weight sliced to match, so it computes exactly their partial sum for len(units) / units of the layer."""
    if node.op_type not in WEIGHTED or len(node.input) < 2 or not ed.is_const(node.input[1]):
        raise SplitError(f"region {region!r}: its parts end in {node.op_type}, not in a Conv / Gemm / MatMul with a "
                         f"constant weight, so a replica of some of its units cannot be built")
    if len(node.input) > 2 and node.input[2]:
        raise SplitError(f"region {region!r}: its parts add a bias before the Sum; expected pure partial sums")
    w = ed.array(node.input[1])
    axis = weight_axes(node, w.ndim)[1]
    if w.shape[axis] % units:
        raise SplitError(f"region {region!r}: {w.shape[axis]} inputs of its last layer do not divide into "
                         f"{units} units")
    per = w.shape[axis] // units
    keep = np.concatenate([np.arange(p * per, (p + 1) * per) for p in positions]).astype(np.int64)
    along = {"Conv": 1, "Gemm": 0 if attr(node, "transA", 0) else 1}.get(node.op_type, -1)  # MatMul: x's last axis
    gather = ed.make("Gather", [node.input[0], ed.const(f"{node.name}{tag}/rows", keep)], f"{node.name}{tag}/rows",
                     {"axis": along})
    node.input[0] = gather.output[0]
    node.input[1] = ed.const(f"{node.input[1]}{tag}", np.take(w, keep, axis=axis))
    return gather