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
from edgesplit.search.profile import Profile, for_device, live_bytes, speed_factor
from edgesplit.search.space import Group, Splits, Vertical, equal_layers, from_placement

__all__ = ["CostModel", "Costs", "Overheads", "Vertical", "equal_layers", "from_placement"]


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


class _Groups:
    """Where a grouped layout puts things, as arrays: each layer's group, each group's members and lead, and the
    group each split is used in (-1: unused)."""

    def __init__(self, groups: list[Group], n: int, k: int, active: np.ndarray, sp: Splits) -> None:
        starts = np.array([g.first for g in groups])
        self.of_layer = np.searchsorted(starts, np.arange(n), side="right") - 1
        self.leads = np.array([g.lead for g in groups], dtype=np.int64)
        self.members = np.zeros((len(groups), k), dtype=bool)
        for i, g in enumerate(groups):
            self.members[i, list(g.devices)] = True
        self.lead = np.eye(k, dtype=bool)[self.leads]
        self.active = active
        # copied: the cheap ops after a used split, copied onto every device that reads them; spread: those and
        # the used splits' parts (computed where they are read, not on one lead)
        self.copied = np.zeros(n, dtype=bool)
        self.copied[sp.closure_layer[active[sp.closure_split] >= 0]] = True
        self.spread = self.copied | ((sp.split_of >= 0) & (active[np.maximum(sp.split_of, 0)] >= 0))

    def lead_of(self, layers: np.ndarray) -> np.ndarray:
        return self.leads[self.of_layer[layers]]

    def group_of(self, split: np.ndarray, layer: np.ndarray) -> np.ndarray:
        """The group of each layer that reads a used split's result (a graph output, n: the split's own group)."""
        n = len(self.of_layer)
        return np.where(layer < n, self.of_layer[np.minimum(layer, n - 1)], self.active[split])


