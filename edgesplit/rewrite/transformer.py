"""Split a Transformer across devices the Megatron way: attention by heads, MLP by neurons, LM head by vocabulary.

Each attention / MLP sub-block becomes one part per device (entry weights sliced by columns, exit weight by rows,
reshape constants carrying the head count rewritten from the concrete shapes) plus one Sum: two synchronisations
per block. Norms, residual adds and the bias of each exit run once, on the group's root device (star reduction:
the root gathers the partial sums, then sends the next normalised hidden state to every part). Side inputs of a
part (masks, rotary tables, shape vectors) are recomputed on its device from the model inputs where possible, else
received once per device. The LM head is split by vocabulary columns (Concat, or a distributed argmax). Blocks may
be spread over device groups (hybrid with vertical cuts). The result is checked against the unsplit model on
sample inputs before it is returned; what is not recognised is reported (`skipped`) and left whole.

    split = split_transformer(graph, cluster)              # every block over every device, shares = speeds
    plan = cut(split.graph, cluster, split.placement)
"""

from __future__ import annotations

import warnings
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from edgesplit.cluster import Cluster
from edgesplit.graph import Graph, from_model, node_references
from edgesplit.layout import Combine, Part, SplitKind
from edgesplit.layout import Region as TypedRegion
from edgesplit.place import check_memory
from edgesplit.plan import Plan, cut
from edgesplit.rewrite import concrete as concrete_run
from edgesplit.rewrite.base import SplitError, topological_order
from edgesplit.rewrite.shard_labels import slice_params
from edgesplit.rewrite.tp_check import self_check
from edgesplit.rewrite.tp_place import placement as place
from edgesplit.rewrite.tp_regions import Region, Skipped, find, weight_input

INT_MAX = np.iinfo(np.int64).max
SIDE_WEIGHT_LIMIT = 1 << 20  # side computations with bigger constants are sent, not recomputed per device


@dataclass(frozen=True)
class TransformerSplit:
    """The rewritten graph (regions in its metadata), a device for every node, and what was left unsplit."""

    graph: Graph
    placement: dict[str, str]
    skipped: tuple[Skipped, ...]
    blocks: int
    max_rel_error: float  # of the self-check against the unsplit model on sample inputs


@dataclass
class _Part:
    device: str
    classes: frozenset[int]
    share: float
    nodes: list[str] = field(default_factory=list)
    output: str = ""


def split_transformer(
    graph: Graph,
    cluster: Cluster,
    devices: Sequence[str] | None = None,
    shares: Mapping[str, float] | None = None,
    groups: Sequence[Sequence[str]] | None = None,
    boundaries: Sequence[int] | None = None,
    vocab: bool = True,
    allow_idle: bool = False,
    dims: Mapping[str, int] | None = None,
    check: bool = True,
    kv_cache: str = "gather",
    lm_head: str = "concat",
) -> TransformerSplit:
    """Split every attention and MLP block (and the LM head) of `graph` over devices.

    `devices` (default: all, in cluster order) share every block; or `groups` (lists of devices) take consecutive
    runs of blocks (hybrid: vertical cuts between groups), starting at `boundaries` (first block of each later
    group; default: proportional to each group's total speed). `shares` weight devices (default: their speed).
    A sub-block with fewer head groups / neurons than devices raises, unless `allow_idle` leaves devices out of it.
    `dims` sizes symbolic dims for the sample run. `check` compares the result with the unsplit model.
    `kv_cache`: "gather" keeps the model's interface (each part slices the past it needs; presents are concatenated
    back); "shard" gives each part its own `past_X.pN` input and `present_X.pN` output (N = part), so every device
    keeps the cache of its own heads and only hidden states cross devices during generation.
    `lm_head`: "concat" gathers the vocabulary slices of the logits; "argmax" sends only each part's best logit and
    its index, and the model's logits output becomes `<logits>.argmax` (greedy token ids, [batch, sequence]).
    """
    if kv_cache not in ("gather", "shard"):
        raise SplitError(f"kv_cache: expected 'gather' or 'shard', got {kv_cache!r}")
    if lm_head not in ("concat", "argmax"):
        raise SplitError(f"lm_head: expected 'concat' or 'argmax', got {lm_head!r}")
    groups = _groups(cluster, devices, groups)
    weight = _shares(cluster, groups, shares)
    base = _fold_weight_views(graph)
    sample = concrete_run.run(base, concrete_run.sample_inputs(base, dims))
    regions, skipped = find(base, sample)
    block_of = _blocks(regions)
    n_blocks = max(block_of, default=-1) + 1
    group_of_block = _group_runs(n_blocks, groups, weight, boundaries)
    builder = _Builder(base, sample, kv_cache == "shard")
    records = []
    for i, (r, b) in enumerate(zip(regions, block_of)):
        devs = groups[group_of_block[b]]
        if len(devs) > 1:
            w = weight
            if r.kind == "neurons" and i and block_of[i - 1] == b and regions[i - 1].kind == "heads":
                w = _compensate(devs, weight, builder.cost, builder.cost_total, _region_cost(r))
            records.extend(builder.split(r, devs, w, allow_idle, b))
    if vocab and groups:
        head = _lm_head(base, {n for r in regions for n in r.nodes})
        last = groups[group_of_block[n_blocks - 1]] if n_blocks else groups[-1]
        if head is not None and len(last) > 1:
            records.append(builder.split_vocab(head, last, weight, lm_head == "argmax"))
    out = replace(builder.finish(records), path=graph.path)
    roots = [g[0] for g in groups]
    placement = place(out, base, regions, block_of, [roots[group_of_block[b]] for b in range(n_blocks)], roots[0])
    err = self_check(out, sample, builder.new_inputs, builder.new_outputs, builder.argmax_outputs) if check \
        else float("nan")
    return TransformerSplit(out, placement, tuple(skipped), n_blocks, err)


