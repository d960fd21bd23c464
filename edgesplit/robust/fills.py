"""Calibrated fills: what stands in for a lost unit is its mean over a calibration set, not zero.

Concat regions: each unit's mean activation (over samples and every other axis). Sum regions: each unit's mean
contribution to the combined output — the mean of the unit's inputs to the part's last layer times that layer's
weight rows for them (exact in expectation for Gemm / MatMul; for a Conv the border padding is ignored).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace

import numpy as np

from edgesplit.errors import InputError
from edgesplit.graph import Graph
from edgesplit.layout import Combine, Fill, Region
from edgesplit.probe import exposing, run_model
from edgesplit.robust.importance import Where, locate


def mean_fills(graph: Graph, calibration: Mapping[str, np.ndarray]) -> Graph:
    """The rewritten graph with every Concat and Sum region filled by its calibrated means (others unchanged)."""
    regions = [r for r in graph.regions if r.combine in (Combine.CONCAT, Combine.SUM) and all(p.nodes for p in r.parts)]
    places = {r.name: [locate(graph, r, p) for p in r.parts] for r in regions}
    values = run_model(exposing(graph.model, sorted({w.tensor for ws in places.values() for w in ws})), calibration)
    filled = {r.name: _means(r, places[r.name], values) for r in regions}
    return replace(graph, regions=tuple(filled.get(r.name, r) for r in graph.regions))


def _means(region: Region, places: list[Where], values: Mapping[str, np.ndarray]) -> Region:
    per_unit: dict[int, tuple[float, ...]] = {}
    axis = 1
    for part, where in zip(region.parts, places):
        value = values[where.tensor].astype(np.float64)
        if region.combine is Combine.CONCAT:
            per_channel = value.ndim > 2 and where.tensor_axis % value.ndim != 1  # rows or tiles: keep channels
            rows = _unit_means(value, where.tensor_axis, 1 if per_channel else None)
            per_unit.update({u: tuple(float(c) for c in v.mean(axis=0))
                             for u, v in zip(part.units, _grouped(rows, len(part.units), region))})
            axis = 1 if per_channel else axis
            continue
        x = np.moveaxis(value, where.tensor_axis, 0)
        mean_in = x.reshape(x.shape[0], -1).mean(axis=1)  # one value per channel / row of the unit axis
        if where.weight is None:
            raise InputError(f"region {region.name!r}: its parts end in a layer without a constant weight; a mean "
                             f"fill needs one")
        w = np.moveaxis(where.weight.astype(np.float64), where.weight_axis, 0)  # [inputs, outputs, kernel...]
        w = w.reshape(w.shape[0], w.shape[1], -1).sum(axis=2) if where.node.op_type == "Conv" else w
        contribution = _grouped(mean_in[:, None] * w, len(part.units), region).sum(axis=1)
        per_unit.update({u: tuple(float(c) for c in row) for u, row in zip(part.units, contribution)})
        axis = 1 if where.node.op_type == "Conv" else -1
    return replace(region, fill=Fill.MEAN, fill_values=tuple(per_unit[u] for u in range(region.units)),
                   fill_axis=axis)


def _unit_means(value: np.ndarray, unit_axis: int, channel_axis: int | None) -> np.ndarray:
    """[rows along the unit axis, channels or 1]: the mean over samples and every other axis."""
    keep = [unit_axis % value.ndim] + ([channel_axis] if channel_axis is not None else [])
    moved = np.moveaxis(value, keep, list(range(len(keep))))
    means = moved.reshape(*moved.shape[:len(keep)], -1).mean(axis=-1)
    return means if channel_axis is not None else means[:, None]


def _grouped(a: np.ndarray, units: int, region: Region) -> np.ndarray:
    """`a` (rows along axis 0) as [units, rows per unit, ...]."""
    if a.shape[0] % units:
        raise InputError(f"region {region.name!r}: {a.shape[0]} rows do not divide into its {units} units")
    return a.reshape(units, a.shape[0] // units, *a.shape[1:])
