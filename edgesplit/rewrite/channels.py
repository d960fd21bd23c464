"""Channel splits: output channels (lop, combine Concat), input channels (lip, combine Sum), and the ops that follow.

Rules are pattern / check / rewrite: `LOP`, `LIP` and `FOLLOW` map an op type to a function that either
returns the part nodes or raises / returns a reason why it does not apply. The engine walks the graph once in
topological order, keeping for every split tensor its parts; an op whose inputs are all split the same way follows
the split (BatchNorm, activations, pooling, Add of identically split tensors, depthwise Conv, Flatten/Reshape before
a Gemm), a Concat along the split axis takes the parts directly, anything else gets the combined tensor. A split
tensor with several consumers still flows on when they are elementwise ops that reconverge (GELU, x * sigmoid(x));
a per-channel activation such as a squeeze-and-excitation scale is sliced for each part instead of forcing a combine.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import onnx

from edgesplit.cluster import Cluster
from edgesplit.layout import Combine
from edgesplit.graph import Graph
from edgesplit.rewrite.base import (
    Editor, PartRecord, RegionRecord, SplitError, SplitRequest, attr, ranges_from, static_shape, weights_for,
)

Ranges = list[tuple[int, int]]

UNARY = {
    "Relu", "LeakyRelu", "Sigmoid", "Tanh", "Clip", "HardSigmoid", "HardSwish", "Elu", "Selu", "Celu", "Gelu",
    "Softplus", "Softsign", "Abs", "Neg", "Exp", "Log", "Sqrt", "Reciprocal", "Floor", "Ceil", "Round", "Identity",
    "Dropout", "Mish", "Erf", "ThresholdedRelu", "Sign", "Cast",
}
BINARY = {"Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "PRelu"}
POOLS = {"MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "LpPool", "GlobalLpPool"}


@dataclass
class Split:
    """A tensor that currently exists as parts: slices along `axis` (or partial sums when `partial`)."""

    axis: int
    ranges: Ranges
    parts: list[str]
    region: RegionRecord
    partial: bool = False

    def signature(self) -> tuple:
        return (self.axis, tuple(self.ranges), tuple(p.device for p in self.region.parts), self.partial)


class ChannelEngine:
    def __init__(self, editor: Editor, cluster: Cluster) -> None:
        self.ed = editor
        self.graph: Graph = editor.graph
        self.cluster = cluster
        self.split: dict[str, Split] = {}
        self.regions: list[RegionRecord] = []
        self.alias: dict[int, RegionRecord] = {}
        self.why: dict[str, str] = {}  # layer -> why it did not follow a split
        self.fan_ok: set[str] = set()  # split tensors whose several consumers all follow (e.g. x * sigmoid(x))
        self.fan_checked: set[str] = set()
        self.bias: dict[str, str] = {}  # partial-sum tensor -> the bias its combine adds

    # ----- driver -------------------------------------------------------------------------------------------
    def run(self, requests: Sequence[SplitRequest]) -> list[RegionRecord]:
        heads: dict[str, tuple[str, SplitRequest]] = {}
        lip_targets: dict[str, SplitRequest] = {}
        for req in requests:
            first = req.layers[0]
            mode = "lip" if req.kind == "lip" else "lop"
            if first in heads:
                raise SplitError(f"layer {first!r} is in two horizontal regions; expected each layer in at most one")
            heads[first] = (mode, req)
            if req.kind == "fused-channels":
                if len(req.layers) < 2:
                    raise SplitError(f"fused-channels region at {first!r}: expected at least two layers (an "
                                     f"output-channel split, then the layer that takes an input-channel split), "
                                     f"got {list(req.layers)}")
                lip_targets[req.layers[-1]] = req
        consumers = self.graph.consumers()
        outputs = set(self.graph.outputs)
        fused_done: set[str] = set()
        for layer in self.graph.layers:
            name = layer.name
            split_ins = [t for t in layer.inputs if t in self.split]
            if name in self.ed.claimed:  # a part of an earlier region (e.g. a spatial tile): never follows
                for t in split_ins:
                    self._combine(t)
                continue
            node = self.ed.node(name)
            if name in heads:
                mode, req = heads[name]
                for t in split_ins:
                    self._combine(t)
                self._head(node, mode, req)
                continue
            if not split_ins:
                continue
            states = [self.split[t] for t in layer.inputs if t in self.split]
            single = all(t not in outputs and (consumers.get(t) == [name] or self._fans_out(t, consumers, outputs))
                         for t in split_ins)
            if name in lip_targets and len(split_ins) == len(layer.inputs) == 1 and single and not states[0].partial:
                self._lip_follow(node, states[0], lip_targets[name])
                fused_done.add(name)
                continue
            sides_ok = all(t in self.split or _side_input(self, node, t, states[0]) for t in layer.inputs)
            if single and sides_ok and len({s.signature() for s in states}) == 1 \
                    and not states[0].partial and self._follow(node, states):
                continue
            if not single:
                self.why.setdefault(name, "its input is also used elsewhere (or is a model output), so the split is "
                                          "combined first")
            if node.op_type == "Concat" and single and self._concat_merge(node, split_ins):
                continue
            for t in split_ins:
                self._combine(t)
        for t in list(self.split):
            if t in outputs:
                self._combine(t)
        for target, req in lip_targets.items():
            if target not in fused_done:
                raise SplitError(
                    f"fused-channels region {req.layers[0]!r} .. {target!r}: {target!r} does not receive the channel "
                    f"split of {req.layers[0]!r}: {self._chain_reason(req)}; expected only BatchNorm, activations, "
                    f"pooling, depthwise Conv and Flatten/Reshape between an output-channel split and an input-channel "
                    f"split")
        for req in requests:
            missing = [l for l in req.layers if l not in self._covered()]
            if req.kind == "fused-channels" and missing:
                raise SplitError(f"fused-channels region {req.layers[0]!r} .. {req.layers[-1]!r}: layer(s) {missing} "
                                 f"are not on the chain from the first to the last layer")
        return [r for r in self.regions if id(r) not in self.alias]

    def _fans_out(self, tensor: str, consumers, outputs) -> bool:
        if tensor not in self.fan_checked:
            self.fan_checked.add(tensor)
            members = fan_closure(self.graph, tensor, consumers, outputs)
            if members:
                self.fan_ok.add(tensor)
                self.fan_ok.update(self.graph.layer(m).outputs[0] for m in members[:-1])
        return tensor in self.fan_ok

    def _covered(self) -> set[str]:
        return {l for r in self.regions for l in r.layers}

    def _chain_reason(self, req: SplitRequest) -> str:
        for l in req.layers[1:]:
            if l in self.why:
                return f"{l!r} stops it ({self.why[l]})"
        return "a layer on the way is not a single-consumer chain"

    # ----- regions --------------------------------------------------------------------------------------------
    def _region(self, kind: str, layer: str, req: SplitRequest, shares: list[float]) -> RegionRecord:
        total = sum(shares)
        region = RegionRecord(name=f"{kind}:{layer}", kind=kind, layers=[layer],
                              parts=[PartRecord(d, s / total) for d, s in zip(req.devices, shares)])
        self.regions.append(region)
        return region

    def _root(self, r: RegionRecord) -> RegionRecord:
        while id(r) in self.alias:
            r = self.alias[id(r)]
        return r

    def _merge(self, a: RegionRecord, b: RegionRecord) -> RegionRecord:
        a, b = self._root(a), self._root(b)
        if a is b:
            return a
        for pa, pb in zip(a.parts, b.parts):
            pa.nodes.extend(pb.nodes)
        a.layers.extend(l for l in b.layers if l not in a.layers)
        a.scatter.extend(b.scatter)
        self.alias[id(b)] = a
        for s in self.split.values():
            s.region = self._root(s.region)
        return a

    def _emit(self, removed: str | None, nodes: list[onnx.NodeProto]) -> None:
        if removed is None:
            self.ed.nodes.extend(nodes)  # order is fixed by the topological sort in build()
        else:
            self.ed.replace([removed], nodes)

    # ----- heads ----------------------------------------------------------------------------------------------
    def _head(self, node: onnx.NodeProto, mode: str, req: SplitRequest) -> None:
        rule = LOP if mode == "lop" else LIP
        if node.op_type not in rule:
            kinds = "Conv (incl. grouped), Gemm and MatMul with a constant weight" if mode == "lop" else \
                "Conv (group 1), Gemm and MatMul with a constant weight"
            which = "output" if mode == "lop" else "input"
            raise SplitError(f"layer {node.name!r} ({node.op_type}) cannot be split by {which} channels ({mode}); "
                             f"expected one of: {kinds}")
        weights = weights_for(req, self.cluster)
        axis, ranges, build = rule[node.op_type](self, node, weights, req.points)
        kind = req.kind if req.kind == "fused-channels" else mode
        region = self._region(kind, node.name, req, [float(b - a) for a, b in ranges])
        parts, new = [], []
        for i, (a, b) in enumerate(ranges):
            made, scatter = build(i, a, b)
            new.extend(scatter)
            region.scatter.extend(n.name for n in scatter)
            new.extend(made)
            region.parts[i].nodes.extend(n.name for n in made)
            parts.append(made[-1].output[0])
        self._emit(node.name, new)
        self.split[node.output[0]] = Split(axis, ranges, parts, region, partial=(mode == "lip"))

    def _lip_follow(self, node: onnx.NodeProto, state: Split, req: SplitRequest) -> None:
        if node.op_type not in LIP:
            raise SplitError(f"fused-channels region ending at {node.name!r} ({node.op_type}): expected the last "
                             f"layer to be a Conv (group 1), Gemm or MatMul with a constant weight")
        axis, _, build = LIP[node.op_type](self, node, [1.0] * len(state.ranges), None, given=state)
        if axis is None:
            raise SplitError(f"fused-channels region ending at {node.name!r}: {build}")
        new, parts = [], []
        for i, (a, b) in enumerate(state.ranges):
            made, _ = build(i, a, b)
            new.extend(made)
            state.region.parts[i].nodes.extend(n.name for n in made)
            parts.append(made[-1].output[0])
        state.region.layers.append(node.name)
        self._emit(node.name, new)
        del self.split[node.input[0]]
        self.split[node.output[0]] = Split(state.axis, state.ranges, parts, state.region, partial=True)

    # ----- followers ------------------------------------------------------------------------------------------
    def _follow(self, node: onnx.NodeProto, states: list[Split]) -> bool:
        rule = FOLLOW.get(node.op_type)
        if rule is None or len(node.output) != 1 and node.op_type != "Dropout":
            self.why.setdefault(node.name, f"{node.op_type} does not follow a channel split")
            return False
        state = states[0]
        result = rule(self, node, state)
        if isinstance(result, str):
            self.why.setdefault(node.name, result)
            return False
        ranges, build = result
        region = state.region
        for s in states[1:]:
            region = self._merge(region, s.region)
        new, parts = [], []
        for i, (a, b) in enumerate(state.ranges):
            made = build(i, a, b)
            new.extend(made)
            region.parts[i].nodes.extend(n.name for n in made)
            parts.append(made[-1].output[0])
        region.layers.append(node.name)
        self._emit(node.name, new)
        for t in {t for t in node.input if t in self.split and t not in self.fan_ok}:
            del self.split[t]  # a fanned-out tensor stays: its other consumers follow it too
        self.split[node.output[0]] = Split(state.axis if node.op_type not in ("Flatten", "Reshape") else 1,
                                           ranges, parts, region)
        return True

    def _concat_merge(self, node: onnx.NodeProto, split_ins: list[str]) -> bool:
        """A Concat along the split axis takes the parts in place of the combined tensor: it becomes the combine."""
        rank = len(self.graph.tensors[node.output[0]].shape)
        axis = attr(node, "axis", 0) % rank
        if any(self.split[t].partial or self.split[t].axis != axis for t in split_ins):
            return False
        inputs = []
        for t in node.input:
            if t in self.split:
                s = self.split.pop(t)
                inputs.extend(s.parts)
                self._combined(self._root(s.region), node.name, s)
            else:
                inputs.append(t)
        del node.input[:]
        node.input.extend(inputs)
        return True

    def _combine(self, tensor: str) -> None:
        s = self.split.pop(tensor, None)
        if s is None:
            return
        region = self._root(s.region)
        base = f"{region.layers[0]}/combine"
        bias = self.bias.pop(tensor, None) if s.partial else None
        if bias is not None:
            node = self.ed.make("Sum", s.parts, base)
            add = self.ed.make("Add", [node.output[0], bias], f"{base}/bias", outputs=[tensor])
            self._combined(region, node.name, s)
            region.combine_nodes.append(add.name)
            self._emit(None, [node, add])
            return
        node = self.ed.make("Sum", s.parts, base, outputs=[tensor]) if s.partial else \
            self.ed.make("Concat", s.parts, base, {"axis": s.axis}, outputs=[tensor])
        self._combined(region, node.name, s)
        self._emit(None, [node])

    @staticmethod
    def _combined(region: RegionRecord, node: str, s: Split) -> None:
        region.combine = node
        region.combine_nodes.append(node)
        region.merge = Combine.SUM if s.partial else Combine.CONCAT
        region.axis = s.axis
        region.set_units(s.ranges)
        for p, out in zip(region.parts, s.parts):
            p.output = out


# ----- lop / lip rules: (engine, node, weights, points) -> (axis, ranges, build(i, a, b) -> (nodes, scatter)) ---
def _weight(e: ChannelEngine, node: onnx.NodeProto, index: int, what: str) -> np.ndarray:
    if len(node.input) <= index or not e.ed.is_const(node.input[index]):
        raise SplitError(f"layer {node.name!r} ({node.op_type}): its {what} is not a constant weight, so it cannot be "
                         f"split by channels; expected an initializer")
    return e.ed.array(node.input[index])


def _bias(e: ChannelEngine, node: onnx.NodeProto, index: int) -> np.ndarray | None:
    if len(node.input) <= index or not node.input[index]:
        return None
    return _weight(e, node, index, "bias")


def _conv_lop(e: ChannelEngine, node, weights, points):
    w, bias = _weight(e, node, 1, "weight W"), _bias(e, node, 2)
    groups = attr(node, "group", 1)
    cout, cin_g = w.shape[0], w.shape[1]
    cout_g = cout // groups
    what = f"layer {node.name!r} (Conv, {cout} output channels{f', {groups} groups' if groups > 1 else ''})"
    ranges = ranges_from(cout, weights, points, what, unit=cout_g if groups > 1 else 1)

    def build(i, a, b):
        p = f"{node.name}/part{i}"
        ins = [node.input[0], e.ed.const(f"{p}/W", w[a:b])]
        if bias is not None:
            ins.append(e.ed.const(f"{p}/B", bias[a:b]))
        scatter = []
        if groups > 1:
            g0, g1 = a // cout_g, b // cout_g
            if (g0, g1) != (0, groups):
                cut = e.ed.slice_node(node.input[0], [1], [g0 * cin_g], [g1 * cin_g], f"{p}/scatter")
                scatter, ins[0] = [cut], cut.output[0]
            return [e.ed.clone(node, p, ins, {"group": g1 - g0})], scatter
        return [e.ed.clone(node, p, ins)], scatter

    return 1, ranges, build


def _gemm_lop(e: ChannelEngine, node, weights, points):
    b_w = _weight(e, node, 1, "input B")
    trans_b = attr(node, "transB", 0)
    n = b_w.shape[0] if trans_b else b_w.shape[1]
    c = _bias(e, node, 2)
    ranges = ranges_from(n, weights, points, f"layer {node.name!r} (Gemm, {n} output neurons)")

    def build(i, a, b):
        p = f"{node.name}/part{i}"
        ins = [node.input[0], e.ed.const(f"{p}/B", b_w[a:b] if trans_b else b_w[:, a:b])]
        if c is not None:
            ins.append(e.ed.const(f"{p}/C", c[..., a:b] if c.ndim and c.shape[-1] == n and n > 1 else c))
        return [e.ed.clone(node, p, ins)], []

    return 1, ranges, build


def _matmul_lop(e: ChannelEngine, node, weights, points):
    w = _weight(e, node, 1, "second input")
    if w.ndim != 2:
        raise SplitError(f"layer {node.name!r} (MatMul): expected a 2-D constant weight, got shape {list(w.shape)}")
    n = w.shape[1]
    ranges = ranges_from(n, weights, points, f"layer {node.name!r} (MatMul, {n} output features)")
    axis = len(e.graph.tensors[node.output[0]].shape) - 1

    def build(i, a, b):
        p = f"{node.name}/part{i}"
        return [e.ed.clone(node, p, [node.input[0], e.ed.const(f"{p}/W", w[:, a:b])])], []

    return axis, ranges, build


def _input_axis(e: ChannelEngine, node: onnx.NodeProto) -> int:
    if node.op_type == "Conv":
        return 1
    if node.op_type == "Gemm":
        return 0 if attr(node, "transA", 0) else 1
    return len(e.graph.tensors[node.input[0]].shape) - 1


def _lip(e: ChannelEngine, node, weights, points, given: Split | None = None):
    """Input-channel split of Conv (group 1), Gemm, MatMul: weight slices, combine Sum, then the bias."""
    op = node.op_type
    if op == "Conv":
        w = _weight(e, node, 1, "weight W")
        if attr(node, "group", 1) != 1:
            msg = (f"layer {node.name!r} (Conv, group {attr(node, 'group', 1)}): a grouped Conv's input channels are "
                   f"its groups; expected group 1 for an input-channel split (use lop to split it by groups)")
            if given is not None:
                return None, None, msg
            raise SplitError(msg)
        k, wslice = w.shape[1], (lambda a, b: w[:, a:b])
    elif op == "Gemm":
        w = _weight(e, node, 1, "input B")
        trans_b = attr(node, "transB", 0)
        k, wslice = w.shape[1] if trans_b else w.shape[0], (lambda a, b: w[:, a:b] if trans_b else w[a:b])
    else:
        w = _weight(e, node, 1, "second input")
        if w.ndim != 2:
            raise SplitError(f"layer {node.name!r} (MatMul): expected a 2-D constant weight, got shape {list(w.shape)}")
        k, wslice = w.shape[0], (lambda a, b: w[a:b])
    axis = _input_axis(e, node)
    if len(node.input) > 2 and node.input[2]:  # added once after the Sum: every part is a pure partial sum
        e.bias[node.output[0]] = _lip_bias(e, node)
    if given is not None:
        if given.axis != axis or given.ranges[-1][1] != k:
            return None, None, (f"{node.name!r} ({op}) reads the split along axis {axis} with {k} inputs, but the "
                                f"split is along axis {given.axis} over {given.ranges[-1][1]}")
        ranges = given.ranges
    else:
        ranges = ranges_from(k, weights, points, f"layer {node.name!r} ({op}, {k} input channels)")

    def build(i, a, b):
        p = f"{node.name}/part{i}"
        scatter = []
        x = given.parts[i] if given is not None else node.input[0]
        if given is None:
            cut = e.ed.slice_node(x, [axis], [a], [b], f"{p}/scatter")
            scatter, x = [cut], cut.output[0]
        return [e.ed.clone(node, p, [x, e.ed.const(f"{p}/W", wslice(a, b))])], scatter

    return axis, ranges, build


def _lip_bias(e: ChannelEngine, node: onnx.NodeProto) -> str:
    """The bias term of a layer split by input channels, shaped to add to the summed parts."""
    bias = e.ed.array(node.input[2]) if e.ed.is_const(node.input[2]) else None
    if bias is None:
        raise SplitError(f"layer {node.name!r} ({node.op_type}): its bias is not a constant; expected an initializer")
    if node.op_type == "Conv":  # [C] -> [C, 1, ...] against [N, C, spatial...]
        rank = len(e.graph.tensors[node.output[0]].shape)
        bias = bias.reshape(-1, *([1] * (rank - 2)))
    elif node.op_type == "Gemm":
        bias = bias * np.asarray(attr(node, "beta", 1.0), dtype=bias.dtype)
    return e.ed.const(f"{node.name}/bias", bias)


LOP: dict[str, Callable] = {"Conv": _conv_lop, "Gemm": _gemm_lop, "MatMul": _matmul_lop}
LIP: dict[str, Callable] = {"Conv": _lip, "Gemm": _lip, "MatMul": _lip}


# ----- follower rules: (engine, node, state) -> (new ranges, build(i, a, b) -> nodes) or a reason string ------------
def _slice_const(e: ChannelEngine, node, name: str, rank: int, axis: int, a: int, b: int, p: str) -> str:
    c = e.ed.array(name)
    ax = axis - (rank - c.ndim)
    if ax < 0 or c.shape[ax] == 1:
        return name
    return e.ed.const(f"{p}/{name.rsplit('/', 1)[-1]}", np.take(c, range(a, b), axis=ax))


def _side_input(e: ChannelEngine, node: onnx.NodeProto, tensor: str, state: Split) -> bool:
    """An unsplit activation that an elementwise op may slice per part: one value per channel (and sample), like
    the scale of a squeeze-and-excitation block; small, so sending it whole to every part costs little."""
    if node.op_type not in BINARY or state.axis != 1:
        return False
    shape = e.graph.tensors[tensor].shape
    rank = len(e.graph.tensors[node.output[0]].shape)
    return len(shape) == rank >= 2 and shape[1] in (1, state.ranges[-1][1]) and all(d == 1 for d in shape[2:])


def _f_elementwise(e: ChannelEngine, node, state: Split):
    rank = len(e.graph.tensors[node.output[0]].shape)
    for t in node.input:
        if t and t not in e.split and not e.ed.is_const(t) and not _side_input(e, node, t, state):
            return f"{node.op_type} mixes the split tensor with {t!r}, which is not split the same way"

    def build(i, a, b):
        p = f"{node.name}/part{i}"
        made, ins = [], []
        for t in node.input:
            if t in e.split:
                ins.append(e.split[t].parts[i])
            elif t and not e.ed.is_const(t):  # a per-channel side input: this part's channels of it
                whole = e.graph.tensors[t].shape[1] != 1
                cut = e.ed.slice_node(t, [1], [a], [b], f"{p}/side") if whole else None
                made += [cut] if cut else []
                ins.append(cut.output[0] if cut else t)
            else:
                ins.append(_slice_const(e, node, t, rank, state.axis, a, b, p) if t else t)
        out = e.ed.clone(node, p, ins)
        del out.output[1:]
        return made + [out]

    return state.ranges, build


def _f_per_channel(e: ChannelEngine, node, state: Split):
    """BatchNorm / InstanceNorm: every parameter input is per channel along axis 1."""
    if state.axis != 1 or len(node.output) != 1:
        return f"{node.op_type} normalises along axis 1, the split is along axis {state.axis}"

    def build(i, a, b):
        p = f"{node.name}/part{i}"
        ins = [state.parts[i]] + [e.ed.const(f"{p}/{k}", e.ed.array(t)[a:b]) for k, t in enumerate(node.input[1:])]
        return [e.ed.clone(node, p, ins)]

    if not all(e.ed.is_const(t) for t in node.input[1:]):
        return f"{node.op_type} has non-constant parameters"
    return state.ranges, build


def _f_pool(e: ChannelEngine, node, state: Split):
    if state.axis != 1 or len(node.output) != 1:
        return f"{node.op_type} pools within a channel; it follows only a split along axis 1 with one output"

    def build(i, a, b):
        return [e.ed.clone(node, f"{node.name}/part{i}", [state.parts[i]])]

    return state.ranges, build


def _f_grouped_conv(e: ChannelEngine, node, state: Split):
    groups = attr(node, "group", 1)
    if groups == 1 or state.axis != 1 or not e.ed.is_const(node.input[1]):
        return "a Conv with group 1 needs every input channel (split it with lip instead)"
    w, bias = e.ed.array(node.input[1]), _bias(e, node, 2)
    cin_g, cout_g = w.shape[1], w.shape[0] // groups
    if any(a % cin_g or b % cin_g for a, b in state.ranges):
        return f"the split {state.ranges} does not align with its {groups} groups of {cin_g} channels"
    ranges = [(a // cin_g * cout_g, b // cin_g * cout_g) for a, b in state.ranges]

    def build(i, a, b):
        p = f"{node.name}/part{i}"
        o0, o1 = ranges[i]
        ins = [state.parts[i], e.ed.const(f"{p}/W", w[o0:o1])]
        if bias is not None:
            ins.append(e.ed.const(f"{p}/B", bias[o0:o1]))
        return [e.ed.clone(node, p, ins, {"group": (b - a) // cin_g})]

    return ranges, build


def _f_flatten(e: ChannelEngine, node, state: Split):
    shape = static_shape(e.graph, node.input[0])
    if state.axis != 1 or len(shape) < 2 or any(d < 0 for d in shape[2:]):
        return "Flatten follows only a split along axis 1 of a tensor with static trailing dims"
    factor = math.prod(shape[2:])
    if node.op_type == "Flatten":
        if attr(node, "axis", 1) != 1:
            return "Flatten follows only with axis 1"
        make_ins = lambda i, a, b, p: [state.parts[i]]  # noqa: E731
    else:
        if not e.ed.is_const(node.input[1]):
            return "Reshape with a computed shape does not follow a split"
        target = [int(x) for x in e.ed.array(node.input[1])]
        out = static_shape(e.graph, node.output[0])
        if len(out) != 2 or out[1] != shape[1] * factor or target[0] == -1 and target[1] == -1:
            return f"Reshape to {target} is not a flatten of the channel dims (expected [N, {shape[1] * factor}])"
        make_ins = lambda i, a, b, p: [state.parts[i], e.ed.const(f"{p}/shape", np.array(  # noqa: E731
            [target[0], (b - a) * factor] if target[0] != -1 else [-1, (b - a) * factor], dtype=np.int64))]

    def build(i, a, b):
        p = f"{node.name}/part{i}"
        return [e.ed.clone(node, p, make_ins(i, a, b, p))]

    return [(a * factor, b * factor) for a, b in state.ranges], build


FOLLOW: dict[str, Callable] = {
    **{op: _f_elementwise for op in UNARY | BINARY},
    "BatchNormalization": _f_per_channel, "InstanceNormalization": _f_per_channel,
    **{op: _f_pool for op in POOLS},
    "Conv": _f_grouped_conv, "Flatten": _f_flatten, "Reshape": _f_flatten,
}


def fan_closure(graph: Graph, tensor: str, consumers, outputs) -> list[str] | None:
    """The elementwise ops through which a tensor with several consumers reconverges to one tensor (GELU,
    x * sigmoid(x), ...), in topological order, the last producing that tensor; None if it does not reconverge."""
    pending = {tensor: len(consumers.get(tensor, []))}
    members: list[str] = []
    start = graph.position(consumers[tensor][0]) if consumers.get(tensor) else len(graph.layers)
    for layer in graph.layers[start:]:
        read = [t for t in layer.inputs if t in pending]
        if not read:
            continue
        if layer.op_type not in UNARY | BINARY or len(read) != len(layer.inputs) or len(layer.outputs) != 1:
            return None
        for t in read:
            pending[t] -= 1
            if not pending[t]:
                del pending[t]
        out = layer.outputs[0]
        if out in outputs:
            return None
        members.append(layer.name)
        pending[out] = len(consumers.get(out, []))
        if len(pending) == 1 and pending[out] <= 1:
            return members
    return None


def rewrite(graph: Graph, cluster: Cluster, requests: Sequence[SplitRequest], dims=None) -> Graph:
    """Apply channel-split requests (lop, lip, fused-channels) and return the rewritten Graph."""
    editor = Editor(graph)
    regions = ChannelEngine(editor, cluster).run(requests)
    return editor.build(regions, dims)
