"""Horizontal partitioning benchmarks (issue 3), 4 devices, from the plans themselves.

1. Bytes exchanged per inference for each split kind on ResNet-18 (1x3x224x224) and a VGG-style model, against
   the minimum for that kind: every part's input sent once to each device that lacks it (for tiles: the rows the
   tile needs, halo included), every part's output gathered once at the best combine device. The halo-free bound
   (tiles without halo) is reported too, so the halo's own cost is visible.
2. Synchronisations per inference: fused regions against per-layer splitting of the same layers.
3. Per-device parameter bytes of a 4-way output-channel split against total/4 of the split layers.
4. In-process run time of horizontally split plans against the whole model (same threads per session).

python benchmarks/bench_horizontal.py [--repeats 20] [--quick]
Writes benchmarks/results/horizontal.json and horizontal.md.
"""

from __future__ import annotations

import argparse
import tempfile
from collections import defaultdict
from pathlib import Path

import onnxruntime as ort

import edgesplit
from edgesplit.bench import zoo
from edgesplit.bench.harness import interleaved_medians, markdown_table, write_report
from edgesplit.cluster import Cluster
from edgesplit.graph import Graph
from edgesplit.report import region_bytes as region_bytes_moved
from edgesplit.layout import Region
from edgesplit.place.parts import HorizontalSpec, place
from edgesplit.place.regions import boundary, channel_requests, spatial_requests
from edgesplit.plan import Plan, cut
from edgesplit.rewrite.base import SplitRequest
from edgesplit.rewrite.cnn import apply
from edgesplit.rewrite.cnn.fused import lip_units, lop_units
from edgesplit.rewrite.cnn.spatial import WINDOWED
from edgesplit.runtime import random_inputs
from edgesplit.runtime.common import session_options

DEVICES = 4
THREADS = 2
KINDS = ("lop", "lip", "fused-channels", "height", "width", "grid", "fused-spatial")


def vgg_style() -> zoo.VGG:
    return zoo.VGG(cfg=(32, "M", 64, "M", 128, 128, "M", 256, 256, "M"), classes=100, spatial_after=7)


def requests_for(graph: Graph, cluster: Cluster, kind: str) -> list[SplitRequest]:
    """The regions of one kind on a model: channel kinds on the weight-heavy part (from the first layer whose
    weights outweigh its input, where channel splits pay), spatial kinds on the activation-heavy part before it."""
    k, speeds = len(cluster.devices), [d.speed for d in cluster.devices]
    cut_at = boundary(graph)
    late = {l.name for l in graph.layers if graph.position(l.name) >= cut_at}
    early = {l.name for l in graph.layers} - late
    weighted = [l.name for l in graph.layers if l.name in late and l.op_type in ("Conv", "Gemm", "MatMul")]
    if kind == "lop":
        return [SplitRequest("lop", (n,), k) for n in weighted if lop_units(graph, n) >= DEVICES]
    if kind == "lip":
        return [SplitRequest("lip", (n,), k) for n in weighted if lip_units(graph, n) >= DEVICES]
    if kind == "fused-channels":
        return [r for r in channel_requests(graph, speeds, late) if r.kind == "fused-channels"]
    if kind == "fused-spatial":
        return [r for r in spatial_requests(graph, speeds, early) if r.kind == "fused-spatial"]
    windowed = [l.name for l in graph.layers if l.name in early and l.op_type in WINDOWED]
    grid = (2, 2) if kind == "grid" else None
    return [SplitRequest(kind, (n,), k, grid=grid) for n in windowed]


def per_layer_twins(graph: Graph, fused: list[SplitRequest]) -> list[SplitRequest]:
    """The same layers split one layer at a time (the baseline for the synchronisation count)."""
    out = []
    for r in fused:
        if r.kind == "fused-channels":
            out += [SplitRequest("lop", r.layers[:1], r.parts), SplitRequest("lip", r.layers[-1:], r.parts)]
        else:
            out += [SplitRequest("height", (n,), r.parts) for n in r.layers if graph.layer(n).op_type in WINDOWED]
    return out


def build(graph: Graph, cluster: Cluster, requests: list[SplitRequest]) -> tuple[Graph, Plan]:
    """Every request's parts on all the cluster's devices, in order (shares: their speeds)."""
    spec = HorizontalSpec(tuple(requests), (cluster.names,) * len(requests)).by_speed(cluster)
    rewritten = apply(graph, spec.requests)
    rewritten, where = place(rewritten, cluster, spec.region_devices(rewritten))
    return rewritten, cut(rewritten, cluster, where)


