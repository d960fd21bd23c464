"""`edgesplit demo`: a shipped MNIST model (the CNN by default, or the ViT), split over devices, gives the same
test accuracy as the whole model."""

from __future__ import annotations

import pickle
import subprocess
import sys
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import psutil
from onnx import helper
from rich.console import Console
from rich.table import Table

from edgesplit import report
from edgesplit.cluster import Cluster
from edgesplit.datasets import accuracy, mnist_split, provenance, shipped_model
from edgesplit.graph import Graph, load
from edgesplit.compare import compare
from edgesplit.layout import Strategy
from edgesplit.planner import layout, partition, with_replicas
from edgesplit.planner import plan as plan_of
from edgesplit.robust.evaluate import fatal_devices, max_param_bytes
from edgesplit.robust.importance import Importance, importance
from edgesplit.robust.policies import Policy, replicas
from edgesplit.plan import Plan, Stage
from edgesplit.runtime.common import session_options
from edgesplit.runtime.local import LocalExecutor, run_whole_model

MODELS = ("mnist_cnn", "mnist_vit")
RTOL = 1e-5
ROBUST_DEVICES = 4  # the device-lost part splits over at least this many simulated devices


@dataclass(frozen=True)
class DeviceMemory:
    """Per device, per inference at batch 1. `rss_delta_bytes` is measured, the rest are estimates."""

    device: str
    param_bytes: int
    activation_peak_bytes: int  # estimate: largest set of live tensors while its stages run, one layer at a time
    rss_delta_bytes: int  # measured: RSS growth of a fresh process opening and running its stage sessions once

    @property
    def estimate_bytes(self) -> int:
        return self.param_bytes + self.activation_peak_bytes


def run_demo(devices: int = 3, console: Console | None = None, cluster: str | Path | None = None,
             model: str = MODELS[0]) -> dict[str, Any]:
    """Split a shipped model over `devices` simulated devices (or the devices of a cluster file), run the held-out
    test digits through the whole model and through the plan, print both accuracies and the plan; return the numbers."""
    console = console or Console()
    t_start = time.perf_counter()
    the_cluster = Cluster.load(cluster) if cluster is not None else Cluster.simulated(devices)
    path, record = shipped_model(model), provenance()[model]
    test = mnist_split().test
    graph = load(path)
    plan = partition(graph, the_cluster)
    inputs = {"input": test.images}
    memory = device_memory(plan, graph, {"input": test.images[:1]})  # first: before big batches grow the heap

    t0 = time.perf_counter()
    reference = run_whole_model(graph.model, inputs)
    t1 = time.perf_counter()
    result = LocalExecutor(plan).run(inputs)
    t2 = time.perf_counter()
    diff = compare(result.outputs, reference, RTOL)[0]
    acc_whole = accuracy(reference["logits"], test.labels)
    acc_split = accuracy(result.outputs["logits"], test.labels)
    same_predictions = bool(np.array_equal(reference["logits"].argmax(1), result.outputs["logits"].argmax(1)))
    if acc_whole != acc_split or not same_predictions or not diff.ok:
        raise RuntimeError(f"the split plan disagrees with the whole model: accuracy {acc_split:.4f} vs {acc_whole:.4f}, "
                           f"max relative logit difference {diff.max_rel:.3g} (tolerance {RTOL:g})")

    console.print(f"[bold]{model}[/] ({record['description']}; {record['parameters']:,} parameters), "
                  f"trained by {record['script']} (seed {record['seed']}), on {len(test)} held-out MNIST test digits")
    console.print(report.plan_table(plan))
    console.print(report.transfer_table(plan))
    console.print(memory_table(memory))
    console.print(f"test accuracy, whole model (one onnxruntime session): [bold]{acc_whole:.2%}[/]  ({t1 - t0:.2f} s)")
    console.print(f"test accuracy, split over {len(the_cluster.devices)} devices ({len(plan.stages)} stages, "
                  f"local executor):  [bold]{acc_split:.2%}[/]  ({t2 - t1:.2f} s)")
    console.print(f"[green]equal[/]: the same prediction for all {len(test)} digits; "
                  f"max relative logit difference {diff.max_rel:.2g} (tolerance {RTOL:g})")
    lossy = the_cluster if cluster is not None else Cluster.simulated(max(len(the_cluster.devices), ROBUST_DEVICES))
    robust = device_lost(graph, lossy, test.images, test.labels, console) if len(lossy.devices) > 2 else None
    return {
        "model": model,
        "model_sha256": graph.sha256,
        "test_digits": len(test),
        "devices": list(the_cluster.names),
        "stages": len(plan.stages),
        "accuracy_unsplit": acc_whole,
        "accuracy_split": acc_split,
        "accuracy_recorded": record["test_accuracy"],
        "predictions_equal": same_predictions,
        "max_abs_diff": diff.max_abs,
        "max_rel_diff": diff.max_rel,
        "wire_bytes_per_digit": plan.wire_bytes(),
        "memory": [asdict(m) | {"estimate_bytes": m.estimate_bytes} for m in memory],
        "robustness": robust,
        "seconds": {"unsplit": t1 - t0, "split": t2 - t1, "total": time.perf_counter() - t_start},
    }