class CostModel:
    """Everything about a model and a cluster that candidates share, precomputed once; `costs` is then cheap."""

    def __init__(self, graph: Graph, cluster: Cluster, profiles: Mapping[int | str, Profile],
                 overheads: Overheads = Overheads(), host_speed: float = 1.0, parallel: bool = True) -> None:
        """`host_speed`: this machine's speed in the cluster's units (a device of speed s computes s ÷ host_speed
        times as fast as this machine did when profiled); `parallel`: the parts of a split run at once (on devices,
        on Ray, emulated), not one after another (the local executor)."""
        self.graph, self.cluster, self.overheads, self.parallel = graph, cluster, overheads, parallel
        self._splits: Splits | None = None
        layers = graph.layers
        self.n = len(layers)
        self.k = len(cluster.devices)
        kinds = [for_device(profiles, d) for d in cluster.devices]
        seconds = [np.asarray(k.layer_seconds) * speed_factor(k, d, host_speed) for k, d in zip(kinds, cluster.devices)]
        self.seconds = np.stack(seconds)
        self.speed = np.array([d.speed for d in cluster.devices])
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
        self.tensor_index = index
        self.edge_tensor = np.array([index[t] for t, _, _ in pairs], dtype=np.int64)
        self.edge_from = np.array([p for _, p, _ in pairs], dtype=np.int64)
        self.edge_to = np.array([c for _, _, c in pairs], dtype=np.int64)
        self.tensor_bytes = np.array([graph.tensors[t].nbytes for t in names], dtype=np.int64)
        self.producer = np.array([position[t] for t in names], dtype=np.int64)
        inner = (self.edge_from >= 0) & (self.edge_to < self.n)
        self.inner_tensor, self.inner_from = self.edge_tensor[inner], self.edge_from[inner]
        self.inner_to = self.edge_to[inner]

    def costs(self, v: Vertical) -> Costs:
        if v.horizontal:
            return self._grouped(v)
        b = np.asarray(v.bounds(self.n))
        order = np.asarray(v.order)
        used = b[1:] > b[:-1]
        busy = np.zeros(self.k)
        busy[order] = self.time_prefix[order, b[1:]] - self.time_prefix[order, b[:-1]]
        memory, survived = self._memory(b, order, used, v.standby)
        src, dst, nbytes = self._transfers(b, order)
        stages = int(used.sum())
        o = self.overheads
        latency = float(busy.sum() + self._hops(src, dst, nbytes, dst) + o.base + max(stages - 1, 0) * o.step)
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

    @property
    def splits(self) -> Splits:
        """The channel splits groups may use, with each one's seconds per device and weights (computed once)."""
        if self._splits is None:
            self._splits = Splits(self.graph, self.k)
            layers = self._splits.layers
            self.split_seconds = np.array([[self.seconds[d, p].sum() for p in layers] for d in range(self.k)])
            param = np.diff(self.param_prefix)
            sides = np.array([self.tensor_index[t] for t in self._splits.side_names], dtype=np.int64)
            self.side_tensor = sides[self._splits.side_tensor] if len(sides) else sides
            self.split_params = np.array([param[p].sum() for p in layers], dtype=float)
        return self._splits

    def _grouped(self, v: Vertical) -> Costs:
        """Costs of a layout with horizontal groups: a group's unsplit layers run on its lead, each split's parts
        on every member by speed; each split's parts (or partial sums) then go to every device that reads its
        result (`_exchanges`), and other tensors between groups from the producer's lead to the reader's lead, or
        to every member of its group where the reader is a split's part."""
        o, sp, groups = self.overheads, self.splits, v.groups(self.n)
        busy, weights, live = np.zeros(self.k), np.zeros(self.k), np.zeros(self.k)
        received, occupancy = np.zeros(self.k), np.zeros((self.k, self.k))
        latency = o.base + max(len(groups) - 1, 0) * o.step
        standby = v.standby or (-1,) * self.k
        holders_of = {d: e for d, e in zip(v.order, standby) if e >= 0}
        covered = np.zeros(self.k, dtype=bool)
        active = np.full(len(sp.requests), -1, dtype=np.int64)  # the group each split is used in, or -1
        share = np.zeros((len(groups), self.k))  # each member's share of its group's splits
        for i, g in enumerate(groups):
            members = np.asarray(g.devices)
            total = self.time_prefix[members, g.end] - self.time_prefix[members, g.first]
            params = self.param_prefix[g.end] - self.param_prefix[g.first]
            peak = self.live[g.first: g.end].max()
            if len(members) == 1:
                holders = [g.lead] + ([holders_of[g.lead]] if g.lead in holders_of else [])
                covered[g.lead] = len(holders) > 1
                for h in holders:
                    weights[h] += params
                    live[h] = max(live[h], peak)
                busy[g.lead] += total[0]
                latency += total[0]
                continue
            split = sp.inside(g.first, g.end)
            active[split] = i
            live[members] = np.maximum(live[members], peak)
            share[i, members] = self.speed[members] / self.speed[members].sum()
            parts = share[i, members] * self.split_seconds[np.ix_(members, np.flatnonzero(split))].sum(axis=1)
            rest = total[0] - self.split_seconds[g.lead, split].sum()
            split_params = self.split_params[split].sum()
            weights[members] += share[i, members] * split_params
            weights[g.lead] += params - split_params
            busy[members] += parts
            busy[g.lead] += rest
            latency += rest + (parts.max() if self.parallel else parts.sum())
        at = _Groups(groups, self.n, self.k, active, sp)
        latency += self._exchanges(at, share, received, occupancy)
        src, dst, nbytes, reader = self._group_transfers(at)
        latency += self._hops(src, dst, nbytes, reader)
        np.add.at(occupancy, (src, dst), nbytes / self.bw[src, dst])
        np.add.at(received, dst, nbytes)
        memory = np.where(weights + live > 0, weights * self.weight_factor + live * self.activation_factor
                          + self.session_bytes, 0).astype(np.int64)
        period = float(max((busy + np.where(busy > 0, o.step, 0.0)).max(), occupancy.max(initial=0.0), 1e-12))
        energy = self.busy_w * busy + self.idle_w * np.maximum(latency - busy, 0.0)
        return Costs(float(latency), period, tuple(int(m) for m in memory), int(received.sum()),
                     tuple(float(e) for e in energy), tuple(int(r) for r in received), float(covered.mean()))

    def _hops(self, src: np.ndarray, dst: np.ndarray, nbytes: np.ndarray, reader: np.ndarray) -> float:
        """Seconds of the messages between devices, one after another: one per (source, destination) pair, its
        link's latency plus its tensors' bytes ÷ bandwidth; a group's members receive theirs at once (`reader`:
        the group of each destination)."""
        if not len(src):
            return 0.0
        pairs, where = np.unique(src * self.k + dst, return_inverse=True)
        seconds = np.zeros(len(pairs))
        np.add.at(seconds, where, nbytes / self.bw[src, dst])
        a, b = pairs // self.k, pairs % self.k
        seconds += self.lat[a, b]
        first = np.zeros(len(pairs), dtype=np.int64)
        first[where] = reader
        hops, slot = np.unique(a * (int(reader.max()) + 1) + first, return_inverse=True)
        slowest = np.zeros(len(hops))
        np.maximum.at(slowest, slot, seconds)
        return float(slowest.sum())

    def _exchanges(self, at: _Groups, share: np.ndarray, received: np.ndarray, occupancy: np.ndarray) -> float:
        """Seconds of the exchanges, one per used split, one after another: every member of the split's group sends
        its part (or its whole partial sum) to every device that reads the result (`_readers`). Adds their bytes
        to `received`, their link time to `occupancy`."""
        sp = self.splits
        used = np.flatnonzero(at.active >= 0)
        if not len(used):
            return 0.0
        readers = self._readers(at)[used]
        group = at.active[used]
        sent = sp.sync_bytes[used, None] * np.where(sp.partial_sums[used, None], at.members[group], share[group])
        inv = np.where(np.eye(self.k, dtype=bool), 0.0, 1.0 / self.bw)
        to = at.members[group][:, :, None] & readers[:, None, :] & ~np.eye(self.k, dtype=bool)[None]
        per = np.where(to, sent[:, :, None], 0.0)  # split, sender, receiver
        # each pair of devices has its own link: a split's exchange ends when its slowest pair has delivered
        arrive = np.where(to, self.lat[None] + per * inv[None], 0.0).max(axis=(1, 2))
        received += per.sum(axis=(0, 1))
        occupancy += per.sum(axis=0) * inv
        return float(arrive.sum() + (arrive > 0).sum() * self.overheads.step)

    def _readers(self, at: _Groups) -> np.ndarray:
        """(split, device): does the device read the split's result (a used split's frontier, `_devices`)."""
        sp = self.splits
        keep = at.active[sp.frontier_split] >= 0
        readers = np.zeros((len(sp.requests), self.k), dtype=bool)
        split = sp.frontier_split[keep]
        np.logical_or.at(readers, split, self._devices(at, split, sp.frontier_layer[keep]))
        return readers

    def _devices(self, at: _Groups, split: np.ndarray, layer: np.ndarray) -> np.ndarray:
        """(row, device): where each layer after a used split runs: on every member of its group if it is a part
        of another split used there, else on its group's lead (a graph output: on the split's own lead)."""
        group = at.group_of(split, layer)
        target = self.splits.split_of[np.minimum(layer, self.n - 1)]
        wide = (layer < self.n) & (target >= 0) & (at.active[np.maximum(target, 0)] == group)
        return np.where(wide[:, None], at.members[group], at.lead[group])

    def _sides(self, at: _Groups) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(tensor, source, destination, reading group) of the tensors the copies of a used split's cheap ops read
        from elsewhere (a residual shortcut): from the lead of the group that made it to every other device where
        a copy reading it runs."""
        sp = self.splits
        keep = (at.active[sp.side_split] >= 0) & ~at.spread[sp.side_layer]
        split, reader = sp.side_split[keep], sp.side_reader[keep]
        src = at.lead_of(sp.side_layer[keep])
        rows, dst = np.nonzero(self._devices(at, split, reader) & (np.arange(self.k)[None] != src[:, None]))
        return self.side_tensor[keep][rows], src[rows], dst, at.group_of(split, reader)[rows]

    def _group_transfers(self, at: _Groups) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(source, destination, bytes, reading group) of every other tensor between devices, once per
        destination: from the producer's lead to the reader's lead (between groups), or to every member of the
        reader's group where the reader is a split's part (from inside the group too); and the inputs of the
        copies of a used split's cheap ops (`_sides`). A used split's result and its cheap ops' outputs are not
        among them: the exchange carries its parts instead."""
        sp = self.splits
        gs, gd = at.of_layer[self.inner_from], at.of_layer[self.inner_to]
        target = sp.split_of[self.inner_to]
        wide = (target >= 0) & (at.active[np.maximum(target, 0)] == gd)
        keep = ((gs != gd) | wide) & ~at.spread[self.inner_from] & ~at.copied[self.inner_to]
        tensor, gs, gd, wide = self.inner_tensor[keep], gs[keep], gd[keep], wide[keep]
        rows, dst = np.nonzero(np.where(wide[:, None], at.members[gd], at.lead[gd]))
        side_tensor, side_src, side_dst, side_group = self._sides(at)
        tensor = np.concatenate([tensor[rows], side_tensor])
        src = np.concatenate([at.leads[gs[rows]], side_src])
        dst = np.concatenate([dst, side_dst])
        group = np.concatenate([gd[rows], side_group])
        _, once = np.unique(tensor * self.k + dst, return_index=True)
        once = once[src[once] != dst[once]]
        return src[once], dst[once], self.tensor_bytes[tensor[once]].astype(float), group[once]

    def over_budget(self, c: Costs) -> float:
        """The largest overshoot of a device's memory budget, as a fraction of it (≤ 0: everything fits)."""
        return float(((np.asarray(c.memory) - self.budget) / self.budget).max())

    def memory_over_budget(self, v: Vertical) -> float:
        """`over_budget` of a layout from its memory alone (what a repair needs, without latency and links)."""
        if v.horizontal:
            return self.over_budget(self._grouped(v))
        b = np.asarray(v.bounds(self.n))
        memory, _ = self._memory(b, np.asarray(v.order), b[1:] > b[:-1], v.standby)
        return float(((memory - self.budget) / self.budget).max())

