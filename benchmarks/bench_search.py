"""The design-space search: its cost model against runs, the front against its baselines, and its speed.

python benchmarks/bench_search.py [--quick] [--repeats 20]

1. Validation: for each model (ResNet-18 224², DenseNet-121 224², all-MiniLM-L6-v2 at 128 tokens) on
   examples/mixed.yaml, a search (latency, memory), then 8 front points and both baselines are cut into plans and
   run with the emulated backend (each stage for real on this machine, devices slowed to their speed, links
   delayed: edgesplit.search.emulate). Predicted against measured: Spearman rank correlation and median absolute
   error, for latency and for each device's model memory, per model and over all plans.
2. Baselines: on mixed.yaml and examples/home-lab.yaml (ResNet-18), the fastest front point within each baseline's
   max memory against AutoDiCE-style equal layer counts and today's balance, predicted and measured (emulated);
   on 4 identical simulated devices, the same for pipelined throughput (predicted).
3. Search time: a ResNet-101-sized graph (≈340 layers) and DenseNet-264 (929 layers) over 4 devices, population
   100 × 100 generations, median of 3 seeds (profiling timed apart).
Writes benchmarks/results/search.json and search.md.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from edgesplit.bench import zoo  # noqa: E402
from edgesplit.bench.harness import markdown_table, write_report  # noqa: E402
from edgesplit.cluster import Cluster  # noqa: E402
from edgesplit.graph import load  # noqa: E402
from edgesplit.search import front, validate  # noqa: E402
from edgesplit.search.cost import CostModel  # noqa: E402
from edgesplit.search.nsga import Objective, Pick, search  # noqa: E402
from edgesplit.search.profile import profile, threads_of  # noqa: E402

MIXED, HOME = ROOT / "examples" / "mixed.yaml", ROOT / "examples" / "home-lab.yaml"
GOALS = [Objective.LATENCY, Objective.MEMORY]
EMULATED = validate.Backend.EMULATED


def profiles_for(graph, cluster, dims):
    return {t: profile(graph, t, dims=dims) for t in sorted({threads_of(d.cores) for d in cluster.devices})}


def models(work: Path, quick: bool) -> dict[str, tuple[Path, dict]]:
    size = 96 if quick else 224
    out = {"ResNet-18": (zoo.export(zoo.resnet18(), (1, 3, size, size), work / "r18.onnx", keep_batchnorm=False),
                         {"batch": 1}),
           "DenseNet-121": (zoo.export(zoo.DenseNet(growth=32, blocks=(6, 12, 24, 16), stem=64, classes=1000),
                                       (1, 3, size, size), work / "d121.onnx", keep_batchnorm=False), {"batch": 1})}
    if not quick:
        from edgesplit.bench import transformers_zoo

        out["all-MiniLM-L6-v2"] = (transformers_zoo.minilm(transformers_zoo.default_cache_dir()).path,
                                   {"batch": 1, "sequence": 128})
    return out


def searched(path: Path, dims: dict, cluster: Cluster, generations: int):
    graph = load(path, dims=dims)
    profiles = profiles_for(graph, cluster, dims)
    base = validate.overheads(EMULATED)
    model = CostModel(graph, cluster, profiles, base)
    result, bases, chosen, _ = front.run_search(model, GOALS, 100, generations, 0, Pick.KNEE)
    return graph, profiles, base, model, result, bases


def validation(work: Path, quick: bool, repeats: int) -> tuple[list[dict], dict]:
    cluster = Cluster.load(MIXED)
    rows = []
    for name, (path, dims) in models(work, quick).items():
        graph, profiles, base, model, result, bases = searched(path, dims, cluster, 30 if quick else 100)
        picked = front.spread(len(result.front), 4 if quick else 8, 0)
        layouts = [result.front[i].layout for i in picked] + [b.layout for b in bases if b.feasible]
        labels = [f"#{i}" for i in picked] + [b.name for b in bases if b.feasible]
        checks = validate.check(graph, cluster, profiles, layouts, EMULATED, 1, repeats, base, dims=dims)
        as_run = CostModel(graph, validate.as_run(cluster, base, EMULATED), profiles, base)
        for label, c in zip(labels, checks):
            rows.append({"model": name, "point": label, "layers": len(graph.layers),
                         "predicted_ms": c.predicted.latency * 1e3, "measured_ms": c.measured.latency * 1e3,
                         "predicted_mib": max(validate.model_memory(as_run, c.predicted)) / 2**20,
                         "measured_mib": max(c.measured.memory) / 2**20,
                         "devices_predicted_mib": [m / 2**20 for m in validate.model_memory(as_run, c.predicted)],
                         "devices_measured_mib": [m / 2**20 for m in c.measured.memory]})
    return rows, summary(rows)


def summary(rows: list[dict]) -> dict:
    out = {}
    for name in [*dict.fromkeys(r["model"] for r in rows), "all"]:
        mine = [r for r in rows if name in ("all", r["model"])]
        mp = [m for r in mine for m, x in zip(r["devices_predicted_mib"], r["devices_measured_mib"]) if x > 1]
        mm = [x for r in mine for x in r["devices_measured_mib"] if x > 1]
        lp, lm = [r["predicted_ms"] for r in mine], [r["measured_ms"] for r in mine]
        out[name] = {"plans": len(mine), "latency_spearman": validate.spearman(lp, lm),
                     "latency_median_error": validate.median_abs_error(lp, lm),
                     "memory_spearman": validate.spearman(mp, mm), "memory_median_error": validate.median_abs_error(mp, mm)}
    return out


def baselines(work: Path, quick: bool, repeats: int) -> list[dict]:
    path, dims = models(work, True if quick else False)["ResNet-18"]
    rows = []
    for cluster_path in (MIXED, HOME):
        cluster = Cluster.load(cluster_path)
        graph, profiles, base, model, result, bases = searched(path, dims, cluster, 30 if quick else 100)
        for b in bases:
            within = [p for p in result.front if p.costs.max_memory <= b.costs.max_memory]
            best = min(within, key=lambda p: p.costs.latency)
            measured = validate.check(graph, cluster, profiles, [b.layout, best.layout], EMULATED, 1, repeats, base,
                                      dims=dims)
            rows.append({"cluster": cluster_path.name, "baseline": b.name, "baseline_ms": b.costs.latency * 1e3,
                         "front_ms": best.costs.latency * 1e3, "predicted_gain": b.costs.latency / best.costs.latency,
                         "measured_gain": measured[0].measured.latency / measured[1].measured.latency,
                         "baseline_mib": b.costs.max_memory / 2**20, "front_mib": best.costs.max_memory / 2**20,
                         "front_layout": best.layout.to_dict(graph, cluster)["stages"],
                         "wifi_received_mib": {d: r / 2**20 for d, r in zip(cluster.names, best.costs.received)}})
    cluster = Cluster.simulated(4, cores=1)
    graph = load(path, dims=dims)
    model = CostModel(graph, cluster, profiles_for(graph, cluster, dims), validate.overheads(validate.Backend.LOCAL))
    result, bases, _, _ = front.run_search(model, [Objective.THROUGHPUT, Objective.MEMORY], 100,
                                           30 if quick else 100, 0, Pick.THROUGHPUT)
    for b in bases:
        within = [p for p in result.front if p.costs.max_memory <= b.costs.max_memory]
        best = min(within, key=lambda p: p.costs.period)
        rows.append({"cluster": "4 identical (throughput)", "baseline": b.name, "baseline_ms": b.costs.period * 1e3,
                     "front_ms": best.costs.period * 1e3, "predicted_gain": b.costs.period / best.costs.period,
                     "measured_gain": None, "baseline_mib": b.costs.max_memory / 2**20,
                     "front_mib": best.costs.max_memory / 2**20})
    return rows


def big_graphs(work: Path, quick: bool) -> dict[str, Path]:
    """The search-time models: a ResNet-101-sized graph (≈340 layers) and DenseNet-264 (929 layers)."""
    big = (6, 12, 24, 16) if quick else (6, 12, 64, 48)
    return {
        "ResNet-101-sized (BN kept)": zoo.export(zoo.ResNet(widths=(64, 128, 256, 512), blocks=(3, 4, 36, 3)),
                                                 (1, 3, 64, 64), work / "r101.onnx"),
        "DenseNet-264 (BN kept)": zoo.export(zoo.DenseNet(growth=32, blocks=big, stem=64, classes=1000),
                                             (1, 3, 64, 64), work / "d264.onnx"),
    }


def timing(work: Path, quick: bool) -> list[dict]:
    graphs = big_graphs(work, quick)
    rows = []
    cluster = Cluster.simulated(4)
    for name, path in graphs.items():
        graph = load(path, dims={"batch": 1})
        t0 = time.perf_counter()
        profiles = profiles_for(graph, cluster, {"batch": 1})
        profiled = time.perf_counter() - t0
        model = CostModel(graph, cluster, profiles)
        seeds = [b.layout for b in front.baselines(model) if b.feasible]
        times = [search(model, GOALS, seeds, 100, 100, seed).seconds for seed in range(1 if quick else 3)]
        rows.append({"model": name, "layers": len(graph.layers), "devices": 4, "population": 100,
                     "generations": 100, "search_s": statistics.median(times), "profile_s": profiled})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="smaller inputs and searches (a smoke run)")
    ap.add_argument("--repeats", type=int, default=20, help="timed runs per plan (median)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        speed = timing(work, args.quick)
        checks, totals = validation(work, args.quick, args.repeats)
        gains = baselines(work, args.quick, args.repeats)
    data = {"quick": args.quick, "repeats": args.repeats, "validation": checks, "validation_summary": totals,
            "baselines": gains, "search_time": speed}
    sections = [
        ("Cost model against runs (emulated backend, examples/mixed.yaml)",
         "Each plan run for real on this machine, stage by stage, each device slowed to its speed relative to the "
         "fastest and each cross-device tensor delayed by its link (edgesplit.search.emulate); memory is each "
         f"device's model memory measured as a Ray device measures it. Median of {args.repeats} runs per plan. "
         "Goal: rank correlation ≥ 0.9 and median error ≤ 15 %.\n\n" +
         markdown_table(["model", "plans", "latency ρ", "latency median error", "memory ρ", "memory median error"],
                        [[k, v["plans"], v["latency_spearman"], f"{v['latency_median_error']:.1%}",
                          v["memory_spearman"], f"{v['memory_median_error']:.1%}"] for k, v in totals.items()]) +
         "\n\n" + markdown_table(["model", "point", "predicted ms", "measured ms", "predicted MiB", "measured MiB"],
                                 [[r["model"], r["point"], r["predicted_ms"], r["measured_ms"], r["predicted_mib"],
                                   r["measured_mib"]] for r in checks])),
        ("The front against its baselines (ResNet-18)",
         "The fastest front point whose max per-device memory is at most the baseline's. Gains are baseline ÷ front "
         "(latency, or time per answer for throughput); measured with the emulated backend where given. Goal on "
         "heterogeneous clusters: ≥ 1.3×; on identical devices: ≥ 1.0×.\n\n" +
         markdown_table(["cluster", "baseline", "baseline ms", "front ms", "gain predicted", "gain measured",
                         "baseline MiB", "front MiB"],
                        [[r["cluster"], r["baseline"], r["baseline_ms"], r["front_ms"], r["predicted_gain"],
                          r["measured_gain"] if r["measured_gain"] is not None else "-", r["baseline_mib"],
                          r["front_mib"]] for r in gains])),
        ("Search time (4 devices, population 100 × 100 generations, median of seeds)",
         "Goal: under 60 s for both on the 2-core machine.\n\n" +
         markdown_table(["model", "layers", "search s", "profile s (apart)"],
                        [[r["model"], r["layers"], r["search_s"], r["profile_s"]] for r in speed])),
    ]
    print(write_report("search", "Design-space search", data, sections).read_text())


if __name__ == "__main__":
    main()
