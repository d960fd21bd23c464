"""Ray executor benchmarks (issue 4), on one machine (loopback; Ray's own local instance simulates the devices).

python benchmarks/bench_ray.py [--repeats 20] [--requests 160] [--quick]
Writes benchmarks/results/ray.json and ray.md: per-hop overhead (actor calls vs Compiled Graphs), single-request
latency of 2- and 3-device vertical plans vs one onnxruntime session, pipelined throughput of a 2-device plan
(1 core each) vs 1 core on the whole model with the bound from stage times, per-device memory (model share vs
Ray's overhead), bytes sent per inference vs plan.json, time from killing a device to the next answer (replica).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import psutil
import ray

import edgesplit
from edgesplit.bench import zoo
from edgesplit.bench.harness import interleaved_medians, machine, markdown_table, median_seconds, write_report
from edgesplit.cluster import Cluster
from edgesplit.planner import partition
from edgesplit.plan import cut
from edgesplit.runtime import raycluster
from edgesplit.runtime.common import random_inputs, session_options
from edgesplit.runtime.failures import DeviceLost
from edgesplit.runtime.local import LocalExecutor
from edgesplit.runtime.ray import RayExecutor
from edgesplit.runtime.rayworker import DeviceWorker

DEVICES = ("dev0", "dev1", "dev2", "dev3")
CHUNK = 8  # requests per actor call in the chunked throughput runs


@ray.remote(num_cpus=0)
class Echo:
    def f(self, x: np.ndarray) -> np.ndarray:
        return x


def hop_overhead(repeats: int) -> list[dict]:
    """Small tensor (1 KiB) bounced between actors: per-hop cost from the slope between 1 and 5 hops (interleaved)."""
    from ray.dag import InputNode

    x = np.zeros(256, np.float32)
    rows = []
    for plane in ("actor calls (ObjectRefs)", "Ray Compiled Graph"):
        one = Echo.options(resources={raycluster.resource(DEVICES[0]): 0.001}).remote()
        pair = [Echo.options(resources={raycluster.resource(d): 0.001}).remote() for d in DEVICES[1:3]]
        chains = {1: [one], 5: [pair[i % 2] for i in range(5)]}
        dags = []
        if plane.startswith("actor"):
            def call(chain):
                def run():
                    ref = x
                    for actor in chain:
                        ref = actor.f.remote(ref)
                    return ray.get(ref)
                return run
            fns = {h: call(c) for h, c in chains.items()}
        else:
            fns = {}
            for h, chain in chains.items():
                with InputNode() as inp:
                    node = inp
                    for actor in chain:
                        node = actor.f.bind(node)
                dag = node.experimental_compile()
                ray.get(dag.execute(x), timeout=120)  # the first execution sets the channels up (seconds)
                dags.append(dag)
                fns[h] = lambda dag=dag: ray.get(dag.execute(x))
        t = interleaved_medians(fns, repeats * 10, warmup=10)
        rows.append({"dataplane": plane, "round_trip_1_hop_ms": t[1] * 1e3, "round_trip_5_hops_ms": t[5] * 1e3,
                     "per_hop_us": (t[5] - t[1]) / 4 * 1e6})
        for dag in dags:
            dag.teardown()
        for actor in (one, *pair):
            ray.kill(actor)
    return rows


def _whole(path: Path, threads: int = 1) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), session_options(threads), providers=["CPUExecutionProvider"])


def latency(model: Path, graph, repeats: int) -> list[dict]:
    x = random_inputs(tuple(graph.tensors[t] for t in graph.inputs), {"batch": 1})
    whole = _whole(model)
    base = median_seconds(lambda: whole.run(None, x), repeats)
    rows = [{"plan": "whole model, 1 onnxruntime session (1 thread)", "devices": 1, "dataplane": "-",
             "median_ms": base * 1e3, "ratio": 1.0}]
    for n in (2, 3):
        plan = partition(graph, Cluster.simulated(n))
        for dataplane in ("tasks", "compiled"):
            with RayExecutor(plan, dataplane=dataplane) as ex:
                session = ex.session(1)
                t = median_seconds(lambda: session.run(x), repeats)
            rows.append({"plan": f"vertical, {len(plan.stages)} stages", "devices": n, "dataplane": dataplane,
                         "median_ms": t * 1e3, "ratio": t / base})
    return rows


def throughput(model: Path, graph, requests: int, repeats: int) -> tuple[list[dict], dict, list[dict], list[dict]]:
    """2-device vertical plan, 1 core each, many requests in flight vs 1 core on the whole model."""
    plan = _time_balanced(graph, Cluster.simulated(2, cores=1))
    xs = [random_inputs(plan.inputs, {"batch": 1}, seed=i) for i in range(requests)]
    whole = _whole(model)
    for x in xs[:3]:
        whole.run(None, x)

    def whole_burst() -> float:
        t0 = time.perf_counter()
        for x in xs:
            whole.run(None, x)
        return requests / (time.perf_counter() - t0)

    whole_rates: list[float] = []
    local = LocalExecutor(plan, threads=1)
    stage_times = {s.name: [] for s in plan.stages}
    for x in xs[:10] * 2:
        for k, v in local.run(x).stage_seconds.items():
            stage_times[k].append(v)
    stage_ms = {k: statistics.median(v) * 1e3 for k, v in stage_times.items()}
    rows: list[dict] = []
    memory_rows: list[dict] = []
    bytes_rows: list[dict] = []
    for dataplane, chunk in (("tasks", 1), ("compiled", 1), ("auto", 1), ("tasks", CHUNK), ("compiled", CHUNK)):
        with RayExecutor(plan, dataplane=dataplane) as ex:
            session = ex.session(4, chunk=chunk)
            list(session.stream(xs[:4 * chunk]))
            if dataplane == "auto":
                dataplane = f"auto (chose {ex.chosen}: " + ", ".join(f"{k} {v:.1f}/s" for k, v in ex.calibration.items()) + ")"
            before = ex.stats()
            devices = [psutil.Process(s["pid"]) for s in before.values()]
            rates, paired, cores = [], [], []
            for _ in range(repeats):  # alternate with the baseline so that machine noise hits both alike
                paired.append(whole_burst())
                t0, cpu0 = time.perf_counter(), _cpu_seconds(devices)
                answers = list(session.stream(xs))
                seconds = time.perf_counter() - t0
                rates.append(requests / seconds)
                cores.append([(b - a) / seconds for a, b in zip(cpu0, _cpu_seconds(devices))])
                assert all(not isinstance(a, Exception) for a in answers)
            whole_rates += paired
            after = ex.stats()
            blanks = {d: DeviceWorker.options(resources={raycluster.resource(d): 0.001}).remote(
                d, [], 1, ex.cpus.get(d, ())) for d in after}
            _same_traffic(plan, blanks, requests)
            blank = dict(zip(blanks, ray.get([b.stats.remote() for b in blanks.values()])))
            for b in blanks.values():
                ray.kill(b)
            rate = statistics.median(rates)
            busy, on_devices, driver = (statistics.median(c[i] for c in cores) for i in range(3))
            rows.append({"run": "2-device vertical plan, 1 core each", "dataplane": dataplane, "chunk": chunk,
                         "requests_per_s": rate, "speedup": rate / statistics.median(paired),
                         "cores_busy": busy, "cores_devices": on_devices, "cores_driver": driver,
                         "cores_rest": busy - on_devices - driver})
            if dataplane == "tasks" and chunk == 1:
                memory_rows = _memory(plan, graph, after, blank)
                bytes_rows = _bytes(plan, before, after, repeats * requests)
    whole_rate = statistics.median(whole_rates)
    t_whole_ms = 1e3 / whole_rate
    bound = t_whole_ms / max(stage_ms.values())
    rows.insert(0, {"run": "whole model, 1 core (median over all bursts)", "dataplane": "-", "chunk": "-",
                    "requests_per_s": whole_rate, "speedup": 1.0, "cores_busy": "-", "cores_devices": "-",
                    "cores_driver": "-", "cores_rest": "-"})
    concurrent = [concurrent_bound(plan, xs[0], requests) for _ in range(3)]
    info = {"stage_ms": stage_ms, "whole_ms": t_whole_ms, "bound": bound, "goal": 1.7,
            "concurrent_bound": statistics.median(concurrent) / whole_rate if None not in concurrent else None,
            "parallel_ceiling": parallel_ceiling(model, xs[0], requests),
            "stages": [s.name for s in plan.stages]}
    return rows, info, memory_rows, bytes_rows


def _cpu_seconds(devices: list[psutil.Process]) -> tuple[float, float, float]:
    """CPU seconds so far: the whole machine (busy), the device actors' processes, this driver process."""
    t = psutil.cpu_times()
    busy = t.user + t.nice + t.system + getattr(t, "irq", 0.0) + getattr(t, "softirq", 0.0)  # guest is in user
    used = lambda p: sum(p.cpu_times()[:2])  # noqa: E731  (user + system)
    return busy, sum(used(p) for p in devices), used(psutil.Process())


