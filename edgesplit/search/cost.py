"""The cost model: a pure function of (profile, cluster, vertical layout) -> predicted costs. No ONNX is built.

A vertical layout gives each device one contiguous range of layers in topological order (a range may be empty):
`cuts` are the k-1 range boundaries and `order` says which device takes each range. Predictions, per inference:
- latency: the ranges run one after another; each costs its layers' profiled seconds ÷ the device's speed, plus the
  data plane's overheads (`Overheads`, measured); each tensor crossing to another device costs the link's latency
  plus bytes ÷ bandwidth;
- period (1 ÷ pipelined throughput): the busiest device or link;
- memory per device: its layers' weights and the peak of its live activations, each scaled by what the whole
  model's session was measured to hold per byte of them, plus the runtime's own memory (measured once per device
  kind);
- bytes on the wire, and an energy estimate per device from its power profile (busy watts while it computes, idle
  watts for the rest of the request: an estimate, no meter is read).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from edgesplit.cluster import Cluster
from edgesplit.graph import Graph
from edgesplit.search.profile import Profile, for_device, live_bytes


@dataclass(frozen=True)
class Overheads:
    """Fixed costs of the executor's data plane, measured (see edgesplit.search.validate.overheads)."""

    base: float = 0.0  # one request through one stage, beyond its compute: driver to stage and back, one call
    step: float = 0.0  # each further stage of a chain: its call and one hop
    bandwidth: float = float("inf")  # bytes per second between devices of this data plane when links are not shaped


@dataclass(frozen=True)
class Costs:
    latency: float  # seconds, one request
    period: float  # seconds between answers when pipelined
    memory: tuple[int, ...]  # bytes per device, in cluster order (0 for an unused device)
    wire_bytes: int  # bytes crossing between devices per inference
    energy: tuple[float, ...]  # joules per device per inference (an estimate)
    received: tuple[int, ...]  # bytes each device receives per inference
    survived: float = 0.0  # the fraction of single-device losses after which every stage still runs (standbys)

    @property
    def throughput(self) -> float:
        return 1.0 / self.period if self.period > 0 else float("inf")

    @property
    def max_memory(self) -> int:
        return max(self.memory)


@dataclass(frozen=True)
class Vertical:
    """Contiguous layer ranges: range s is layers [bounds[s], bounds[s+1]) on device order[s], with a standby copy
    on device standby[s] (-1: none; no entries: no standbys at all) that runs only while order[s] is down."""

    cuts: tuple[int, ...]
    order: tuple[int, ...]
    standby: tuple[int, ...] = ()

    def standby_requests(self, n: int, cluster: Cluster) -> list[str]:
        """`partition --standby` requests: DEVICE=DEVICE for every range that has a standby (each device holds one)."""
        b = self.bounds(n)
        return [f"{cluster.devices[d].name}={cluster.devices[e].name}" for s, (d, e) in
                enumerate(zip(self.order, self.standby)) if e >= 0 and b[s + 1] > b[s]]

    def bounds(self, n: int) -> tuple[int, ...]:
        return (0, *self.cuts, n)

    def placement(self, graph: Graph, cluster: Cluster) -> dict[str, str]:
        b = self.bounds(len(graph.layers))
        return {layer.name: cluster.devices[self.order[s]].name
                for s in range(len(self.order)) for layer in graph.layers[b[s]: b[s + 1]]}

    def to_dict(self, graph: Graph, cluster: Cluster) -> dict:
        b = self.bounds(len(graph.layers))
        standby = self.standby or (-1,) * len(self.order)
        return {"stages": [{"device": cluster.devices[d].name, "first": graph.layers[b[s]].name,
                            "last": graph.layers[b[s + 1] - 1].name, "layers": b[s + 1] - b[s],
                            "standby": cluster.devices[standby[s]].name if standby[s] >= 0 else None}
                           for s, d in enumerate(self.order) if b[s + 1] > b[s]]}


