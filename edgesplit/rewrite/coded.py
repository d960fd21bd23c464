"""Coded parts as graph surgery: a linear region re-split into N−1 parts plus one part computing their sum.

A region is linear when it is an output-channel split (Concat) whose every part is one Conv / Gemm / MatMul with a
constant weight, then at most an Add of a constant bias. Over the N devices of such a region the layer is cut
again into N−1 parts, one per device, and the remaining device gets the *coded part*: the same layer with the sum
of the parts' weight (and bias) slices, each zero-padded to the widest part. Its output is the sum of the part
outputs, so when one part is lost, it is the coded output minus the others' (`edgesplit.runtime.failures`), exact
up to float rounding, for N/(N−1) of the plain split's per-device memory of that layer.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

import numpy as np
import onnx

from edgesplit.graph import Graph
from edgesplit.layout import Coded, Combine, Part, Region, SplitKind
from edgesplit.rewrite.base import Editor, SplitError, attr, sizes, weight_axes

WEIGHTED = ("Conv", "Gemm", "MatMul")


class NotLinearError(SplitError):
    """A region asked for a coded part computes something that is not linear in its input."""


@dataclass(frozen=True)
class CodedRequest:
    region: str
    devices: tuple[str, ...]  # the data parts' devices, in part order
    coded: str  # the coded part's device


@dataclass(frozen=True)
class _Linear:
    """A linear region taken apart: its full weight and per-unit bias, and the nodes one part is made of."""

    head: onnx.NodeProto
    add: onnx.NodeProto | None
    weight: np.ndarray  # the layer's whole weight, units along `out_axis`
    out_axis: int
    bias: np.ndarray  # one value per unit
    bias_shape: tuple[int, ...]  # of one part's bias constant, the unit axis at `bias_axis`
    bias_axis: int


def linear_problems(graph: Graph, regions: Sequence[Region]) -> dict[str, str]:
    """Per region, why it cannot take a coded part ('' when it can)."""
    ed = Editor(graph)
    out = {}
    for region in regions:
        try:
            _linear(ed, region)
            out[region.name] = ""
        except NotLinearError as exc:
            out[region.name] = str(exc)
        if not out[region.name] and len({p.device for p in region.parts}) < 2:
            out[region.name] = f"region {region.name!r}: parity needs its parts on at least 2 devices"
    return out


def add_coded(graph: Graph, requests: Sequence[CodedRequest]) -> tuple[Graph, dict[str, str]]:
    """The graph with each requested region re-split and coded, and the device of every node these added."""
    ed = Editor(graph)
    regions = {r.name: r for r in graph.regions}
    devices: dict[str, str] = {}
    new: dict[str, Region] = {}
    for k, req in enumerate(requests):
        region = regions[req.region]
        new[region.name], placed = _recode(ed, region, req, f"~c{k}")
        devices.update(placed)
    ed.regions = []
    built = ed.build([])
    return replace(built, regions=tuple(new.get(r.name, r) for r in graph.regions)), devices


def _recode(ed: Editor, region: Region, req: CodedRequest, tag: str) -> tuple[Region, dict[str, str]]:
    lin = _linear(ed, region)
    bounds = np.cumsum([0, *sizes(region.units, [1.0] * len(req.devices), f"region {region.name!r}")])
    ranges = [(int(a), int(b)) for a, b in zip(bounds, bounds[1:])]
    width = max(b - a for a, b in ranges)
    source = ed.node(region.parts[0].nodes[0]).input[0]
    parts, placed, outputs = [], {}, []
    for i, ((a, b), device) in enumerate(zip(ranges, req.devices)):
        units = np.arange(a, b)
        nodes = _layer(ed, lin, source, np.take(lin.weight, units, axis=lin.out_axis), lin.bias[a:b], f"{tag}p{i}")
        parts.append(Part(tuple(range(a, b)), nodes[-1].output[0], tuple(n.name for n in nodes), device,
                          (b - a) / region.units))
        placed.update(dict.fromkeys((n.name for n in nodes), device))
        outputs.append(nodes[-1].output[0])
    weight, bias = _coded_weights(lin, ranges, width)
    coded_nodes = _layer(ed, lin, source, weight, bias, f"{tag}coded")
    placed.update(dict.fromkeys((n.name for n in coded_nodes), req.coded))
    _rewire(ed, region, outputs)
    ed.remove(region.nodes)
    coded = Coded(req.coded, coded_nodes[-1].output[0], width, tuple(n.name for n in coded_nodes))
    return replace(region, parts=tuple(parts), coded=coded, fill_values=()), placed


def _linear(ed: Editor, region: Region) -> _Linear:
    where = f"region {region.name!r}"
    if region.combine is not Combine.CONCAT or region.kind is not SplitKind.LOP:
        raise NotLinearError(f"{where} ({region.kind.value}, {region.combine.value}): parity needs an output-channel "
                             f"split (lop) whose parts meet at a Concat")
    ops = [[ed.node(n) for n in p.nodes] for p in region.parts]
    for nodes in ops:
        if not _is_linear(ed, nodes):
            raise NotLinearError(f"{where}: parity needs parts that are one Conv / Gemm / MatMul with a constant "
                                 f"weight, then at most a bias Add; its parts compute "
                                 f"{' -> '.join(n.op_type for n in nodes)}")
    if [u for p in region.parts for u in p.units] != list(range(region.units)):
        raise NotLinearError(f"{where}: parity needs its parts to hold consecutive units in order")
    head, add = ops[0][0], ops[0][1] if len(ops[0]) > 1 else None
    w_axis = weight_axes(head, ed.array(head.input[1]).ndim)[0]
    weight = np.concatenate([ed.array(nodes[0].input[1]) for nodes in ops], axis=w_axis)
    bias_parts = [_part_bias(ed, nodes, len(p.units)) for nodes, p in zip(ops, region.parts)]
    shape, axis = bias_parts[0][1], bias_parts[0][2]
    return _Linear(head, add, weight, w_axis, np.concatenate([b for b, _, _ in bias_parts]), shape, axis)


def _is_linear(ed: Editor, nodes: list[onnx.NodeProto]) -> bool:
    head = nodes[0]
    if head.op_type not in WEIGHTED or len(head.input) < 2 or not ed.is_const(head.input[1]):
        return False
    if head.op_type == "Conv" and attr(head, "group", 1) != 1:
        return False
    if len(head.input) > 2 and head.input[2] and not ed.is_const(head.input[2]):
        return False
    if len(nodes) == 1:
        return True
    add = nodes[1]
    return len(nodes) == 2 and add.op_type == "Add" and head.output[0] in add.input and \
        any(ed.is_const(i) for i in add.input if i != head.output[0])


def _part_bias(ed: Editor, nodes: list[onnx.NodeProto], units: int) -> tuple[np.ndarray, tuple[int, ...], int]:
    """(one bias value per unit, the bias constant's shape, its unit axis); a bias-free layer has zeros."""
    head = nodes[0]
    if len(nodes) == 1:
        b = ed.array(head.input[2]) if len(head.input) > 2 and head.input[2] else np.zeros(1, np.float32)
        return np.broadcast_to(b.reshape(-1), (units,)).astype(np.float32), (units,), 0
    add = nodes[1]
    b = ed.array(next(i for i in add.input if i != head.output[0]))
    axis = max(range(b.ndim), key=lambda a: b.shape[a]) if b.ndim else 0
    shape = tuple(b.shape) if b.ndim else (1,)
    return np.broadcast_to(b.reshape(-1), (units,)).astype(b.dtype), shape, axis


def _coded_weights(lin: _Linear, ranges: Sequence[tuple[int, int]], width: int) -> tuple[np.ndarray, np.ndarray]:
    """The sum of the parts' weight and bias slices, each zero-padded to `width` units."""
    w_shape = list(lin.weight.shape)
    w_shape[lin.out_axis] = width
    weight = np.zeros(w_shape, dtype=lin.weight.dtype)
    bias = np.zeros(width, dtype=lin.bias.dtype)
    for a, b in ranges:
        index = [slice(None)] * weight.ndim
        index[lin.out_axis] = slice(0, b - a)
        weight[tuple(index)] += np.take(lin.weight, np.arange(a, b), axis=lin.out_axis)
        bias[:b - a] += lin.bias[a:b]
    return weight, bias


def _layer(ed: Editor, lin: _Linear, source: str, weight: np.ndarray, bias: np.ndarray,
           tag: str) -> list[onnx.NodeProto]:
    """The layer's nodes for `weight` and per-unit `bias` (in the form the region's parts had)."""
    ins = [source, ed.const(f"{lin.head.input[1]}{tag}", weight)]
    if lin.add is None and len(lin.head.input) > 2 and lin.head.input[2]:
        ins.append(ed.const(f"{lin.head.input[2]}{tag}", bias))
    head = ed.clone(lin.head, f"{lin.head.name}{tag}", ins)
    nodes = [head]
    if lin.add is not None:
        shape = list(lin.bias_shape)
        shape[lin.bias_axis] = len(bias)
        const = ed.const(f"{lin.add.name}{tag}/bias", bias.reshape(shape))
        first = list(lin.add.input).index(lin.head.output[0]) if lin.head.output[0] in lin.add.input else 0
        nodes.append(ed.clone(lin.add, f"{lin.add.name}{tag}", [head.output[0], const][::1 if first == 0 else -1]))
    ed.nodes.extend(nodes)
    return nodes


def _rewire(ed: Editor, region: Region, outputs: Sequence[str]) -> None:
    """The region's Concat reads the new parts' outputs in place of the old ones."""
    combine = ed.node(region.combine_node)
    old = list(region.outputs)
    if [i for i in combine.input if i in old] != old:
        raise NotLinearError(f"region {region.name!r}: its Concat does not read its parts in order")
    rest = [i for i in combine.input if i not in old]
    del combine.input[:]
    combine.input.extend([*outputs, *rest])


def rotation(region: Region, k: int) -> CodedRequest:
    """The k-th coded region's devices: the coded part on the k-th of its devices (mod N), the parts on the
    others, so no device holds every coded part."""
    devices = list(dict.fromkeys(p.device for p in region.parts if p.device is not None))
    if len(devices) < 2:
        raise NotLinearError(f"region {region.name!r}: parity needs at least 2 devices, got {devices}")
    coded = devices[k % len(devices)]
    return CodedRequest(region.name, tuple(d for d in devices if d != coded), coded)


def placement_with(placement: Mapping[str, str], graph: Graph, added: Mapping[str, str]) -> dict[str, str]:
    """The placement of `graph`'s nodes: the old one for nodes kept, `added` for new ones."""
    names = {n.name for n in graph.model.graph.node}
    return {n: d for n, d in {**placement, **added}.items() if n in names}
