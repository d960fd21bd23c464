"""Speed of one split request (issue 12): 2 devices x 1 core against the whole model on 1 core.

For each model and split plan, one request at a time (batch 1), medians of --repeats runs, each ratio against the
whole model measured in alternation with it in the same run:
- the whole model in one onnxruntime session, 1 thread (the baseline);
- the bound: the same stages in two bare processes (no Ray), one core each, exchanging over local sockets with the
  peer data plane's own code (edgesplit.bench.bare);
- the Ray executor, 2 simulated devices of 1 core each, on each data plane: peer (devices exchange directly, one
  call per device per request), compiled (Ray Compiled Graphs), tasks (actor calls relayed by the driver).
Each split plan twice: `sync="gather"` (a root device combines each region and sends the result on) and
`sync="exchange"` (every device combines the parts itself; not on actor calls).
Also: one synchronisation (2 KB and 300 KB each way between two bare processes on the peer wire), and pipelined
throughput of a 2-device vertical plan on each data plane (it must not fall).

Every split output is checked against the local executor (identical) before it is timed.

python benchmarks/bench_speed.py [--repeats 20] [--quick] [--models resnet18,minilm,vit]
Writes benchmarks/results/speed.json and speed.md.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort

import edgesplit
from edgesplit.bench import bare, zoo
from edgesplit.bench import transformers_zoo as tzoo
from edgesplit.bench.harness import interleaved_medians, markdown_table, write_report
from edgesplit.cluster import Cluster
from edgesplit.runtime.common import random_inputs, session_options
from edgesplit.runtime.local import LocalExecutor

PLANES = ("peer", "compiled", "tasks")
SYNCS = {"gather": PLANES, "exchange": ("peer", "compiled")}  # actor calls are slower on every plan


def vit_b16(path: Path) -> Path:
    """A ViT-B/16 (224², 197 tokens, 12 blocks of 12 heads, random weights: speed does not need trained ones)."""
    import torch
    from transformers import ViTConfig, ViTModel

    torch.manual_seed(0)
    config = ViTConfig(image_size=224, patch_size=16, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                       intermediate_size=3072, attn_implementation="eager")
    model = ViTModel(config, add_pooling_layer=False).eval()

    class Hidden(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.vit = model

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.vit(pixel_values=x).last_hidden_state

    torch.onnx.export(Hidden(), (torch.randn(1, 3, 224, 224),), str(path), dynamo=False, opset_version=17,
                      input_names=["input"], output_names=["output"])
    return path


def cases(directory: Path, models: list[str]) -> list[tuple[str, Path, str, dict, dict[str, int]]]:
    """(name, model file, strategy, partition options, dims)."""
    found = []
    if "resnet18" in models:
        path = zoo.export(zoo.resnet18(), (1, 3, 224, 224), directory / "resnet18.onnx", dynamic_batch=False)
        found += [("ResNet-18 224², horizontal channels", path, "horizontal", {"split": "channels"}, {}),
                  ("ResNet-18 224², horizontal spatial", path, "horizontal", {"split": "spatial"}, {})]
    if "minilm" in models:
        path = tzoo.minilm(tzoo.default_cache_dir()).path
        found.append(("all-MiniLM-L6-v2, 128 tokens, heads", path, "heads", {}, {"batch": 1, "sequence": 128}))
    if "vit" in models:
        found.append(("ViT-B/16 224² (197 tokens), heads", vit_b16(directory / "vit_b16.onnx"), "heads", {},
                      {"batch": 1}))
    return found


def whole_session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), session_options(1), providers=["CPUExecutionProvider"])


def inputs_for(plan, dims: dict[str, int]) -> dict[str, np.ndarray]:
    x = random_inputs(plan.inputs, dims, seed=0)
    if "attention_mask" in x:  # every token attended, as a real sentence of that length
        x["attention_mask"] = np.ones_like(x["attention_mask"])
    return x


def check_same(got: dict[str, np.ndarray], want: dict[str, np.ndarray], what: str) -> None:
    for name, value in want.items():
        if not np.array_equal(got[name], value):
            raise SystemExit(f"{what}: output {name!r} differs from the local executor's")


def one_case(name: str, path: Path, strategy: str, options: dict, dims: dict[str, int], repeats: int) -> list[dict]:
    graph = edgesplit.load(path)
    cluster = Cluster.simulated(2, cores=1)
    rows = []
    for sync, planes in SYNCS.items():
        plan = edgesplit.partition(graph, cluster, strategy=strategy, dims=dims or None, sync=sync, **options)
        rows += one_plan(f"{name}, {sync}", plan, path, dims, planes, repeats)
    return rows


def one_plan(name: str, plan, path: Path, dims: dict[str, int], planes: tuple[str, ...], repeats: int) -> list[dict]:
    from edgesplit.runtime.ray import RayExecutor

    x = inputs_for(plan, dims)
    reference = LocalExecutor(plan, threads=1).run(x).outputs
    whole = whole_session(path)
    names = [o.name for o in whole.get_outputs()]
    run_whole: Callable[[], object] = lambda: whole.run(names, x)  # noqa: E731
    rows = []
    cpus = sorted(os.sched_getaffinity(0))
    pinned = {"dev0": (cpus[0],), "dev1": (cpus[1 % len(cpus)],)}
    with bare.BareMesh(plan, threads=1, cpus=pinned) as mesh:
        check_same(mesh.run(x), reference, f"{name}, bare processes")
        t = interleaved_medians({"whole": run_whole, "split": lambda: mesh.run(x)}, repeats)
    rows.append({"plan": name, "stages": len(plan.stages), "runs": "bare processes (bound)",
                 "whole_ms": t["whole"] * 1e3, "split_ms": t["split"] * 1e3, "speedup": t["whole"] / t["split"]})
    for plane in planes:
        with RayExecutor(plan, dataplane=plane) as ex:
            session = ex.session(1)
            check_same(session.run(x).outputs, reference, f"{name}, ray {plane}")
            t = interleaved_medians({"whole": run_whole, "split": lambda: session.run(x)}, repeats)
            active = plane != "compiled" or ex.compiled_graph_active
        rows.append({"plan": name, "stages": len(plan.stages), "runs": f"ray, {plane}" + ("" if active else
                     " (no compiled graph: actor calls)"), "whole_ms": t["whole"] * 1e3, "split_ms": t["split"] * 1e3,
                     "speedup": t["whole"] / t["split"]})
        print(rows[-1], file=sys.stderr)
    return rows


def synchronisation(rounds: int) -> list[dict]:
    cpus = sorted(os.sched_getaffinity(0))
    ends = ((cpus[0],), (cpus[1 % len(cpus)],))
    rows = []
    for nbytes in (2 * 1024, 300 * 1024):
        seconds = bare.exchange_seconds(nbytes, rounds, ends)[rounds // 10:]  # the first rounds warm up
        rows.append({"bytes each way": nbytes, "median_us": statistics.median(seconds) * 1e6,
                     "p90_us": sorted(seconds)[int(0.9 * len(seconds))] * 1e6})
    return rows


def pipelined(directory: Path, requests: int, repeats: int) -> list[dict]:
    from edgesplit.runtime.ray import RayExecutor

    path = directory / "resnet18.onnx"
    if not path.is_file():  # exported already when the latency cases included ResNet-18
        zoo.export(zoo.resnet18(), (1, 3, 224, 224), path, dynamic_batch=False)
    plan = edgesplit.partition(edgesplit.load(path), Cluster.simulated(2, cores=1))
    xs = [random_inputs(plan.inputs, {}, seed=i) for i in range(requests)]
    whole = whole_session(path)

    def burst(fn: Callable[[dict], object]) -> float:
        t0 = time.perf_counter()
        for x in xs:
            fn(x)
        return requests / (time.perf_counter() - t0)

    base = statistics.median(burst(lambda x: whole.run(None, x)) for _ in range(repeats))
    rows = [{"runs": "whole model, 1 core", "requests_per_s": base, "ratio": 1.0}]
    for plane in PLANES:
        with RayExecutor(plan, dataplane=plane) as ex:
            session = ex.session(8)
            list(session.stream(xs[:8]))

            def stream() -> float:
                t0 = time.perf_counter()
                list(session.stream(xs))
                return requests / (time.perf_counter() - t0)

            rate = statistics.median(stream() for _ in range(repeats))
        rows.append({"runs": f"vertical, 2 devices, ray {plane}", "requests_per_s": rate, "ratio": rate / base})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--quick", action="store_true", help="5 repeats, ResNet-18 only")
    parser.add_argument("--models", default="resnet18,minilm,vit")
    args = parser.parse_args()
    repeats = 5 if args.quick else args.repeats
    models = ["resnet18"] if args.quick else args.models.split(",")
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        sync = synchronisation(100 if args.quick else 1000)
        latency = [row for case in cases(directory, models) for row in one_case(*case, repeats)]
        throughput = pipelined(directory, 24, 3 if args.quick else 5)
    cols = ["plan", "stages", "runs", "whole_ms", "split_ms", "speedup"]
    sections = [
        ("One request, 2 devices x 1 core vs the whole model on 1 core",
         markdown_table(cols, [[r[c] for c in cols] for r in latency])
         + "\n\nspeedup = whole-model median / split median, each pair measured in alternation; the bare-process "
           "row is the bound of the data plane on this machine."),
        ("One synchronisation between two processes (peer wire, loopback)",
         markdown_table(["bytes each way", "median_us", "p90_us"],
                        [[r["bytes each way"], r["median_us"], r["p90_us"]] for r in sync])),
        ("Pipelined throughput, ResNet-18 vertical over 2 devices x 1 core (24 requests in flight up to 8)",
         markdown_table(["runs", "requests_per_s", "ratio"],
                        [[r["runs"], r["requests_per_s"], r["ratio"]] for r in throughput])),
    ]
    path = write_report("speed", "Speed of split requests (issue 12)",
                        {"latency": latency, "synchronisation": sync, "throughput": throughput,
                         "repeats": repeats}, sections)
    print(path.read_text())


if __name__ == "__main__":
    main()