def _pinned_rate(model: bytes, feeds: dict, outputs: list | None, cpu: int, n: int, barrier, out) -> None:
    os.sched_setaffinity(0, {cpu})
    session = ort.InferenceSession(model, session_options(1), providers=["CPUExecutionProvider"])
    session.run(outputs, feeds)
    barrier.wait()
    t0 = time.perf_counter()
    for _ in range(n):
        session.run(outputs, feeds)
    out.put(n / (time.perf_counter() - t0))


def concurrent_rates(jobs: list[tuple[bytes, dict, list | None]], n: int) -> list[float] | None:
    """Requests per second of each (model, feeds, outputs) job while all run at once, each in its own process
    pinned to its own core, without Ray (None without a core per job)."""
    import multiprocessing as mp

    cpus = sorted(os.sched_getaffinity(0))
    if len(jobs) > len(cpus):
        return None
    ctx = mp.get_context("spawn")
    barrier, out = ctx.Barrier(len(jobs)), ctx.Queue()
    procs = [ctx.Process(target=_pinned_rate, args=(*job, cpu, n, barrier, out)) for cpu, job in zip(cpus, jobs)]
    for p in procs:
        p.start()
    rates = [out.get() for _ in procs]
    for p in procs:
        p.join()
    return rates


def parallel_ceiling(model: Path, x: dict, n: int) -> float:
    """Two 1-thread processes on the whole model, each on its own core, total rate over one alone: what 2 devices
    on this machine can give at best (1.0 when the cores are not really free)."""
    job = (model.read_bytes(), x, None)  # None: every output
    one, two = concurrent_rates([job], n), concurrent_rates([job, job], n)
    return sum(two) / one[0] if one and two else 1.0


