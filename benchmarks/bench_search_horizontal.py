"""The search's horizontal space: what joining ranges into channel-split groups gains, checked against runs.

python benchmarks/bench_search_horizontal.py [--quick] [--repeats 20]

1. For ResNet-18 224² on examples/mixed.yaml and on two identical 1-core devices with a fast link (10 Gbit/s,
   20 µs: a wired cluster where compute, not links, decides), a search (latency, memory; population 100 × 100
   generations) over `--space vertical` and over `vertical,horizontal`: the fastest predicted point of each.
2. Those points, up to 4 more horizontal front points and the fully joined layout (every device in one group) are
   cut into plans and run with the emulated backend (edgesplit.search.emulate: each stage for real, devices
   slowed to their speed on a virtual clock with one timeline per device, links delayed): predicted against
   measured, Spearman rank correlation and median absolute error.
3. Search time with the horizontal space: a ResNet-101-sized graph (≈340 layers) and DenseNet-264 (929 layers) on
   4 devices, population 100 × 100 generations (profiling apart).
Writes benchmarks/results/search_horizontal.json and .md.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_search import big_graphs  # noqa: E402
from edgesplit.bench import zoo  # noqa: E402
from edgesplit.bench.harness import markdown_table, write_report  # noqa: E402
from edgesplit.cluster import Cluster, Link  # noqa: E402
from edgesplit.graph import load  # noqa: E402
from edgesplit.search import front, validate  # noqa: E402
from edgesplit.search.cost import CostModel  # noqa: E402
from edgesplit.search.nsga import Objective, search  # noqa: E402
from edgesplit.search.profile import profile, threads_of  # noqa: E402
from edgesplit.search.space import Vertical  # noqa: E402

GOALS = [Objective.LATENCY, Objective.MEMORY]
EMULATED = validate.Backend.EMULATED


def profiles_for(graph, cluster, dims):
    return {t: profile(graph, t, dims=dims) for t in sorted({threads_of(d.cores) for d in cluster.devices})}


def clusters() -> dict[str, Cluster]:
    return {"mixed.yaml": Cluster.load(ROOT / "examples" / "mixed.yaml"),
            "2 × 1 core, 10 Gbit/s 20 µs": Cluster(Cluster.simulated(2, cores=1).devices, Link(1.25e9, 2e-5))}


def compare(work: Path, quick: bool, repeats: int) -> tuple[list[dict], list[dict]]:
    size = 96 if quick else 224
    path = zoo.export(zoo.resnet18(), (1, 3, size, size), work / "r18.onnx", keep_batchnorm=False)
    dims = {"batch": 1}
    graph = load(path, dims=dims)
    searches, checks = [], []
    for name, cluster in clusters().items():
        profiles = profiles_for(graph, cluster, dims)
        base = validate.overheads(EMULATED)
        model = CostModel(graph, cluster, profiles, base)
        seeds = [b.layout for b in front.baselines(model) if b.feasible]
        generations = 20 if quick else 100
        found = {h: search(model, GOALS, seeds, 100, generations, 0, horizontal=h) for h in (False, True)}
        best = {h: min(r.front, key=lambda p: p.costs.latency) for h, r in found.items()}
        grouped = [p for p in found[True].front if p.layout.horizontal]
        searches.append({"cluster": name, "vertical_ms": best[False].costs.latency * 1e3,
                         "horizontal_ms": best[True].costs.latency * 1e3,
                         "gain": best[False].costs.latency / best[True].costs.latency,
                         "front_points": len(found[True].front), "horizontal_points": len(grouped),
                         "best_layout": best[True].layout.to_dict(graph, cluster)["stages"],
                         "search_s": found[True].seconds})
        k = len(cluster.devices)
        every = Vertical((0,) * (k - 1), tuple(range(k)), (), (True,) * (k - 1))
        step = max(len(grouped) // 4, 1)
        layouts = {"best vertical": best[False].layout, "best with horizontal": best[True].layout,
                   **{f"front #{found[True].front.index(p)}": p.layout for p in grouped[::step][:4]},
                   "all devices in one group": every}
        unique = {}
        for label, v in layouts.items():
            unique.setdefault(v, label)
        measured = validate.check(graph, cluster, profiles, list(unique), EMULATED, 1, repeats, base, dims=dims)
        for (v, label), c in zip(unique.items(), measured):
            checks.append({"cluster": name, "plan": label, "horizontal": v.horizontal,
                           "groups": [len(g.devices) for g in v.groups(len(graph.layers))],
                           "predicted_ms": c.predicted.latency * 1e3, "measured_ms": c.measured.latency * 1e3})
    return searches, checks


def timing(work: Path, quick: bool) -> list[dict]:
    graphs = big_graphs(work, quick)
    rows = []
    cluster = Cluster.simulated(4)
    for name, path in graphs.items():
        graph = load(path, dims={"batch": 1})
        profiles = profiles_for(graph, cluster, {"batch": 1})
        t0 = time.perf_counter()
        model = CostModel(graph, cluster, profiles)
        splits = len(model.splits.requests)
        prepared = time.perf_counter() - t0
        seeds = [b.layout for b in front.baselines(model) if b.feasible]
        result = search(model, GOALS, seeds, 100, 100, 0, horizontal=True)
        rows.append({"model": name, "layers": len(graph.layers), "splits": splits, "devices": 4,
                     "population": 100, "generations": 100, "search_s": result.seconds, "prepare_s": prepared,
                     "horizontal_points": sum(p.layout.horizontal for p in result.front)})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="smaller inputs and searches (a smoke run)")
    ap.add_argument("--repeats", type=int, default=20, help="timed runs per plan (median)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        searches, checks = compare(work, args.quick, args.repeats)
        speed = timing(work, args.quick)
    lp, lm = [c["predicted_ms"] for c in checks], [c["measured_ms"] for c in checks]
    total = {"plans": len(checks), "latency_spearman": validate.spearman(lp, lm),
             "latency_median_error": validate.median_abs_error(lp, lm)}
    data = {"quick": args.quick, "repeats": args.repeats, "searches": searches, "validation": checks,
            "validation_summary": total, "search_time": speed}
    sections = [
        ("Vertical only against vertical + horizontal (ResNet-18, predicted)",
         "The fastest predicted point of each search; gain = vertical ÷ with horizontal.\n\n" +
         markdown_table(["cluster", "vertical ms", "with horizontal ms", "gain", "front points",
                         "horizontal points", "search s"],
                        [[r["cluster"], r["vertical_ms"], r["horizontal_ms"], r["gain"], r["front_points"],
                          r["horizontal_points"], r["search_s"]] for r in searches])),
        ("Predicted against emulated runs",
         f"Median of {args.repeats} runs per plan. Over all {total['plans']} plans: latency rank correlation "
         f"{total['latency_spearman']:.3f}, median error {total['latency_median_error']:.1%}.\n\n" +
         markdown_table(["cluster", "plan", "group sizes", "predicted ms", "measured ms"],
                        [[c["cluster"], c["plan"], c["groups"], c["predicted_ms"], c["measured_ms"]]
                         for c in checks])),
        ("Search time with the horizontal space (4 devices, population 100 × 100 generations, one seed)",
         "Goal: under 60 s on the 2-core machine. `prepare s`: choosing and rewriting the channel splits once.\n\n" +
         markdown_table(["model", "layers", "channel splits", "search s", "prepare s", "horizontal points"],
                        [[r["model"], r["layers"], r["splits"], r["search_s"], r["prepare_s"],
                          r["horizontal_points"]] for r in speed])),
    ]
    print(write_report("search_horizontal", "Design-space search: the horizontal space", data, sections).read_text())


if __name__ == "__main__":
    main()
