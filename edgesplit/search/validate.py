"""Predictions checked against real runs: the data plane's overheads measured, plans run, ranks and errors compared.

Runs happen on this machine (Ray with simulated devices, or in-process): every device computes at this machine's
speed and links are loopback, so predictions for a run use the cluster *as run* (`as_run`): speed 1, links at the
data plane's measured bandwidth with no added latency. Memory is each device's model memory: its weights and
activations, without the runtime's fixed cost (measured once, reported apart): on Ray, a device actor's unique
memory after its stages ran minus its memory once onnxruntime had started; in-process, the resident growth of a
fresh process opening and running that device's stages (`edgesplit.demo.device_memory`).
"""

from __future__ import annotations

import pickle
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace

import numpy as np
from onnx import TensorProto, helper

from edgesplit.cluster import Cluster, Link
from edgesplit.errors import EdgesplitError
from edgesplit.graph import Graph, from_model
from edgesplit.layout import Choice
from edgesplit.plan import Plan
from edgesplit.runtime.common import random_inputs
from edgesplit.search.cost import CostModel, Costs, Overheads
from edgesplit.search.space import Vertical, to_plan


UNBOUNDED = 1e15  # bytes per second: a hop whose size costs nothing measurable


class Backend(Choice):
    LOCAL = "local"  # in-process, loopback: every device at this machine's speed
    RAY = "ray"  # Ray with simulated devices on this machine, loopback
    EMULATED = "emulated"  # in-process, each device slowed to its speed and each link delayed (search.emulate)


@dataclass(frozen=True)
class Measured:
    latency: float  # median seconds of one request
    memory: tuple[int, ...]  # model bytes per device, in cluster order (0 for an unused device)
    runtime_bytes: int  # the runtime's own memory on one device (largest seen)


Timed = Callable[[Mapping[str, np.ndarray]], float]  # runs one request, returns its latency in seconds


@contextmanager
def executor(plan: Plan, backend: Backend, threads: int) -> Iterator[tuple[Timed, Callable[[], dict]]]:
    """A function running one request and returning its latency (emulated: on the virtual clock, else the wall
    clock), and one returning the per-device memory stats of the run (Ray only)."""
    if backend is Backend.LOCAL:
        from edgesplit.runtime.local import LocalExecutor

        yield _wall_clock(LocalExecutor(plan, threads=threads).run), dict
        return
    if backend is Backend.EMULATED:
        from edgesplit.search.emulate import EmulatedExecutor

        emulated = EmulatedExecutor(plan)

        def virtual(feeds: Mapping[str, np.ndarray]) -> float:
            emulated.run(feeds)
            return emulated.seconds

        yield virtual, dict
        return
    from edgesplit.runtime.ray import RayExecutor

    with RayExecutor(plan, threads=threads, dataplane="tasks", trust_unsigned=True) as ray_ex:
        yield _wall_clock(ray_ex.run), ray_ex.stats


def _wall_clock(run: Callable[[Mapping[str, np.ndarray]], object]) -> Timed:
    def timed(feeds: Mapping[str, np.ndarray]) -> float:
        t0 = time.perf_counter()
        run(feeds)
        return time.perf_counter() - t0

    return timed


def latency(timed: Timed, feeds: Mapping[str, np.ndarray], repeats: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        timed(feeds)
    return statistics.median(timed(feeds) for _ in range(repeats))


def measure(plan: Plan, graph: Graph, backend: Backend, threads: int, repeats: int = 20,
            dims: Mapping[str, int] | None = None) -> Measured:
    feeds = random_inputs(plan.inputs, dims)
    with executor(plan, backend, threads) as (run, stats):
        seconds = latency(run, feeds, repeats)
        per_device = stats()
    names = plan.cluster.names
    if backend is Backend.RAY:
        memory = tuple(int(per_device[d]["uss"] - per_device[d]["uss_runtime"]) if d in per_device and d in
                       plan.devices else 0 for d in names)
        runtime = max(int(s["uss_runtime"] - s["uss_start"]) for s in per_device.values())
    else:
        found = {d: _device_memory(plan, d, feeds) for d in plan.devices}
        memory = tuple(found[d][0] if d in found else 0 for d in names)
        runtime = max(r for _, r in found.values())
    return Measured(seconds, memory, runtime)


def _device_memory(plan: Plan, device: str, sample: Mapping[str, np.ndarray]) -> tuple[int, int]:
    """(model bytes, runtime bytes) of `device`, measured as a Ray device measures them, in a fresh process."""
    from edgesplit.runtime.local import LocalExecutor

    stages, values = [], dict(sample)
    sessions = LocalExecutor(plan)  # every stage's inputs, from a run of the whole plan
    for stage in plan.order():
        feeds = {t: values[t] for t in stage.inputs}
        values.update(zip(stage.outputs, sessions.sessions[stage.name].run(list(stage.outputs), feeds)))
        if stage.device == device:
            stages.append((plan.stage_models[stage.name], feeds))
    done = subprocess.run([sys.executable, "-c", "from edgesplit.search.validate import _memory_main; _memory_main()"],
                          input=pickle.dumps(stages), capture_output=True, check=False)
    if done.returncode != 0:
        raise EdgesplitError(f"measuring {device}'s memory in a subprocess failed: {done.stderr.decode()[-2000:]}")
    model, runtime = done.stdout.decode().split()[-2:]
    return int(model), int(runtime)


def _memory_main() -> None:
    """Child side: unique memory of the stages' lean sessions after one run each, and of onnxruntime's start."""
    import psutil

    from edgesplit.runtime.lean import lean_session, start_onnxruntime, trim

    stages = pickle.load(sys.stdin.buffer)
    process = psutil.Process()
    start = process.memory_full_info().uss
    start_onnxruntime(1)
    runtime = process.memory_full_info().uss
    sessions = [lean_session(model, 1) for model, _ in stages]
    for session, (_, feeds) in zip(sessions, stages):
        session.run(None, feeds)
    trim()
    # the stage files read from stdin were resident at `start` and still are: they are in neither difference
    print(process.memory_full_info().uss - runtime, runtime - start)


def as_run(cluster: Cluster, overheads: Overheads, backend: Backend = Backend.LOCAL) -> Cluster:
    """The cluster as a run on this machine sees it: emulated, speeds relative to the fastest device and the
    cluster's links; otherwise every device at speed 1 and loopback links."""
    if backend is Backend.EMULATED:
        from edgesplit.search.emulate import relative

        return relative(cluster)
    link = Link(bandwidth=min(overheads.bandwidth, UNBOUNDED), latency=0.0)
    return Cluster(tuple(replace(d, speed=1.0) for d in cluster.devices), link, {})


def _chain(width: int, layers: int = 4) -> Graph:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, width])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, width])
    names = ["x", *(f"t{i}" for i in range(layers - 1)), "y"]
    nodes = [helper.make_node("Relu", [a], [b], name=f"relu{i}") for i, (a, b) in enumerate(zip(names, names[1:]))]
    model = helper.make_model(helper.make_graph(nodes, "chain", [x], [y]), opset_imports=[helper.make_opsetid("", 17)])
    return from_model(model)


