"""How much each unit of each horizontal region matters: one score per unit, higher is more important.

Scores are read from the rewritten graph, part by part, so a unit's score sits where the replica surgery
(edgesplit.rewrite.replicas) would cut it:
- `weight` (data-free): for a Concat region, the L2 norm of the unit's output-channel row of the part's head layer;
  for a Sum region, the L2 norm of the unit's input rows of the part's exit layer (the layer whose partial sums
  meet at the combine: input channels, fused channels, attention heads or MLP neurons). Spatial units share one
  weight, so they all score 1 (a spatial region has no data-free ranking).
- `activation` (data-driven): the mean absolute value on a calibration batch of the unit's slice of the part's
  output (Concat) or of the exit layer's input (Sum), computed by onnxruntime on the rewritten graph.
- `ablation` (data-driven, measured): the change of the model's output on a calibration batch when that slice
  alone is zeroed (`edgesplit.robust.ablation`): what losing the unit costs, one unit at a time.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

from edgesplit.graph import Graph
from edgesplit.layout import Choice, Combine, Part, Region
from edgesplit.rewrite.base import weight_axes
from edgesplit.probe import exposing, run_model

WEIGHTED = ("Conv", "Gemm", "MatMul")


class Importance(Choice):
    WEIGHT = "weight"
    ACTIVATION = "activation"
    ABLATION = "ablation"

    @property
    def needs_data(self) -> bool:
        return self is not Importance.WEIGHT


@dataclass(frozen=True)
class Where:
    """Where a part's units live: a node's weight (and its unit axis) or a tensor (and its unit axis)."""

    node: onnx.NodeProto | None
    weight: np.ndarray | None
    weight_axis: int
    tensor: str
    tensor_axis: int


def importance(graph: Graph, method: Importance | str,
               calibration: Mapping[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """Per region name, one score per unit (index = unit)."""
    method = Importance.parse(method, "--importance")
    places = {r.name: [locate(graph, r, p) for p in r.parts] for r in graph.regions}
    if method is Importance.WEIGHT:
        return {r.name: _scores(r, [_weight_scores(w, len(p.units)) for p, w in zip(r.parts, places[r.name])])
                for r in graph.regions}
    if calibration is None:
        raise ValueError(f"{method.value} importance needs a calibration batch")
    if method is Importance.ABLATION:
        from edgesplit.robust.ablation import ablation_scores

        return ablation_scores(graph, calibration)
    wanted = sorted({w.tensor for ws in places.values() for w in ws})
    values = run_model(exposing(graph.model, wanted), calibration)
    return {r.name: _scores(r, [_activation_scores(values[w.tensor], w.tensor_axis, len(p.units))
                                for p, w in zip(r.parts, places[r.name])]) for r in graph.regions}


def _scores(region: Region, per_part: list[np.ndarray]) -> np.ndarray:
    out = np.zeros(region.units, dtype=np.float64)
    for part, scores in zip(region.parts, per_part):
        out[list(part.units)] = scores
    return out


def locate(graph: Graph, region: Region, part: Part) -> Where:
    nodes = {n.name: n for n in graph.model.graph.node}
    weights = {t.name: t for t in graph.model.graph.initializer}
    if region.combine is Combine.SUM:
        exit_node = next(n for n in graph.model.graph.node if part.output in n.output)
        w = _weight(exit_node, weights)
        axis = 0 if w is None else weight_axes(exit_node, w.ndim)[1]
        tensor_axis = 1 if exit_node.op_type == "Conv" else -1
        return Where(exit_node, w, axis, exit_node.input[0], tensor_axis)
    head = nodes[part.nodes[0]]
    spatial = region.kind.spatial or head.op_type not in WEIGHTED
    w = None if spatial else _weight(head, weights)
    axis = 0 if w is None else weight_axes(head, w.ndim)[0]
    return Where(head, w, axis, part.output, region.axis)


def _weight(node: onnx.NodeProto, weights: Mapping[str, onnx.TensorProto]) -> np.ndarray | None:
    if node.op_type not in WEIGHTED or len(node.input) < 2 or node.input[1] not in weights:
        return None
    return numpy_helper.to_array(weights[node.input[1]])


def _weight_scores(where: Where, units: int) -> np.ndarray:
    if where.weight is None:
        return np.ones(units)
    return _grouped(np.moveaxis(where.weight, where.weight_axis, 0) ** 2, units, np.sum) ** 0.5


def _activation_scores(value: np.ndarray, axis: int, units: int) -> np.ndarray:
    return _grouped(np.abs(np.moveaxis(value, axis, 0)), units, np.mean)


def _grouped(a: np.ndarray, units: int, reduce) -> np.ndarray:
    """Reduce `a` (units along axis 0, possibly `per` rows each) to one value per unit."""
    if a.shape[0] % units:
        raise ValueError(f"expected the unit axis ({a.shape[0]}) to divide into {units} units")
    grouped = a.reshape(units, -1)
    return np.asarray(reduce(grouped, axis=1), dtype=np.float64)
