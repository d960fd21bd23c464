"""load: an ONNX model becomes a `Graph` with shapes, byte sizes, parameters and MACs per layer."""

from __future__ import annotations

import hashlib
import math
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from edgesplit.errors import ModelError, first_line
from edgesplit.layout import Region
from edgesplit.opset import upgrade

Dim = int | str


@dataclass(frozen=True)
class TensorInfo:
    """One value of the graph. Symbolic dims stay symbolic; `nbytes` counts them as `dims` says (1 if unset)."""

    name: str
    dtype: str
    shape: tuple[Dim, ...]
    nbytes: int

    def to_dict(self) -> dict:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape), "bytes": self.nbytes}

    @staticmethod
    def from_dict(d: Mapping) -> TensorInfo:
        return TensorInfo(d["name"], d["dtype"], tuple(d["shape"]), int(d["bytes"]))


@dataclass(frozen=True)
class Layer:
    """One node of the graph. `inputs` are activations (incl. outer-scope refs of subgraphs), `weights` initializers."""

    name: str
    op_type: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    weights: tuple[str, ...]
    params: int
    param_bytes: int
    macs: int


@dataclass(frozen=True)
class Graph:
    """A shape-inferred ONNX model with stable node names, in topological order."""

    model: onnx.ModelProto
    layers: tuple[Layer, ...]
    tensors: Mapping[str, TensorInfo]
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    sha256: str
    name: str = "model"
    path: str = ""  # where it was loaded from, if a file
    regions: tuple[Region, ...] = ()  # horizontal regions of a rewritten graph
    dims: Mapping[str, int] = field(default_factory=dict, compare=False)  # the symbolic dims' sizes `nbytes` used
    _index: dict[str, int] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        self._index.update({layer.name: i for i, layer in enumerate(self.layers)})

    def layer(self, name: str) -> Layer:
        return self.layers[self._index[name]]

    def position(self, name: str) -> int:
        return self._index[name]

    def has_layer(self, name: str) -> bool:
        return name in self._index

    @property
    def initializers(self) -> dict[str, onnx.TensorProto]:
        return {t.name: t for t in self.model.graph.initializer}

    def producers(self) -> dict[str, str]:
        return {t: layer.name for layer in self.layers for t in layer.outputs}

    def consumers(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = defaultdict(list)
        for layer in self.layers:
            for t in dict.fromkeys(layer.inputs):
                out[t].append(layer.name)
        return out

    @property
    def total_params(self) -> int:
        return sum(layer.params for layer in self.layers)

    @property
    def total_param_bytes(self) -> int:
        return sum(layer.param_bytes for layer in self.layers)

    @property
    def total_macs(self) -> int:
        return sum(layer.macs for layer in self.layers)


def load(source: str | Path | onnx.ModelProto, dims: Mapping[str, int] | None = None) -> Graph:
    """Load, check and shape-infer an ONNX model (opset < 13 is converted, external data allowed)."""
    if isinstance(source, onnx.ModelProto):
        model, name, digest = source, source.graph.name or "model", _sha256_bytes(source.SerializeToString())
    else:
        model, name, digest = _read(Path(source))
    graph = from_model(model, dims=dims, name=name, sha256=digest)
    return graph if isinstance(source, onnx.ModelProto) else replace(graph, path=str(Path(source).resolve()))


def from_model(
    model: onnx.ModelProto, dims: Mapping[str, int] | None = None, name: str = "model", sha256: str | None = None
) -> Graph:
    """Build a Graph from an in-memory model (used by load and by every rewrite)."""
    model = _fold_constants(_stable_names(upgrade(model, dims)))  # opset < 13: converted and checked
    try:
        inferred = onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True, data_prop=True)
    except Exception as exc:  # onnx raises several exception types for inference failures
        raise ModelError(f"shape inference failed: {first_line(exc)}") from None
    tensors = _tensor_infos(inferred, dims or {})
    layers = _layers(inferred, tensors)
    digest = sha256 or _sha256_bytes(model.SerializeToString())
    return Graph(
        model=inferred,
        layers=layers,
        tensors=tensors,
        inputs=tuple(i.name for i in inferred.graph.input if i.name not in {t.name for t in inferred.graph.initializer}),
        outputs=tuple(o.name for o in inferred.graph.output),
        sha256=digest,
        name=name,
        dims=dict(dims or {}),
    )


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()



