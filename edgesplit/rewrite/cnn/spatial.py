"""Spatial splits: tiles of the feature map (height, width or a grid), each with its halo, over one or L layers.

Every tile is planned backwards from the output rows it owns: a Conv or pooling window needs input rows
[lo*s - pad, (hi-1)*s - pad + d*(k-1) + 1), clipped to the image; what falls outside the image becomes the tile's
own padding, so padding appears only at the true border and never on interior tile edges. Inside a fused region a
tensor is computed once per tile over the hull of what its consumers need (the growing halo); a consumer that
needs less gets a crop. Regions ending in a global pool combine partial pools (Sum of area-weighted means, Max).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import onnx

from edgesplit.graph import Graph
from edgesplit.layout import Combine, SplitKind
from edgesplit.rewrite.base import (
    Editor, PartRecord, RegionRecord, SplitError, SplitRequest, attr, ranges_from, static_shape, weights_for,
)
from edgesplit.rewrite.cnn.channel_rules import BINARY, UNARY

WINDOWED = {"Conv", "MaxPool", "AveragePool", "LpPool"}
GLOBAL = {"GlobalAveragePool", "GlobalMaxPool"}
POINTWISE = UNARY | BINARY | {"BatchNormalization", "LRN", "Concat"}  # per pixel (LRN: across channels only)
AXES = {SplitKind.HEIGHT: (2,), SplitKind.WIDTH: (3,), SplitKind.GRID: (2, 3)}

Box = dict[int, tuple[int, int]]  # axis -> [lo, hi) on the split axes only


def supported(op: str) -> bool:
    return op in WINDOWED | GLOBAL | POINTWISE


def extend_followers(graph: Graph, layers: list[str]) -> list[str]:
    """Add the single-consumer chain of pointwise ops after the last layer: they need no halo."""
    consumers, outputs = graph.consumers(), set(graph.outputs)
    layers = list(layers)
    while True:
        last = graph.layer(layers[-1])
        if len(last.outputs) != 1 or last.outputs[0] in outputs or last.op_type in GLOBAL:
            return layers
        users = consumers.get(last.outputs[0], [])
        if len(users) != 1:
            return layers
        nxt = graph.layer(users[0])
        if nxt.op_type not in (UNARY | {"BatchNormalization"}) or len(nxt.inputs) != 1 or len(nxt.outputs) != 1:
            return layers
        layers.append(nxt.name)


def window(node: onnx.NodeProto, graph: Graph, ed: Editor,
           ) -> tuple[list[int], list[int], list[int], list[int], list[int]]:
    """Kernel, strides, dilations, pads begin, pads end of a windowed op, with auto_pad made explicit."""
    in_shape = static_shape(graph, node.input[0])
    spatial = len(in_shape) - 2
    if node.op_type == "Conv":
        kernel = list(ed.array(node.input[1]).shape[2:]) if ed.is_const(node.input[1]) else \
            list(static_shape(graph, node.input[1])[2:])
    else:
        kernel = list(attr(node, "kernel_shape"))
    strides = list(attr(node, "strides", [1] * spatial))
    dil = list(attr(node, "dilations", [1] * spatial))
    pads = list(attr(node, "pads", [0] * 2 * spatial))
    auto = attr(node, "auto_pad", b"NOTSET")
    auto = auto.decode() if isinstance(auto, bytes) else auto
    begin, end = pads[:spatial], pads[spatial:]
    if auto in ("SAME_UPPER", "SAME_LOWER"):
        for j in range(spatial):
            size = in_shape[2 + j]
            total = max((math.ceil(size / strides[j]) - 1) * strides[j] + dil[j] * (kernel[j] - 1) + 1 - size, 0)
            small = total // 2
            begin[j], end[j] = (small, total - small) if auto == "SAME_UPPER" else (total - small, small)
    elif auto == "VALID":
        begin, end = [0] * spatial, [0] * spatial
    return kernel, strides, dil, begin, end


class SpatialPlanner:
    """Checks one spatial region and computes, per tile, the box every tensor of the region must cover."""

    def __init__(self, graph: Graph, ed: Editor, request: SplitRequest) -> None:
        self.graph, self.ed, self.req = graph, ed, request
        self.layers = list(request.layers)
        fused = request.kind == SplitKind.FUSED_SPATIAL
        if not fused:
            self.layers = extend_followers(graph, self.layers)
        axis = (request.axis or SplitKind.HEIGHT) if fused else request.kind
        if axis not in AXES:
            raise SplitError(f"fused-spatial region at {self.layers[0]!r}: expected axis one of "
                             f"{[str(a) for a in AXES]}, got {str(axis)!r}")
        self.axes = AXES[axis]
        self.members = set(self.layers)
        taken = [n for n in self.layers if n in ed.covered]
        if taken:
            raise SplitError(f"layer(s) {taken} of the {request.kind} region at {self.layers[0]!r} are already in "
                             f"another horizontal region (followers join the region before them); expected each layer "
                             f"in one region")
        self._check()
        self.last = graph.layer(self.out_producer)
        self.reduce = self.last.op_type in GLOBAL
        target = self.last.inputs[0] if self.reduce else self.out
        self.shape = static_shape(graph, target)
        self.tiles = self._tiles()

    def _check(self) -> None:
        g = self.graph
        self.layers = sorted(self.layers, key=g.position)
        for name in self.layers:
            layer = g.layer(name)
            if not supported(layer.op_type):
                raise SplitError(
                    f"layer {name!r} ({layer.op_type}) cannot be split spatially; expected Conv, MaxPool, AveragePool, "
                    f"LpPool, global pooling (as the last layer), BatchNorm, LRN, activations, elementwise ops or a "
                    f"channel Concat")
            shape = static_shape(g, layer.outputs[0])
            if len(shape) != 4 or any(d < 0 for d in shape[1:]):
                raise SplitError(f"layer {name!r} ({layer.op_type}): spatial splits need a 4-D output with static "
                                 f"C, H, W; got shape {list(g.tensors[layer.outputs[0]].shape)}")
            if len(layer.outputs) != 1:
                raise SplitError(f"layer {name!r} ({layer.op_type}) has {len(layer.outputs)} outputs; a spatial tile "
                                 f"needs exactly one")
            node = self.ed.node(name)
            if layer.op_type == "Concat" and attr(node, "axis", 0) % 4 != 1:
                raise SplitError(f"layer {name!r} (Concat): only a Concat along channels can be tiled spatially")
            if layer.op_type == "AveragePool" and attr(node, "ceil_mode", 0) and attr(node, "count_include_pad", 0):
                raise SplitError(f"layer {name!r} (AveragePool with ceil_mode=1 and count_include_pad=1) cannot be "
                                 f"tiled exactly; expected ceil_mode=0 or count_include_pad=0")
            for w in layer.weights if layer.op_type in BINARY else ():
                if any(d > 1 for d in g.tensors[w].shape[-2:]):
                    raise SplitError(f"layer {name!r} ({layer.op_type}): constant {w!r} of shape "
                                     f"{list(g.tensors[w].shape)} varies over space; expected a per-channel constant")
            if layer.op_type in GLOBAL and name != self.layers[-1]:
                raise SplitError(f"layer {name!r} ({layer.op_type}): a global pool must be the last layer of a "
                                 f"spatial region")
        consumers, outputs = g.consumers(), set(g.outputs)
        outs = [t for n in self.layers for t in g.layer(n).outputs
                if t in outputs or any(c not in self.members for c in consumers.get(t, []))]
        if len(outs) != 1:
            raise SplitError(f"spatial region {self.layers[0]!r} .. {self.layers[-1]!r} has {len(outs)} outputs used "
                             f"outside it ({outs}); expected exactly one (end the region where its result leaves)")
        self.out = outs[0]
        self.out_producer = g.producers()[self.out]

    def _tiles(self) -> list[Box]:
        weights = weights_for(self.req)
        prefix = "input " if self.reduce else ""
        what = lambda ax: f"layer {self.last.name!r} ({prefix}{'height' if ax == 2 else 'width'} "  # noqa: E731
        if len(self.axes) == 1:
            ax = self.axes[0]
            rng = ranges_from(self.shape[ax], weights, self.req.points, what(ax) + f"{self.shape[ax]})")
            return [{ax: r} for r in rng]
        rows, cols = self.req.grid or _factor(len(weights))
        if rows * cols != len(weights):
            raise SplitError(f"grid {rows}x{cols} at {self.layers[0]!r}: expected rows x cols = {len(weights)} parts")
        row_w = [sum(weights[r * cols:(r + 1) * cols]) for r in range(rows)]
        col_w = [sum(weights[c::cols]) for c in range(cols)]
        rr = ranges_from(self.shape[2], row_w, None, what(2) + f"{self.shape[2]}, {rows} tile rows)")
        cc = ranges_from(self.shape[3], col_w, None, what(3) + f"{self.shape[3]}, {cols} tile columns)")
        self.grid = (rows, cols)
        return [{2: r, 3: c} for r in rr for c in cc]

    def needs(self, box: Box) -> tuple[dict[str, Box], dict[tuple[str, str], Box]]:
        """Backwards: the box each tensor must cover, and the box each node reads from each input."""
        g = self.graph
        need: dict[str, Box] = {self.last.inputs[0] if self.reduce else self.out: dict(box)}
        reads: dict[tuple[str, str], Box] = {}
        for name in reversed(self.layers):
            layer = g.layer(name)
            if layer.op_type in GLOBAL:
                reads[(name, layer.inputs[0])] = need[layer.inputs[0]]
                continue
            out = need.get(layer.outputs[0])
            if out is None:
                continue
            node = self.ed.node(name)
            for t in layer.inputs:
                r = self._input_box(node, t, out)
                reads[(name, t)] = r
                need[t] = _hull(need[t], r) if t in need else r
        return need, reads

    def _input_box(self, node: onnx.NodeProto, tensor: str, out: Box) -> Box:
        shape = static_shape(self.graph, tensor)
        if node.op_type not in WINDOWED:
            return {ax: (0, 1) if shape[ax] == 1 else rng for ax, rng in out.items()}
        kernel, strides, dil, begin, _ = window(node, self.graph, self.ed)
        box = {}
        for ax, (lo, hi) in out.items():
            j = ax - 2
            start = lo * strides[j] - begin[j]
            end = (hi - 1) * strides[j] - begin[j] + dil[j] * (kernel[j] - 1) + 1
            box[ax] = (max(0, start), min(shape[ax], end))
        return box


def _hull(a: Box, b: Box) -> Box:
    return {ax: (min(a[ax][0], b[ax][0]), max(a[ax][1], b[ax][1])) for ax in a}


def _factor(k: int) -> tuple[int, int]:
    rows = max(r for r in range(1, int(math.isqrt(k)) + 1) if k % r == 0)
    return rows, k // rows


def _tile_pads(node: onnx.NodeProto, graph: Graph, ed: Editor, out: Box) -> dict:
    """Explicit pads for a tile: the original pads where the tile touches the image border, none inside."""
    kernel, strides, dil, begin, end = window(node, graph, ed)
    shape = static_shape(graph, node.input[0])
    out_shape = static_shape(graph, node.output[0])
    pb, pe = list(begin), list(end)
    for j in range(len(kernel)):
        ax = j + 2
        lo, hi = out.get(ax, (0, out_shape[ax]))
        start = lo * strides[j] - begin[j]
        stop = (hi - 1) * strides[j] - begin[j] + dil[j] * (kernel[j] - 1) + 1
        pb[j], pe[j] = max(0, -start), max(0, stop - shape[ax])
    attrs = {"pads": pb + pe, "auto_pad": None}
    if node.op_type != "Conv":
        attrs["ceil_mode"] = None
    return attrs


def plan_region(graph: Graph, ed: Editor, request: SplitRequest) -> RegionRecord:
    """Rewrite one spatial region in the editor and return its record."""
    sp = SpatialPlanner(graph, ed, request)
    ed.covered.update(sp.layers)
    total_area = math.prod(sp.shape[ax] for ax in sp.axes)
    shares = [math.prod(b - a for a, b in box.values()) / total_area for box in sp.tiles]
    region = RegionRecord(name=f"{request.kind}:{sp.layers[0]}", kind=request.kind, layers=list(sp.layers),
                          parts=[PartRecord(s) for s in shares], axis=sp.axes[0])
    new: list[onnx.NodeProto] = []
    for i, box in enumerate(sp.tiles):
        scatter, part_nodes, output = _tile(graph, ed, sp, i, box)
        region.scatter.extend(n.name for n in scatter)
        new.extend(scatter)
        new.extend(part_nodes)
        region.parts[i].nodes = [n.name for n in part_nodes]
        region.parts[i].output = output
    new.extend(_combine(ed, sp, region))
    ed.replace(sp.layers, new)
    ed.claimed.update(n for part in region.parts for n in part.nodes)
    return region


def _tile(graph: Graph, ed: Editor, sp: SpatialPlanner, i: int, box: Box,
          ) -> tuple[list[onnx.NodeProto], list[onnx.NodeProto], str]:
    """Tile i: the Slices that cut its inputs, its own nodes (crops, layer copies), and the tensor it produces."""
    need, reads = sp.needs(box)
    p = f"/part{i}"
    producers = graph.producers()
    have: dict[str, str] = {}
    scatter: list[onnx.NodeProto] = []
    part_nodes: list[onnx.NodeProto] = []
    for t, b in need.items():
        if producers.get(t) in sp.members:
            continue
        full = static_shape(graph, t)
        if all(b[ax] == (0, full[ax]) for ax in b):
            have[t] = t
            continue
        cut = ed.slice_node(t, list(b), [r[0] for r in b.values()], [r[1] for r in b.values()],
                            f"{sp.layers[0]}{p}/scatter")
        scatter.append(cut)
        have[t] = cut.output[0]
    for name in sp.layers:
        layer = graph.layer(name)
        if layer.outputs[0] not in need and layer.op_type not in GLOBAL:
            continue  # this tile needs nothing from this layer
        node = ed.node(name)
        ins = []
        for t in node.input:
            if t not in layer.inputs:
                ins.append(t)
                continue
            src, r = need[t], reads[(name, t)]
            if r != src:
                crop = ed.slice_node(have[t], list(r), [r[ax][0] - src[ax][0] for ax in r],
                                     [r[ax][1] - src[ax][0] for ax in r], f"{name}{p}/crop")
                part_nodes.append(crop)
                ins.append(crop.output[0])
            else:
                ins.append(have[t])
        attrs = _tile_pads(node, graph, ed, need.get(layer.outputs[0], {})) if layer.op_type in WINDOWED else None
        made = ed.clone(node, f"{name}{p}", ins, attrs)
        part_nodes.append(made)
        have[layer.outputs[0]] = made.output[0]
    if sp.reduce and sp.last.op_type == "GlobalAveragePool":  # a partial mean, weighted by the tile's area
        area = math.prod(b - a for a, b in box.values()) / math.prod(sp.shape[ax] for ax in sp.axes)
        dtype = np.dtype(graph.tensors[sp.out].dtype)
        scale = ed.make("Mul", [have[sp.out], ed.const(f"{sp.last.name}{p}/area", np.array(area, dtype=dtype))],
                        f"{sp.last.name}{p}/weigh")
        part_nodes.append(scale)
        have[sp.out] = scale.output[0]
    return scatter, part_nodes, have[sp.out]


def _combine(ed: Editor, sp: SpatialPlanner, region: RegionRecord) -> list[onnx.NodeProto]:
    outs = [p.output for p in region.parts]
    base = f"{sp.layers[0]}/combine"
    if sp.reduce:
        op = "Sum" if sp.last.op_type == "GlobalAveragePool" else "Max"
        nodes = [ed.make(op, outs, base, outputs=[sp.out])]
    elif len(sp.axes) == 1:
        nodes = [ed.make("Concat", outs, base, {"axis": sp.axes[0]}, outputs=[sp.out])]
    else:
        rows, cols = sp.grid
        row_nodes = [ed.make("Concat", outs[r * cols:(r + 1) * cols], f"{base}/row{r}", {"axis": 3})
                     for r in range(rows)]
        nodes = row_nodes + [ed.make("Concat", [n.output[0] for n in row_nodes], base, {"axis": 2}, outputs=[sp.out])]
    region.combine = nodes[-1].name
    region.combine_nodes = [n.name for n in nodes]
    if sp.reduce:
        region.merge = Combine.SUM if sp.last.op_type == "GlobalAveragePool" else Combine.MAX
    if len(sp.axes) == 1:
        region.set_units([box[sp.axes[0]] for box in sp.tiles])
    else:  # a grid's units are its tiles, row-major
        region.set_units([(i, i + 1) for i in range(len(sp.tiles))])
    return nodes


def rewrite(graph: Graph, requests: Sequence[SplitRequest], dims=None) -> Graph:
    """Apply spatial requests (height, width, grid, fused-spatial) and return the rewritten Graph."""
    editor = Editor(graph)
    regions = [plan_region(graph, editor, req) for req in requests]
    return editor.build(regions, dims)
