"""Which elements of a column-parallel -> row-parallel region must stay on one device.

A region starts at *entry* MatMuls (activation x 2-D weight, split by output columns) and ends at one *exit*
MatMul (split by its contracted rows, giving partial sums). Every entry column gets a label; labels flow forward
through the region along one *split axis* per tensor and are united wherever the math ties elements together (the
d columns a head is reshaped from; query head i meeting key head i//r in QK^T). The union-find classes are the
atoms a part may take (a head group, an MLP neuron). An op that would mix classes (a reduction or a contraction over
the split axis, an op the rules do not know) rejects the region with the node's name and the reason.

Shapes are concrete (one onnxruntime run on sample inputs), so reshapes of any exporter are followed exactly.
A fused q/k/v output reshaped to [..., 3, H, d] (timm) keeps one label row per segment until it is unbound.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx

from edgesplit.rewrite.base import attr

ELEMENTWISE = frozenset({
    "Abs", "Add", "And", "BitwiseAnd", "Cast", "CastLike", "Ceil", "Clip", "Cos", "Div", "Dropout", "Elu", "Equal",
    "Erf", "Exp", "Floor", "Gelu", "Greater", "GreaterOrEqual", "HardSigmoid", "HardSwish", "Identity", "IsInf",
    "IsNaN", "LeakyRelu", "Less", "LessOrEqual", "Log", "Max", "Min", "Mish", "Mod", "Mul", "Neg", "Not", "Or",
    "Pow", "PRelu", "Reciprocal", "Relu", "Round", "Selu", "Sigmoid", "Sign", "Sin", "Softplus", "Softsign", "Sqrt",
    "Sub", "Tanh", "Where", "Xor", "FastGelu", "QuickGelu", "BiasGelu",
})
AXIS_OPS = frozenset({"Softmax", "LogSoftmax", "Hardmax"})  # act along one axis
RESHAPES = frozenset({"Reshape", "Flatten", "Squeeze", "Unsqueeze"})
REDUCES = frozenset({"ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL2", "ReduceL1",
                     "ReduceLogSumExp", "ReduceSumSquare"})
SHAPE_ONLY = frozenset({"Shape", "Size"})


class Rejected(Exception):
    """The region cannot be split; `node` names where and `reason` says why."""

    def __init__(self, node: str, reason: str) -> None:
        self.node, self.reason = node, reason
        super().__init__(f"node {node!r}: {reason}")


@dataclass(frozen=True)
class Split:
    """A tensor split along `axis`; `labels[i]` is the label of element i along that axis.

    With `seg` (a fused q/k/v tensor reshaped to [..., 3, H, d]), `labels[s, i]` labels segment s (q, k or v) of
    head i: the tensor is still split along the head axis only, and an unbind along `seg` ends the fusion.
    """

    axis: int
    labels: np.ndarray
    seg: int | None = None


@dataclass
class Labels:
    """Union-find over entry-column labels plus the per-tensor split axes of one region."""

    size: int
    parent: np.ndarray = field(init=False)
    tensors: dict[str, Split] = field(default_factory=dict)
    # (node, input index, axis of that input, output whose split it follows): outside tensors each part slices
    slices: list[tuple[str, int, int, str]] = field(default_factory=list)
    reasons: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.parent = np.arange(self.size)

    def find(self, x: int) -> int:
        root = x
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[x] != root:
            self.parent[x], x = root, self.parent[x]
        return int(root)

    def union(self, a: np.ndarray, b: np.ndarray) -> None:
        for x, y in zip(a.tolist(), b.tolist()):
            rx, ry = self.find(x), self.find(y)
            if rx != ry:
                self.parent[max(rx, ry)] = min(rx, ry)

    def classes(self, labels: np.ndarray) -> np.ndarray:
        for x in np.unique(labels).tolist():  # compress paths, then one vectorised lookup
            self.find(x)
        return self.parent[self.parent[labels]]


def propagate(
    nodes: Sequence[onnx.NodeProto],
    entries: Mapping[str, int],
    exit_node: str,
    shapes: Mapping[str, tuple[int, ...]],
    values: Mapping[str, np.ndarray],
    inits: Mapping[str, onnx.TensorProto],
    n_labels: int,
) -> Labels:
    """Label the region's tensors. `entries` maps entry node name -> first label of its output columns."""
    lab = Labels(n_labels)
    produced = {o for n in nodes for o in n.output}
    for node in nodes:
        if node.name in entries:
            width = shapes[node.output[0]][-1]
            first = entries[node.name]
            lab.tensors[node.output[0]] = Split(len(shapes[node.output[0]]) - 1, np.arange(first, first + width))
            continue
        if node.name == exit_node:
            a = lab.tensors.get(node.input[0])
            if a is None or a.axis != len(shapes[node.input[0]]) - 1:
                raise Rejected(node.name, "the output projection's input is not split along its contracted axis")
            continue
        split = [lab.tensors.get(i) if i else None for i in node.input]
        if not any(s is not None for s in split):
            continue  # shape arithmetic and constants: copied per part, rewritten where they meet a split axis
        if any(s is not None and s.seg is not None for s in split):
            _SEG_RULES.get(node.op_type, _unknown)(node, split, lab, shapes, values, inits, produced)
            continue
        _RULES.get(node.op_type, _unknown)(node, split, lab, shapes, values, inits, produced)
    return lab


