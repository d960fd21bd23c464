"""The stages an executor runs and the declared types of the tensors between them."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import onnx
import onnxruntime as ort
from onnx import helper

from edgesplit.errors import PlanError, first_line
from edgesplit.plan import Plan
from edgesplit.runtime.common import session_options


@dataclass(frozen=True)
class StageSpec:
    name: str
    device: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    model: bytes = field(repr=False)


@dataclass(frozen=True)
class Declared:
    """A tensor's dtype and declared shape (symbolic dims are strings, unknown dims None)."""

    dtype: str
    shape: tuple[int | str | None, ...]


def stage_specs(plan: Plan) -> tuple[StageSpec, ...]:
    """The plan's stages in topological order."""
    return tuple(StageSpec(s.name, s.device, s.inputs, s.outputs, plan.stage_models[s.name]) for s in plan.stages)


def standby_specs(plan: Plan) -> tuple[StageSpec, ...]:
    """The plan's standby stages: each its stage's name, files and tensors, on the standby's device."""
    stage = {s.name: s for s in plan.stages}
    return tuple(StageSpec(s.stage, s.device, stage[s.stage].inputs, stage[s.stage].outputs,
                           plan.stage_models[s.stage]) for s in plan.standbys)


def declared(specs: tuple[StageSpec, ...]) -> dict[str, Declared]:
    """Every stage boundary tensor's declared type, read from the stage models' inputs and outputs."""
    out: dict[str, Declared] = {}
    for spec in specs:
        g = onnx.load_from_string(spec.model).graph
        for v in (*g.input, *g.output):
            t = v.type.tensor_type
            if not t.HasField("elem_type") or t.elem_type == 0:
                continue
            shape = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in t.shape.dim)
            out.setdefault(v.name, Declared(helper.tensor_dtype_to_np_dtype(t.elem_type).name, shape))
    return out


def bind_dims(declared_inputs: Mapping[str, Declared], arrays: Mapping[str, object]) -> dict[str, int]:
    """Symbolic dim name -> size, read from the concrete model inputs of one request."""
    dims: dict[str, int] = {}
    for name, d in declared_inputs.items():
        shape = getattr(arrays.get(name), "shape", None)
        if shape is None or len(shape) != len(d.shape):
            continue
        for want, got in zip(d.shape, shape):
            if isinstance(want, str):
                dims.setdefault(want, int(got))
    return dims


def load_session(spec: StageSpec, options: ort.SessionOptions,
                 providers: Sequence[str] = ("CPUExecutionProvider",)) -> ort.InferenceSession:
    """An onnxruntime session for one stage, or a PlanError naming the stage and what onnxruntime lacks."""
    try:
        return ort.InferenceSession(spec.model, options, providers=list(providers))
    except Exception as exc:  # onnxruntime raises its own pybind11 classes (NotImplemented, Fail, InvalidGraph)
        raise PlanError(f"stage {spec.name!r} (device {spec.device!r}) cannot be loaded by onnxruntime "
                        f"{ort.__version__}: {first_line(exc)}") from None


def check_loadable(plan: Plan) -> None:
    """Every stage loads in onnxruntime (an op it does not implement is refused now, not when the plan runs)."""
    problems = []
    for spec in stage_specs(plan):
        try:
            load_session(spec, session_options(1))
        except PlanError as exc:
            problems.append(str(exc))
    if problems:
        raise PlanError("the plan cannot run:\n  " + "\n  ".join(problems))