def concurrent_bound(plan, x: dict, n: int) -> float | None:
    """Requests per second of the slowest stage while every stage runs at once, each in its own process on its own
    core, without Ray: the pipeline's bound with the cores really shared (None without a core per stage)."""
    values = dict(x)
    for stage in plan.stages:  # a vertical plan's stages in order: every stage's inputs, once
        session = ort.InferenceSession(plan.stage_models[stage.name], providers=["CPUExecutionProvider"])
        values.update(zip(stage.outputs, session.run(list(stage.outputs), {t: values[t] for t in stage.inputs})))
    rates = concurrent_rates([(plan.stage_models[s.name], {t: values[t] for t in s.inputs}, list(s.outputs))
                              for s in plan.stages], n)
    return min(rates) if rates else None


def _time_balanced(graph, cluster: Cluster):
    """The 2-stage vertical cut whose measured stage times (1 thread) are closest: MAC balance is not time balance."""
    x = random_inputs(tuple(graph.tensors[t] for t in graph.inputs), {"batch": 1})
    names = [layer.name for layer in graph.layers]
    best, best_time = None, float("inf")
    for k in range(int(len(names) * 0.3), int(len(names) * 0.7)):
        plan = cut(graph, cluster, {n: "dev0" if i < k else "dev1" for i, n in enumerate(names)})
        crossing = [t for t in plan.transfers if t.cross_device and "@" not in t.src + t.dst]
        if len(plan.stages) != 2 or len(crossing) > 2:  # at most a block's input and its shortcut cross
            continue
        local = LocalExecutor(plan, threads=1)
        slowest = statistics.median(max(local.run(x).stage_seconds.values()) for _ in range(3))
        if slowest < best_time:
            best, best_time = plan, slowest
    return best or partition(graph, cluster)


