"""Core benchmarks (issue 2): local-executor overhead, balance quality, partitioning time of a ~1000-layer model.

python benchmarks/bench_core.py [--repeats 60] [--quick]
Writes benchmarks/results/core.json and core.md.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

import edgesplit
from edgesplit.bench import zoo
from edgesplit.bench.harness import interleaved_medians, markdown_table, median_seconds, write_report
from edgesplit.place import balance
from edgesplit.runtime import random_inputs
from edgesplit.runtime.common import session_options

THREADS = 2


def overhead(model: Path, repeats: int, rounds: int) -> list[dict]:
    """Plan vs whole model, `rounds` times over; each row keeps every round's ratio so the spread is on record."""
    graph = edgesplit.load(model)
    x = random_inputs(tuple(graph.tensors[t] for t in graph.inputs))
    whole = ort.InferenceSession(str(model), session_options(THREADS), providers=["CPUExecutionProvider"])
    plans = {"1 stage": edgesplit.partition(graph, edgesplit.Cluster.simulated(1)),
             "4 stages": edgesplit.partition(graph, edgesplit.Cluster.simulated(4))}
    runners = {"whole model (onnxruntime)": lambda: whole.run(None, x)}
    for label, plan in plans.items():
        ex = edgesplit.LocalExecutor(plan, threads=THREADS)
        runners[label] = lambda ex=ex: ex.run(x)
    # onnxruntime's defaults (spinning on), measured apart: spinning threads slow whatever runs right after them
    spinning_opts = ort.SessionOptions()
    spinning_opts.intra_op_num_threads = THREADS
    spinning_whole = ort.InferenceSession(str(model), spinning_opts, providers=["CPUExecutionProvider"])
    four = plans["4 stages"]
    spinning_stages = [(s, ort.InferenceSession(four.stage_models[s.name], spinning_opts, providers=["CPUExecutionProvider"]))
                       for s in four.order()]

    def spinning_plan() -> None:
        values = dict(x)
        for stage, sess in spinning_stages:
            values.update(zip(stage.outputs, sess.run(list(stage.outputs), {t: values[t] for t in stage.inputs})))

    apart = {"whole model (onnxruntime defaults, spinning on)": lambda: spinning_whole.run(None, x),
             "4 stages, spinning on": spinning_plan}
    per_round = []
    for _ in range(rounds):
        medians = interleaved_medians(runners, repeats)
        medians.update({label: median_seconds(fn, repeats) for label, fn in apart.items()})
        per_round.append(medians)
    stages = {"whole model (onnxruntime)": 1, "whole model (onnxruntime defaults, spinning on)": 1,
              "1 stage": len(plans["1 stage"].stages), "4 stages": len(four.stages), "4 stages, spinning on": len(four.stages)}
    goals = {"1 stage": 1.05, "4 stages": 1.15}
    rows = []
    for label in stages:
        ratios = [m[label] / m["whole model (onnxruntime)"] for m in per_round]
        rows.append({"plan": label, "stages": stages[label], "median_ms": statistics.median(m[label] for m in per_round) * 1e3,
                     "ratio": statistics.median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios),
                     "goal": goals.get(label)})
    return rows


def balance_quality(models: dict[str, Path], devices: int = 4) -> list[dict]:
    rows = []
    cluster = edgesplit.Cluster.simulated(devices)
    for name, path in models.items():
        graph = edgesplit.load(path)
        macs, params = _per_device(graph, cluster, balance(graph, cluster))
        best, _ = _per_device(graph, cluster, balance(graph, cluster, tolerance=0.0))  # the best contiguous cut
        biggest = max(layer.macs for layer in graph.layers)
        rows.append({
            "model": name, "layers": len(graph.layers),
            "max_over_mean_macs": float(macs.max() / macs.mean()),
            "best_cut_max_over_mean": float(best.max() / best.mean()),
            "largest_layer_over_mean": float(biggest / macs.mean()),
            "cut_allows_goal": bool(best.max() / best.mean() <= 1.25),
            "max_param_bytes_over_total_per_n": float(params.max() / (params.sum() / devices)),
            "param_mib_per_device": [round(float(p) / 2**20, 3) for p in params],
        })
    return rows


def _per_device(graph, cluster, placement) -> tuple[np.ndarray, np.ndarray]:
    macs, params = np.zeros(len(cluster.devices)), np.zeros(len(cluster.devices))
    for layer in graph.layers:
        d = cluster.names.index(placement[layer.name])
        macs[d] += layer.macs
        params[d] += layer.param_bytes
    return macs, params


def partition_time(path: Path, out: Path, devices: int = 4) -> dict:
    t0 = time.perf_counter()
    graph = edgesplit.load(path)
    t1 = time.perf_counter()
    plan = edgesplit.partition(graph, edgesplit.Cluster.simulated(devices))
    t2 = time.perf_counter()
    plan.save(out)
    t3 = time.perf_counter()
    return {"layers": len(graph.layers), "params": graph.total_params, "stages": len(plan.stages),
            "load_s": t1 - t0, "partition_s": t2 - t1, "save_s": t3 - t2, "total_s": t3 - t0, "goal_s": 10.0}


