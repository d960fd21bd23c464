"""Models below opset 13 (AutoDiCE tested at 9, its search script exports at 12): converted with
onnx.version_converter, and used only once the converted model computes what the original does on sample inputs."""

from __future__ import annotations

import logging
from collections.abc import Mapping

import numpy as np
import onnx
from onnx import helper

from edgesplit.errors import ModelError, first_line

MINIMUM = 13
TARGET = 17  # the opset edgesplit's rewrites and the test zoo use
RTOL = 1e-5
log = logging.getLogger("edgesplit")


def opset_of(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def upgrade(model: onnx.ModelProto, dims: Mapping[str, int] | None = None) -> onnx.ModelProto:
    """The model itself at opset >= 13, else converted to opset 17 and checked against the original."""
    opset = opset_of(model)
    if opset >= MINIMUM:
        return model
    if opset == 0:
        raise ModelError("expected an ONNX model importing the default (ai.onnx) opset, got none")
    try:
        converted = onnx.version_converter.convert_version(model, TARGET)
        onnx.checker.check_model(converted)
    except Exception as exc:  # the converter raises several types, one per missing adapter
        raise ModelError(f"expected an ONNX model with opset >= {MINIMUM}, got opset {opset}, and "
                         f"onnx.version_converter cannot convert it to {TARGET}: {first_line(exc)}") from None
    worst = _difference(model, converted, dims or {})
    if worst:
        raise ModelError(f"expected an ONNX model with opset >= {MINIMUM}, got opset {opset}; converting it to "
                         f"{TARGET} changed what it computes ({worst}), so it is not used; convert it yourself")
    log.warning("the model has opset %d; converted it to opset %d with onnx.version_converter (outputs "
                "checked equal on sample inputs)", opset, TARGET)
    return converted


def _difference(original: onnx.ModelProto, converted: onnx.ModelProto, dims: Mapping[str, int]) -> str:
    """'' when both give the same outputs on one sample input, else what differs."""
    import onnxruntime as ort

    try:
        before, after = (ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
                         for m in (original, converted))
        feeds = _sample(original, before, dims)
        want, got = before.run(None, feeds), after.run(None, feeds)
    except Exception as exc:  # onnxruntime raises its own exception types
        return f"onnxruntime cannot run both on sample inputs: {first_line(exc)}"
    for out, a, b in zip(before.get_outputs(), want, got):
        a, b = np.asarray(a), np.asarray(b)
        if a.shape != b.shape:
            return f"output {out.name!r}: shape {list(a.shape)} became {list(b.shape)}"
        scale = float(np.max(np.abs(a), initial=0.0)) or 1.0
        err = float(np.max(np.abs(a.astype(np.float64) - b), initial=0.0)) / scale
        if a.dtype.kind in "fc" and err > RTOL or a.dtype.kind not in "fc" and np.any(a != b):
            return f"output {out.name!r}: relative difference {err:.3g}"
    return ""


def _sample(model: onnx.ModelProto, session, dims: Mapping[str, int]) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    declared = {i.name: i for i in model.graph.input}
    feeds = {}
    for i in session.get_inputs():
        shape = [d if isinstance(d, int) else dims.get(str(d), 1) for d in i.shape]
        dtype = np.dtype(helper.tensor_dtype_to_np_dtype(declared[i.name].type.tensor_type.elem_type))
        feeds[i.name] = rng.standard_normal(shape).astype(dtype) if dtype.kind == "f" else np.ones(shape, dtype)
    return feeds
