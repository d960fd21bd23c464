"""Plans on the emulated edge network (scripts/edge-lab): single-request latency and bytes on the wire.

sudo python benchmarks/bench_network.py [--repeats 15] [--size 224] [--network 1gbit/0.3ms --network 100mbit/2ms]

For each network: `edge-lab up 3` (a head + edge0..edge2, each a Ray node in its own namespace, links shaped with
tbf + a one-way delay), then a requester inside the head's namespace times one onnxruntime session on the whole
ResNet-18 (1 thread) and 2- and 3-device plans on edgesplit.runtime.ray.RayExecutor (1 core per device): vertical
(actor calls and peer data plane) and horizontal channel splits (peer, gather and exchange synchronisation), one
request at a time, against a prediction from each stage's compute time, the bytes between devices and the links'
delay and bandwidth; and reads every device's link counters (`ip -s link`) to count the bytes actually sent per
inference, against what plan.json says. Writes benchmarks/results/network.json and network.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from edgesplit import signing
from edgesplit.cluster import parse_bandwidth, parse_seconds

ROOT = Path(__file__).resolve().parents[1]
LAB = ROOT / "scripts" / "edge-lab"
HOP_S = 128e-6  # one exchange on the peer wire between two processes on loopback (bench_speed.py, 2 KB)


def lab(*args: str) -> str:
    done = subprocess.run([sys.executable, str(LAB), *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"edge-lab {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}")
    return done.stdout


# (label, partition options, data plane): each cut for 2 and 3 devices
PLANS = (("vertical", {}, "tasks"), ("vertical", {}, "peer"),
         ("channels, gather", {"strategy": "horizontal", "split": "channels", "sync": "gather"}, "peer"),
         ("channels, exchange", {"strategy": "horizontal", "split": "channels", "sync": "exchange"}, "peer"))


def plan_key(label: str, plane: str, n: int) -> str:
    return f"{label.replace(', ', '-')}-{plane}-{n}"


def prepare(work: Path, size: int) -> dict:
    """ResNet-18 at size x size, cut by every entry of PLANS for edge0.. (1 core each); each stage's compute time
    measured here, one thread, for the prediction."""
    from edgesplit.bench import zoo
    from edgesplit.cluster import Cluster
    from edgesplit.graph import load
    from edgesplit.plan import SINK, SOURCE
    from edgesplit.planner import partition

    model = zoo.export(zoo.resnet18(), (1, 3, size, size), work / "model.onnx", dynamic_batch=False)
    graph = load(model)
    # signed with a key of this run: the driver in the lab checks them with it, then seals them for the devices
    # with the lab's Ray auth token (each `edge-lab up` makes a new one)
    (work / "plan.key").write_text(secrets.token_hex(32))
    signing_key = signing.find_key(work / "plan.key")
    plans = {}
    for label, options, plane in PLANS:
        for n in (2, 3):
            plan = partition(graph, Cluster.simulated(n, cores=1, prefix="edge"), **options)
            key = plan_key(label, plane, n)
            plan.save(work / key, key=signing_key)
            requester = sum(t.nbytes for t in plan.transfers
                            if t.cross_device and (SOURCE in (t.src, t.dst) or SINK in (t.src, t.dst)))
            plans[key] = {"label": label, "plane": plane, "devices": n, "wire_bytes": plan.wire_bytes(),
                          "requester_bytes": requester,
                          "stages": [[s.name, s.device, len(s.layers)] for s in plan.stages],
                          "stage_s": stage_seconds(plan), "order": [s.name for s in plan.order()],
                          "transfers": [[t.tensor, t.src, t.dst, t.nbytes] for t in plan.transfers if t.cross_device]}
    return {"params": graph.total_params, "macs": graph.total_macs, "plans": plans}


def stage_seconds(plan, repeats: int = 9) -> dict[str, float]:
    """Median seconds of each stage on one onnxruntime thread, fed the values a request gives it."""
    import onnxruntime as ort

    from edgesplit.bench.harness import median_seconds
    from edgesplit.runtime.common import random_inputs, session_options

    values = random_inputs(plan.inputs, {}, seed=0)
    seconds = {}
    for stage in plan.order():
        sess = ort.InferenceSession(plan.stage_models[stage.name], session_options(1),
                                    providers=["CPUExecutionProvider"])
        feeds = {t: values[t] for t in stage.inputs}
        seconds[stage.name] = median_seconds(lambda: sess.run(None, feeds), repeats, warmup=2)
        values.update(zip(stage.outputs, sess.run(list(stage.outputs), feeds)))
    return seconds


def predict(plan: dict, bandwidth: float, delay_s: float, hop_s: float = HOP_S) -> float:
    """Latency of one request on the peer data plane: every device runs its stages in the plan's order, each as
    soon as its inputs are there; a tensor between two devices (or to and from the requester) arrives `delay_s`
    + bytes / bandwidth + `hop_s` after it was made. No Ray cost per call is counted."""
    from edgesplit.plan import SINK, SOURCE

    device = {name: dev for name, dev, _ in plan["stages"]}
    into: dict[str, list[tuple[str, int]]] = {}
    for _, src, dst, nbytes in plan["transfers"]:
        into.setdefault(dst, []).append((src, nbytes))
    link = lambda nbytes: delay_s + nbytes / bandwidth + hop_s  # noqa: E731  bandwidth in bytes per second
    done: dict[str, float] = {SOURCE: 0.0}
    free: dict[str, float] = {}
    for name in plan["order"]:
        ready = max((done[src] + link(nbytes) for src, nbytes in into.get(name, ())), default=0.0)
        # inputs from the same device's stages are not transfers across devices: they wait only for the producer
        start = max(ready, free.get(device[name], 0.0))
        done[name] = free[device[name]] = start + plan["stage_s"][name]
    return max((done[src] + link(nbytes) for src, nbytes in into.get(SINK, ())), default=max(done.values()))


def drive(work: Path, repeats: int, out: Path) -> None:
    """Runs inside the head's namespace (the requester)."""
    import onnxruntime as ort

    from edgesplit.bench.harness import timings
    from edgesplit.plan import Plan
    from edgesplit.runtime.common import session_options
    from edgesplit.runtime.ray import RayExecutor

    rng = np.random.default_rng(0)
    sess = ort.InferenceSession(str(work / "model.onnx"), session_options(1), providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    x = {name: rng.standard_normal(sess.get_inputs()[0].shape).astype(np.float32)}
    ref = sess.run(None, x)[0]
    whole = timings(lambda: sess.run(None, x), repeats, warmup=1)
    result: dict = {"whole_model_s": whole}
    for key, plane in ((plan_key(label, plane, n), plane) for label, _, plane in PLANS for n in (2, 3)):
        # checked with this run's key, then sealed afresh for the devices with the lab's token
        plan = dataclasses.replace(Plan.load(work / key, key=signing.find_key(work / "plan.key")), seal=None)
        with RayExecutor(plan, address=os.environ["RAY_ADDRESS"], deadline=120, dataplane=plane,
                         key=signing.find_key()) as ex:
            got = ex.run(x).outputs
            err = float(np.abs(next(iter(got.values())) - ref).max())
            timings(lambda: ex.run(x), 2, warmup=1)
            time.sleep(1.0)
            idle_before = _idle_rate(3.0)
            before, t0 = _sent(), time.monotonic()
            times = timings(lambda: ex.run(x), repeats, warmup=1)
            elapsed, after = time.monotonic() - t0, _sent()
            time.sleep(1.0)
            idle_after = _idle_rate(3.0)
        idle = {d: min(idle_before[d], idle_after[d]) for d in after}  # a stray transfer only ever adds bytes
        per_device = {d: max(0.0, after[d] - before[d] - idle[d] * elapsed) / repeats for d in after}
        result[key] = {"latency_s": times, "max_abs_diff": err, "sent_per_inference": per_device,
                              "idle_bytes_per_s": idle}
    out.write_text(json.dumps(result))


def _sent() -> dict[str, int]:
    status = json.loads(lab("status", "--json"))
    return {d: v["sent_bytes"] for d, v in status["devices"].items()}


def _idle_rate(seconds: float) -> dict[str, float]:
    """Background bytes per second per device (Ray's health checks, heartbeats, resource reports)."""
    before = _sent()
    time.sleep(seconds)
    after = _sent()
    return {d: (after[d] - before[d]) / seconds for d in after}


def report(prepared: dict, runs: dict[str, dict], repeats: int, size: int) -> None:
    from edgesplit.bench.harness import markdown_table, write_report

    rows, bytes_rows = [], []
    for network, r in runs.items():
        whole = statistics.median(r["whole_model_s"])
        bandwidth, delay = network.split("/")
        rate, delay_s = parse_bandwidth(bandwidth), parse_seconds(delay)
        rows.append([network, "whole model, 1 onnxruntime session", 1, whole * 1e3, "-", "-", 1.0, "-"])
        for key, plan in prepared["plans"].items():
            p = r[key]
            med = statistics.median(p["latency_s"])
            n = plan["devices"]
            guess = predict(plan, rate, delay_s) if plan["plane"] == "peer" else None
            rows.append([network, f"{plan['label']} ({len(plan['stages'])} stages), ray {plan['plane']}", n,
                         med * 1e3, "-" if guess is None else guess * 1e3,
                         "-" if guess is None else f"{(med - guess) / guess:+.0%}", med / whole,
                         f"{p['max_abs_diff']:.2g}"])
            measured = sum(p["sent_per_inference"].values())
            expected = plan["wire_bytes"] + plan["requester_bytes"]
            bytes_rows.append([network, f"{plan['label']}, ray {plan['plane']}", n, plan["wire_bytes"],
                               plan["requester_bytes"], expected, round(measured),
                               measured / expected if expected else float("nan"),
                               ", ".join(f"{d} {v / 1e3:.0f} kB" for d, v in p["sent_per_inference"].items())])
    data = {"model": f"resnet18 1x3x{size}x{size}", "repeats": repeats, **prepared, "runs": runs,
            "load_average": os.getloadavg()}
    note = (f"ResNet-18 ({prepared['params'] / 1e6:.1f} M parameters, {prepared['macs'] / 1e9:.2f} GMACs) at "
            f"1x3x{size}x{size}; median of {repeats} single requests, one at a time, the requester in the head's "
            "namespace; 1 core per device (Ray num_cpus=1, onnxruntime 1 thread). All Ray nodes share this machine's "
            f"cores (load average during the run {os.getloadavg()[0]:.1f}), so compute is not isolated; the network "
            "is. Predicted (peer data plane only): every device runs its stages in plan order as soon as their "
            "inputs are there, each stage taking its median time measured on one thread before the lab came up, "
            f"each tensor between devices (and to or from the requester) the link's delay + bytes / bandwidth + "
            f"{HOP_S * 1e6:.0f} µs (one exchange on loopback, bench_speed.py); Ray's cost per call is not counted. "
            "vs whole model = split median / whole-model median (above 1: slower than one device).")
    bytes_note = ("Bytes every lab device sent on its link (tx counter of its veth) per inference, minus the idle "
                  "background rate (Ray health checks and heartbeats; the lower of 3 s just before and 3 s just "
                  "after), against plan.json: "
                  "tensors between devices (`wire_bytes`) plus the requester's inputs and outputs. Ray adds "
                  "per-object framing, gRPC and TCP/IP headers (and the TCP ACKs every receiver sends back).")
    write_report("network", "Plans on the emulated edge network (edge-lab)", data, [
        ("Single-request latency", note + "\n\n" + markdown_table(
            ["network", "what", "devices", "median ms", "predicted ms", "measured vs predicted", "vs whole model",
             "max abs diff"], rows)),
        ("Bytes on the wire per inference", bytes_note + "\n\n" + markdown_table(
            ["network", "plan", "devices", "plan: between devices", "plan: requester", "plan: total", "measured total",
             "measured / plan", "sent by each device"], bytes_rows)),
    ])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--network", action="append", help="BANDWIDTH/DELAY, e.g. 100mbit/2ms (repeatable)")
    p.add_argument("_drive", nargs="*", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args._drive:
        work, out = Path(args._drive[1]), Path(args._drive[2])
        return drive(work, args.repeats, out)
    networks = args.network or ["1gbit/0.3ms", "100mbit/2ms"]
    with tempfile.TemporaryDirectory(prefix="bench_network_") as tmp:
        work = Path(tmp)
        prepared = prepare(work, args.size)
        runs = {}
        try:
            for network in networks:
                bandwidth, delay = network.split("/")
                print(f"edge-lab up 3 --bandwidth {bandwidth} --delay {delay}", flush=True)
                lab("up", "3", "--bandwidth", bandwidth, "--delay", delay, "--cores", "1", "--memory", "2GiB")
                out = work / f"{network.replace('/', '_')}.json"
                subprocess.run([sys.executable, str(LAB), "exec", "head", "--", sys.executable, __file__,
                                "--repeats", str(args.repeats), "_drive", str(work), str(out)], check=True)
                runs[network] = json.loads(out.read_text())
        finally:
            lab("down")
    report(prepared, runs, args.repeats, args.size)
    print((ROOT / "benchmarks" / "results" / "network.md").read_text())


if __name__ == "__main__":
    main()
