"""The LM head split by vocabulary columns: the slices' logits concatenated back, or a distributed argmax that
sends only each part's best logit and its index."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx
from onnx import helper

from edgesplit.graph import Graph
from edgesplit.layout import Combine, SplitKind
from edgesplit.rewrite.base import attr, sizes
from edgesplit.rewrite.transformer.blocks import weight_input
from edgesplit.rewrite.transformer.surgery import INT_MAX, Built, Piece, Slot, Surgery, record, region_name


def lm_head(graph: Graph, in_blocks: set[str]) -> onnx.NodeProto | None:
    """The last weight MatMul/Gemm outside the sub-blocks that writes a model output."""
    inits = graph.initializers
    outputs = set(graph.outputs)
    heads = [n for n in graph.model.graph.node if n.name not in in_blocks and weight_input(n, inits)
             and n.output[0] in outputs]
    return heads[-1] if heads else None


def split_vocab(s: Surgery, head: onnx.NodeProto, group: int, weights: Sequence[float], argmax: bool) -> Built:
    w = s.arr(head.input[1])
    trans_b = head.op_type == "Gemm" and attr(head, "transB", 0)
    vocab = w.shape[0] if trans_b else w.shape[1]
    counts = sizes(vocab, weights, f"LM head {head.name!r} (vocabulary {vocab})")
    bounds = np.concatenate([[0], np.cumsum(counts)]).astype(int)
    pieces = []
    for p, (a, b) in enumerate(zip(bounds, bounds[1:])):
        piece = Piece(Slot(group, p), frozenset(), counts[p] / vocab)
        new = onnx.NodeProto()
        new.CopyFrom(head)
        new.name = f"{head.name}.p{p}"
        new.input[1] = s.const(f"{head.input[1]}.{new.name}", w[a:b] if trans_b else w[:, a:b])
        if head.op_type == "Gemm" and len(head.input) > 2 and head.input[2]:
            c = s.arr(head.input[2])
            if c.ndim and c.shape[-1] > 1:
                new.input[2] = s.const(f"{head.input[2]}.{new.name}", c[..., a:b])
        del new.output[:]
        new.output.append(f"{head.output[0]}.p{p}")
        piece.output = s.emit(piece, new)
        if argmax:
            piece.output = _winner(s, piece, new.output[0], int(a))
        pieces.append(piece)
    s.removed.add(head.name)
    units = [tuple(range(a, b)) for a, b in zip(bounds, bounds[1:]) if b > a]
    if argmax:
        return _argmax_combine(s, head, pieces, units)
    name = f"{head.name}.concat"
    s.emit(None, helper.make_node("Concat", [p.output for p in pieces], [head.output[0]], name=name, axis=-1))
    return record(region_name(SplitKind.VOCAB, head.name), SplitKind.VOCAB, (head.name,), name, pieces, None,
                  Combine.CONCAT, units)


def _winner(s: Surgery, piece: Piece, logits: str, offset: int) -> str:
    """The part's best logit and its vocabulary index (as a float: exact below 2^24) side by side: [..., 2]."""
    opset = next(o.version for o in s.edit.model.opset_import if o.domain in ("", "ai.onnx"))
    if opset >= 18:
        axes = s.const(f"{logits}.axes", np.array([-1], dtype=np.int64))
        best = s.node(piece, "ReduceMax", [logits, axes], f"{logits}.max", keepdims=1)
    else:
        best = s.node(piece, "ReduceMax", [logits], f"{logits}.max", axes=[-1], keepdims=1)
    where = s.node(piece, "ArgMax", [logits], f"{logits}.argmax", axis=-1, keepdims=1)
    off = s.const(f"{logits}.offset", np.array(offset, dtype=np.int64))
    where = s.node(piece, "Add", [where, off], f"{logits}.index")
    where = s.node(piece, "CastLike", [where, best], f"{logits}.findex")
    return s.node(piece, "Concat", [best, where], f"{logits}.winner", axis=-1)


def _argmax_combine(s: Surgery, head: onnx.NodeProto, pieces: Sequence[Piece],
                    units: Sequence[tuple[int, ...]]) -> Built:
    """Only the parts' winners cross devices; the model's logits output becomes `<logits>.argmax` (token ids)."""
    out, at = head.output[0], head.name
    c = lambda suffix, v: s.const(f"{out}.{suffix}", np.array(v, dtype=np.int64))
    end, axis, step = c("end", [INT_MAX]), c("ax", [-1]), c("step", [2])
    nodes = [
        helper.make_node("Concat", [p.output for p in pieces], [f"{out}.winners"], name=f"{at}.winners", axis=-1),
        helper.make_node("Slice", [f"{out}.winners", c("s0", [0]), end, axis, step], [f"{out}.values"],
                         name=f"{at}.values"),
        helper.make_node("Slice", [f"{out}.winners", c("s1", [1]), end, axis, step], [f"{out}.indices"],
                         name=f"{at}.indices"),
        helper.make_node("ArgMax", [f"{out}.values"], [f"{out}.best"], name=f"{at}.best", axis=-1, keepdims=1),
        helper.make_node("GatherElements", [f"{out}.indices", f"{out}.best"], [f"{out}.token"], name=f"{at}.token",
                         axis=-1),
        helper.make_node("Squeeze", [f"{out}.token", axis], [f"{out}.tokenf"], name=f"{at}.squeeze"),
        helper.make_node("Cast", [f"{out}.tokenf"], [f"{out}.argmax"], name=f"{at}.cast", to=onnx.TensorProto.INT64),
    ]
    for n in nodes:
        s.emit(None, n)
    s.argmax_outputs[out] = f"{out}.argmax"
    return record(region_name(SplitKind.VOCAB, at), SplitKind.VOCAB, (at,), nodes[0].name, pieces, None,
                  Combine.ARGMAX, units, [n.name for n in nodes])