def _echo(worker, sizes: list[int], *received: np.ndarray) -> list[np.ndarray]:
    """Returns as many bytes as the device's stages, from one buffer kept between calls (as a session's arena)."""
    largest = max(sizes, default=0)
    if getattr(worker, "echo_buffer", np.zeros(0, np.uint8)).nbytes < largest:
        worker.echo_buffer = np.zeros(largest, np.uint8)
    return [worker.echo_buffer[:n] for n in sizes]


def _same_traffic(plan, blanks: dict, n: int) -> None:
    """Each idle actor receives and returns, n times with 4 in flight, as many bytes as its device's stages do,
    so that Ray's own buffers for that traffic count in the baseline rather than in the model's share."""
    for device, actor in blanks.items():
        stages = {s.name for s in plan.device_stages(device)}
        sent = [np.zeros(t.nbytes, np.uint8) for t in plan.transfers if t.cross_device and t.dst in stages]
        returned = {t.tensor: t.nbytes for t in plan.transfers if t.cross_device and t.src in stages}
        sizes = list(returned.values())
        pending = []
        for _ in range(n):
            pending.append(actor.__ray_call__.remote(_echo, sizes, *sent))
            if len(pending) >= 4:
                ray.get(pending.pop(0))
        ray.get(pending)


def _memory(plan, graph, stats: dict, blank: dict) -> list[dict]:
    """Model share: unique memory of the device's actor minus that of an actor with no stages (same imports, same
    onnxruntime start, same traffic). Ray's worker and onnxruntime's fixed start-up cost are that actor's, apart."""
    rows = []
    for device, st in stats.items():
        stages = plan.device_stages(device)
        params = sum(s.param_bytes for s in stages)
        layers = [graph.layer(l) for s in stages for l in s.layers]
        boundary = sum(graph.tensors[t].nbytes for s in stages for t in (*s.inputs, *s.outputs))
        working = max((sum(graph.tensors[t].nbytes for t in (*layer.inputs, *layer.outputs)) for layer in layers), default=0)
        activations = boundary + working
        model_share = st["uss"] - blank[device]["uss"]
        runtime = blank[device]["uss_runtime"] - blank[device]["uss_start"]
        rows.append({"device": device, "ray_worker_rss_mib": blank[device]["rss"] / 2**20,
                     "ray_worker_uss_mib": (blank[device]["uss"] - runtime) / 2**20,
                     "onnxruntime_start_mib": runtime / 2**20, "model_share_mib": model_share / 2**20,
                     "params_mib": params / 2**20, "activations_mib": activations / 2**20,
                     "ratio": model_share / (params + activations), "goal": 1.15})
    return rows


def _bytes(plan, before: dict, after: dict, n: int) -> list[dict]:
    producer_device = {t: s.device for s in plan.stages for t in s.outputs}
    cross = feed = 0
    for device, st in after.items():
        for key, value in st["bytes_in"].items():
            delta = value - before[device]["bytes_in"].get(key, 0)
            tensor = key.split("/", 1)[1]
            if tensor not in producer_device:
                feed += delta
            elif producer_device[tensor] != device:
                cross += delta
    return [{"what": "between devices (plan.wire_bytes)", "plan_json": plan.wire_bytes(), "measured_per_inference": cross / n},
            {"what": "requester's inputs to first stages", "plan_json": sum(t.nbytes for t in plan.inputs),
             "measured_per_inference": feed / n}]