def _unknown(node, split, lab, shapes, values, inits, produced) -> None:
    raise Rejected(node.name, f"no splitting rule for op {node.op_type} on a tensor split by heads/neurons")


def _out_split(node: onnx.NodeProto, lab: Labels, axis: int, labels: np.ndarray, k: int = 0) -> None:
    lab.tensors[node.output[k]] = Split(axis, labels)


def _align_inputs(node, split, lab, shapes, inits, produced, out_rank: int,
                  inputs: Sequence[int]) -> tuple[int, np.ndarray]:
    """Broadcasting inputs: the split axes must agree from the right; unsplit full-size inputs get sliced."""
    axis, labels = None, None
    for k in inputs:
        s = split[k] if k < len(split) else None
        if s is None:
            continue
        a = s.axis + out_rank - len(shapes[node.input[k]])
        if axis is None:
            axis, labels = a, s.labels
        elif a != axis or len(s.labels) != len(labels):
            raise Rejected(node.name, "its inputs are split along different axes")
        else:
            lab.union(labels, s.labels)
    assert axis is not None and labels is not None
    for k in inputs:
        if k >= len(node.input) or not node.input[k] or split[k] is not None:
            continue
        name = node.input[k]
        shape = shapes[name]
        a = axis - (out_rank - len(shape))
        if a < 0 or shape[a] == 1:
            continue
        if shape[a] != len(labels):
            raise Rejected(node.name, f"input {name!r} has {shape[a]} elements on the split axis, "
                                      f"expected {len(labels)}")
        if name in produced and name not in inits:
            raise Rejected(node.name, f"input {name!r} is computed inside the region with the full split axis")
        lab.slices.append((node.name, k, a, node.output[0]))
    return axis, labels


def _elementwise(node, split, lab, shapes, values, inits, produced) -> None:
    out_rank = len(shapes[node.output[0]])
    axis, labels = _align_inputs(node, split, lab, shapes, inits, produced, out_rank, range(len(node.input)))
    _out_split(node, lab, axis, labels)
    if node.op_type == "Dropout" and len(node.output) > 1 and node.output[1]:
        _out_split(node, lab, axis, labels, 1)


def _axis_op(node, split, lab, shapes, values, inits, produced) -> None:
    rank = len(shapes[node.output[0]])
    axis = attr(node, "axis", -1) % rank
    if split[0] is not None and split[0].axis == axis:
        raise Rejected(node.name, f"{node.op_type} normalises over the split axis {axis}")
    _elementwise(node, split, lab, shapes, values, inits, produced)