def overheads(backend: Backend, threads: int = 1, repeats: int = 50) -> Overheads:
    """base: a one-stage request beyond its compute; step: each further stage; bandwidth: bytes per second of a hop.

    Measured on a chain of 4 Relu layers, cut into 1 and 2 stages, at 64 floats and at 1 MiB."""
    from edgesplit.planner import plan as make_plan

    times = {}
    for width in (64, 2**18):
        chain = _chain(width)
        for k in (1, 2):
            devices = Cluster.simulated(k, cores=threads, prefix=f"probe{width}x").devices
            cluster = Cluster(devices, Link(UNBOUNDED, 0.0))  # the data plane's own costs, no link added
            layout = Vertical(tuple(len(chain.layers) * s // k for s in range(1, k)), tuple(range(k)))
            plan = make_plan(chain, cluster, layout.placement(chain, cluster))
            with executor(plan, backend, threads) as (run, _):
                times[width, k] = latency(run, random_inputs(plan.inputs), repeats)
    step = max(times[64, 2] - times[64, 1], 0.0)
    extra = times[2**18, 2] - times[2**18, 1] - step
    return Overheads(base=times[64, 1], step=step, bandwidth=4 * 2**18 / extra if extra > 0 else UNBOUNDED)


@dataclass(frozen=True)
class Check:
    layout: Vertical
    predicted: Costs
    measured: Measured


def check(graph: Graph, cluster: Cluster, profiles: Mapping[int, object], layouts: Sequence[Vertical],
          backend: Backend, threads: int, repeats: int = 20, base: Overheads | None = None,
          on_step: Callable[[], None] = lambda: None, dims: Mapping[str, int] | None = None) -> list[Check]:
    """Each layout predicted for the cluster as run, then run for real and measured."""
    base = base or overheads(backend, threads)
    model = run_model(graph, cluster, profiles, base, backend)
    out = []
    for v in layouts:
        plan = to_plan(graph, model.cluster, v, model.splits if v.horizontal else None, dims)
        out.append(Check(v, model.costs(v), measure(plan, graph, backend, threads, repeats, dims)))
        on_step()
    return out


def run_model(graph: Graph, cluster: Cluster, profiles: Mapping[int, object], base: Overheads,
              backend: Backend) -> CostModel:
    """The cost model of a run on this machine: the cluster as run; the local executor runs parts one by one."""
    return CostModel(graph, as_run(cluster, base, backend), profiles, base,  # type: ignore[arg-type]
                     parallel=backend is not Backend.LOCAL)


def model_memory(model: CostModel, c: Costs) -> tuple[int, ...]:
    """Predicted memory per device without the runtime's own (what `Measured.memory` measures)."""
    return tuple(int(m - s) if m else 0 for m, s in zip(c.memory, model.session_bytes))


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    from scipy.stats import spearmanr

    if len(a) < 2 or len(set(a)) < 2 or len(set(b)) < 2:
        return float("nan")
    return float(spearmanr(a, b).statistic)


def median_abs_error(predicted: Sequence[float], measured: Sequence[float]) -> float:
    """Median of |predicted − measured| ÷ measured."""
    return float(np.median([abs(p - m) / m for p, m in zip(predicted, measured) if m > 0]))