def device_lost(graph: Graph, cluster: Cluster, images: np.ndarray, labels: np.ndarray, console: Console,
                r: float = 0.5, calibration: int = 100, batch: int = 100, lost_after: int = 4) -> dict[str, Any]:
    """Split horizontally, lose one device that holds only parts: the plain split's accuracy (degraded answers)
    against the same split with the vital half of every part's units on the next device (k-of-n, standby); then
    the replicated plan answers the digits as a stream of batches, the device lost after `lost_after` of them."""
    t0 = time.perf_counter()
    rewritten, placement = layout(graph, cluster, strategy=Strategy.HORIZONTAL)
    scores = importance(rewritten, Importance.ACTIVATION, {"input": images[:calibration]})
    extra = replicas(rewritten, Policy.K_OF_N, scores, r)
    plain = plan_of(rewritten, cluster, placement)
    with_extra, placed = with_replicas(rewritten, placement, extra)
    replicated = plan_of(with_extra, cluster, placed)
    lost = next(d for d in plain.devices if d not in fatal_devices(plain))
    x, y = {"input": images[calibration:]}, labels[calibration:]
    acc = {name: accuracy(LocalExecutor(p, allow_degraded=True).run(x, failed={lost}).outputs["logits"], y)
           for name, p in (("plain", plain), ("replicated", replicated))}
    fault_free = accuracy(LocalExecutor(plain).run(x).outputs["logits"], y)
    memory = max_param_bytes(replicated) / max_param_bytes(plain)
    stream = lost_mid_stream(replicated, x["input"], y, lost, batch, lost_after)
    table = Table(title=f"device {lost} lost: horizontal split over {len(cluster.devices)} devices, {len(y)} digits")
    for col in ("layout", "per-device parameters vs plain", "accuracy"):
        table.add_column(col, justify="left" if col == "layout" else "right")
    table.add_row("no device lost", "1.00x", f"{fault_free:.2%}")
    table.add_row(f"plain split, {lost} lost (degraded answers)", "1.00x", f"[bold]{acc['plain']:.2%}[/]")
    table.add_row(f"vital {r:.0%} of every part's units on the next device (k-of-n), {lost} lost", f"{memory:.2f}x",
                  f"[bold]{acc['replicated']:.2%}[/]")
    console.print(table)
    console.print(f"device {lost} lost mid-stream ({len(stream['answers'])} batches of {batch}, lost after batch "
                  f"{lost_after}): answers {' '.join(stream['answers'])}; accuracy after the loss "
                  f"{stream['accuracy_after']:.2%} (the in-process evaluation of that failure set: "
                  f"{stream['evaluated_after']:.2%}); {time.perf_counter() - t0:.1f} s")
    return {"lost": lost, "devices": len(cluster.devices), "fault_free": fault_free, "plain": acc["plain"],
            "replicated": acc["replicated"], "memory_vs_plain": memory, "r": r, "stream": stream,
            "seconds": time.perf_counter() - t0}


def lost_mid_stream(plan: Plan, images: np.ndarray, labels: np.ndarray, lost: str, batch: int,
                    lost_after: int) -> dict[str, Any]:
    """Batches through one executor, `lost` down from batch `lost_after` on: each answer full or degraded, and
    the accuracy after the loss against the evaluation of that failure set on the same digits."""
    executor = LocalExecutor(plan, allow_degraded=True)
    marks, logits = [], []
    for k, start in enumerate(range(0, len(images), batch)):
        answer = executor.run({"input": images[start:start + batch]}, failed={lost} if k >= lost_after else None)
        marks.append("degraded" if answer.degraded else "full")
        logits.append(answer.outputs["logits"])
    after = slice(lost_after * batch, None)
    evaluated = LocalExecutor(plan, allow_degraded=True).run({"input": images[after]}, failed={lost})
    return {"answers": marks, "accuracy_after": accuracy(np.concatenate(logits[lost_after:]), labels[after]),
            "evaluated_after": accuracy(evaluated.outputs["logits"], labels[after])}