class CostModel:
    """Everything about a model and a cluster that candidates share, precomputed once; `costs` is then cheap."""

    def __init__(self, graph: Graph, cluster: Cluster, profiles: Mapping[int, Profile],
                 overheads: Overheads = Overheads(), host_speed: float = 1.0) -> None:
        """`host_speed`: this machine's speed in the cluster's units (a device of speed s computes s ÷ host_speed
        times as fast as this machine did when profiled)."""
        self.graph, self.cluster, self.overheads = graph, cluster, overheads
        layers = graph.layers
        self.n = len(layers)
        self.k = len(cluster.devices)
        kinds = [for_device(profiles, d.cores) for d in cluster.devices]
        seconds = [np.asarray(k.layer_seconds) * host_speed / d.speed for k, d in zip(kinds, cluster.devices)]
        self.time_prefix = np.stack([np.concatenate([[0.0], np.cumsum(s)]) for s in seconds])
        self.param_prefix = np.concatenate([[0], np.cumsum([layer.param_bytes for layer in layers])])
        self.live = live_bytes(graph)
        self.weight_factor = np.array([k.weight_factor for k in kinds])
        self.activation_factor = np.array([k.activation_factor for k in kinds])
        self.session_bytes = np.array([k.session_bytes for k in kinds])
        self.budget = np.array([d.memory for d in cluster.devices])
        self._edges(graph)
        self.bw = np.array([[self._bandwidth(a, b) for b in cluster.names] for a in cluster.names])
        self.lat = np.array([[0.0 if a == b else cluster.link(a, b).latency for b in cluster.names]
                             for a in cluster.names])
        self.idle_w = np.array([d.power.idle_w if d.power else 0.0 for d in cluster.devices])
        self.busy_w = np.array([d.power.busy_w if d.power else 0.0 for d in cluster.devices])

    def _bandwidth(self, a: str, b: str) -> float:
        return float("inf") if a == b else min(self.cluster.link(a, b).bandwidth, self.overheads.bandwidth)

    def _edges(self, graph: Graph) -> None:
        """Every (activation, producer position, consumer position) pair; the driver is at -1 and at n."""
        position = {t: -1 for t in graph.inputs}
        for p, layer in enumerate(graph.layers):
            position.update(dict.fromkeys(layer.outputs, p))
        pairs = [(t, position[t], p) for p, layer in enumerate(graph.layers) for t in dict.fromkeys(layer.inputs)
                 if t in position]
        pairs += [(t, position[t], self.n) for t in graph.outputs if t in position]
        names = list(dict.fromkeys(t for t, _, _ in pairs))
        index = {t: i for i, t in enumerate(names)}
        self.edge_tensor = np.array([index[t] for t, _, _ in pairs], dtype=np.int64)
        self.edge_from = np.array([p for _, p, _ in pairs], dtype=np.int64)
        self.edge_to = np.array([c for _, _, c in pairs], dtype=np.int64)
        self.tensor_bytes = np.array([graph.tensors[t].nbytes for t in names], dtype=np.int64)
        self.producer = np.array([position[t] for t in names], dtype=np.int64)
        inner = (self.edge_from >= 0) & (self.edge_to < self.n)
        self.inner_tensor, self.inner_from = self.edge_tensor[inner], self.edge_from[inner]
        self.inner_to = self.edge_to[inner]

    def costs(self, v: Vertical) -> Costs:
        b = np.asarray(v.bounds(self.n))
        order = np.asarray(v.order)
        used = b[1:] > b[:-1]
        busy = np.zeros(self.k)
        busy[order] = self.time_prefix[order, b[1:]] - self.time_prefix[order, b[:-1]]
        memory, survived = self._memory(b, order, used, v.standby)
        src, dst, nbytes = self._transfers(b, order)
        link = self.lat[src, dst] + nbytes / self.bw[src, dst]
        stages = int(used.sum())
        o = self.overheads
        latency = float(busy.sum() + link.sum() + o.base + max(stages - 1, 0) * o.step)
        occupancy = np.zeros((self.k, self.k))
        np.add.at(occupancy, (src, dst), nbytes / self.bw[src, dst])
        period = float(max((busy + np.where(busy > 0, o.step, 0.0)).max(), occupancy.max(initial=0.0), 1e-12))
        received = np.zeros(self.k, dtype=np.int64)
        np.add.at(received, dst, nbytes)
        energy = self.busy_w * busy + self.idle_w * np.maximum(latency - busy, 0.0)
        return Costs(latency, period, tuple(int(m) for m in memory), int(nbytes.sum()),
                     tuple(float(e) for e in energy), tuple(int(r) for r in received), survived)

    def _memory(self, b: np.ndarray, order: np.ndarray, used: np.ndarray,
                standby: tuple[int, ...]) -> tuple[np.ndarray, float]:
        """Bytes per device (its ranges and the standbys it holds: weights add up, the activation peak is the
        larger one, as they never run at once), and the fraction of single-device losses every stage survives."""
        weights, live = np.zeros(self.k), np.zeros(self.k)
        covered = np.ones(self.k, dtype=bool)
        for s in np.flatnonzero(used):
            i, j, d = b[s], b[s + 1], order[s]
            holders = [d] + ([standby[s]] if standby and standby[s] >= 0 and standby[s] != d else [])
            covered[d] = len(holders) > 1
            for h in holders:
                weights[h] += self.param_prefix[j] - self.param_prefix[i]
                live[h] = max(live[h], self.live[i:j].max())
        memory = np.where(weights + live > 0, weights * self.weight_factor + live * self.activation_factor
                          + self.session_bytes, 0).astype(np.int64)
        return memory, float(covered.mean())

    def _transfers(self, b: np.ndarray, order: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(source device, destination device, bytes) of every tensor crossing between devices (driver excluded)."""
        src = order[np.searchsorted(b, self.inner_from, side="right") - 1]
        dst = order[np.searchsorted(b, self.inner_to, side="right") - 1]
        crossing = src != dst
        keys = np.unique(self.inner_tensor[crossing] * self.k + dst[crossing])
        tensors, dst = keys // self.k, keys % self.k
        src = order[np.searchsorted(b, self.producer[tensors], side="right") - 1]
        return src, dst, self.tensor_bytes[tensors].astype(float)

    def over_budget(self, c: Costs) -> float:
        """The largest overshoot of a device's memory budget, as a fraction of it (≤ 0: everything fits)."""
        return float(((np.asarray(c.memory) - self.budget) / self.budget).max())

    def memory_over_budget(self, v: Vertical) -> float:
        """`over_budget` of a layout from its memory alone (what a repair needs, without latency and links)."""
        b = np.asarray(v.bounds(self.n))
        memory, _ = self._memory(b, np.asarray(v.order), b[1:] > b[:-1], v.standby)
        return float(((memory - self.budget) / self.budget).max())


def equal_layers(n: int, k: int) -> Vertical:
    """AutoDiCE-style: the same number of layers per device, in cluster order."""
    return Vertical(tuple(round(n * s / k) for s in range(1, k)), tuple(range(k)))


def from_placement(graph: Graph, cluster: Cluster, placement: Mapping[str, str]) -> Vertical:
    """The vertical layout of a placement of contiguous ranges (as `place.balance` gives), devices in cluster order."""
    names = cluster.names
    devices = [names.index(placement[layer.name]) for layer in graph.layers]
    if any(b < a for a, b in zip(devices, devices[1:])):
        raise ValueError("expected contiguous ranges in cluster order")
    cuts = tuple(int(np.searchsorted(devices, d, side="left")) for d in range(1, len(names)))
    return Vertical(cuts, tuple(range(len(names))))

