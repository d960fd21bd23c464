"""One sub-block becomes parts plus a Sum: entry weights sliced by columns, the exit weight by rows, and the
constants that carry the head / neuron count (reshape and expand shapes, split sizes, slice bounds) rewritten
from the concrete shapes. Split tensors read outside the sub-block (a KV cache) are concatenated back, or, with a
sharded cache, become one model input and output per part.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence

import numpy as np
import onnx
from onnx import helper

from edgesplit.layout import Combine
from edgesplit.rewrite.base import SplitError, attr
from edgesplit.rewrite.transformer.blocks import SubBlock
from edgesplit.rewrite.transformer.labels import Labels, slice_params
from edgesplit.rewrite.transformer.surgery import GATHER, INT_MAX, Built, Piece, Surgery, record, region_name


def split_block(s: Surgery, sub: SubBlock, pieces: Sequence[Piece], block: int) -> list[Built]:
    """The parts of `sub` (one per piece), their Sum (+ the exit's bias, once), and the gathers of its outputs."""
    lab = sub.labels
    exit_node = s.source[sub.exit]
    produced = {o for n in sub.nodes for o in s.source[n].output if o}
    slices = defaultdict(list)
    for node, k, axis, follow in lab.slices:
        slices[node].append((k, axis, follow))
    for p, piece in enumerate(pieces):
        _part(s, sub, p, piece, produced, slices)
        s.localise(piece, sub.x)
    s.removed.update(sub.nodes)
    name = f"{sub.exit}.sum"
    outs = [piece.output for piece in pieces]
    if exit_node.op_type == "Gemm" and len(exit_node.input) > 2 and exit_node.input[2]:
        summed = f"{exit_node.output[0]}.sum"
        s.emit(None, helper.make_node("Sum", outs, [summed], name=name))
        beta = attr(exit_node, "beta", 1.0)
        bias = exit_node.input[2]
        if beta != 1.0:
            bias = s.const(f"{bias}.beta", s.arr(bias) * np.float32(beta))
        s.emit(None, helper.make_node("Add", [summed, bias], [exit_node.output[0]], name=f"{sub.exit}.bias"))
    else:
        s.emit(None, helper.make_node("Sum", outs, [exit_node.output[0]], name=name))
    built = [record(region_name(sub.kind, sub.exit), sub.kind, sub.nodes, name, pieces, block)]
    for reader in sub.shape_reads:
        _shape_read(s, s.source[reader], lab, pieces[0])
    for t in sub.outputs:  # e.g. present key/value: each part's heads, concatenated back in order
        if s.kv_shard and t in s.graph_outputs:
            split = lab.tensors[t]
            s.new_outputs[t] = [(f"{t}.p{p}", split.axis,
                                 np.flatnonzero(np.isin(lab.classes(split.labels), sorted(piece.classes))))
                                for p, piece in enumerate(pieces)]
        else:
            built.append(_gather(s, sub, t, pieces, block))
    return built


def _part(s: Surgery, sub: SubBlock, p: int, piece: Piece, produced: set[str], slices) -> None:
    lab = sub.labels
    cls = np.array(sorted(piece.classes))
    mask = {t: _row(np.isin(lab.classes(split.labels), cls), t) for t, split in lab.tensors.items()}
    idx = {t: np.flatnonzero(m) for t, m in mask.items()}
    rn = lambda t: f"{t}.p{p}" if t in produced else t
    for name in sub.nodes:
        node = s.source[name]
        new = onnx.NodeProto()
        new.CopyFrom(node)
        new.name = f"{name}.p{p}"
        del new.input[:]
        new.input.extend(rn(i) if i else "" for i in node.input)
        del new.output[:]
        new.output.extend(rn(o) if o else "" for o in node.output)
        if name == sub.exit:
            _exit_part(s, new, node, idx[node.input[0]])
            piece.output = new.output[0]
        elif name in sub.entries:
            _entry_part(s, new, node, idx[node.output[0]])
        else:
            _rewrite_shapes(s, new, node, lab, idx, mask, piece)
        for k, axis, follow in slices.get(name, ()):
            new.input[k] = _slice_input(s, node.input[k], axis, idx[follow], piece, f"{name}.p{p}.in{k}", p, sub)
        s.emit(piece, new)


def _shape_read(s: Surgery, node: onnx.NodeProto, lab: Labels, piece: Piece) -> None:
    """An outside Shape of a split tensor: part 0's shape with the full size put back (no gather needed)."""
    t = node.input[0]
    rank = len(s.sample.shapes[t])
    start, end = attr(node, "start", 0), attr(node, "end", rank)
    start, end = start % rank if start < 0 else min(start, rank), end % rank if end < 0 else min(end, rank)
    axis = lab.tensors[t].axis
    own = onnx.NodeProto()
    own.CopyFrom(node)
    own.name, own.input[0] = f"{node.name}.p0", f"{t}.p0"
    s.removed.add(node.name)
    if not start <= axis < end:
        s.emit(piece, own)
        return
    own.output[0] = f"{node.output[0]}.p0"
    s.emit(piece, own)
    _set_element(s, own.output[0], own.output[0], axis - start, len(lab.tensors[t].labels), piece, own.name,
                 output=node.output[0])


def _entry_part(s: Surgery, new: onnx.NodeProto, node: onnx.NodeProto, cols: np.ndarray) -> None:
    w = s.arr(node.input[1])
    trans_b = node.op_type == "Gemm" and attr(node, "transB", 0)
    new.input[1] = s.const(f"{node.input[1]}.{new.name}", w[cols] if trans_b else w[:, cols])
    if node.op_type == "Gemm" and len(node.input) > 2 and node.input[2]:
        c = s.arr(node.input[2])
        if c.ndim and c.shape[-1] > 1:
            new.input[2] = s.const(f"{node.input[2]}.{new.name}", c[..., cols])


def _exit_part(s: Surgery, new: onnx.NodeProto, node: onnx.NodeProto, rows: np.ndarray) -> None:
    w = s.arr(node.input[1])
    trans_b = node.op_type == "Gemm" and attr(node, "transB", 0)
    new.input[1] = s.const(f"{node.input[1]}.{new.name}", w[:, rows] if trans_b else w[rows])
    if node.op_type == "Gemm":
        del new.input[2:]


def _rewrite_shapes(s: Surgery, new: onnx.NodeProto, node: onnx.NodeProto, lab: Labels,
                    idx: Mapping[str, np.ndarray], mask: Mapping[str, np.ndarray], piece: Piece) -> None:
    """The constants that carry the head / neuron count: reshape and expand shapes, split sizes, slice bounds."""
    op = node.op_type
    if op in ("Reshape", "Expand") and node.output[0] in lab.tensors:
        out = node.output[0]
        axis = lab.tensors[out].axis + s.sample.shapes[node.input[1]][0] - len(s.sample.shapes[out])
        if axis >= 0:
            new.input[1] = _set_element(s, new.input[1], node.input[1], axis, len(idx[out]), piece, new.name)
    elif op == "Split" and node.input[0] in lab.tensors:
        split = lab.tensors[node.input[0]]
        if split.axis == attr(node, "axis", 0) % len(s.sample.shapes[node.input[0]]):
            while len(new.input) < 2:
                new.input.append("")
            new.input[1] = s.const(f"{new.name}.split", np.array([len(idx[o]) for o in node.output], dtype=np.int64))
            for a in list(new.attribute):
                if a.name == "num_outputs":
                    new.attribute.remove(a)
    elif op == "Slice" and node.input[0] in lab.tensors:
        _rewrite_slice(s, new, node, lab, mask[node.input[0]])


def _rewrite_slice(s: Surgery, new: onnx.NodeProto, node: onnx.NodeProto, lab: Labels, mask: np.ndarray) -> None:
    """A Slice along the split axis keeps the part's elements of the sliced range."""
    split = lab.tensors[node.input[0]]
    params = slice_params(node, s.sample.shapes, s.sample.values)
    if split.axis not in params:
        return
    start, end, _ = slice(*params[split.axis][:2]).indices(len(split.labels))
    params[split.axis] = (int(mask[:start].sum()), int(mask[:end].sum()), 1)
    axes = sorted(params)
    for k, key in ((1, 0), (2, 1), (3, None), (4, 2)):
        while len(new.input) <= k:
            new.input.append("")
        vals = axes if key is None else [params[a][key] for a in axes]
        new.input[k] = s.const(f"{new.name}.{('starts', 'ends', 'axes', 'steps')[k - 1]}",
                               np.array(vals, dtype=np.int64))


def _set_element(s: Surgery, current: str, original: str, axis: int, size: int, piece: Piece, name: str,
                 output: str | None = None) -> str:
    """A shape vector with `size` at `axis`: a new constant, or (a computed shape) spliced in by the part."""
    if s.edit.is_const(original):
        shape = s.arr(original).copy()
        if shape[axis] != -1:
            shape[axis] = size
        return s.const(f"{original}.{name}", shape)
    c = lambda suffix, v: s.const(f"{name}.{suffix}", np.array(v, dtype=np.int64))
    zero = c("shape_axes", [0])
    a = s.node(piece, "Slice", [current, c("head_s", [0]), c("head_e", [axis]), zero], f"{name}.shape_a")
    b = s.node(piece, "Slice", [current, c("tail_s", [axis + 1]), c("tail_e", [INT_MAX]), zero], f"{name}.shape_b")
    joined = helper.make_node("Concat", [a, c("shape_size", [size]), b], [output or f"{name}.shape"],
                              name=f"{name}.shape", axis=0)
    return s.emit(piece, joined)


def _slice_input(s: Surgery, tensor: str, axis: int, keep: np.ndarray, piece: Piece, name: str, p: int,
                 sub: SubBlock) -> str:
    if s.edit.is_const(tensor):
        return s.const(f"{tensor}.{name}", np.take(s.arr(tensor), keep, axis=axis))
    if s.kv_shard and tensor in s.graph_inputs and set(s.consumers[tensor]) <= set(sub.nodes):
        s.new_inputs.setdefault(tensor, []).append((f"{tensor}.p{p}", axis, keep))
        return f"{tensor}.p{p}"  # this part's own cache, fed by its own present of the step before
    ind = s.const(f"{name}.indices", keep.astype(np.int64))
    return s.emit(piece, helper.make_node("Gather", [tensor, ind], [f"{name}.sliced"], name=f"{name}.slice",
                                          axis=axis))


def _gather(s: Surgery, sub: SubBlock, tensor: str, pieces: Sequence[Piece], block: int) -> Built:
    """A split tensor read outside the sub-block, concatenated back in the source's element order."""
    split = sub.labels.tensors[tensor]
    classes = sub.labels.classes(split.labels)
    order = np.concatenate([np.flatnonzero(np.isin(classes, sorted(piece.classes))) for piece in pieces])
    name = f"{tensor}.gather"
    outputs = [f"{tensor}.p{p}" for p in range(len(pieces))]
    gathered = [Piece(piece.slot, piece.classes, piece.share, [], outputs[p]) for p, piece in enumerate(pieces)]
    if np.array_equal(order, np.arange(len(order))):
        s.emit(None, helper.make_node("Concat", outputs, [tensor], name=name, axis=split.axis))
    else:
        s.emit(None, helper.make_node("Concat", outputs, [f"{tensor}.cat"], name=name, axis=split.axis))
        inv = s.const(f"{tensor}.order", np.argsort(order).astype(np.int64))
        s.emit(None, helper.make_node("Gather", [f"{tensor}.cat", inv], [tensor], name=f"{name}.order",
                                      axis=split.axis))
    return record(region_name(GATHER, tensor), sub.kind, (), name, gathered, block, Combine.CONCAT)


def _row(mask: np.ndarray, tensor: str) -> np.ndarray:
    """The part's elements along the split axis (a fused q/k/v tensor: the same heads in every segment)."""
    if mask.ndim == 1:
        return mask
    if not (mask == mask[:1]).all():
        raise SplitError(f"internal error: tensor {tensor!r} has different heads per q/k/v segment in one part")
    return mask[0]