class TransformerSplitWarning(UserWarning):
    """Part of the model was left unsplit (e.g. an attention pattern not recognised); it runs vertically."""


def partition_transformer(graph: Graph, cluster: Cluster, mapping: Any = None, dims: Mapping[str, int] | None = None,
                          **options: Any) -> Plan:
    """`partition(..., strategy="heads")`: split, place parts on their devices, cut. Devices a sub-block cannot
    use (fewer KV-head groups than devices) are left out of it with a warning instead of an error."""
    if mapping is not None:
        raise SplitError("strategy 'heads' places every part itself; expected no mapping, got one")
    options.setdefault("allow_idle", True)
    split = split_transformer(graph, cluster, dims=dims, **options)
    for s in split.skipped:
        warnings.warn(str(s), TransformerSplitWarning, stacklevel=2)
    check_memory(split.graph, cluster, split.placement)
    return cut(split.graph, cluster, split.placement)


def _groups(cluster: Cluster, devices, groups) -> list[list[str]]:
    if groups is not None and devices is not None:
        raise SplitError("expected either devices=[...] (one group) or groups=[[...], ...], got both")
    groups = [list(g) for g in groups] if groups is not None else [list(devices or cluster.names)]
    problems = [f"device {d!r} is not in the cluster {list(cluster.names)}" for g in groups for d in g
                if d not in cluster.names]
    flat = [d for g in groups for d in g]
    problems += [f"device {d!r} is listed twice" for d in sorted({d for d in flat if flat.count(d) > 1})]
    problems += ["expected non-empty device groups, got an empty one"] if any(not g for g in groups) else []
    if problems:
        raise SplitError("invalid devices for the transformer split:\n  " + "\n  ".join(problems))
    return groups


def _shares(cluster: Cluster, groups, shares) -> dict[str, float]:
    out = {d: cluster.device(d).speed for g in groups for d in g}
    for d, w in (shares or {}).items():
        if d not in out:
            raise SplitError(f"shares name device {d!r}, expected one of {list(out)}")
        if not float(w) > 0:
            raise SplitError(f"share of device {d!r}: expected a positive number, got {w!r}")
        out[d] = float(w)
    return out


def _blocks(regions: Sequence[Region]) -> list[int]:
    """A block starts at every attention region; an MLP region belongs to the attention before it, if any."""
    out, b, prev = [], -1, "heads"
    for r in regions:
        if r.kind == "heads" or prev == "neurons" or b < 0:
            b += 1
        out.append(b)
        prev = r.kind
    return out


def _group_runs(n_blocks: int, groups, weight, boundaries) -> list[int]:
    k = len(groups)
    if boundaries is None:
        speed = np.array([sum(weight[d] for d in g) for g in groups])
        cum = np.cumsum(speed) / speed.sum()
        boundaries = [int(round(c * n_blocks)) for c in cum[:-1]]
    bounds = [0, *[int(b) for b in boundaries], n_blocks]
    if len(bounds) != k + 1 or any(a > b for a, b in zip(bounds, bounds[1:])) or bounds[-2] > n_blocks:
        raise SplitError(f"expected {k - 1} increasing block boundaries within 0..{n_blocks} for {k} groups, "
                         f"got {list(boundaries)}")
    return [next(g for g in range(k) if bounds[g] <= b < bounds[g + 1]) for b in range(n_blocks)]


