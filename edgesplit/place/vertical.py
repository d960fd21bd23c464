"""place: every layer gets a device, from a user mapping or from a balancing heuristic."""

from __future__ import annotations

import difflib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from edgesplit.cluster import Cluster
from edgesplit.errors import MappingError, PlacementError, listing
from edgesplit.graph import Graph
from edgesplit.place.autodice import keys_problem, resolve

Placement = Mapping[str, str]  # layer name -> device name


def load_mapping(path: str | Path) -> Any:
    """Read a mapping file: AutoDiCE JSON (`{device: [layer, ...]}`) or the YAML form with ranges."""
    path = Path(path)
    if not path.is_file():
        raise MappingError(f"expected a mapping file (.json or .yaml), but {str(path)!r} does not exist")
    try:
        text = path.read_text()
        return json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (UnicodeDecodeError, json.JSONDecodeError, yaml.YAMLError) as exc:
        raise MappingError(f"{path}: cannot parse it as {'JSON' if path.suffix == '.json' else 'YAML'}: {exc}") from None


def from_mapping(graph: Graph, cluster: Cluster, mapping: Any) -> dict[str, str]:
    """Validate a user mapping and return the full placement; every problem is reported at once.

    Accepted forms, per device: a list of layer names (AutoDiCE), where an item may also be
    `{from: layerA, to: layerB}` (an inclusive range in topological order). A top-level `devices:` key is allowed.
    """
    if isinstance(mapping, dict) and set(mapping) == {"devices"}:
        mapping = mapping["devices"]
    if not isinstance(mapping, dict) or not mapping:
        raise MappingError(f"expected a mapping of device name -> list of layers, got {type(mapping).__name__}")
    names = [layer.name for layer in graph.layers]
    problems: list[str] = []
    placement: dict[str, str] = {}
    for device, items in mapping.items():
        if device not in cluster.names:
            problems.append(f"device {device!r} is not in the cluster; expected one of {list(cluster.names)}"
                            + keys_problem(cluster, mapping))
        items = items if isinstance(items, list) else [items]
        for item in items:
            for layer in expand_layers(graph, item, problems):
                if layer in placement and placement[layer] != device:
                    problems.append(f"layer {layer!r} is assigned to two devices: {placement[layer]!r} and {device!r}")
                placement[layer] = device
    unassigned = [n for n in names if n not in placement]
    if unassigned:
        problems.append(f"{len(unassigned)} layer(s) are not assigned to any device: {listing(unassigned, 10)}")
    if problems:
        raise MappingError("invalid mapping:\n  " + "\n  ".join(dict.fromkeys(problems)))
    return placement


def expand_layers(graph: Graph, item: Any, problems: list[str]) -> list[str]:
    """A layer name or {from: a, to: b} (inclusive, topological order) -> layer names; problems are appended."""
    if isinstance(item, str):
        found, problem = resolve(graph, item)
        if problem:
            problems.append(_unknown(graph, item) if problem.startswith("unknown") else problem)
        return found
    if isinstance(item, dict) and set(item) == {"from", "to"}:
        ends = [resolve(graph, str(item[k])) for k in ("from", "to")]
        bad = [_unknown(graph, str(item[k])) if p.startswith("unknown") else p
               for k, (found, p) in zip(("from", "to"), ends) if p or not found]
        if bad:
            problems.extend(bad)
            return []
        (a,), (b,) = ends[0][0], ends[1][0]
        i, j = graph.position(a), graph.position(b)
        if i > j:
            problems.append(f"range from {a!r} to {b!r}: {a!r} comes after {b!r} in topological order")
            return []
        return [layer.name for layer in graph.layers[i : j + 1]]
    problems.append(f"expected a layer name or {{from: layer, to: layer}}, got {item!r}")
    return []


def _unknown(graph: Graph, name: str) -> str:
    close = difflib.get_close_matches(name, [layer.name for layer in graph.layers], n=3, cutoff=0.5)
    hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    return f"unknown layer {name!r}{hint}"


def memory_need(graph: Graph, layers: list[str]) -> int:
    """Estimated bytes a device needs to hold these layers: parameters plus the largest activation set of one layer."""
    params = {w for name in layers for w in graph.layer(name).weights}
    param_bytes = sum(graph.tensors[w].nbytes for w in params)
    act = max((sum(graph.tensors[t].nbytes for t in (*graph.layer(n).inputs, *graph.layer(n).outputs)) for n in layers), default=0)
    return param_bytes + act


