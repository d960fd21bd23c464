"""Horizontal specs from a mapping file: AutoDiCE's `{layer: [kind, [split points], [devices]]}` as is, and a
YAML/JSON form with `regions:` (layers from..to, split kind, devices, optional weights / points / grid) next to an
optional vertical `devices:` mapping (hybrid). Parsed into device-free split requests plus, per request, the
devices of its parts.

```yaml
devices:                      # optional: vertical placement of every layer not in a region (AutoDiCE form)
  dev0: [{from: conv1, to: relu3}]
  dev1: [{from: conv4, to: softmax}]
regions:
  - layers: {from: conv2, to: conv3}
    split: fused-channels     # lop | lip | height | width | grid | fused-channels | fused-spatial
    devices: [dev0, dev2]
    weights: [2, 1]           # optional, default: the devices' speed
```
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from edgesplit.cluster import Cluster
from edgesplit.errors import MappingError, listing
from edgesplit.graph import Graph
from edgesplit.layout import CNN_KINDS, SplitKind
from edgesplit.place.autodice import interior_points, keys_problem
from edgesplit.place.parts import HorizontalSpec
from edgesplit.place.vertical import expand_layers
from edgesplit.rewrite.base import SplitRequest
from edgesplit.rewrite.cnn.fused import lop_units
from edgesplit.rewrite.cnn.spatial import GLOBAL, WINDOWED

KINDS = tuple(str(k) for k in CNN_KINDS)
AUTODICE_KINDS = ("lop", "lip", "height", "width")
PER_LAYER = ("lop", "lip", "height", "width", "grid")
Asked = tuple[SplitRequest, tuple[str, ...]]  # a request and the devices of its parts


def is_horizontal(mapping: Any) -> bool:
    """Does this mapping ask for horizontal regions (AutoDiCE horizontal entries or a `regions:` list)?"""
    if not isinstance(mapping, dict):
        return False
    return "regions" in mapping or any(_is_autodice(v) for v in mapping.values())


def _is_autodice(value: Any) -> bool:
    return isinstance(value, list) and len(value) == 3 and isinstance(value[0], str) and isinstance(value[1], list) \
        and isinstance(value[2], list) and value[0] in KINDS


def parse(graph: Graph, cluster: Cluster, mapping: Any) -> HorizontalSpec:
    """Turn a mapping into split requests, their devices and the placement of the vertical remainder (if given);
    every problem of the horizontal part is reported at once, then every problem of the vertical part."""
    if not isinstance(mapping, dict):
        raise MappingError(f"expected a mapping (JSON object / YAML mapping), got {type(mapping).__name__}")
    problems: list[str] = []
    requests: list[Asked] = []
    vertical: dict[str, Any] = {}
    if "regions" in mapping:
        extra = set(mapping) - {"regions", "devices"}
        if extra:
            problems.append(f"unexpected top-level key(s) {sorted(extra)}; expected 'regions' and optionally 'devices'")
        if not isinstance(mapping["regions"], list):
            problems.append(f"'regions' must be a list of regions, got {type(mapping['regions']).__name__}")
        else:
            for i, item in enumerate(mapping["regions"]):
                requests.extend(_region(graph, item, f"regions[{i}]", problems))
        vertical = dict(mapping.get("devices") or {})
    else:
        for key, value in mapping.items():
            if _is_autodice(value):
                kind, points, devices = value
                if kind not in AUTODICE_KINDS:
                    problems.append(f"layer {key!r}: AutoDiCE horizontal kind must be one of {list(AUTODICE_KINDS)}, "
                                    f"got {kind!r} (use the regions: form for {kind})")
                    continue
                requests.extend(_region(graph, {"layers": key, "split": kind, "points": points, "devices": devices},
                                        f"layer {key!r}", problems))
            elif isinstance(value, list) and value and isinstance(value[0], str) and value[0] in KINDS:
                problems.append(f"{key!r}: expected [kind, [split points], [devices]], got {value!r}")
            else:
                vertical[key] = value
    if problems:
        raise MappingError("invalid horizontal mapping:\n  " + "\n  ".join(dict.fromkeys(problems)))
    covered = {l for r, _ in requests for l in r.layers}
    base = vertical_placement(graph, cluster, vertical, covered) if vertical else None
    return HorizontalSpec(tuple(r for r, _ in requests), tuple(d for _, d in requests), base)


def _region(graph: Graph, item: Any, where: str, problems: list[str]) -> list[Asked]:
    if not isinstance(item, dict):
        problems.append(f"{where}: expected a mapping with layers, split, devices; got {item!r}")
        return []
    missing = [k for k in ("layers", "split", "devices") if k not in item]
    if missing:
        problems.append(f"{where}: missing key(s) {missing}")
        return []
    kind = str(item["split"])
    if kind not in KINDS:
        problems.append(f"{where}: unknown split {kind!r}; expected one of {list(KINDS)}")
        return []
    devices = item["devices"]
    if not isinstance(devices, list) or not all(isinstance(d, str) for d in devices):
        problems.append(f"{where}: 'devices' must be a list of device names, got {devices!r}")
        return []
    layers = expand(graph, item["layers"], where, problems)
    if not layers:
        return []
    shape = _shape(item, where, problems)
    if shape is None:
        return []

    def make(ls: list[str]) -> list[Asked]:
        points = shape["points"]
        if points is not None and kind in AUTODICE_KINDS and len(ls) == 1:
            try:
                points = tuple(interior_points(graph, ls[0], kind, points, len(devices)))
            except MappingError as exc:
                problems.append(str(exc))
                return []
        return [(SplitRequest(SplitKind(kind), tuple(ls), len(devices), **{**shape, "points": points}), tuple(devices))]

    if kind not in PER_LAYER or len(layers) == 1:
        return make(layers)
    heads = [l for l in layers if _head_ok(graph, l, kind)]
    if not heads:
        problems.append(f"{where}: no layer in {layers[0]!r} .. {layers[-1]!r} can be split by {kind}")
    if shape["points"] is not None and len(heads) > 1:
        problems.append(f"{where}: split points apply to one layer; the range has {len(heads)} layers to split")
    return [asked for h in heads for asked in make([h])]


def _shape(item: Mapping[str, Any], where: str, problems: list[str]) -> dict[str, Any] | None:
    """The optional weights, points, grid and axis of a region entry, checked (None: a problem was appended)."""
    weights, points, grid, axis = (item.get(k) for k in ("weights", "points", "grid", "axis"))
    for key, value in (("weights", weights), ("points", points), ("grid", grid)):
        if value is not None and (not isinstance(value, list) or not all(isinstance(v, (int, float)) for v in value)):
            problems.append(f"{where}: {key!r} must be a list of numbers, got {value!r}")
            return None
    if grid is not None and len(grid) != 2:
        problems.append(f"{where}: 'grid' must be [rows, cols], got {grid!r}")
        return None
    if axis is not None and axis not in ("height", "width", "grid"):
        problems.append(f"{where}: 'axis' must be height, width or grid, got {axis!r}")
        return None
    return {"weights": tuple(weights) if weights else None,
            "points": tuple(int(p) for p in points) if points is not None else None,
            "grid": tuple(int(g) for g in grid) if grid else None, "axis": SplitKind(axis) if axis else None}


def _head_ok(graph: Graph, name: str, kind: str) -> bool:
    op = graph.layer(name).op_type
    if kind in ("lop", "lip"):
        return lop_units(graph, name) > 0
    return op in WINDOWED | GLOBAL


def expand(graph: Graph, spec: Any, where: str, problems: list[str]) -> list[str]:
    """A layer name, a list of names, or {from: a, to: b} (inclusive, topological order), in topological order."""
    items = spec if isinstance(spec, list) and spec else [spec]
    found: list[str] = []
    mine: list[str] = []
    for item in items:
        found += expand_layers(graph, item, mine)
    problems.extend(f"{where}: {p}" for p in mine)
    return [] if mine else sorted(dict.fromkeys(found), key=graph.position)


def vertical_placement(graph: Graph, cluster: Cluster, vertical: Mapping[str, Any],
                       covered: set[str]) -> dict[str, str]:
    """The vertical part of a hybrid mapping: every layer outside the regions must be given a device."""
    problems: list[str] = []
    placement: dict[str, str] = {}
    listed: dict[str, list[str]] = {}
    for device, items in vertical.items():
        if device not in cluster.names:
            problems.append(f"device {device!r} is not in the cluster; expected one of {list(cluster.names)}"
                            + keys_problem(cluster, vertical))
        for item in items if isinstance(items, list) else [items]:
            for layer in expand(graph, item, f"device {device!r}", problems):
                placement[layer] = device
                listed.setdefault(layer, []).append(device)
    for layer, devices in listed.items():
        if len(set(devices)) < 2:
            continue
        if layer in covered:  # AutoDiCE lists a split layer under every device that takes a part of it
            del placement[layer]
        else:
            problems.append(f"layer {layer!r} is assigned to two devices: {devices[0]!r} and {devices[-1]!r}")
    missing = [l.name for l in graph.layers if l.name not in placement and l.name not in covered]
    if missing:
        problems.append(f"{len(missing)} layer(s) outside the horizontal regions have no device: {listing(missing)}")
    if problems:
        raise MappingError("invalid hybrid mapping:\n  " + "\n  ".join(dict.fromkeys(problems)))
    return placement