def region_bytes(rewritten: Graph, plan: Plan, region: Region) -> dict:
    """Actual bytes the region moves, the kind's minimum, and the halo-free bound."""
    dev = plan.placement
    producers = rewritten.producers()
    tensors = rewritten.tensors
    actual = region_bytes_moved(plan, region)
    scatter = set(region.scatter)
    part_devices = [p.device for p in region.parts]
    minimum = bound = 0.0
    tiles: dict[str, list[tuple[int, int]]] = defaultdict(list)  # original tensor -> (part index, bytes of its slice)
    for t in region.stats.inputs:
        p = producers.get(t)
        if p in scatter:
            src = rewritten.layer(p).inputs[0]
            users = [i for i, part in enumerate(region.parts) if any(t in rewritten.layer(n).inputs for n in part.nodes)]
            tiles[src] += [(i, tensors[t].nbytes) for i in users]
        elif p is not None:  # broadcast: once to every part device that lacks it
            need = {d for d in part_devices if d != dev[p]}
            minimum += len(need) * tensors[t].nbytes
            bound += len(need) * tensors[t].nbytes
    for src, slices in tiles.items():
        p = producers.get(src)
        if p is None:
            continue  # a model input: the requester sends each slice, outside the wire count
        far = [(i, b) for i, b in slices if part_devices[i] != dev[p]]
        minimum += sum(b for _, b in far)
        bound += sum(region.parts[i].share for i, _ in far) * tensors[src].nbytes
    gather = min(sum(tensors[p.output].nbytes for p in region.parts if p.device != d) for d in part_devices)
    return {"actual": actual, "minimum": minimum + gather, "halo_free": bound + gather}


def bytes_table(name: str, graph: Graph, cluster: Cluster) -> list[dict]:
    rows = []
    for kind in KINDS:
        reqs = requests_for(graph, cluster, kind)
        if not reqs:
            rows.append({"model": name, "kind": kind, "regions": 0})
            continue
        rewritten, plan = build(graph, cluster, reqs)
        totals = defaultdict(float)
        for region in rewritten.regions:
            for k, v in region_bytes(rewritten, plan, region).items():
                totals[k] += v
        rows.append({
            "model": name, "kind": kind, "regions": len(rewritten.regions),
            "layers": sum(len(r.layers) for r in rewritten.regions),
            "actual_bytes": int(totals["actual"]), "minimum_bytes": int(totals["minimum"]),
            "halo_free_bytes": int(totals["halo_free"]),
            "ratio": totals["actual"] / totals["minimum"] if totals["minimum"] else 1.0,
            "ratio_halo_free": totals["actual"] / totals["halo_free"] if totals["halo_free"] else 1.0,
            "redundant_macs_share": sum(r.stats.redundant_macs for r in rewritten.regions) / max(1, sum(r.stats.macs for r in rewritten.regions)),
        })
    return rows


def sync_table(name: str, graph: Graph, cluster: Cluster) -> list[dict]:
    rows = []
    for kind in ("fused-channels", "fused-spatial"):
        fused = requests_for(graph, cluster, kind)
        if not fused:
            continue
        syncs = lambda reqs: len({r.combine_node for r in apply(graph, reqs).regions})  # noqa: E731
        a, b = syncs(fused), syncs(per_layer_twins(graph, fused))
        rows.append({"model": name, "kind": kind, "regions": len(fused), "fused_syncs": a, "per_layer_syncs": b,
                     "reduction": b / a, "goal": 2.0})
    return rows


def param_table(name: str, graph: Graph, cluster: Cluster) -> dict:
    reqs = requests_for(graph, cluster, "lop")
    rewritten, plan = build(graph, cluster, reqs)
    split_layers = {r.layers[0] for r in reqs}
    total = sum(graph.layer(n).param_bytes for n in split_layers)
    per_device = defaultdict(int)
    for region in rewritten.regions:
        head = region.layers[0]
        for part in region.parts:
            node = next(n for n in part.nodes if n.startswith(head + "/part"))
            per_device[part.device] += rewritten.layer(node).param_bytes
    worst = max(per_device.values())
    return {"model": name, "split_layers": len(split_layers), "total_param_bytes": total,
            "per_device": dict(per_device), "max_over_quarter": worst / (total / DEVICES), "goal": 1.05}


def _options(spinning: bool) -> ort.SessionOptions:
    opts = session_options(THREADS)
    if not spinning:  # idle sessions' spinning threads otherwise fight the running one for the cores
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return opts