def check_memory(graph: Graph, cluster: Cluster, placement: Placement) -> None:
    """Every device's layers fit its budget, and the devices of one host together fit the host's memory."""
    by_device: dict[str, list[str]] = {d: [] for d in cluster.names}
    for layer, device in placement.items():
        by_device[device].append(layer)
    over = []
    for d in cluster.devices:
        need = memory_need(graph, by_device[d.name])
        if need > d.memory:
            over.append(f"device {d.name!r} needs {_mib(need)} (parameters + activations) but its budget is {_mib(d.memory)}")
    for host in dict.fromkeys(d.host for d in cluster.devices if d.host):
        sharing = [d for d in cluster.devices if d.host == host]
        need = sum(memory_need(graph, by_device[d.name]) for d in sharing)
        budget = min(d.memory for d in sharing)
        if len(sharing) > 1 and need > budget:
            over.append(f"host {host!r} (devices {[d.name for d in sharing]}) needs {_mib(need)} together but "
                        f"shares {_mib(budget)}")
    if over:
        raise PlacementError("placement exceeds device memory:\n  " + "\n  ".join(over))


def _mib(n: float) -> str:
    return f"{n / 2**20:.2f} MiB"


def balance(graph: Graph, cluster: Cluster, tolerance: float = 0.05) -> dict[str, str]:
    """Vertical placement: contiguous ranges in topological order, one per device (in cluster order).

    First the smallest achievable bottleneck (MACs / speed) under memory budgets, then, among splits within
    `tolerance` of it, the one whose cuts carry the fewest bytes.
    """
    layers = graph.layers
    n = len(layers)
    prefix = np.concatenate([[0.0], np.cumsum([layer.macs + 1.0 for layer in layers])])  # +1: no layer is free
    pbytes = np.concatenate([[0.0], np.cumsum([float(layer.param_bytes) for layer in layers])])
    act = np.array([float(sum(graph.tensors[t].nbytes for t in (*l.inputs, *l.outputs))) for l in layers])
    cut = np.append(_cut_bytes(graph)[:n], 0.0)  # no cost after the last layer

    def feasible(j: int, d: int) -> tuple[np.ndarray, np.ndarray]:
        """For a range ending at j on device d: its load and whether it fits memory, for every start i < j."""
        i = np.arange(j)
        suffix_max = np.maximum.accumulate(act[:j][::-1])[::-1]
        need = pbytes[j] - pbytes[i] + suffix_max
        return (prefix[j] - prefix[i]) / cluster.devices[d].speed, need <= cluster.devices[d].memory

    def bottleneck(j: int, d: int) -> np.ndarray:
        load, fits = feasible(j, d)
        return np.where(fits, load, np.inf)

    best, _ = _dp(n, len(cluster.devices), bottleneck, np.maximum)
    if not np.isfinite(best):
        raise PlacementError(
            f"no vertical placement fits the devices' memory: the model has {_mib(graph.total_param_bytes)} of "
            f"parameters, budgets are {', '.join(f'{d.name}={_mib(d.memory)}' for d in cluster.devices)}"
        )
    limit = best * (1 + tolerance)

    def crossing(j: int, d: int) -> np.ndarray:
        load, fits = feasible(j, d)
        return np.where(fits & (load <= limit), cut[j], np.inf)

    _, bounds = _dp(n, len(cluster.devices), crossing, np.add)
    return {layer.name: cluster.devices[d].name for d, (i, j) in enumerate(bounds) for layer in layers[i:j]}


def _dp(n: int, k: int, cost, combine) -> tuple[float, list[tuple[int, int]]]:
    """Split 0..n into k contiguous ranges (some may be empty), minimising the combine-fold of range costs.

    cost(j, d) returns the cost of ranges [i, j) on device d for every i < j; an empty range costs nothing.
    """
    f = np.full((k + 1, n + 1), np.inf)
    arg = np.zeros((k + 1, n + 1), dtype=int)
    f[0, 0] = 0.0
    for d in range(1, k + 1):
        f[d, 0], arg[d, 0] = f[d - 1, 0], 0
        for j in range(1, n + 1):
            values = np.append(combine(f[d - 1, :j], cost(j, d - 1)), f[d - 1, j])  # last: empty range
            where = int(np.argmin(values))
            f[d, j], arg[d, j] = values[where], where
    bounds, j = [], n
    for d in range(k, 0, -1):
        i = int(arg[d, j])
        bounds.append((i, j))
        j = i
    return float(f[k, n]), bounds[::-1]


def _cut_bytes(graph: Graph) -> np.ndarray:
    """cut[p] = bytes of activations that cross a cut placed just before layer p."""
    n = len(graph.layers)
    delta = np.zeros(n + 2)
    start = {t: 0 for t in graph.inputs}
    end: dict[str, int] = {}
    for pos, layer in enumerate(graph.layers):
        for t in layer.inputs:
            end[t] = pos
        for t in layer.outputs:
            start[t] = pos + 1
    for t in graph.outputs:
        end[t] = n
    for t, s in start.items():
        e = end.get(t)
        if e is not None and e >= s:
            delta[s] += graph.tensors[t].nbytes
            delta[e + 1] -= graph.tensors[t].nbytes
    return np.cumsum(delta)[: n + 1]