def _read(path: Path) -> tuple[onnx.ModelProto, str, str]:
    if not path.is_file():
        raise ModelError(f"expected an ONNX model file, but {str(path)!r} does not exist or is not a file")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:
        raise ModelError(f"{path} is not an ONNX model (protobuf parse failed: {first_line(exc)})") from None
    if not model.graph.node:
        raise ModelError(f"{path} is not an ONNX model with a graph (no nodes found)")
    try:
        onnx.checker.check_model(str(path))
    except Exception as exc:
        raise ModelError(f"{path} fails onnx.checker: {first_line(exc)}") from None
    try:
        onnx.load_external_data_for_model(model, str(path.parent))
    except Exception as exc:
        raise ModelError(f"{path}: cannot read its external data: {first_line(exc)}") from None
    return model, path.stem, sha256_file(path)


def _stable_names(model: onnx.ModelProto) -> onnx.ModelProto:
    """Give every node a unique, deterministic name: keep good names, name the rest `<OpType>_<index>`."""
    seen: set[str] = set()
    needs = False
    for node in model.graph.node:
        if not node.name or node.name in seen:
            needs = True
            break
        seen.add(node.name)
    if not needs:
        return model
    model = _copy(model)
    taken = {n.name for n in model.graph.node if n.name}
    used: set[str] = set()
    for i, node in enumerate(model.graph.node):
        if node.name and node.name not in used:
            used.add(node.name)
            continue
        base = f"{node.op_type}_{i}" if not node.name else node.name
        candidate, k = base, 1
        while candidate in used or (candidate in taken and candidate != node.name):
            k += 1
            candidate = f"{base}_{k}"
        node.name = candidate
        used.add(candidate)
    return model


def _fold_constants(model: onnx.ModelProto) -> onnx.ModelProto:
    """Turn top-level Constant nodes, and Identity nodes of initializers, into initializers.

    Constants are copied to every stage that needs them instead of being sent between devices.
    """
    inits = {t.name: t for t in model.graph.initializer}

    def constant(node: onnx.NodeProto) -> bool:
        return node.domain in ("", "ai.onnx") and (
            node.op_type == "Constant" or (node.op_type == "Identity" and node.input[0] in inits))

    if not any(constant(n) for n in model.graph.node):
        return model
    model = _copy(model)
    keep, new_inits = [], []
    for node in model.graph.node:
        value = _constant_value(node, inits) if constant(node) else None
        if value is None:
            keep.append(node)
        else:
            new_inits.append(value)
    del model.graph.node[:]
    model.graph.node.extend(keep)
    model.graph.initializer.extend(new_inits)
    return model


def _constant_value(node: onnx.NodeProto, inits: Mapping[str, onnx.TensorProto]) -> onnx.TensorProto | None:
    out = node.output[0]
    if node.op_type == "Identity":
        t = onnx.TensorProto()
        t.CopyFrom(inits[node.input[0]])
        t.name = out
        return t
    for attr in node.attribute:
        if attr.name == "value":
            t = onnx.TensorProto()
            t.CopyFrom(attr.t)
            t.name = out
            return t
        scalar = {
            "value_float": (np.float32, lambda a: a.f),
            "value_floats": (np.float32, lambda a: list(a.floats)),
            "value_int": (np.int64, lambda a: a.i),
            "value_ints": (np.int64, lambda a: list(a.ints)),
        }.get(attr.name)
        if scalar:
            dtype, get = scalar
            return numpy_helper.from_array(np.array(get(attr), dtype=dtype), out)
    return None


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    m = onnx.ModelProto()
    m.CopyFrom(model)
    return m


def _value_infos(model: onnx.ModelProto) -> Iterable[onnx.ValueInfoProto]:
    yield from model.graph.input
    yield from model.graph.value_info
    yield from model.graph.output


def _tensor_infos(model: onnx.ModelProto, dims: Mapping[str, int]) -> dict[str, TensorInfo]:
    infos: dict[str, TensorInfo] = {}
    for t in model.graph.initializer:
        dtype = helper.tensor_dtype_to_np_dtype(t.data_type)
        shape = tuple(int(d) for d in t.dims)
        infos[t.name] = TensorInfo(t.name, np.dtype(dtype).name, shape, _nbytes(shape, dtype, dims))
    for vi in _value_infos(model):
        if vi.name in infos or not vi.type.HasField("tensor_type"):
            continue
        tt = vi.type.tensor_type
        if tt.elem_type == 0 or not tt.HasField("shape"):
            continue
        dtype = helper.tensor_dtype_to_np_dtype(tt.elem_type)
        shape = tuple(
            d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in tt.shape.dim
        )
        infos[vi.name] = TensorInfo(vi.name, np.dtype(dtype).name, shape, _nbytes(shape, dtype, dims))
    unknown = {out: node for node in model.graph.node for out in node.output if out and out not in infos}
    if unknown:
        infos.update(_probe(model, unknown, dims))
    return infos