def failover(kills: int, requests: int) -> list[dict]:
    """Kill the device of part A mid-stream (its replica lives): time from the kill to the next answer."""
    rest = dict.fromkeys(("stem_conv", "stem_relu", "relu1", "conv2", "relu2", "gap", "flatten", "fc"), "dev0")
    plan, _ = zoo.replicated_split_conv(("dev1", "dev2"), "dev3", rest, "dev0", Cluster.simulated(4), channels=32,
                                        size=64, batch=1)
    xs = [random_inputs(plan.inputs, seed=i) for i in range(requests)]
    rows = []
    for dataplane in ("tasks", "compiled"):
        detect, answer, not_full = [], [], 0
        with RayExecutor(plan, dataplane=dataplane, rejoin_interval=None) as ex:
            for _ in range(kills):
                session = ex.session(4)
                list(session.stream(xs[:8]))
                killed_at = 0.0
                for i, a in enumerate(session.stream(xs)):
                    not_full += isinstance(a, Exception) or a.degraded
                    if i == requests // 3:
                        ray.kill(ex.actors["dev1"])
                        killed_at = time.monotonic()
                report = session.report()
                lost = next(e for e in report.events if isinstance(e, DeviceLost))
                detect.append(lost.at - killed_at)
                answer.append(lost.at - killed_at + report.recovery_seconds[0])  # first answer re-routed around it
                ex.rejoin(timeout=60)
        rows.append({"dataplane (steady state)": dataplane, "kill_to_detection_ms": statistics.median(detect) * 1e3,
                     "kill_to_first_answer_after_ms": statistics.median(answer) * 1e3, "kills": kills,
                     "answers_not_full": not_full, "goal_ms": 1000})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--requests", type=int, default=160)
    ap.add_argument("--size", type=int, default=224, help="ResNet-18 input resolution")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    if args.quick:
        args.repeats, args.requests, args.size = 5, 32, 112
    resources = {raycluster.resource(d): 1 for d in DEVICES}
    ray.init(num_cpus=len(DEVICES), resources=resources, include_dashboard=False, log_to_driver=False, configure_logging=False,
             _system_config=raycluster.WORKER_PRIORITY)
    with tempfile.TemporaryDirectory() as tmp:
        model = zoo.export(zoo.resnet18(), (1, 3, args.size, args.size), Path(tmp) / "resnet18.onnx")
        graph = edgesplit.load(model)
        hops = hop_overhead(args.repeats)
        lat = latency(model, graph, args.repeats)
        tput, bound, mem, sent = throughput(model, graph, args.requests, max(3, args.repeats // 5))
    fail = failover(3, 30)
    ray.shutdown()
    data = {"machine": machine(), "model": f"resnet18 1x3x{args.size}x{args.size}", "hop_overhead": hops,
            "latency": lat, "throughput": tput, "throughput_bound": bound, "memory": mem, "bytes": sent, "failover": fail}

    def table(rows: list[dict]) -> str:
        return markdown_table(list(rows[0]), [list(r.values()) for r in rows])

    bound_text = (f"Stage times (1 thread): {', '.join(f'{k} {v:.1f} ms' for k, v in bound['stage_ms'].items())}; "
                  f"whole model {bound['whole_ms']:.1f} ms/request, so the bound is {bound['bound']:.2f}x "
                  f"(goal {bound['goal']}x). Both stages running at once, each alone in its own process on its own "
                  f"core without Ray, the slowest gives {bound['concurrent_bound'] or float('nan'):.2f}x. "
                  f"Two independent 1-thread processes on the whole model run "
                  f"{bound['parallel_ceiling']:.2f}x the rate of one on this machine at this time: the ceiling any "
                  f"2-device split can reach here. cores_*: CPU used during the stream, in cores (medians): the whole "
                  f"machine (of {psutil.cpu_count()}), the two device actors' processes, the driver, and the rest "
                  f"(Ray's raylet, GCS and other processes).")
    sections = [
        ("Per-hop overhead, 1 KiB tensor actor to actor", table(hops)),
        (f"Single-request latency, ResNet-18 {args.size}x{args.size}, loopback", table(lat)),
        ("Pipelined throughput, 2-device vertical plan, 1 core per device", table(tput) + "\n\n" + bound_text),
        ("Per-device resident memory (tasks dataplane, after the throughput run)", table(mem)),
        ("Bytes sent per inference vs plan.json", table(sent)),
        ("Failover: kill part A's device mid-stream, its replica takes over", table(fail)),
    ]
    path = write_report("ray", "Ray executor", data, sections)
    print(path.read_text() if path.suffix == ".md" else path)


if __name__ == "__main__":
    main()
