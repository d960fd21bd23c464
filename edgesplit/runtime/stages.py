"""The stages an executor runs: the plan's stages, with replica outputs made visible, and declared tensor types.

A replica's output feeds no node of the plain ONNX graph, so `cut` keeps it inside its stage. An executor needs it as
a stage output to hand it to a combine whose primary part is down, so the stage model is given that extra output.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import onnx
from onnx import helper

from edgesplit.plan import Plan


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


def replica_outputs(plan: Plan) -> set[str]:
    parts = [part for region in plan.regions for part in region.get("parts", ())]
    return {r["output"] for part in parts for r in part.get("replicas") or ()}


def stage_specs(plan: Plan) -> tuple[StageSpec, ...]:
    """The plan's stages in topological order, each with the replica outputs it computes added to its outputs."""
    wanted = replica_outputs(plan)
    specs = []
    for s in plan.stages:
        data = plan.stage_models[s.name]
        extra: list[str] = []
        if wanted:
            model = onnx.load_from_string(data)
            extra = [o for n in model.graph.node for o in n.output if o in wanted and o not in s.outputs]
            if extra:
                data = _with_outputs(model, extra)
        specs.append(StageSpec(s.name, s.device, s.inputs, s.outputs + tuple(extra), data))
    return tuple(specs)


def _with_outputs(model: onnx.ModelProto, names: list[str]) -> bytes:
    model = onnx.shape_inference.infer_shapes(model)
    info = {v.name: v for v in model.graph.value_info}
    for name in names:
        model.graph.output.append(info.get(name) or helper.make_empty_tensor_value_info(name))
    return model.SerializeToString()


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
