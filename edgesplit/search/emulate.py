"""A plan run in this process as its cluster would run it, to check the cost model where the real boards are absent.

Each stage runs for real in onnxruntime at its device's thread count, then waits as long again as its device is
slower than the fastest one (taken to be this machine: `speed` ratios are the cluster file's); each tensor crossing
between devices waits its link's latency plus bytes ÷ bandwidth before the stage that needs it. What this checks is
the profile (real stage times: fusion inside a stage, cache effects, per-call costs) and the composition (which
tensors cross, in what order); the link model itself is only checked on a real or emulated network
(`scripts/edge-lab`).
"""

from __future__ import annotations

import time
from collections.abc import Mapping

import numpy as np

from edgesplit.cluster import Cluster
from edgesplit.plan import Plan
from edgesplit.runtime.common import check_inputs, session_options
from edgesplit.runtime.stages import load_session, stage_specs
from edgesplit.search.profile import threads_of


def wait(seconds: float) -> None:
    """Sleep for long waits, spin for the last millisecond (sleep overshoots by tens of microseconds)."""
    end = time.perf_counter() + seconds
    if seconds > 2e-3:
        time.sleep(seconds - 1e-3)
    while time.perf_counter() < end:
        pass


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
        self.stretch = {d.name: fastest / d.speed - 1.0 for d in cluster.devices}
        specs = {s.name: s for s in stage_specs(plan)}
        threads = {d.name: threads_of(d.cores) for d in cluster.devices}
        self.sessions = {s.name: load_session(specs[s.name], session_options(threads[s.device])) for s in plan.stages}
        self.delay = {s.name: 0.0 for s in plan.stages}
        for t in plan.cross_device_transfers:
            a, b = plan.stage(t.src).device, plan.stage(t.dst).device
            link = cluster.link(a, b)
            self.delay[t.dst] += link.latency + t.nbytes / link.bandwidth

    def run(self, inputs: Mapping[str, object]) -> dict[str, np.ndarray]:
        values: dict[str, np.ndarray] = check_inputs(self.plan.inputs, inputs)
        for stage in self.plan.order():
            wait(self.delay[stage.name])
            t0 = time.perf_counter()
            results = self.sessions[stage.name].run(list(stage.outputs), {t: values[t] for t in stage.inputs})
            wait((time.perf_counter() - t0) * self.stretch[stage.device])
            values.update(zip(stage.outputs, results))
        return {t.name: values[t.name] for t in self.plan.outputs}