def planner_time(graphs: dict[str, edgesplit.Graph], repeats: int, devices: int = 4) -> list[dict]:
    """Time of one call of the planner from a ready (loaded) graph: the cost a search pays per built plan."""
    rows = []
    for name, graph in graphs.items():
        for strategy in ("vertical", "horizontal"):
            cluster = edgesplit.Cluster.simulated(devices)
            times = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                plan = edgesplit.partition(graph, cluster, strategy=strategy)
                times.append(time.perf_counter() - t0)
            rows.append({"model": name, "layers": len(graph.layers), "strategy": strategy, "devices": devices,
                         "stages": len(plan.stages), "regions": len(plan.regions), "repeats": repeats,
                         "median_s": statistics.median(times), "min_s": min(times)})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=3, help="independent repetitions of the overhead measurement")
    ap.add_argument("--quick", action="store_true", help="fewer repeats, smaller big model (smoke run)")
    args = ap.parse_args()
    repeats = 10 if args.quick else args.repeats
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        r18 = zoo.export(zoo.resnet18(), (1, 3, 224, 224), d / "resnet18.onnx", keep_batchnorm=False)
        models = {name: zoo.build(name, d) for name in zoo.MODELS}
        models["resnet18"] = r18
        big_blocks = (6, 12, 24, 16) if args.quick else (6, 12, 64, 48)
        big = zoo.export(zoo.DenseNet(growth=32, blocks=big_blocks, stem=64, classes=1000), (1, 3, 224, 224), d / "densenet_big.onnx")
        models["densenet-264 (BN kept)"] = big
        over = overhead(r18, repeats, 1 if args.quick else args.rounds)
        quality = balance_quality(models)
        timing = partition_time(big, d / "big-plan")
        planner = planner_time({"resnet18": edgesplit.load(r18), "densenet-264 (929 layers)": edgesplit.load(big)},
                               repeats=2 if args.quick else 5)
    rounds = 1 if args.quick else args.rounds
    data = {"threads": THREADS, "repeats": repeats, "rounds": rounds, "overhead": over, "balance": quality, "partition_time": timing,
            "planner_time": planner}
    sections = [
        ("Local executor overhead (ResNet-18, 1×3×224×224, BatchNorm folded)",
         f"onnxruntime intra-op threads = {THREADS} for every session, thread spinning off (edgesplit's setting), "
         f"median of {repeats} interleaved runs, {rounds} independent rounds (ratio: median of the rounds; min–max "
         "beside it). The rows marked 'spinning on' are onnxruntime's default, timed apart: they show what the "
         "setting is for — idle spinning threads of one stage steal the cores the next stage needs.\n\n" +
         markdown_table(["plan", "stages", "median ms", "ratio vs whole", "ratio min–max", "goal"],
                        [[r["plan"], r["stages"], r["median_ms"], r["ratio"], f"{r['ratio_min']:.3f}–{r['ratio_max']:.3f}",
                          r["goal"] or "-"] for r in over])),
        ("Automatic vertical placement on 4 equal devices",
         "max/mean MACs per device (goal ≤ 1.25 where a cut allows it). 'best cut' is the smallest bottleneck any "
         "contiguous vertical cut reaches; the balancer trades up to 5 % of it for smaller crossing tensors.\n\n" +
         markdown_table(["model", "layers", "max/mean MACs", "best cut max/mean", "largest layer/mean", "a cut allows ≤1.25",
                         "max params / (total/4)", "param MiB per device"],
                        [[r["model"], r["layers"], r["max_over_mean_macs"], r["best_cut_max_over_mean"],
                          r["largest_layer_over_mean"], r["cut_allows_goal"],
                          r["max_param_bytes_over_total_per_n"], r["param_mib_per_device"]] for r in quality])),
        ("Partitioning time, ~1000-layer model",
         markdown_table(["layers", "parameters", "stages", "load s", "partition s", "save s", "total s", "goal s"],
                        [[timing["layers"], timing["params"], timing["stages"], timing["load_s"], timing["partition_s"],
                          timing["save_s"], timing["total_s"], timing["goal_s"]]])),
        ("Planner time from a loaded graph (rewrite + placement + memory check + cut, no file I/O)",
         f"4 simulated devices, median of {planner[0]['repeats']} calls.\n\n" +
         markdown_table(["model", "layers", "strategy", "stages", "regions", "median s", "min s"],
                        [[r["model"], r["layers"], r["strategy"], r["stages"], r["regions"], r["median_s"], r["min_s"]]
                         for r in planner])),
    ]
    path = write_report("core", "Core benchmarks: overhead, balance, partitioning time", data, sections)
    print(path.read_text())


if __name__ == "__main__":
    main()
