"""The local executor: every stage in-process, in topological order. The reference for correctness."""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from edgesplit.errors import DeviceFailedError
from edgesplit.plan import Plan
from edgesplit.runtime.common import RunResult, check_inputs, session_options


class LocalExecutor:
    """Runs a Plan in this process; `failed` devices are treated as down for every request."""

    def __init__(self, plan: Plan, threads: int | None = None, failed: Iterable[str] = ()) -> None:
        self.plan = plan
        self.failed = frozenset(failed)
        opts = session_options(threads)
        self.sessions = {
            s.name: ort.InferenceSession(plan.stage_models[s.name], opts, providers=["CPUExecutionProvider"])
            for s in plan.stages
            if s.device not in self.failed
        }

    def run(self, inputs: Mapping[str, object], failed: Iterable[str] | None = None) -> RunResult:
        down = self.failed if failed is None else frozenset(failed) | self.failed
        values: dict[str, np.ndarray] = check_inputs(self.plan.inputs, inputs)
        seconds: dict[str, float] = {}
        for stage in self.plan.order():
            if stage.device in down:
                raise DeviceFailedError(stage.device, stage.name)
            t0 = time.perf_counter()
            results = self.sessions[stage.name].run(list(stage.outputs), {t: values[t] for t in stage.inputs})
            seconds[stage.name] = time.perf_counter() - t0
            values.update(zip(stage.outputs, results))
        return RunResult({t.name: values[t.name] for t in self.plan.outputs}, (), seconds)


def run_whole_model(model: str | Path | onnx.ModelProto, inputs: Mapping[str, np.ndarray], threads: int | None = None) -> dict[str, np.ndarray]:
    """The baseline: one onnxruntime session on the unsplit model."""
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    sess = ort.InferenceSession(source, session_options(threads), providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(names, dict(inputs))))