def activation_peak(graph: Graph, stage: Stage) -> int:
    """Estimated peak bytes of live activations while a stage runs its layers in order (batch as the graph's dims)."""
    last_use: dict[str, int] = {}
    for i, name in enumerate(stage.layers):
        for t in graph.layer(name).inputs:
            last_use[t] = i
    end = len(stage.layers)
    for t in stage.outputs:
        last_use[t] = end
    live = {t: graph.tensors[t].nbytes for t in stage.inputs}
    peak = sum(live.values())
    for i, name in enumerate(stage.layers):
        layer = graph.layer(name)
        live.update({t: graph.tensors[t].nbytes for t in layer.outputs})
        peak = max(peak, sum(live.values()))
        live = {t: b for t, b in live.items() if last_use.get(t, -1) > i}
    return peak


def device_memory(plan: Plan, graph: Graph, sample: Mapping[str, np.ndarray]) -> list[DeviceMemory]:
    """Parameter bytes and estimated activation peak per device, and the measured RSS growth of its sessions."""
    values: dict[str, np.ndarray] = dict(sample)
    feeds: dict[str, list[tuple[bytes, dict[str, np.ndarray]]]] = {d: [] for d in plan.cluster.names}
    for stage in plan.order():
        model, feed = plan.stage_models[stage.name], {t: values[t] for t in stage.inputs}
        feeds[stage.device].append((model, feed))
        values.update(zip(stage.outputs, _session(model).run(list(stage.outputs), feed)))
    busy = [d for d in plan.cluster.names if feeds[d]]
    with ThreadPoolExecutor(max_workers=2) as pool:
        rss = dict(zip(busy, pool.map(_rss_in_fresh_process, [feeds[d] for d in busy])))
    return [
        DeviceMemory(
            device=d,
            param_bytes=sum(s.param_bytes for s in plan.device_stages(d)),
            activation_peak_bytes=max((activation_peak(graph, s) for s in plan.device_stages(d)), default=0),
            rss_delta_bytes=rss.get(d, 0),
        )
        for d in plan.cluster.names
    ]


def _session(model: bytes) -> ort.InferenceSession:
    return ort.InferenceSession(model, session_options(1), providers=["CPUExecutionProvider"])


def _rss_in_fresh_process(stages: list[tuple[bytes, dict[str, np.ndarray]]]) -> int:
    """In this process, heap freed by earlier work would hide the sessions' growth; a new interpreter has none."""
    done = subprocess.run([sys.executable, "-c", "import edgesplit.demo as d; d.session_rss_main()"],
                          input=pickle.dumps(stages), capture_output=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"measuring stage memory in a subprocess failed: {done.stderr.decode()[-2000:]}")
    return int(done.stdout.decode().split()[-1])


def session_rss_main() -> None:
    """Child side: RSS growth from opening the given stage sessions and running each once (all kept open)."""
    stages = pickle.load(sys.stdin.buffer)
    process = psutil.Process()
    _warm_up()
    before = process.memory_info().rss
    sessions = [_session(model) for model, _ in stages]
    for session, (_, feed) in zip(sessions, stages):
        session.run(None, feed)
    print(process.memory_info().rss - before)


def _warm_up() -> None:
    """Open and run a one-node session, so that onnxruntime's one-time set-up is counted for no device."""
    def info(name: str) -> onnx.ValueInfoProto:
        return helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, [1])

    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "warm_up", [info("x")], [info("y")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    _session(model.SerializeToString()).run(None, {"x": np.ones(1, np.float32)})


def memory_table(rows: list[DeviceMemory]) -> Table:
    table = Table(title="memory per device (batch 1): parameters and activation peak are estimates, RSS is measured")
    for col in ("device", "parameters", "activation peak (est.)", "total (est.)", "RSS growth (measured)"):
        table.add_column(col, justify="left" if col == "device" else "right")
    for m in rows:
        table.add_row(m.device, report.human_bytes(m.param_bytes), report.human_bytes(m.activation_peak_bytes),
                      report.human_bytes(m.estimate_bytes), report.human_bytes(m.rss_delta_bytes))
    return table
