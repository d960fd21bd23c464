"""A plan run in this process as its cluster would run it, to check the cost model where the real boards are absent.

Each stage runs for real in onnxruntime at its device's thread count; its time, stretched by how much slower its
device is than the fastest one (taken to be this machine: `speed` ratios are the cluster file's), is laid on a
virtual clock where every device has its own timeline: a stage starts once its device is free and its inputs have
arrived, a tensor from another device arriving its link's latency plus bytes ÷ bandwidth after its producer ended.
The request's latency is the virtual time its last result is ready (`seconds`), so the parts of a horizontal split
run at once as on separate boards although this process computes them one after another. What this checks is the
profile (real stage times: fusion inside a stage, cache effects, per-call costs) and the composition (which tensors
cross, in what order, what overlaps); the link model itself is only checked on a real or emulated network
(`scripts/edge-lab`).
"""

from __future__ import annotations

import time
from collections.abc import Mapping

import numpy as np

from edgesplit.cluster import Cluster, Link
from edgesplit.plan import Plan
from edgesplit.runtime.common import check_inputs, session_options
from edgesplit.runtime.stages import load_session, stage_specs
from edgesplit.search.profile import threads_of


def relative(cluster: Cluster) -> Cluster:
    """The cluster with speeds relative to its fastest device (1.0), as the emulation runs it on this machine."""
    from dataclasses import replace

    fastest = max(d.speed for d in cluster.devices)
    return Cluster(tuple(replace(d, speed=d.speed / fastest) for d in cluster.devices), cluster.default_link,
                   cluster.links)


class EmulatedExecutor:
    def __init__(self, plan: Plan) -> None:
        self.plan = plan
        cluster = plan.cluster
        fastest = max(d.speed for d in cluster.devices)
        self.stretch = {d.name: fastest / d.speed for d in cluster.devices}
        specs = {s.name: s for s in stage_specs(plan)}
        threads = {d.name: threads_of(d.cores) for d in cluster.devices}
        self.sessions = {s.name: load_session(specs[s.name], session_options(threads[s.device])) for s in plan.stages}
        self.crossing: dict[tuple[str, str], tuple[Link, list[str]]] = {}  # (producer, reader) -> link, tensors
        for t in plan.cross_device_transfers:
            link = cluster.link(plan.stage(t.src).device, plan.stage(t.dst).device)
            self.crossing.setdefault((t.src, t.dst), (link, []))[1].append(t.tensor)
        self.producer = {t: s.name for s in plan.stages for t in s.outputs}
        self.seconds = 0.0  # the last request's latency on the virtual clock

    def run(self, inputs: Mapping[str, object]) -> dict[str, np.ndarray]:
        values: dict[str, np.ndarray] = check_inputs(self.plan.inputs, inputs)
        finish: dict[str, float] = {}
        free: dict[str, float] = {}
        for stage in self.plan.order():
            ready = max((finish[p] + self._delay(p, stage.name, values)
                         for p in {self.producer[t] for t in stage.inputs if t in self.producer}), default=0.0)
            start = max(ready, free.get(stage.device, 0.0))
            t0 = time.perf_counter()
            results = self.sessions[stage.name].run(list(stage.outputs), {t: values[t] for t in stage.inputs})
            finish[stage.name] = free[stage.device] = start + (time.perf_counter() - t0) * self.stretch[stage.device]
            values.update(zip(stage.outputs, results))
        self.seconds = max((finish[self.producer[t.name]] for t in self.plan.outputs if t.name in self.producer),
                           default=0.0)
        return {t.name: values[t.name] for t in self.plan.outputs}

    def _delay(self, producer: str, reader: str, values: Mapping[str, np.ndarray]) -> float:
        """The link's latency plus the bytes of the tensors actually produced (not the plan's sizes) ÷ bandwidth."""
        if (producer, reader) not in self.crossing:
            return 0.0
        link, tensors = self.crossing[producer, reader]
        return link.latency + sum(values[t].nbytes for t in tensors) / link.bandwidth
