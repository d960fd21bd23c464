"""Ablation importance: how much the model's output changes, on a calibration batch, when one unit is removed.

A unit is removed by zeroing its slice where `edgesplit.robust.importance.locate` finds it: a part's output along
the region axis (Concat: the unit is lost as a zero fill would lose it) or the exit layer's input (Sum: its partial
sum is gone). Per region, one model is built with a mask multiplying each part's tensor; the calibration batch is
repeated once per unit in a chunk, each copy with one unit's mask at zero, so one onnxruntime run scores many
units. The score is the mean over samples of the L2 norm of the change of the model's first output.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import onnx
from onnx import helper

from edgesplit.graph import Graph
from edgesplit.probe import exposing, run_model
from edgesplit.robust.importance import Where, locate

SAMPLES = 32  # of the calibration batch: enough to rank units, few enough for thousands of units
ROWS_PER_RUN = 1024  # calibration copies per onnxruntime run


def ablation_scores(graph: Graph, calibration: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Per region name, one score per unit: the mean output change when that unit alone is zeroed."""
    batch = {k: v[:SAMPLES] for k, v in calibration.items()}
    places = {r.name: [locate(graph, r, p) for p in r.parts] for r in graph.regions}
    tensors = sorted({w.tensor for ws in places.values() for w in ws})
    output = graph.outputs[0]
    values = run_model(exposing(graph.model, tensors), batch)
    reference = values[output].astype(np.float64)
    scores = {}
    for region in graph.regions:
        where = places[region.name]
        shape = [(values[w.tensor].ndim, values[w.tensor].shape[w.tensor_axis], len(p.units))
                 for w, p in zip(where, region.parts)]
        masked = _masked(graph.model, where, [rank for rank, _, _ in shape], output)
        units = [(i, k) for i, p in enumerate(region.parts) for k in range(len(p.units))]
        changes = _changes(masked, batch, reference, where, shape, units)
        out = np.zeros(region.units)
        for (i, k), change in zip(units, changes):
            out[region.parts[i].units[k]] = change
        scores[region.name] = out
    return scores


def _masked(model: onnx.ModelProto, where: Sequence[Where], ranks: Sequence[int], output: str) -> onnx.ModelProto:
    """`model` with each located tensor multiplied by an input `mask{i}` before anything reads it."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    for i, (w, rank) in enumerate(zip(where, ranks)):
        masked = f"{w.tensor}~ablated"
        for node in g.node:
            for j, name in enumerate(node.input):
                if name == w.tensor:
                    node.input[j] = masked
        g.node.append(helper.make_node("Mul", [w.tensor, f"mask{i}"], [masked], name=f"{w.tensor}~ablate"))
        g.input.append(helper.make_tensor_value_info(f"mask{i}", onnx.TensorProto.FLOAT, [None] * rank))
    del g.output[:]
    g.output.append(onnx.ValueInfoProto(name=output))
    _sort(g)
    return out


def _sort(g: onnx.GraphProto) -> None:
    from edgesplit.rewrite.base import topological_order

    nodes = topological_order(list(g.node))
    del g.node[:]
    g.node.extend(nodes)


def _changes(model: onnx.ModelProto, batch: Mapping[str, np.ndarray], reference: np.ndarray, where: Sequence[Where],
             shape: Sequence[tuple[int, int, int]], units: Sequence[tuple[int, int]]) -> list[float]:
    """The output change of each (part, unit of the part) ablated, in chunks of units per run; `shape` is per
    part (tensor rank, rows along the unit axis, units)."""
    samples = len(next(iter(batch.values())))
    per_run = max(1, ROWS_PER_RUN // samples)
    out: list[float] = []
    for start in range(0, len(units), per_run):
        chunk = units[start:start + per_run]
        feeds = {k: np.concatenate([v] * len(chunk)) for k, v in batch.items()}
        for i, (w, (rank, rows, size)) in enumerate(zip(where, shape)):
            feeds[f"mask{i}"] = _mask(chunk, i, w.tensor_axis % rank, rank, rows, size, samples)
        got = run_model(model, feeds)[model.graph.output[0].name].reshape(len(chunk), samples, -1)
        diff = got.astype(np.float64) - reference.reshape(1, samples, -1)
        out += np.linalg.norm(diff, axis=-1).mean(axis=1).tolist()
    return out


def _mask(chunk: Sequence[tuple[int, int]], part: int, axis: int, rank: int, rows: int, units: int,
          samples: int) -> np.ndarray:
    """[copies * samples, 1.., rows, 1..]: ones, but zero on the rows of the unit each copy ablates in `part`."""
    per = rows // units
    mask = np.ones((len(chunk), rows), dtype=np.float32)
    for c, (i, k) in enumerate(chunk):
        if i == part:
            mask[c, k * per:(k + 1) * per] = 0.0
    full = np.repeat(mask, samples, axis=0)  # copy c's samples in a row, as the inputs were concatenated
    return full.reshape([len(chunk) * samples] + [rows if a == axis else 1 for a in range(1, rank)])
