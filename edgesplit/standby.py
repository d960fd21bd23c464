"""Standby stages: a copy of a whole stage on another device, run only while the stage's own device is down or late.

A standby runs the stage's own ONNX file (signed with the plan) on `device`, so a vertical plan survives the loss
of a device as a horizontal one does with replicas. `choose` picks them: `auto` gives every stage the device with
the most memory to spare that can hold it; `STAGE=DEVICE` or `DEVICE=DEVICE` (every stage of the first device)
picks by hand. Every device's memory budget is checked with its standbys counted.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from edgesplit.cluster import Cluster
from edgesplit.errors import PlacementError
from edgesplit.graph import Graph

AUTO = "auto"


@dataclass(frozen=True)
class Standby:
    stage: str
    device: str

    def to_dict(self) -> dict[str, str]:
        return {"stage": self.stage, "device": self.device}

    @staticmethod
    def from_dict(d: Mapping[str, Any]) -> Standby:
        return Standby(str(d["stage"]), str(d["device"]))


def problems(standbys: Sequence[Standby], stage_devices: Mapping[str, str], devices: Iterable[str]) -> list[str]:
    """Each standby names a stage of the plan and a device of the cluster other than the stage's, once."""
    known = set(devices)
    found, seen = [], set()
    for i, s in enumerate(standbys):
        where = f"standbys[{i}]"
        if s.stage not in stage_devices:
            found.append(f"{where}: stage {s.stage!r} is not a stage of the plan; expected one of "
                         f"{sorted(stage_devices)[:8]}")
        elif s.device == stage_devices[s.stage]:
            found.append(f"{where}: stage {s.stage!r} is on {s.device!r} already; expected another device")
        if s.device not in known:
            found.append(f"{where}: device {s.device!r} is not in the cluster; expected one of {sorted(known)}")
        if (s.stage, s.device) in seen:
            found.append(f"{where}: stage {s.stage!r} has a standby on {s.device!r} twice")
        seen.add((s.stage, s.device))
    return found


def choose(graph: Graph, cluster: Cluster, stage_layers: Mapping[str, Sequence[str]],
           stage_devices: Mapping[str, str], requests: Sequence[str]) -> tuple[Standby, ...]:
    """The standbys `requests` ask for ('auto', 'STAGE=DEVICE', 'DEVICE=DEVICE'), memory budgets checked."""
    from edgesplit.place.vertical import memory_need

    held = {d: [layer for s, layers in stage_layers.items() if stage_devices[s] == d for layer in layers]
            for d in cluster.names}
    chosen: list[Standby] = []
    for request in requests:
        if request.strip() == AUTO:
            chosen += _auto(graph, cluster, stage_layers, stage_devices, held, chosen)
        else:
            chosen += _by_hand(request, stage_devices, cluster)
    wrong = problems(chosen, stage_devices, cluster.names)
    if wrong:
        raise PlacementError("invalid --standby:\n  " + "\n  ".join(wrong))
    for s in chosen:
        held[s.device] = held[s.device] + list(stage_layers[s.stage])
    over = [f"device {d.name!r} needs {memory_need(graph, held[d.name]) / 2**20:.2f} MiB with its standbys but its "
            f"budget is {d.memory / 2**20:.2f} MiB" for d in cluster.devices
            if memory_need(graph, held[d.name]) > d.memory]
    if over:
        raise PlacementError("standbys exceed device memory:\n  " + "\n  ".join(over))
    return tuple(chosen)


def _by_hand(request: str, stage_devices: Mapping[str, str], cluster: Cluster) -> list[Standby]:
    what, sep, device = request.partition("=")
    what, device = what.strip(), device.strip()
    if not sep or not what or not device:
        raise PlacementError(f"expected --standby auto, STAGE=DEVICE or DEVICE=DEVICE, got {request!r}")
    if what in stage_devices:
        return [Standby(what, device)]
    if what in cluster.names:
        return [Standby(s, device) for s, d in stage_devices.items() if d == what]
    raise PlacementError(f"--standby {request!r}: {what!r} is neither a stage ({sorted(stage_devices)[:8]}) nor a "
                         f"device ({list(cluster.names)})")


def _auto(graph: Graph, cluster: Cluster, stage_layers: Mapping[str, Sequence[str]], stage_devices: Mapping[str, str],
          held: Mapping[str, list[str]], chosen: Sequence[Standby]) -> list[Standby]:
    """Each stage on the other device with the most memory left once it holds the stage (none fits: refused)."""
    from edgesplit.place.vertical import memory_need

    load = {d: list(layers) for d, layers in held.items()}
    for s in chosen:
        load[s.device] += list(stage_layers[s.stage])
    picked = []
    for stage, layers in stage_layers.items():
        spare = {d.name: d.memory - memory_need(graph, load[d.name] + list(layers)) for d in cluster.devices
                 if d.name != stage_devices[stage]}
        fits = [d for d, left in spare.items() if left >= 0]
        if not fits:
            raise PlacementError(f"--standby auto: no other device has the memory for stage {stage!r} "
                                 f"({memory_need(graph, list(layers)) / 2**20:.2f} MiB)")
        best = max(fits, key=lambda d: spare[d])
        load[best] += list(layers)
        picked.append(Standby(stage, best))
    return picked
