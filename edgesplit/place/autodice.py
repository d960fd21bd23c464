"""AutoDiCE's files as AutoDiCE writes them: its layer names, its horizontal split values, its hybrid file pair and
the devices its mapping keys describe.

AutoDiCE renames every node to its first output tensor with `/` replaced by `_` (`format_onnx`; its search script
also replaces `.`), so a layer may be named by its own name, its first output, or either of those `_` forms.
Its horizontal spec gives one value per device: for `lop` the cumulative end of each part's output channels (65535:
to the end), for `lip` the size of each part's input-channel slice, for `height` / `width` the output rows or
columns of each part. edgesplit's own form gives the n-1 interior boundaries (or 0, the boundaries, the total).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from edgesplit.cluster import Cluster
from edgesplit.errors import MappingError
from edgesplit.graph import Graph
from edgesplit.platforms import from_keys
from edgesplit.rewrite.cnn.fused import lip_units, lop_units
from edgesplit.rewrite.cnn.spatial import GLOBAL

TO_THE_END = 65535  # AutoDiCE's lop end meaning "the layer's last channel"
KINDS = ("lop", "lip", "height", "width")
_aliases_of: list[tuple[Graph, dict[str, set[str]]]] = []  # the last graph's alias index


def autodice_form(name: str) -> tuple[str, ...]:
    """The names AutoDiCE's tools give a tensor: `/` -> `_` (format_onnx), and also `.` -> `_` (search.py)."""
    slashed = name.replace("/", "_")
    return tuple(dict.fromkeys((slashed, slashed.replace(".", "_"))))


def _aliases(graph: Graph) -> dict[str, set[str]]:
    if _aliases_of and _aliases_of[0][0] is graph:
        return _aliases_of[0][1]
    index: dict[str, set[str]] = {}
    for layer in graph.layers:
        first = graph.model.graph.node[graph.position(layer.name)].output[0]
        for alias in (layer.name, first, *autodice_form(layer.name), *autodice_form(first)):
            index.setdefault(alias, set()).add(layer.name)
    _aliases_of[:] = [(graph, index)]
    return index


def resolve(graph: Graph, name: str) -> tuple[list[str], str | None]:
    """The layer `name` stands for ([] for a constant edgesplit folded into its users), or a problem."""
    if graph.has_layer(name):
        return [name], None
    found = sorted(_aliases(graph).get(name, ()), key=graph.position)
    if len(found) == 1:
        return found, None
    if len(found) > 1:
        return [], (f"layer name {name!r} is ambiguous: it names {found} (by node name, first output, or AutoDiCE's "
                    f"'_' form); give the node name")
    if any(name in (t, *autodice_form(t)) for t in graph.initializers):
        return [], None  # a Constant node AutoDiCE lists; edgesplit folds it into the layers that read it
    return [], f"unknown layer {name!r}"


def interior_points(graph: Graph, layer: str, kind: str, values: Sequence[int], parts: int) -> list[int]:
    """Split points as the rewrite takes them, from AutoDiCE's one value per device or edgesplit's interior form."""
    if len(values) != parts or parts < 2:
        return list(values)  # edgesplit's form (or a count the rewrite reports)
    total = extent(graph, layer, kind)
    where = f"layer {layer!r} ({kind}, AutoDiCE form: one value per device)"
    if kind == "lop":
        ends = list(values)
        if ends[-1] not in (TO_THE_END, total):
            raise MappingError(f"{where}: expected the last cumulative end to be {total} (its output channels) or "
                               f"{TO_THE_END} (to the end), got {list(values)}")
        return ends[:-1]
    if any(v <= 0 for v in values) or sum(values) != total:
        what = {"lip": "input channels", "height": "output rows", "width": "output columns"}[kind]
        raise MappingError(f"{where}: expected positive sizes summing to its {total} {what}, got {list(values)} "
                           f"(sum {sum(values)})")
    return [sum(values[: i + 1]) for i in range(parts - 1)]


