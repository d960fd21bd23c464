"""Sessions that hold about their parameters once, and resident memory that shows what is in use (no Ray here)."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from edgesplit.runtime.common import CPU, session_options


def start_onnxruntime(threads: int) -> None:
    """Initialise onnxruntime's process-wide state (environment, kernel registries: the same whatever the model)
    with a one-node session, so that a device's memory splits into Ray's worker, this fixed runtime cost, and its
    stages' share."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "start", [x],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    session = ort.InferenceSession(model.SerializeToString(), session_options(threads),
                                   providers=["CPUExecutionProvider"])
    session.run(None, {"x": np.zeros(1, np.float32)})
    trim()


def lean_session(model: bytes, threads: int, providers: tuple[str, ...] | list[str] = (CPU,)) -> Any:
    """An onnxruntime session holding about its parameters once: optimise once into a file (fusions made at load
    time keep the unfused weights alive as well), then load that file with optimisations off. Its arena keeps the
    peak activations between requests (freed without an arena, glibc keeps more than that). The optimised
    graph is the one the local executor runs, so outputs stay bitwise identical."""
    import onnxruntime as ort

    if list(providers) != [CPU]:  # an optimised file may hold provider-specific nodes: let each provider optimise
        return ort.InferenceSession(model, session_options(threads), providers=list(providers))
    with tempfile.TemporaryDirectory(prefix="edgesplit-stage-") as tmp:
        source, optimised = Path(tmp) / "stage.onnx", Path(tmp) / "stage.opt.onnx"
        source.write_bytes(model)
        opts = session_options(threads)
        opts.optimized_model_filepath = str(optimised)
        try:
            ort.InferenceSession(str(source), opts, providers=["CPUExecutionProvider"])
        except Exception:  # noqa: BLE001 - some graphs cannot be saved optimised: run them as they are
            return ort.InferenceSession(model, session_options(threads), providers=["CPUExecutionProvider"])
        trim()
        lean = session_options(threads)
        lean.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        session = ort.InferenceSession(str(optimised), lean, providers=["CPUExecutionProvider"])
    trim()
    return session


def trim() -> bool:
    """Hand freed heap back to the OS (glibc), so resident memory shows what is really in use."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
        return True
    except (OSError, AttributeError):
        return False
