"""Channel splits: output channels (lop, combine Concat), input channels (lip, combine Sum), and the ops that follow.

The rules (`channel_rules`) are pattern / check / rewrite. The engine walks the graph once in topological order,
keeping for every split tensor its parts; an op whose inputs are all split the same way follows the split
(BatchNorm, activations, pooling, Add of identically split tensors, depthwise Conv, Flatten/Reshape before a Gemm),
a Concat along the split axis takes the parts directly, anything else gets the combined tensor. A split tensor with
several consumers still flows on when they are elementwise ops that reconverge (GELU, x * sigmoid(x)); a
per-channel activation such as a squeeze-and-excitation scale is sliced for each part instead of forcing a combine.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import onnx

from edgesplit.graph import Graph, Layer
from edgesplit.layout import Combine, SplitKind
from edgesplit.rewrite.base import Editor, PartRecord, RegionRecord, SplitError, SplitRequest, attr, weights_for
from edgesplit.rewrite.cnn.channel_rules import BINARY, FOLLOW, LIP, LOP, POOLS, UNARY, Split, fan_closure, side_input

Heads = dict[str, tuple[SplitKind, SplitRequest]]  # first layer -> (lop or lip, its request)
ALIGN_THROUGH = UNARY | BINARY | POOLS | {"BatchNormalization", "InstanceNormalization"}  # keep channel positions


class ChannelEngine:
    def __init__(self, editor: Editor) -> None:
        self.ed = editor
        self.graph: Graph = editor.graph
        self.split: dict[str, Split] = {}
        self.regions: list[RegionRecord] = []
        self.alias: dict[int, RegionRecord] = {}
        self.why: dict[str, str] = {}  # layer -> why it did not follow a split
        self.fan_ok: set[str] = set()  # split tensors whose several consumers all follow (e.g. x * sigmoid(x))
        self.fan_checked: set[str] = set()
        self.bias: dict[str, str] = {}  # partial-sum tensor -> the bias its combine adds
        self.consumers = self.graph.consumers()
        self.outputs = set(self.graph.outputs)
        self.heads: Heads = {}

    # ----- driver -------------------------------------------------------------------------------------------
    def run(self, requests: Sequence[SplitRequest]) -> list[RegionRecord]:
        heads, lip_targets = _heads(requests)
        self.heads = heads
        fused_done: set[str] = set()
        for layer in self.graph.layers:
            if self._visit(layer, heads, lip_targets):
                fused_done.add(layer.name)
        for t in list(self.split):
            if t in self.outputs:
                self._combine(t)
        self._check_fused(requests, lip_targets, fused_done)
        return [r for r in self.regions if id(r) not in self.alias]

    def _visit(self, layer: Layer, heads: Heads, lip_targets: dict[str, SplitRequest]) -> bool:
        """Split, follow, merge or combine at one layer; True when it is the input-channel end of a fused pair."""
        name = layer.name
        split_ins = [t for t in layer.inputs if t in self.split]
        if name in self.ed.claimed:  # a part of an earlier region (e.g. a spatial tile): never follows
            for t in split_ins:
                self._combine(t)
            return False
        if name in heads:
            for t in split_ins:
                self._combine(t)
            self._head(self.ed.node(name), *heads[name])
            return False
        if not split_ins:
            return False
        node = self.ed.node(name)
        states = [self.split[t] for t in layer.inputs if t in self.split]
        single = all(t not in self.outputs and (self.consumers.get(t) == [name] or self._fans_out(t))
                     for t in split_ins)
        if name in lip_targets and len(split_ins) == len(layer.inputs) == 1 and single and not states[0].partial:
            self._lip_follow(node, states[0], lip_targets[name])
            return True
        sides_ok = all(t in self.split or side_input(self, node, t, states[0]) for t in layer.inputs)
        if single and sides_ok and len({s.signature() for s in states}) == 1 \
                and not states[0].partial and self._follow(node, states):
            return False
        if not single:
            self.why.setdefault(name, "its input is also used elsewhere (or is a model output), so the split is "
                                      "combined first")
        if node.op_type == "Concat" and single and self._concat_merge(node, split_ins):
            return False
        for t in split_ins:
            self._combine(t)
        return False

    def _check_fused(self, requests: Sequence[SplitRequest], lip_targets: dict[str, SplitRequest],
                     fused_done: set[str]) -> None:
        for target, req in lip_targets.items():
            if target not in fused_done:
                raise SplitError(
                    f"fused-channels region {req.layers[0]!r} .. {target!r}: {target!r} does not receive the channel "
                    f"split of {req.layers[0]!r}: {self._chain_reason(req)}; expected only BatchNorm, activations, "
                    f"pooling, depthwise Conv and Flatten/Reshape between an output-channel split and an input-channel "
                    f"split")
        covered = self._covered()
        for req in requests:
            missing = [l for l in req.layers if l not in covered]
            if req.kind == SplitKind.FUSED_CHANNELS and missing:
                raise SplitError(f"fused-channels region {req.layers[0]!r} .. {req.layers[-1]!r}: layer(s) {missing} "
                                 f"are not on the chain from the first to the last layer")

    def _fans_out(self, tensor: str) -> bool:
        if tensor not in self.fan_checked:
            self.fan_checked.add(tensor)
            members = fan_closure(self.graph, tensor, self.consumers, self.outputs)
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
    def _region(self, kind: SplitKind, layer: str, shares: list[float]) -> RegionRecord:
        total = sum(shares)
        region = RegionRecord(name=f"{kind}:{layer}", kind=kind, layers=[layer],
                              parts=[PartRecord(s / total) for s in shares])
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
    def _head(self, node: onnx.NodeProto, mode: SplitKind, req: SplitRequest) -> None:
        rule = LOP if mode == SplitKind.LOP else LIP
        if node.op_type not in rule:
            kinds = "Conv (incl. grouped), Gemm and MatMul with a constant weight" if mode == SplitKind.LOP else \
                "Conv (group 1), Gemm and MatMul with a constant weight"
            which = "output" if mode == SplitKind.LOP else "input"
            raise SplitError(f"layer {node.name!r} ({node.op_type}) cannot be split by {which} channels ({mode}); "
                             f"expected one of: {kinds}")
        axis, ranges, build = rule[node.op_type](self, node, weights_for(req), req.points)
        kind = req.kind if req.kind == SplitKind.FUSED_CHANNELS else mode
        region = self._region(kind, node.name, [float(b - a) for a, b in ranges])
        parts, new = [], []
        for i, (a, b) in enumerate(ranges):
            made, scatter = build(i, a, b)
            new.extend(scatter)
            region.scatter.extend(n.name for n in scatter)
            new.extend(made)
            region.parts[i].nodes.extend(n.name for n in made)
            parts.append(made[-1].output[0])
        self._emit(node.name, new)
        self.split[node.output[0]] = Split(axis, ranges, parts, region, partial=(mode == SplitKind.LIP))

    def follower_unit(self, head: str) -> int:
        """The channel multiple that a split of `head`'s output must keep for the grouped Convs after it to follow
        the split (1 if none comes before the next head, fan-out or mixing op): rounding the ranges to it saves the
        synchronisation that combining before such a Conv would cost (ResNeXt, RegNet, ShuffleNet, MobileNets
        with grouped pointwise Convs)."""
        return self._unit_after(self.graph.layer(head).outputs[0])

    def _unit_after(self, tensor: str) -> int:
        users = self.consumers.get(tensor, [])
        if tensor in self.outputs or len(users) != 1 or users[0] in self.heads:
            return 1
        layer = self.graph.layer(users[0])
        node = self.graph.model.graph.node[self.graph.position(layer.name)]
        if layer.op_type == "Conv" and attr(node, "group", 1) > 1 and node.input[1] in layer.weights:
            w = self.graph.tensors[node.input[1]].shape
            cin_g, cout_g = int(w[1]), int(w[0]) // attr(node, "group", 1)
            after = self._unit_after(layer.outputs[0])  # in output channels: whole groups of cout_g
            return cin_g * (after // math.gcd(after, cout_g))
        if layer.op_type not in ALIGN_THROUGH or any(t != tensor and t not in layer.weights for t in layer.inputs):
            return 1
        return self._unit_after(layer.outputs[0])

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


def _heads(requests: Sequence[SplitRequest]) -> tuple[Heads, dict[str, SplitRequest]]:
    """Each request's first layer (split by output or input channels) and each fused pair's last layer."""
    heads: Heads = {}
    lip_targets: dict[str, SplitRequest] = {}
    for req in requests:
        first = req.layers[0]
        if first in heads:
            raise SplitError(f"layer {first!r} is in two horizontal regions; expected each layer in at most one")
        heads[first] = (SplitKind.LIP if req.kind == SplitKind.LIP else SplitKind.LOP, req)
        if req.kind == SplitKind.FUSED_CHANNELS:
            if len(req.layers) < 2:
                raise SplitError(f"fused-channels region at {first!r}: expected at least two layers (an output-channel "
                                 f"split, then the layer that takes an input-channel split), got {list(req.layers)}")
            lip_targets[req.layers[-1]] = req
    return heads, lip_targets


def rewrite(graph: Graph, requests: Sequence[SplitRequest], dims=None) -> Graph:
    """Apply channel-split requests (lop, lip, fused-channels) and return the rewritten Graph."""
    editor = Editor(graph)
    regions = ChannelEngine(editor).run(requests)
    return editor.build(regions, dims)