def _layer_norm(node, split, lab, shapes, values, inits, produced) -> None:
    rank = len(shapes[node.input[0]])
    start = attr(node, "axis", -1) % rank
    if split[0] is None or split[0].axis >= start:
        raise Rejected(node.name, "LayerNormalization normalises over the split axis")
    _out_split(node, lab, split[0].axis, split[0].labels)


def _reduce(node, split, lab, shapes, values, inits, produced) -> None:
    s = split[0]
    if s is None:
        raise Rejected(node.name, "reduces a tensor computed from split inputs")
    rank = len(shapes[node.input[0]])
    axes = attr(node, "axes")
    if axes is None and len(node.input) > 1 and node.input[1]:
        axes = values.get(node.input[1])
    axes = list(range(rank)) if axes is None or len(axes) == 0 else [int(a) % rank for a in np.ravel(axes)]
    if s.axis in axes:
        raise Rejected(node.name, f"{node.op_type} reduces over the split axis")
    keep = attr(node, "keepdims", 1)
    _out_split(node, lab, s.axis if keep else s.axis - sum(a < s.axis for a in axes), s.labels)


def _transpose(node, split, lab, shapes, values, inits, produced) -> None:
    rank = len(shapes[node.input[0]])
    perm = list(attr(node, "perm", list(range(rank))[::-1]))
    _out_split(node, lab, perm.index(split[0].axis), split[0].labels)


