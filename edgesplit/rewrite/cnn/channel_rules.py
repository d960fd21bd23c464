"""The channel-split rules, pattern / check / rewrite: which ops split by channels and how, which follow a split.

`LOP` and `LIP` map an op type to a rule (engine, node, weights, points) -> (axis, ranges, build), where
build(i, a, b) returns part i's nodes and the scatter nodes that cut its input; `FOLLOW` maps an op type to a rule
(engine, node, split) -> (ranges, build) or the reason it does not follow.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import onnx

from edgesplit.graph import Graph
from edgesplit.rewrite.base import RegionRecord, SplitError, attr, ranges_from, static_shape

if TYPE_CHECKING:
    from edgesplit.rewrite.cnn.channels import ChannelEngine

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
        """Splits with the same signature hold the same units in the same parts: an op may take them together."""
        return (self.axis, tuple(self.ranges), self.partial)


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
    unit = cout_g if groups > 1 else 1
    if points is None or not len(points):
        aligned = math.lcm(unit, e.follower_unit(node.name))
        unit = aligned if cout // aligned >= len(weights) else unit  # too few aligned slices: combine before it
    ranges = ranges_from(cout, weights, points, what, unit=unit)

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


def side_input(e: ChannelEngine, node: onnx.NodeProto, tensor: str, state: Split) -> bool:
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
        if t and t not in e.split and not e.ed.is_const(t) and not side_input(e, node, t, state):
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