def _probe(model: onnx.ModelProto, unknown: Mapping[str, onnx.NodeProto], dims: Mapping[str, int]) -> dict[str, TensorInfo]:
    """Shapes static inference could not find (data-dependent Reshape targets): run the model once on inputs of ones.

    The probed shape is concrete for the probe's dims; stage files declare such tensors without a shape.
    """
    from edgesplit.probe import exposing, run_model

    name, node = next(iter(unknown.items()))
    where = f"tensor {name!r} (output of node {node.name!r}, {node.op_type})"
    inits = {t.name for t in model.graph.initializer}
    feeds = {}
    for i in (i for i in model.graph.input if i.name not in inits):
        tt = i.type.tensor_type
        shape = [d.dim_value if d.HasField("dim_value") else dims.get(d.dim_param, 1) for d in tt.shape.dim]
        feeds[i.name] = np.ones(shape, dtype=helper.tensor_dtype_to_np_dtype(tt.elem_type))
    try:
        values = run_model(exposing(model, unknown, only=True), feeds)
    except Exception as exc:
        raise ModelError(f"cannot infer the shape of {where}: static shape inference gives no rank and running the "
                         f"model on sample inputs (symbolic dims = {dict(dims) or 1}) failed: {first_line(exc)[:200]}; if the model "
                         f"only runs for certain sizes, give them (CLI: --dim NAME=SIZE, Python: load(..., dims={{...}}))") from None
    return {t: TensorInfo(t, v.dtype.name, tuple(v.shape), int(v.nbytes)) for t, v in values.items()}


def _nbytes(shape: tuple[Dim, ...], dtype: np.dtype, dims: Mapping[str, int]) -> int:
    n = 1
    for d in shape:
        n *= d if isinstance(d, int) else dims.get(d, 1)
    return n * np.dtype(dtype).itemsize


def node_references(node: onnx.NodeProto) -> list[str]:
    """Every tensor name the node reads: its inputs plus outer-scope names used inside its subgraphs."""
    refs = [i for i in node.input if i]
    for attr in node.attribute:
        for g in ([attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)):
            refs.extend(_outer_refs(g))
    return list(dict.fromkeys(refs))


def _outer_refs(graph: onnx.GraphProto) -> list[str]:
    local = {i.name for i in graph.input} | {t.name for t in graph.initializer}
    refs: list[str] = []
    for node in graph.node:
        refs.extend(r for r in node_references(node) if r not in local)
        local.update(o for o in node.output if o)
    return refs


def _layers(model: onnx.ModelProto, tensors: Mapping[str, TensorInfo]) -> tuple[Layer, ...]:
    inits = {t.name: t for t in model.graph.initializer}
    layers = []
    for node in model.graph.node:
        refs = node_references(node)
        weights = tuple(r for r in refs if r in inits)
        params = sum(math.prod(inits[w].dims) for w in weights)
        param_bytes = sum(tensors[w].nbytes for w in weights)
        layers.append(
            Layer(
                name=node.name,
                op_type=node.op_type,
                inputs=tuple(r for r in refs if r not in inits),
                outputs=tuple(o for o in node.output if o),
                weights=weights,
                params=params,
                param_bytes=param_bytes,
                macs=_macs(node, tensors),
            )
        )
    return tuple(layers)


def _numel(info: TensorInfo) -> int:
    return math.prod(d if isinstance(d, int) else 1 for d in info.shape)


def _macs(node: onnx.NodeProto, tensors: Mapping[str, TensorInfo]) -> int:
    op = node.op_type
    try:
        if op == "Conv":
            w = tensors[node.input[1]].shape
            return _numel(tensors[node.output[0]]) * math.prod(int(d) for d in w[1:])
        if op == "ConvTranspose":
            w = tensors[node.input[1]].shape
            return _numel(tensors[node.input[0]]) * math.prod(int(d) for d in w[1:])
        if op in ("Gemm", "MatMul"):
            a = tensors[node.input[0]].shape
            trans_a = next((x.i for x in node.attribute if x.name == "transA"), 0)
            k = a[-2] if (op == "Gemm" and trans_a) else a[-1]
            return _numel(tensors[node.output[0]]) * (k if isinstance(k, int) else 1)
    except (KeyError, IndexError, ValueError):
        return 0
    return 0
