"""Concrete shapes of every tensor: one onnxruntime run on sample inputs, every intermediate exposed.

Static shape inference loses track of exporters' dynamic reshapes (Shape -> Gather -> Concat -> Reshape); a run
does not. Symbolic dims take sizes > 1 (batch 2, others 5 unless given), so no axis hides behind a size of 1.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper, numpy_helper

from edgesplit.errors import ModelError
from edgesplit.graph import Graph
from edgesplit.runtime.common import session_options

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


def run_model(model: onnx.ModelProto, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Every output of `model`, unoptimised: a one-off run, where optimising a large graph costs more than it saves."""
    opts = session_options(None)
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(names, dict(inputs))))


def run(graph: Graph, inputs: Mapping[str, np.ndarray]) -> Concrete:
    model = onnx.ModelProto()
    model.CopyFrom(graph.model)
    declared = {o.name for o in model.graph.output}
    for node in model.graph.node:
        for o in node.output:
            if o and o not in declared:
                elem = helper.np_dtype_to_tensor_dtype(np.dtype(graph.tensors[o].dtype))
                model.graph.output.append(helper.make_tensor_value_info(o, elem, None))
                declared.add(o)
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