def extent(graph: Graph, layer: str, kind: str) -> int:
    """How many output channels (lop), input channels (lip), output rows (height) or columns (width) a layer has."""
    node = graph.model.graph.node[graph.position(layer)]
    if kind == "lop":
        units = lop_units(graph, layer)
        conv = node.op_type == "Conv" and units
        return int(graph.tensors[node.input[1]].shape[0]) if conv else units
    if kind == "lip":
        return lip_units(graph, layer)
    tensor = node.input[0] if node.op_type in GLOBAL else node.output[0]
    shape = graph.tensors[tensor].shape if tensor in graph.tensors else ()
    axis = 2 if kind == "height" else 3
    return shape[axis] if len(shape) > axis and isinstance(shape[axis], int) else 0


def is_spec(value: Any) -> bool:
    """An AutoDiCE horizontal entry: [kind, [values], [devices]]."""
    return isinstance(value, list) and len(value) == 3 and isinstance(value[0], str) and \
        isinstance(value[1], list) and isinstance(value[2], list)


def merge_hybrid(mapping: Any, horizontal: Any, graph: Graph | None = None) -> dict[str, Any]:
    """AutoDiCE's hybrid pair as one mapping: a split layer listed under every device that takes a part of it leaves
    the vertical lists (its parts are placed by the horizontal spec); its devices must be the spec's devices."""
    for what, value in (("mapping", mapping), ("horizontal spec", horizontal)):
        if not isinstance(value, dict):
            raise MappingError(f"the {what} of a hybrid pair must be a JSON object, got {type(value).__name__}")
    bad = {k: v for k, v in horizontal.items() if not is_spec(v)}
    if bad:
        raise MappingError(f"horizontal spec: expected {{layer: [kind, [values], [devices]]}}, got {bad}")
    same = (lambda a, b: a == b) if graph is None else (lambda a, b: _same_layer(graph, a, b))
    problems, vertical = [], {}
    for device, items in mapping.items():
        items = items if isinstance(items, list) else [items]
        vertical[device] = [i for i in items if not any(isinstance(i, str) and same(i, k) for k in horizontal)]
    for layer, (_, _, devices) in horizontal.items():
        listed = [d for d, items in mapping.items() if any(isinstance(i, str) and same(i, layer) for i in
                                                           (items if isinstance(items, list) else [items]))]
        if listed and sorted(listed) != sorted(devices):
            problems.append(f"layer {layer!r} is split over {devices} in the horizontal spec but listed under "
                            f"{listed} in the mapping; expected it under every device that takes a part")
    if problems:
        raise MappingError("invalid hybrid pair:\n  " + "\n  ".join(problems))
    return {**vertical, **horizontal}


def _same_layer(graph: Graph, a: str, b: str) -> bool:
    return a == b or (resolve(graph, a)[0] or [a]) == (resolve(graph, b)[0] or [b])


def mapping_devices(mapping: Any) -> list[str]:
    """The device names a mapping uses: its keys (AutoDiCE or `devices:`) and the devices of its split specs."""
    if not isinstance(mapping, dict):
        return []
    names: list[str] = []
    vertical = mapping.get("devices") if isinstance(mapping.get("devices"), dict) else None
    for key, value in (vertical or mapping).items():
        names.extend(value[2] if is_spec(value) else [] if key == "regions" else [key])
    for value in mapping.values():
        names.extend(value[2] if is_spec(value) else [])
    for region in mapping.get("regions") or []:
        names.extend(region.get("devices", []) if isinstance(region, dict) else [])
    return [n for n in dict.fromkeys(names) if isinstance(n, str)]


def cluster_from_mapping(mapping: Any) -> Cluster:
    """The devices a mapping's keys describe (no cluster file given): see edgesplit.platforms.from_keys."""
    names = mapping_devices(mapping)
    if not names:
        raise MappingError("expected --devices N, --cluster FILE, or a mapping whose keys name the devices; "
                           "the mapping names no device")
    return from_keys(names)


def keys_problem(cluster: Cluster, mapping: Mapping[str, Any]) -> str:
    """A hint when AutoDiCE keys meet a cluster whose names differ (the cluster's names win)."""
    unknown = [k for k in mapping_devices(mapping) if k not in cluster.names]
    if not unknown:
        return ""
    return (f"; the cluster's device names win: name the mapping's devices {unknown} after them, or give neither "
            f"--devices nor --cluster to take the devices from the mapping's keys")