def remap(s: Split, src: Sequence[int], dst: Sequence[int], node: str, lab: Labels | None) -> Split:
    """The split axis through a row-major reshape from `src` to `dst` (same elements, same order)."""
    outer, inner, n = math.prod(src[: s.axis]), math.prod(src[s.axis + 1:]), src[s.axis]
    for j in range(len(dst)):
        if dst[j] != 1 and math.prod(dst[:j]) == outer and math.prod(dst[j:]) == n * inner:
            break
    else:
        raise Rejected(node, f"reshape {list(src)} -> {list(dst)} mixes the split axis {s.axis} with other axes")
    inner_out = math.prod(dst[j + 1:])
    pieces = [d for d in dst[j:] if d != 1]
    if inner == 1 and len(pieces) > 2:
        if len(pieces) != 3 or len(dst) < j + 3 or dst[j:j + 3] != type(dst)(pieces) or lab is None:
            raise Rejected(node, f"reshape {list(src)} -> {list(dst)} splits the split axis into {pieces}, "
                                 "expected [segments, heads, head_dim]")
        seg, heads, dim = pieces  # fused q/k/v as [..., 3, H, d]: split along H, one label row per segment
        cells = s.labels.reshape(seg * heads, dim)
        for c in range(1, dim):
            lab.union(cells[:, 0], cells[:, c])
        return Split(j + 1, cells[:, 0].reshape(seg, heads).copy(), seg=j)
    if inner_out >= inner:
        if inner_out % inner:
            raise Rejected(node, f"reshape {list(src)} -> {list(dst)} cuts across split elements")
        k = inner_out // inner
        groups = s.labels.reshape(dst[j], k)
        if lab is not None:
            for c in range(1, k):
                lab.union(groups[:, 0], groups[:, c])
        return Split(j, groups[:, 0].copy())
    if inner % inner_out:
        raise Rejected(node, f"reshape {list(src)} -> {list(dst)} cuts across split elements")
    return Split(j, np.repeat(s.labels, inner // inner_out))


def _reshape(node, split, lab, shapes, values, inits, produced) -> None:
    s = split[0]
    if s is None:
        raise Rejected(node.name, "its shape input comes from a split tensor but its data does not")
    lab.tensors[node.output[0]] = remap(s, shapes[node.input[0]], shapes[node.output[0]], node.name, lab)


def _expand(node, split, lab, shapes, values, inits, produced) -> None:
    s = split[0]
    if s is None:
        raise Rejected(node.name, "expands to a shape taken from a split tensor")
    src, dst = shapes[node.input[0]], shapes[node.output[0]]
    axis = s.axis + len(dst) - len(src)
    if dst[axis] != src[s.axis]:
        raise Rejected(node.name, "Expand broadcasts along the split axis")
    _out_split(node, lab, axis, s.labels)


def _matmul(node, split, lab, shapes, values, inits, produced) -> None:
    ra, rb, r = len(shapes[node.input[0]]), len(shapes[node.input[1]]), len(shapes[node.output[0]])
    if ra < 2 or rb < 2:
        raise Rejected(node.name, "MatMul with a 1-D operand on a split tensor")
    axes = []
    for k, (rank, contracted, kept) in enumerate(((ra, ra - 1, ra - 2), (rb, rb - 2, rb - 1))):
        s = split[k]
        if s is None:
            continue
        if s.axis == contracted:
            raise Rejected(node.name, "MatMul contracts over the split axis inside the region")
        axes.append((k, r - 2 if (k == 0 and s.axis == kept) else r - 1 if s.axis == kept else s.axis + r - rank))
    if len({a for _, a in axes}) > 1:
        raise Rejected(node.name, "both MatMul operands are split, along different output axes")
    axis = axes[0][1]
    if len(axes) == 2:
        lab.union(split[0].labels, split[1].labels)
    labels = split[axes[0][0]].labels
    if axis < r - 2:  # a batch axis: the other operand must broadcast or be sliced
        other = 1 - axes[0][0] if len(axes) == 1 else None
        if other is not None:
            shape = shapes[node.input[other]]
            a = axis - (r - len(shape))
            if a >= 0 and shape[a] != 1:
                if node.input[other] in produced and node.input[other] not in inits:
                    raise Rejected(node.name, f"operand {node.input[other]!r} is computed in the region unsplit")
                lab.slices.append((node.name, other, a, node.output[0]))
    _out_split(node, lab, axis, labels)


def _concat(node, split, lab, shapes, values, inits, produced) -> None:
    rank = len(shapes[node.output[0]])
    axis = attr(node, "axis") % rank
    first = next(s for s in split if s is not None)
    if first.axis != axis:
        a, labels = _align_inputs(node, split, lab, shapes, inits, produced, rank, range(len(node.input)))
        _out_split(node, lab, a, labels)
        return
    if any(s is None or s.axis != axis for s in split):
        raise Rejected(node.name, "Concat along the split axis of split and unsplit tensors")
    _out_split(node, lab, axis, np.concatenate([s.labels for s in split]))


def _split(node, split, lab, shapes, values, inits, produced) -> None:
    s = split[0]
    rank = len(shapes[node.input[0]])
    axis = attr(node, "axis", 0) % rank
    if s.axis != axis:
        for k, o in enumerate(node.output):
            if o:
                _out_split(node, lab, s.axis, s.labels, k)
        return
    start = 0
    for k, o in enumerate(node.output):
        size = shapes[o][axis]
        if o:
            _out_split(node, lab, axis, s.labels[start:start + size], k)
        start += size


def slice_params(node: onnx.NodeProto, shapes, values) -> dict[int, tuple[int, int, int]]:
    """axis -> (start, end, step) of a Slice, from its (concrete) inputs."""
    rank = len(shapes[node.input[0]])
    get = lambda k: np.ravel(values[node.input[k]]).tolist() if len(node.input) > k and node.input[k] else None
    starts, ends, axes, steps = get(1), get(2), get(3), get(4)
    if starts is None or ends is None:
        raise KeyError(node.input[1])
    axes = axes if axes is not None else list(range(len(starts)))
    steps = steps if steps is not None else [1] * len(starts)
    return {int(a) % rank: (int(b), int(e), int(t)) for a, b, e, t in zip(axes, starts, ends, steps)}


def _slice(node, split, lab, shapes, values, inits, produced) -> None:
    s = split[0]
    if s is None or any(x is not None for x in split[1:]):
        raise Rejected(node.name, "Slice bounds computed from a split tensor")
    try:
        params = slice_params(node, shapes, values)
    except KeyError:
        raise Rejected(node.name, "Slice bounds are not known") from None
    if s.axis not in params:
        _out_split(node, lab, s.axis, s.labels)
        return
    start, end, step = params[s.axis]
    if len(params) > 1 and not all(i in inits for i in node.input[1:3]):
        raise Rejected(node.name, "Slice of the split axis together with other axes whose bounds are computed")
    if step != 1:
        raise Rejected(node.name, "Slice with a step along the split axis")
    picked = s.labels[slice(start, end)]
    if len(picked) != shapes[node.output[0]][s.axis]:
        raise Rejected(node.name, "Slice bounds do not match its output shape")
    _out_split(node, lab, s.axis, picked)


def _gather(node, split, lab, shapes, values, inits, produced) -> None:
    s = split[0]
    if s is None or split[1] is not None:
        raise Rejected(node.name, "Gather with split indices")
    rank = len(shapes[node.input[0]])
    axis = attr(node, "axis", 0) % rank
    if axis == s.axis:
        raise Rejected(node.name, "Gather along the split axis")
    q = len(shapes[node.input[1]])
    _out_split(node, lab, s.axis if s.axis < axis else s.axis + q - 1, s.labels)


def _trilu(node, split, lab, shapes, values, inits, produced) -> None:
    rank = len(shapes[node.input[0]])
    if split[0] is None or split[0].axis >= rank - 2:
        raise Rejected(node.name, "Trilu over the split axis")
    _out_split(node, lab, split[0].axis, split[0].labels)


def _seg_transpose(node, split, lab, shapes, values, inits, produced) -> None:
    s = split[0]
    rank = len(shapes[node.input[0]])
    perm = list(attr(node, "perm", list(range(rank))[::-1]))
    lab.tensors[node.output[0]] = Split(perm.index(s.axis), s.labels, perm.index(s.seg))


def _seg_split(node, split, lab, shapes, values, inits, produced) -> None:
    s = split[0]
    rank = len(shapes[node.input[0]])
    if attr(node, "axis", 0) % rank != s.seg or any(shapes[o][s.seg] != 1 for o in node.output if o):
        raise Rejected(node.name, "splits a fused q/k/v tensor other than into its segments")
    for k, o in enumerate(node.output):
        if o:
            _out_split(node, lab, s.axis, s.labels[k].copy(), k)


def _seg_gather(node, split, lab, shapes, values, inits, produced) -> None:
    s = split[0]
    rank = len(shapes[node.input[0]])
    index = values.get(node.input[1])
    if attr(node, "axis", 0) % rank != s.seg or index is None or np.ndim(index) != 0 or split[1] is not None:
        raise Rejected(node.name, "reads a fused q/k/v tensor other than one segment at a time")
    _out_split(node, lab, s.axis - (s.seg < s.axis), s.labels[int(index)].copy())


def _seg_slice(node, split, lab, shapes, values, inits, produced) -> None:
    s = split[0]
    try:
        params = slice_params(node, shapes, values)
    except KeyError:
        raise Rejected(node.name, "Slice bounds are not known") from None
    if set(params) != {s.seg} or params[s.seg][2] != 1 or any(x is not None for x in split[1:]):
        raise Rejected(node.name, "slices a fused q/k/v tensor other than along its segments")
    rows = s.labels[slice(*params[s.seg][:2])]
    lab.tensors[node.output[0]] = Split(s.axis, rows[0].copy()) if len(rows) == 1 else Split(s.axis, rows, s.seg)


_SEG_RULES = {"Transpose": _seg_transpose, "Split": _seg_split, "Gather": _seg_gather, "Slice": _seg_slice}

_RULES = {
    **{op: _elementwise for op in ELEMENTWISE},
    **{op: _axis_op for op in AXIS_OPS},
    **{op: _reshape for op in RESHAPES},
    **{op: _reduce for op in REDUCES},
    "LayerNormalization": _layer_norm,
    "Transpose": _transpose,
    "Expand": _expand,
    "MatMul": _matmul,
    "Concat": _concat,
    "Split": _split,
    "Slice": _slice,
    "Gather": _gather,
    "Trilu": _trilu,
    "Shape": lambda *a: None,
    "Size": lambda *a: None,
}