def _fold_weight_views(graph: Graph) -> Graph:
    """Transpose(weight) -> a transposed weight (exporters that keep W as [out, in]); Identity(weight) -> a weight
    (the TorchScript exporter's de-duplication of equal initializers)."""
    model = graph.model
    inits = {t.name: t for t in model.graph.initializer}
    folds = [n for n in model.graph.node if n.input and n.input[0] in inits and (
        n.op_type == "Identity" or (n.op_type == "Transpose" and len(inits[n.input[0]].dims) == 2))]
    if not folds:
        return graph
    m = onnx.ModelProto()
    m.CopyFrom(model)
    drop = {n.name for n in folds}
    keep = [n for n in m.graph.node if n.name not in drop]
    del m.graph.node[:]
    m.graph.node.extend(keep)
    for n in folds:
        w = numpy_helper.to_array(inits[n.input[0]])
        m.graph.initializer.append(numpy_helper.from_array(w.T.copy() if n.op_type == "Transpose" else w, n.output[0]))
    _drop_unused(m)
    return from_model(m, name=graph.name, sha256=graph.sha256)


class _Builder:
    """Accumulates part nodes, new weights and combines on a copy of the model."""

    def __init__(self, graph: Graph, sample: concrete_run.Concrete, kv_shard: bool = False) -> None:
        self.graph, self.sample, self.kv_shard = graph, sample, kv_shard
        self.graph_outputs = set(graph.outputs)
        self.consumers = graph.consumers()
        # cache input/output -> (per-part name, axis, indices of the part's elements along it)
        self.new_inputs: dict[str, list[tuple[str, int, np.ndarray]]] = {}
        self.new_outputs: dict[str, list[tuple[str, int, np.ndarray]]] = {}
        self.argmax_outputs: dict[str, str] = {}  # logits -> token ids, for lm_head="argmax"
        self.model = onnx.ModelProto()
        self.model.CopyFrom(graph.model)
        self.nodes = {n.name: n for n in self.model.graph.node}
        self.inits = {t.name: t for t in self.model.graph.initializer}
        self.producer = {o: n for n in self.model.graph.node for o in n.output if o}
        self.graph_inputs = set(graph.inputs)
        self.local: dict[tuple[str, str], str | None] = {}
        self.removed: set[str] = set()
        self.added: list[onnx.NodeProto] = []
        self.new_inits: dict[str, onnx.TensorProto] = {}

    def _arr(self, name: str) -> np.ndarray:
        return numpy_helper.to_array(self.inits[name] if name in self.inits else self.new_inits[name])

    def _init(self, name: str, array: np.ndarray) -> str:
        self.new_inits[name] = numpy_helper.from_array(np.ascontiguousarray(array), name)
        return name

    def _node(self, part: _Part, op: str, inputs, outputs, name: str, **attrs) -> str:
        self.added.append(helper.make_node(op, list(inputs), list(outputs), name=name, **attrs))
        part.nodes.append(name)
        return outputs[0]

    def localise(self, part: _Part, x: str, root: str) -> None:
        """Side inputs of a part (masks, rotary tables, shape vectors) computed on its own device when they
        derive cheaply from model inputs and `x`, so only `x` and the partial sum cross the wire."""
        if part.device == root:
            return
        mine = set(part.nodes)
        nodes = [n for n in self.added if n.name in mine]
        here = {o for n in nodes for o in n.output} | {x}
        for n in nodes:
            for k, t in enumerate(n.input):
                if t and t not in here and t not in self.inits and t not in self.new_inits:
                    n.input[k] = self._replica(t, part, x, 0) or self._relay(t, part)

    def _relay(self, tensor: str, part: _Part) -> str:
        """A side input that cannot be recomputed here (e.g. a mask built from the embeddings' shape) is received
        once per device, by the first part that needs it, and kept there for the later blocks."""
        key = (f"relay:{tensor}", part.device)
        if key not in self.local:
            out = f"{tensor}@{part.device}"
            self.added.append(helper.make_node("Identity", [tensor], [out], name=f"{tensor}@{part.device}.relay"))
            part.nodes.append(self.added[-1].name)
            self.local[key] = out
        return self.local[key]

    def _replica(self, tensor: str, part: _Part, x: str, depth: int) -> str | None:
        key = (tensor, part.device)
        if key in self.local:
            return self.local[key]
        node = self.producer.get(tensor)
        ok = node is not None and node.name not in self.removed and depth < 64 and not any(
            i in self.inits and self.inits[i].ByteSize() > SIDE_WEIGHT_LIMIT for i in node.input) and not (
            node.op_type in ("Shape", "Size") and node.input[0] not in (x, *self.graph_inputs))  # not the model again
        inputs = []
        for i in node.input if ok else ():
            if not i or i in self.inits or i in self.graph_inputs or i == x:
                inputs.append(i)
            elif (r := self._replica(i, part, x, depth + 1)) is not None:
                inputs.append(r)
            else:
                ok = False
                break
        if not ok:
            self.local[key] = None
            return None
        new = onnx.NodeProto()
        new.CopyFrom(node)
        new.name = f"{node.name}@{part.device}"
        del new.input[:]
        new.input.extend(inputs)
        del new.output[:]
        new.output.extend(f"{o}@{part.device}" if o else "" for o in node.output)
        self.added.append(new)
        part.nodes.append(new.name)
        for o in node.output:
            if o:
                self.local[(o, part.device)] = f"{o}@{part.device}"
        return self.local[key]

    def split(self, region: Region, devices: Sequence[str], weight, allow_idle: bool, block: int) -> list[dict]:
        lab = region.labels
        exit_node = self.nodes[region.exit]
        classes_at_exit = lab.classes(lab.tensors[exit_node.input[0]].labels)
        order = sorted(set(classes_at_exit.tolist()))
        all_classes = lab.classes(np.arange(lab.size))
        # a class's weights: its entry columns plus its exit rows (all rows and columns have the same length)
        cost = np.array([np.count_nonzero(all_classes == c) + np.count_nonzero(classes_at_exit == c) for c in order],
                        dtype=float)
        parts = _allocate(order, cost, devices, weight, allow_idle, region)
        self.cost = {p.device: p.share * cost.sum() for p in parts}
        self.cost_total = float(cost.sum())
        if len(parts) < 2:
            return []
        inside = set(region.nodes)
        produced = {o for n in region.nodes for o in self.nodes[n].output if o}
        slices = defaultdict(list)
        for node, k, axis, follow in lab.slices:
            slices[node].append((k, axis, follow))
        for p, part in enumerate(parts):
            self._part(region, lab, p, part, produced, slices)
            self.localise(part, region.x, devices[0])
        self.removed.update(inside)
        name = f"{region.exit}.sum"
        outs = [part.output for part in parts]
        records = []
        if exit_node.op_type == "Gemm" and len(exit_node.input) > 2 and exit_node.input[2]:
            summed = f"{exit_node.output[0]}.sum"
            self.added.append(helper.make_node("Sum", outs, [summed], name=name))
            beta = _attr(exit_node, "beta", 1.0)
            bias = exit_node.input[2]
            if beta != 1.0:
                bias = self._init(f"{bias}.beta", self._arr(bias) * np.float32(beta))
            self.added.append(helper.make_node("Add", [summed, bias], [exit_node.output[0]],
                                               name=f"{region.exit}.bias"))
        else:
            self.added.append(helper.make_node("Sum", outs, [exit_node.output[0]], name=name))
        records.append(_record(f"{region.kind}:{region.exit}", region.kind, region.nodes, name, parts, block))
        for name in region.shape_reads:
            self._shape_read(self.nodes[name], lab, parts[0])
        for t in region.outputs:  # e.g. present key/value: each part's heads, concatenated back in order
            if self.kv_shard and t in self.graph_outputs:
                s = lab.tensors[t]
                self.new_outputs[t] = [(f"{t}.p{p}", s.axis,
                                        np.flatnonzero(np.isin(lab.classes(s.labels), sorted(part.classes))))
                                       for p, part in enumerate(parts)]
            else:
                records.append(self._gather(region, lab, t, parts, block))
        return records

    def _part(self, region: Region, lab, p: int, part: _Part, produced, slices) -> None:
        cls = np.array(sorted(part.classes))
        mask = {t: _row(np.isin(lab.classes(s.labels), cls), t) for t, s in lab.tensors.items()}
        idx = {t: np.flatnonzero(m) for t, m in mask.items()}
        rn = lambda t: f"{t}.p{p}" if t in produced else t
        for name in region.nodes:
            node = self.nodes[name]
            new = onnx.NodeProto()
            new.CopyFrom(node)
            new.name = f"{name}.p{p}"
            del new.input[:]
            new.input.extend(rn(i) if i else "" for i in node.input)
            del new.output[:]
            new.output.extend(rn(o) if o else "" for o in node.output)
            if name == region.exit:
                self._exit_part(new, node, idx[node.input[0]])
                part.output = new.output[0]
            elif name in region.entries:
                self._entry_part(new, node, idx[node.output[0]])
            else:
                self._rewrite_shapes(new, node, lab, idx, mask, part, p)
            for k, axis, follow in slices.get(name, ()):
                new.input[k] = self._slice_input(node.input[k], axis, idx[follow], part, f"{name}.p{p}.in{k}", p,
                                                 region)
            self.added.append(new)
            part.nodes.append(new.name)

    def _shape_read(self, node: onnx.NodeProto, lab, part: _Part) -> None:
        """An outside Shape of a split tensor: part 0's shape with the full size put back (no gather needed)."""
        t = node.input[0]
        rank = len(self.sample.shapes[t])
        start, end = (_attr(node, "start", 0), _attr(node, "end", rank))
        start, end = start % rank if start < 0 else min(start, rank), end % rank if end < 0 else min(end, rank)
        axis = lab.tensors[t].axis
        own = onnx.NodeProto()
        own.CopyFrom(node)
        own.name, own.input[0] = f"{node.name}.p0", f"{t}.p0"
        self.removed.add(node.name)
        if not start <= axis < end:
            self.added.append(own)
            part.nodes.append(own.name)
            return
        own.output[0] = f"{node.output[0]}.p0"
        self.added.append(own)
        part.nodes.append(own.name)
        self._set_element(own.output[0], own.output[0], axis - start, len(lab.tensors[t].labels), part, own.name)
        self.added[-1].output[0] = node.output[0]

    def _entry_part(self, new, node, cols: np.ndarray) -> None:
        w = self._arr(node.input[1])
        trans_b = node.op_type == "Gemm" and _attr(node, "transB", 0)
        new.input[1] = self._init(f"{node.input[1]}.{new.name}", w[cols] if trans_b else w[:, cols])
        if node.op_type == "Gemm" and len(node.input) > 2 and node.input[2]:
            c = self._arr(node.input[2])
            if c.ndim and c.shape[-1] > 1:
                new.input[2] = self._init(f"{node.input[2]}.{new.name}", c[..., cols])

    def _exit_part(self, new, node, rows: np.ndarray) -> None:
        w = self._arr(node.input[1])
        trans_b = node.op_type == "Gemm" and _attr(node, "transB", 0)
        new.input[1] = self._init(f"{node.input[1]}.{new.name}", w[:, rows] if trans_b else w[rows])
        if node.op_type == "Gemm":
            del new.input[2:]

    def _rewrite_shapes(self, new, node, lab, idx, mask, part: _Part, p: int) -> None:
        """The constants that carry the head / neuron count: reshape and expand shapes, split sizes, slice bounds."""
        op = node.op_type
        if op in ("Reshape", "Expand") and node.output[0] in lab.tensors:
            out = node.output[0]
            axis = lab.tensors[out].axis + self.sample.shapes[node.input[1]][0] - len(self.sample.shapes[out])
            if axis >= 0:
                new.input[1] = self._set_element(new.input[1], node.input[1], axis, len(idx[out]), part, new.name)
        elif op == "Split" and node.input[0] in lab.tensors:
            s = lab.tensors[node.input[0]]
            if s.axis == _attr(node, "axis", 0) % len(self.sample.shapes[node.input[0]]):
                sizes = [len(idx[o]) for o in node.output]
                while len(new.input) < 2:
                    new.input.append("")
                new.input[1] = self._init(f"{new.name}.split", np.array(sizes, dtype=np.int64))
                for a in list(new.attribute):
                    if a.name == "num_outputs":
                        new.attribute.remove(a)
        elif op == "Slice" and node.input[0] in lab.tensors:
            s = lab.tensors[node.input[0]]
            params = slice_params(node, self.sample.shapes, self.sample.values)
            if s.axis in params:
                n = len(lab.tensors[node.input[0]].labels)
                start, end, _ = slice(*params[s.axis][:2]).indices(n)
                m = mask[node.input[0]]
                params[s.axis] = (int(m[:start].sum()), int(m[:end].sum()), 1)
                axes = sorted(params)
                for k, key in ((1, 0), (2, 1), (3, None), (4, 2)):
                    while len(new.input) <= k:
                        new.input.append("")
                    vals = axes if key is None else [params[a][key] for a in axes]
                    new.input[k] = self._init(f"{new.name}.{('starts', 'ends', 'axes', 'steps')[k - 1]}",
                                              np.array(vals, dtype=np.int64))

    def _set_element(self, current: str, original: str, axis: int, size: int, part: _Part, name: str) -> str:
        if original in self.inits:
            shape = self._arr(original).copy()
            if shape[axis] != -1:
                shape[axis] = size
            return self._init(f"{original}.{name}", shape)
        # a computed shape: splice the part's size in at `axis`
        c = lambda suffix, v: self._init(f"{name}.{suffix}", np.array(v, dtype=np.int64))
        zero = c("shape_axes", [0])
        a = self._node(part, "Slice", [current, c("head_s", [0]), c("head_e", [axis]), zero], [f"{name}.shape_a"],
                       f"{name}.shape_a")
        b = self._node(part, "Slice", [current, c("tail_s", [axis + 1]), c("tail_e", [INT_MAX]), zero],
                       [f"{name}.shape_b"], f"{name}.shape_b")
        return self._node(part, "Concat", [a, c("shape_size", [size]), b], [f"{name}.shape"], f"{name}.shape", axis=0)

    def _slice_input(self, tensor: str, axis: int, keep: np.ndarray, part: _Part, name: str, p: int,
                     region: Region) -> str:
        if tensor in self.inits:
            return self._init(f"{tensor}.{name}", np.take(self._arr(tensor), keep, axis=axis))
        if self.kv_shard and tensor in self.graph_inputs and set(self.consumers[tensor]) <= set(region.nodes):
            self.new_inputs.setdefault(tensor, []).append((f"{tensor}.p{p}", axis, keep))
            return f"{tensor}.p{p}"  # this part's own cache, fed by its own present of the step before
        ind = self._init(f"{name}.indices", keep.astype(np.int64))
        return self._node(part, "Gather", [tensor, ind], [f"{name}.sliced"], f"{name}.slice", axis=axis)

    def _gather(self, region: Region, lab, tensor: str, parts: list[_Part], block: int) -> TypedRegion:
        s = lab.tensors[tensor]
        classes = lab.classes(s.labels)
        order = np.concatenate([np.flatnonzero(np.isin(classes, sorted(part.classes))) for part in parts])
        name = f"{tensor}.gather"
        pieces = [f"{tensor}.p{p}" for p in range(len(parts))]
        gparts = [_Part(part.device, part.classes, part.share, [], pieces[p]) for p, part in enumerate(parts)]
        if np.array_equal(order, np.arange(len(order))):
            self.added.append(helper.make_node("Concat", pieces, [tensor], name=name, axis=s.axis))
        else:
            self.added.append(helper.make_node("Concat", pieces, [f"{tensor}.cat"], name=name, axis=s.axis))
            inv = self._init(f"{tensor}.order", np.argsort(order).astype(np.int64))
            self.added.append(helper.make_node("Gather", [f"{tensor}.cat", inv], [tensor], name=f"{name}.order",
                                               axis=s.axis))
        return _record(f"gather:{tensor}", region.kind, (), name, gparts, block, Combine.CONCAT)

    def split_vocab(self, head: onnx.NodeProto, devices: Sequence[str], weight, argmax: bool = False) -> TypedRegion:
        w = self._arr(head.input[1])
        trans_b = head.op_type == "Gemm" and _attr(head, "transB", 0)
        vocab = w.shape[0] if trans_b else w.shape[1]
        sizes = _sizes(vocab, [weight[d] for d in devices], f"LM head {head.name!r} (vocabulary {vocab})")
        bounds = np.concatenate([[0], np.cumsum(sizes)])
        parts = []
        for p, d in enumerate(devices):
            part = _Part(d, frozenset(), sizes[p] / vocab)
            cols = slice(int(bounds[p]), int(bounds[p + 1]))
            new = onnx.NodeProto()
            new.CopyFrom(head)
            new.name = f"{head.name}.p{p}"
            new.input[1] = self._init(f"{head.input[1]}.{new.name}", w[cols] if trans_b else w[:, cols])
            if head.op_type == "Gemm" and len(head.input) > 2 and head.input[2]:
                c = self._arr(head.input[2])
                if c.ndim and c.shape[-1] > 1:
                    new.input[2] = self._init(f"{head.input[2]}.{new.name}", c[..., cols])
            del new.output[:]
            new.output.append(f"{head.output[0]}.p{p}")
            self.added.append(new)
            part.nodes.append(new.name)
            part.output = new.output[0] if not argmax else self._winner(part, new.output[0], int(bounds[p]))
            parts.append(part)
        self.removed.add(head.name)
        if argmax:
            return self._argmax_combine(head, parts, sizes)
        name = f"{head.name}.concat"
        self.added.append(helper.make_node("Concat", [p.output for p in parts], [head.output[0]], name=name, axis=-1))
        return _record(f"vocab:{head.name}", "vocab", (head.name,), name, parts, None, Combine.CONCAT,
                       _column_units(sizes))

    def _winner(self, part: _Part, logits: str, offset: int) -> str:
        """The part's best logit and its vocabulary index (as a float: exact below 2^24) side by side: [..., 2]."""
        base = logits
        opset = next(o.version for o in self.model.opset_import if o.domain in ("", "ai.onnx"))
        axes = self._init(f"{base}.axes", np.array([-1], dtype=np.int64))
        best = (self._node(part, "ReduceMax", [logits, axes], [f"{base}.max"], f"{base}.max", keepdims=1)
                if opset >= 18 else
                self._node(part, "ReduceMax", [logits], [f"{base}.max"], f"{base}.max", axes=[-1], keepdims=1))
        where = self._node(part, "ArgMax", [logits], [f"{base}.argmax"], f"{base}.argmax", axis=-1, keepdims=1)
        off = self._init(f"{base}.offset", np.array(offset, dtype=np.int64))
        where = self._node(part, "Add", [where, off], [f"{base}.index"], f"{base}.index")
        where = self._node(part, "CastLike", [where, best], [f"{base}.findex"], f"{base}.findex")
        return self._node(part, "Concat", [best, where], [f"{base}.winner"], f"{base}.winner", axis=-1)

    def _argmax_combine(self, head: onnx.NodeProto, parts: list[_Part], sizes: Sequence[int]) -> TypedRegion:
        """Only the parts' winners cross devices; the model's logits output becomes `<logits>.argmax` (token ids)."""
        out = head.output[0]
        c = lambda suffix, v: self._init(f"{out}.{suffix}", np.array(v, dtype=np.int64))
        nodes = [
            helper.make_node("Concat", [p.output for p in parts], [f"{out}.winners"], name=f"{head.name}.winners",
                             axis=-1),
            helper.make_node("Slice", [f"{out}.winners", c("s0", [0]), c("end", [INT_MAX]), c("ax", [-1]),
                                       c("step", [2])], [f"{out}.values"], name=f"{head.name}.values"),
            helper.make_node("Slice", [f"{out}.winners", c("s1", [1]), f"{out}.end", f"{out}.ax", f"{out}.step"],
                             [f"{out}.indices"], name=f"{head.name}.indices"),
            helper.make_node("ArgMax", [f"{out}.values"], [f"{out}.best"], name=f"{head.name}.best", axis=-1,
                             keepdims=1),
            helper.make_node("GatherElements", [f"{out}.indices", f"{out}.best"], [f"{out}.token"],
                             name=f"{head.name}.token", axis=-1),
            helper.make_node("Squeeze", [f"{out}.token", f"{out}.ax"], [f"{out}.tokenf"], name=f"{head.name}.squeeze"),
            helper.make_node("Cast", [f"{out}.tokenf"], [f"{out}.argmax"], name=f"{head.name}.cast",
                             to=onnx.TensorProto.INT64),
        ]
        self.added.extend(nodes)
        self.argmax_outputs[out] = f"{out}.argmax"
        return _record(f"vocab:{head.name}", "vocab", (head.name,), nodes[0].name, parts, None, Combine.ARGMAX,
                       _column_units(sizes), [n.name for n in nodes])

    def finish(self, records: list[TypedRegion]) -> Graph:
        m = self.model
        nodes = [n for n in m.graph.node if n.name not in self.removed] + self.added
        del m.graph.node[:]
        m.graph.node.extend(topological_order(nodes))
        m.graph.initializer.extend(self.new_inits.values())
        _reinterface(m.graph.input, self.new_inputs)
        _reinterface(m.graph.output, self.new_outputs)
        for vi in m.graph.output:
            if vi.name in self.argmax_outputs:  # logits [..., vocab] -> token ids [...]
                vi.name = self.argmax_outputs[vi.name]
                vi.type.tensor_type.elem_type = onnx.TensorProto.INT64
                del vi.type.tensor_type.shape.dim[-1]
        _drop_unused(m)
        produced = {o for n in m.graph.node for o in n.output}
        added = {o for n in self.added for o in n.output}
        kept = [v for v in m.graph.value_info if v.name in produced and v.name not in added]
        del m.graph.value_info[:]
        m.graph.value_info.extend(kept)
        alive = {n.name for n in m.graph.node}
        # replicas of side inputs that ended up unused were dropped with the dead code
        kept_regions = tuple(r.with_parts([replace(p, nodes=tuple(n for n in p.nodes if n in alive)) for p in r.parts])
                             for r in records)
        return replace(from_model(m, name=self.graph.name, sha256=self.graph.sha256),
                       regions=(*self.graph.regions, *kept_regions))


