"""The local executor: every stage in-process, in topological order. The reference for correctness."""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from edgesplit.compare import Difference, compare
from edgesplit.errors import PlanError
from edgesplit.graph import Graph
from edgesplit.plan import Plan
from edgesplit.runtime.common import RunResult, check_inputs, device_providers, session_options
from edgesplit.runtime.failures import Router
from edgesplit.runtime.stages import load_session


class LocalExecutor:
    """Runs a Plan in this process; `failed` devices are treated as down for every request (a region's part on one
    comes from a live replica, else zeros when `allow_degraded`, else DeviceFailedError; see runtime.failures)."""

    def __init__(self, plan: Plan, threads: int | None = None, failed: Iterable[str] = (),
                 allow_degraded: bool = False) -> None:
        self.plan = plan
        self.failed = frozenset(failed)
        self.router = Router(plan, allow_degraded)  # failure-set semantics shared with the ray executor
        opts = session_options(threads)
        specs = (*self.router.specs, *self.router.standbys)  # a standby runs its stage's own file: one session
        live = dict.fromkeys(s.device for s in specs if s.device not in self.failed)
        providers = {d: device_providers(d, plan.cluster.device(d).providers) for d in live}
        self.sessions: dict[str, ort.InferenceSession] = {}
        for s in specs:
            if s.device not in self.failed and s.name not in self.sessions:
                self.sessions[s.name] = load_session(s, opts, providers[s.device])

    def run(self, inputs: Mapping[str, object], failed: Iterable[str] | None = None) -> RunResult:
        down = self.failed if failed is None else frozenset(failed) | self.failed
        values: dict[str, np.ndarray] = check_inputs(self.plan.inputs, inputs)
        route = self.router.route(down)
        dims = self.router.dims(values)
        seconds: dict[str, float] = {}
        for stage in route.stages:
            t0 = time.perf_counter()
            for t in stage.inputs:
                if t in route.stand_ins and t not in values:
                    values[t] = route.stand_ins[t].array(values, dims)
            feeds = {t: values[t] for t in stage.inputs}
            try:
                results = self.sessions[stage.name].run(list(stage.outputs), feeds)
            except Exception as exc:  # onnxruntime's own classes: inputs passed check_inputs, so the plan is at fault
                raise PlanError(f"stage {stage.name!r} on device {stage.device!r} failed in onnxruntime: "
                                f"{str(exc).strip().splitlines()[0]}") from None
            seconds[stage.name] = time.perf_counter() - t0
            values.update(zip(stage.outputs, results))
        return RunResult({t.name: values[t.name] for t in self.plan.outputs}, route.missing_devices, seconds)


def run_whole_model(model: str | Path | onnx.ModelProto, inputs: Mapping[str, np.ndarray], threads: int | None = None) -> dict[str, np.ndarray]:
    """The baseline: one onnxruntime session on the unsplit model."""
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    sess = ort.InferenceSession(source, session_options(threads), providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(names, dict(inputs))))


def verify(plan: Plan, graph: Graph, inputs: Mapping[str, np.ndarray], rtol: float = 1e-5,
           threads: int | None = None) -> list[Difference]:
    """Run the plan and the whole model on the same inputs and compare every output."""
    got = LocalExecutor(plan, threads=threads).run(inputs).outputs
    ref = run_whole_model(graph.model, inputs, threads=threads)
    return compare(got, {o.name: ref[o.name] for o in plan.outputs}, rtol)