def run_time(path: Path, graph: Graph, cluster: Cluster, repeats: int, spinning: bool) -> list[dict]:
    x = random_inputs(tuple(graph.tensors[t] for t in graph.inputs))
    opts = _options(spinning)
    whole = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    runners = {"whole model": lambda: whole.run(None, x)}
    stages = {"whole model": 1}
    for split in ("channels", "spatial", "auto"):
        plan = edgesplit.partition(graph, cluster, strategy="horizontal", split=split)
        ex = edgesplit.LocalExecutor(plan, threads=THREADS)
        ex.sessions = {s.name: ort.InferenceSession(plan.stage_models[s.name], opts, providers=["CPUExecutionProvider"])
                       for s in plan.stages}
        runners[f"horizontal --split {split}"] = lambda ex=ex: ex.run(x)
        stages[f"horizontal --split {split}"] = len(plan.stages)
    medians = interleaved_medians(runners, repeats, warmup=2)
    base = medians["whole model"]
    return [{"plan": k, "spinning": spinning, "stages": stages[k], "median_ms": v * 1e3, "ratio": v / base}
            for k, v in medians.items()]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--quick", action="store_true", help="fewer repeats (smoke run)")
    args = ap.parse_args()
    repeats = 5 if args.quick else args.repeats
    cluster = Cluster.simulated(DEVICES)
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        paths = {
            "resnet18": zoo.export(zoo.resnet18(), (1, 3, 224, 224), d / "resnet18.onnx", keep_batchnorm=False),
            "vgg-style": zoo.export(vgg_style(), (1, 3, 224, 224), d / "vgg.onnx", keep_batchnorm=False),
        }
        graphs = {k: edgesplit.load(p) for k, p in paths.items()}
        bytes_rows = [r for k, g in graphs.items() for r in bytes_table(k, g, cluster)]
        sync_rows = [r for k, g in graphs.items() for r in sync_table(k, g, cluster)]
        params = [param_table(k, g, cluster) for k, g in graphs.items()]
        timing = [r for spinning in (False, True)
                  for r in run_time(paths["resnet18"], graphs["resnet18"], cluster, repeats, spinning)]
    data = {"devices": DEVICES, "threads": THREADS, "repeats": repeats, "bytes": bytes_rows, "syncs": sync_rows,
            "params": params, "run_time": timing}
    sections = [
        ("Bytes exchanged per inference, 4 devices",
         "Per split kind, the regions chosen on each model (channel kinds on the weight-heavy layers, spatial kinds on "
         "the activation-heavy ones). *minimum*: each part's input sent once to each device lacking it (a tile's rows "
         "incl. its halo), each part's output gathered once at the best device; goal actual/minimum <= 1.1. "
         "*halo-free*: the same with tiles that carry no halo.\n\n" +
         markdown_table(["model", "kind", "regions", "layers", "actual", "minimum", "actual/min", "halo-free", "actual/halo-free",
                         "redundant MACs"],
                        [[r["model"], r["kind"], r["regions"], r.get("layers", 0), r.get("actual_bytes", "-"),
                          r.get("minimum_bytes", "-"), r.get("ratio", "-"), r.get("halo_free_bytes", "-"),
                          r.get("ratio_halo_free", "-"), f"{r.get('redundant_macs_share', 0):.1%}"] for r in bytes_rows])),
        ("Synchronisations per inference: fused vs per-layer on the same layers",
         markdown_table(["model", "kind", "fused regions", "fused syncs", "per-layer syncs", "reduction", "goal"],
                        [[r["model"], r["kind"], r["regions"], r["fused_syncs"], r["per_layer_syncs"], r["reduction"], r["goal"]]
                         for r in sync_rows])),
        ("Per-device parameter bytes, 4-way output-channel split of the split layers",
         markdown_table(["model", "split layers", "total bytes", "per device", "max/(total/4)", "goal"],
                        [[p["model"], p["split_layers"], p["total_param_bytes"], list(p["per_device"].values()),
                          p["max_over_quarter"], p["goal"]] for p in params])),
        ("In-process run time, ResNet-18 1x3x224x224 (BatchNorm folded), 4 simulated devices",
         f"Every stage runs in this process one after the other, onnxruntime intra-op threads = {THREADS} per session "
         f"(whole model and every stage alike), median of {repeats} interleaved runs: the ratio is the cost of the "
         f"extra ops (slices, concats, sums, halos) and of the stage boundaries, not a distributed speed-up. "
         f"*spinning* is onnxruntime's default (idle intra-op threads spin); on a shared, loaded machine the spinning "
         f"threads of a plan's idle sessions compete with the running one, so both settings are shown.\n\n" +
         markdown_table(["plan", "spinning", "stages", "median ms", "ratio vs whole"],
                        [[r["plan"], r["spinning"], r["stages"], r["median_ms"], r["ratio"]] for r in timing])),
    ]
    path = write_report("horizontal", "Horizontal partitioning: bytes, synchronisations, parameters, run time", data, sections)
    print(path.read_text())


if __name__ == "__main__":
    main()