def _row(mask: np.ndarray, tensor: str) -> np.ndarray:
    """The part's elements along the split axis (a fused q/k/v tensor: the same heads in every segment)."""
    if mask.ndim == 1:
        return mask
    if not (mask == mask[:1]).all():
        raise SplitError(f"internal error: tensor {tensor!r} has different heads per q/k/v segment in one part")
    return mask[0]


def _reinterface(values, changes: Mapping[str, list[tuple[str, int, np.ndarray]]]) -> None:
    """Replace model inputs/outputs by one per part, the split axis resized (the per-device KV cache)."""
    for vi in [v for v in values if v.name in changes]:
        at = list(values).index(vi)
        values.remove(vi)
        for k, (name, axis, keep) in enumerate(changes[vi.name]):
            new = onnx.ValueInfoProto()
            new.CopyFrom(vi)
            new.name = name
            dim = new.type.tensor_type.shape.dim[axis]
            dim.Clear()
            dim.dim_value = len(keep)
            values.insert(at + k, new)


def _attr(node: onnx.NodeProto, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _record(name: str, kind: str, layers, combine: str, parts: Sequence[_Part], block: int | None,
            merge: Combine = Combine.SUM, units: Sequence[tuple[int, ...]] | None = None,
            combine_nodes: Sequence[str] = ()) -> TypedRegion:
    """The typed region; a part's units are the indices of its head groups / neurons among the region's."""
    if units is None:
        index = {c: i for i, c in enumerate(sorted({c for p in parts for c in p.classes}))}
        units = [tuple(sorted(index[c] for c in p.classes)) for p in parts]
    typed = tuple(Part(u, p.output, tuple(p.nodes), p.device, round(p.share, 6)) for p, u in zip(parts, units))
    return TypedRegion(name, SplitKind(kind), tuple(layers), sum(len(u) for u in units), merge, combine, typed,
                       axis=-1, combine_nodes=tuple(combine_nodes or (combine,)), block=block)


def _column_units(sizes: Sequence[int]) -> list[tuple[int, ...]]:
    bounds = np.concatenate([[0], np.cumsum(sizes)]).astype(int)
    return [tuple(range(a, b)) for a, b in zip(bounds, bounds[1:]) if b > a]


def _sizes(total: int, weights: Sequence[float], what: str, allow_idle: bool = False) -> list[int]:
    """Integer sizes summing to `total`, proportional to weights (largest remainder), each >= 1 unless idle."""
    k = len(weights)
    if total < k and not allow_idle:
        raise SplitError(f"{what}: {k} devices but only {total} indivisible groups; a part would be empty. Use fewer "
                         f"devices for it, or allow_idle=True to leave {k - total} device(s) out of this sub-block")
    raw = [total * w / sum(weights) for w in weights]
    sizes = [int(np.floor(r)) for r in raw]
    for i in sorted(range(k), key=lambda i: (sizes[i] - raw[i], i))[: total - sum(sizes)]:
        sizes[i] += 1
    for i in range(k):  # an empty part takes one from the part most above its due
        if sizes[i] == 0 and total >= k:
            j = max((j for j in range(k) if sizes[j] > 1), key=lambda j: sizes[j] - raw[j])
            sizes[i], sizes[j] = 1, sizes[j] - 1
    return sizes


def _region_cost(region: Region) -> float:
    lab = region.labels
    return float(lab.size + len(lab.tensors[region.exit_input].labels))


def _compensate(devices, weight, attention: Mapping[str, float], attention_total: float, mlp_total: float) -> dict:
    """MLP shares that even out the block: a device with more than its share of heads (head groups come whole, so
    9 heads over 2 devices is 6 + 3) gets fewer neurons, so that its whole block is close to its share."""
    total = sum(weight[d] for d in devices)
    block = attention_total + mlp_total
    due = {d: max(weight[d] / total * block - attention.get(d, 0.0), 1e-3 * block) for d in devices}
    return {**weight, **due}


def _allocate(order, cost, devices, weight, allow_idle, region: Region) -> list[_Part]:
    """Consecutive classes (head groups / neurons, of equal cost in every model seen) to each device, their number
    proportional to the device's share (largest remainder); every device gets at least one unless `allow_idle`."""
    what = f"{'attention' if region.kind == 'heads' else 'MLP'} at {region.exit!r} ({len(order)} " \
           f"{'head groups' if region.kind == 'heads' else 'neurons'})"
    counts = _sizes(len(order), [weight[d] for d in devices], what, allow_idle)
    parts, start = [], 0
    for d, n in zip(devices, counts):
        if n:
            parts.append(_Part(d, frozenset(order[start:start + n]), float(cost[start:start + n].sum() / cost.sum())))
        start += n
    return parts


def _lm_head(graph: Graph, in_regions: set[str]) -> onnx.NodeProto | None:
    inits = {t.name: t for t in graph.model.graph.initializer}
    outputs = set(graph.outputs)
    heads = [n for n in graph.model.graph.node if n.name not in in_regions and weight_input(n, inits)
             and n.output[0] in outputs]
    return heads[-1] if heads else None


_refs = node_references


def _drop_unused(m: onnx.ModelProto) -> None:
    """Remove nodes whose outputs nobody reads, then initializers nobody reads."""
    outputs = {o.name for o in m.graph.output}
    changed = True
    while changed:
        used = {r for n in m.graph.node for r in _refs(n)} | outputs
        keep = [n for n in m.graph.node if any(o in used for o in n.output if o)]
        changed = len(keep) != len(m.graph.node)
        if changed:
            del m.graph.node[:]
            m.graph.node.extend(keep)
    used = {r for n in m.graph.node for r in _refs(n)} | outputs
    keep_inits = [t for t in m.graph.initializer if t.name in used]
    del m.graph.initializer[:]
    m.graph.initializer.extend(keep_inits)
