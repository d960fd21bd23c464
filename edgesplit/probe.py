"""Concrete shapes and values: one onnxruntime run on sample inputs with intermediate tensors exposed.

Static shape inference loses track of exporters' dynamic reshapes (Shape -> Gather -> Concat -> Reshape); a run
does not. `load` probes the tensors inference left without a shape (`graph._probe`); the Transformer rewrite runs
the whole model once (`run`) to follow every reshape exactly. Symbolic dims of `sample_inputs` take sizes > 1
(batch 2, others 5 unless given), so no axis hides behind a size of 1.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper

from edgesplit.errors import ModelError

if TYPE_CHECKING:
    from edgesplit.graph import Graph

SMALL = 64  # int tensors up to this many elements keep their values (shape vectors, slice bounds)


@dataclass(frozen=True)
class Concrete:
    inputs: dict[str, np.ndarray]
    shapes: dict[str, tuple[int, ...]]
    values: dict[str, np.ndarray]  # small integer tensors
    outputs: dict[str, np.ndarray]


def default_dim(name: str) -> int:
    return 2 if "batch" in name.lower() else 5


def sample_inputs(graph: Graph, dims: Mapping[str, int] | None = None, seed: int = 0) -> dict[str, np.ndarray]:
    """Inputs of the declared shapes: token ids small and random, masks all ones, floats standard normal."""
    rng = np.random.default_rng(seed)
    out = {}
    for name in graph.inputs:
        t = graph.tensors[name]
        shape = [d if isinstance(d, int) else (dims or {}).get(d, default_dim(d)) for d in t.shape]
        dtype = np.dtype(t.dtype)
        if dtype.kind == "f":
            out[name] = rng.standard_normal(shape).astype(dtype)
        elif "mask" in name.lower() or dtype.kind == "b":
            out[name] = np.ones(shape, dtype=dtype)
        elif "position" in name.lower() and shape:
            out[name] = np.broadcast_to(np.arange(shape[-1], dtype=dtype), shape).copy()
        elif "type" in name.lower():  # token type ids: segment 0
            out[name] = np.zeros(shape, dtype=dtype)
        else:  # token ids: 0 and 1 exist in every vocabulary
            out[name] = rng.integers(0, 2, size=shape).astype(dtype)
    return out


def exposing(model: onnx.ModelProto, tensors: Iterable[str], only: bool = False) -> onnx.ModelProto:
    """A copy of `model` with `tensors` as outputs too (`only`: instead of its own outputs)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    if only:
        del out.graph.output[:]
    declared = {o.name for o in out.graph.output}
    out.graph.output.extend(onnx.ValueInfoProto(name=t) for t in dict.fromkeys(tensors) if t not in declared)
    return out


def run_model(model: onnx.ModelProto, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Every output of `model`, unoptimised: a one-off run, where optimising a large graph costs more than it saves."""
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(names, dict(inputs))))


def run(graph: Graph, inputs: Mapping[str, np.ndarray]) -> Concrete:
    """Every tensor's concrete shape, the values of the small integer ones, and the model's outputs."""
    model = exposing(graph.model, (o for node in graph.model.graph.node for o in node.output if o))
    try:
        results = run_model(model, inputs)
    except Exception as exc:  # onnxruntime raises its own exception types
        raise ModelError(
            f"cannot run the model on sample inputs {({k: list(v.shape) for k, v in inputs.items()})} to learn its "
            f"shapes: {str(exc).splitlines()[0][:300]}; give consistent sizes for its symbolic dims (dims=...)"
        ) from None
    shapes = {k: tuple(int(d) for d in v.shape) for k, v in results.items()}
    values = {k: v for k, v in results.items() if v.dtype.kind in "iu" and v.size <= SMALL}
    for t in model.graph.initializer:
        shapes[t.name] = tuple(int(d) for d in t.dims)
        if t.data_type in (onnx.TensorProto.INT64, onnx.TensorProto.INT32) and np.prod(t.dims, dtype=np.int64) <= SMALL:
            values[t.name] = numpy_helper.to_array(t)
    for k, v in inputs.items():
        shapes[k] = tuple(v.shape)
    return Concrete(dict(inputs), shapes, values, {o: results[o] for o in graph.outputs})
