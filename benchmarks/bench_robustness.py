"""Robust split inference (issue 10): the metric under single failures against per-device memory, per policy.

4 simulated devices, horizontal split (the MNIST CNN and ViT that ship with edgesplit: 1000 held-out test digits,
top-1 accuracy, importance calibrated on 256 training digits) and `--strategy heads` (all-MiniLM-L6-v2: cosine of
the sentence embeddings to the unsplit model's, on English sentences of this repository's documentation).
1. Every policy at r in RS with weight / activation / ablation importance (MiniLM: weight / activation): memory
   and MACs against the plain split, fault-free metric, mean and worst over single failures.
2. `mean` against `zeros` fill (none, and k-of-n at r = 0.25).
3. `parity` on the ViT: each lost coded part rebuilt against its fault-free value (max abs error), the coded
   layers' memory against N/(N-1); on the CNN, the refusal (no linear region).
4. Time of a full evaluation (every single and double failure, 1000 images, vital r = 0.25), median of
   repeated runs, and how it grows with devices and failure size (ViT).
5. The issue's goals, each met or missed.

python benchmarks/bench_robustness.py [--repeats 3] [--quick] [--no-minilm]
Writes benchmarks/results/robustness.json, robustness.md and robustness.png.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from edgesplit.bench.harness import RESULTS, markdown_table, write_report
from edgesplit.cluster import Cluster
from edgesplit.datasets import mnist_split, shipped_model
from edgesplit.errors import EdgesplitError
from edgesplit.layout import Fill, Strategy
from edgesplit.robust import study
from edgesplit.robust.evaluate import Row, Study
from edgesplit.robust.importance import Importance
from edgesplit.robust.policies import Policy
from edgesplit.runtime.local import LocalExecutor

DEVICES = 4
RS = (0.1, 0.25, 0.5, 0.75)
RANKED = (Policy.RANDOM, Policy.VITAL, Policy.K_OF_N)
ALL_IMPORTANCE = (Importance.WEIGHT, Importance.ACTIVATION, Importance.ABLATION)
ROOT = Path(__file__).resolve().parent.parent


def mnist_files(directory: Path, samples: int) -> tuple[Path, Path]:
    split = mnist_split()
    data, calibration = directory / "mnist.npz", directory / "mnist_cal.npz"
    np.savez(data, input=split.test.images[:samples], labels=split.test.labels[:samples])
    np.savez(calibration, input=split.train.images[:256])
    return data, calibration


def sentences() -> list[str]:
    """English sentences of this repository's documentation (offline, real text)."""
    text = " ".join((ROOT / p).read_text() for p in ("README.md", "docs/plan-format.md", "docs/benchmarks.md"))
    text = re.sub(r"`[^`]*`|\[[^\]]*\]\([^)]*\)|[#*|>_]", " ", text)
    found = [s.strip() for s in re.split(r"(?<=[.!?])\s+", re.sub(r"\s+", " ", text))]
    return [s for s in found if 40 <= len(s) <= 200 and sum(c.isalpha() for c in s) > 0.7 * len(s)]


def minilm_files(directory: Path) -> tuple[Path, Path, Path, int]:
    from tokenizers import Tokenizer

    from edgesplit.bench import transformers_zoo as tz

    export = tz.minilm(tz.default_cache_dir())
    tok = Tokenizer.from_file(str(export.directory / "tokenizer.json"))
    tok.enable_padding(pad_id=tok.token_to_id("[PAD]") or 0)
    tok.enable_truncation(64)
    texts = sentences()
    enc = tok.encode_batch(texts)
    arrays = {"input_ids": np.array([e.ids for e in enc], dtype=np.int64),
              "attention_mask": np.array([e.attention_mask for e in enc], dtype=np.int64),
              "token_type_ids": np.array([e.type_ids for e in enc], dtype=np.int64)}
    cut = len(texts) // 4  # the first quarter calibrates, the rest is evaluated
    data, calibration = directory / "minilm.npz", directory / "minilm_cal.npz"
    np.savez(data, **{k: v[cut:] for k, v in arrays.items()})
    np.savez(calibration, **{k: v[:cut] for k, v in arrays.items()})
    return export.path, data, calibration, len(texts)


def license_text() -> str:
    """Real English text an installed package ships (numpy's LICENSE.txt), read offline."""
    import importlib.metadata

    files = [f for f in importlib.metadata.distribution("numpy").files or () if f.name.startswith("LICENSE")]
    return "\n".join(Path(str(f.locate())).read_text() for f in files[:1])


def smollm_files(directory: Path, sequences: int = 24, length: int = 32) -> tuple[Path, Path, Path]:
    """SmolLM2-135M (no KV cache): `sequences` windows of `length` tokens of the license text; the first quarter
    calibrates, the rest is evaluated."""
    from tokenizers import Tokenizer

    from edgesplit.bench import transformers_zoo as tz

    export = tz.smollm2(tz.default_cache_dir(), kv_cache=False)
    ids = Tokenizer.from_file(str(export.directory / "tokenizer.json")).encode(license_text()).ids
    windows = np.array([ids[i * length:(i + 1) * length] for i in range(sequences)], dtype=np.int64)
    arrays = {"input_ids": windows, "attention_mask": np.ones_like(windows),
              "position_ids": np.tile(np.arange(length, dtype=np.int64), (sequences, 1))}
    cut = sequences // 4
    data, calibration = directory / "smollm.npz", directory / "smollm_cal.npz"
    np.savez(data, **{k: v[cut:] for k, v in arrays.items()})
    np.savez(calibration, **{k: v[:cut] for k, v in arrays.items()})
    return export.path, data, calibration


def smollm() -> dict[str, Any]:
    """SmolLM2-135M, `--strategy heads`: next-token agreement with the unsplit model and perplexity, per policy."""
    with tempfile.TemporaryDirectory() as tmp:
        path, data, calibration = smollm_files(Path(tmp))
        req = study.Request(path, Cluster.simulated(DEVICES), data, calibration, (Policy.NONE, Policy.K_OF_N),
                            (0.5,), (Importance.WEIGHT,), (1,), Strategy.HEADS)  # 30 blocks: plans take minutes
        rows, prepared, seconds = run_study(req)
    return {"samples": len(prepared.study.samples), "tokens_per_sample": 32, "seconds": seconds,
            "metric": prepared.study.metric.value,
            "rows": [{**row_dict(r, "weight"), "perplexity": r.perplexity[()],
                      "perplexity_1_mean": r.mean_perplexity(1), "perplexity_1_worst": r.worst_perplexity(1)}
                     for r in rows]}


def run_study(req: study.Request, f: int = 1) -> tuple[list[Row], study.Prepared, float]:
    t0 = time.perf_counter()
    prepared = study.prepare_request(req)
    rows, _ = study.evaluate_all(prepared, f)
    return rows, prepared, time.perf_counter() - t0


def row_dict(row: Row, importance: str = "") -> dict[str, Any]:
    mean, worst = row.mean(1), row.worst(1)
    return {"policy": row.policy.value, "importance": row.importance or importance, "r": row.r,
            "memory_vs_plain": row.memory_vs_plain, "macs_vs_plain": row.macs_vs_plain,
            "fault_free": row.fault_free, "mean_1": mean, "worst_1": worst,
            "kept_mean": mean / row.fault_free if row.fault_free else 0.0}


def policies_table(rows: list[dict[str, Any]]) -> str:
    cols = ["policy", "importance", "r", "memory vs plain", "MACs vs plain", "fault-free", "1 failed: mean",
            "1 failed: worst", "kept (mean / fault-free)"]
    return markdown_table(cols, [[r["policy"], r["importance"] or "-", r["r"], r["memory_vs_plain"],
                                  r["macs_vs_plain"], r["fault_free"], r["mean_1"], r["worst_1"], r["kept_mean"]]
                                 for r in rows])


def policies(model: Path, data: Path, calibration: Path, strategy: Strategy, importances: tuple[Importance, ...],
             extra: tuple[Policy, ...] = (), output: str | None = None) -> dict[str, Any]:
    req = study.Request(model, Cluster.simulated(DEVICES), data, calibration,
                        (Policy.NONE, Policy.FULL, *extra, *RANKED), RS, importances, (1,), strategy, output=output)
    rows, prepared, seconds = run_study(req)
    out: dict[str, Any] = {"metric": prepared.study.metric.value, "samples": len(prepared.study.samples),
                           "fatal": list(prepared.study.fatal), "seconds": seconds,
                           "rows": [row_dict(r) for r in rows]}
    if Policy.PARITY in extra:
        out["parity_memory"] = prepared.study.coded_memory().to_dict()
    return out


def fills(model: Path, data: Path, calibration: Path, strategy: Strategy, output: str | None = None) -> list[dict]:
    out = []
    for fill in (Fill.ZEROS, Fill.MEAN):
        req = study.Request(model, Cluster.simulated(DEVICES), data, calibration, (Policy.NONE, Policy.K_OF_N),
                            (0.25,), (Importance.ACTIVATION,), (1,), strategy, fill=fill, output=output)
        rows, _, _ = run_study(req)
        out += [{**row_dict(r, "activation"), "fill": fill.value} for r in rows]
    return out


def all_values(executor: LocalExecutor, inputs: dict[str, np.ndarray], down: frozenset[str]):
    """Every tensor a run computes, stand-ins included (the local executor's loop, keeping what it makes)."""
    route = executor.router.route(down)
    values = dict(inputs)
    dims = executor.router.dims(values)
    for stage in route.stages:
        for t in stage.inputs:
            if t in route.stand_ins and t not in values:
                values[t] = route.stand_ins[t].array(values, dims)
        values.update(zip(stage.outputs, executor.sessions[stage.name].run(list(stage.outputs),
                                                                          {t: values[t] for t in stage.inputs})))
    return values, route


def parity_exactness(model: Path, data: Path) -> dict[str, Any]:
    """Each single failure of the coded plan: every coded region's lost part, rebuilt from the coded part, against
    the part itself run on the same inputs (upstream plain regions are degraded by the same failure)."""
    req = study.Request(model, Cluster.simulated(DEVICES), data, None, (Policy.PARITY,), (0.0,), failures=(1,))
    s: Study = study.prepare_request(req).study
    plan = s.plan(Policy.PARITY, 0.0, None)
    executor = LocalExecutor(plan, allow_degraded=True)  # every stage loaded: the lost ones run for reference
    inputs = dict(s.samples.take(slice(0, 256)).inputs)
    coded_outputs = {p.output for r in plan.regions if r.coded for p in r.parts}
    producer = {t: spec for spec in executor.router.specs for t in spec.outputs}
    per_set = []
    for failed in s.sets[1]:
        values, route = all_values(executor, inputs, frozenset(failed))
        errors, scale, degraded = [], [], False
        for t in (t for t in route.stand_ins if t in coded_outputs):
            spec = producer[t]
            if not all(i in values for i in spec.inputs):
                continue
            direct = executor.sessions[spec.name].run([t], {i: values[i] for i in spec.inputs})[0]
            errors.append(float(np.max(np.abs(values[t] - direct))))
            scale.append(float(np.max(np.abs(direct))))
            degraded |= route.stand_ins[t].degraded
        per_set.append({"failed": list(failed), "coded_parts_rebuilt": len(errors), "degraded": degraded,
                        "max_abs_error": max(errors, default=0.0),
                        "max_rel_error": max((e / max(m, 1e-12) for e, m in zip(errors, scale)), default=0.0)})
    return {"coded_regions": sum(1 for r in plan.regions if r.coded), "regions": len(plan.regions),
            "sets": per_set, "memory": s.coded_memory().to_dict()}


def parity_refusal(model: Path, data: Path) -> str:
    try:
        study.prepare_request(study.Request(model, Cluster.simulated(DEVICES), data, None, (Policy.PARITY,)))
    except EdgesplitError as exc:
        return str(exc)
    return ""


def timing(model: Path, data: Path, calibration: Path, devices: int, sizes: tuple[int, ...],
           repeats: int) -> dict[str, Any]:
    req = study.Request(model, Cluster.simulated(devices), data, calibration, (Policy.VITAL,), (0.25,),
                        (Importance.WEIGHT,), sizes)
    t0 = time.perf_counter()
    prepared = study.prepare_request(req)
    prepare_s = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        study.evaluate_all(prepared)
        times.append(time.perf_counter() - t0)
    sets = {k: len(v) for k, v in prepared.study.sets.items()}
    return {"devices": devices, "sizes": list(sizes), "sets": sets, "samples": len(prepared.study.samples),
            "prepare_s": prepare_s, "evaluate_s": statistics.median(times), "runs": times,
            "per_set_s": statistics.median(times) / (1 + sum(sets.values()))}


def searched(model: Path, data: Path, calibration: Path, strategy: Strategy, population: int, generations: int,
             output: str | None = None) -> dict[str, Any]:
    """--search for k-of-n (activation importance) against the same policy at one r everywhere."""
    req = study.Request(model, Cluster.simulated(DEVICES), data, calibration, (Policy.K_OF_N,), RS,
                        (Importance.ACTIVATION,), (1,), strategy, output=output,
                        search=study.Search(generations, population))
    t0 = time.perf_counter()
    prepared = study.prepare_request(req)
    rows, _ = study.evaluate_all(prepared)
    front = study.search_front(prepared, req, rows)
    return {**front.to_dict(), "population": population, "generations": generations, "fault_free": rows[0].fault_free,
            "samples": len(prepared.study.samples), "total_s": time.perf_counter() - t0,
            "measured": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


def best_under(rows: list[dict[str, Any]], budget: float) -> dict[str, Any] | None:
    fits = [r for r in rows if r["memory_vs_plain"] <= budget + 1e-9]
    return max(fits, key=lambda r: (r["mean_1"], -r["memory_vs_plain"])) if fits else None


def goals(results: dict[str, Any]) -> list[list[Any]]:
    out = []
    for name, res in results["models"].items():
        rows = res["rows"]
        best = best_under(rows, 1.5)
        target = 0.95
        ok = best is not None and best["kept_mean"] >= target and (name != "minilm" or best["mean_1"] >= 0.95)
        out.append([f"{name}: ≥ 95 % of fault-free at ≤ 1.5× memory, one device lost (mean)",
                    "met" if ok else "missed",
                    f"best ≤ 1.5×: {best['policy']} {best['importance'] or ''} r={best['r']:g}, "
                    f"{best['kept_mean']:.3f} of fault-free (worst set {best['worst_1']:.3f}) at "
                    f"{best['memory_vs_plain']:.2f}×" if best else "no row fits"])
        pairs = [(v, r) for v in rows if v["policy"] == "vital"
                 for r in rows if r["policy"] == "random" and r["r"] == v["r"] and r["importance"] == v["importance"]]
        wins = sum(v["mean_1"] > r["mean_1"] for v, r in pairs)
        by_imp = {imp: (sum(v["mean_1"] > r["mean_1"] for v, r in pairs if v["importance"] == imp),
                        sum(1 for v, _ in pairs if v["importance"] == imp)) for imp in dict.fromkeys(
                            v["importance"] for v, _ in pairs)}
        out.append([f"{name}: vital above random at every memory budget", "met" if wins == len(pairs) else "missed",
                    f"{wins} of {len(pairs)} (r, importance) pairs; " +
                    ", ".join(f"{k}: {a}/{b}" for k, (a, b) in by_imp.items())])
        kn = [(k, v) for k in rows if k["policy"] == "k-of-n" for v in rows if v["policy"] == "vital"
              and v["r"] == k["r"] and v["importance"] == k["importance"]]
        same = all(abs(k["mean_1"] - v["mean_1"]) < 1e-9 and k["memory_vs_plain"] < v["memory_vs_plain"]
                   for k, v in kn)
        saving = statistics.median(k["memory_vs_plain"] / v["memory_vs_plain"] for k, v in kn)
        out.append([f"{name}: k-of-n reaches vital's robustness with less memory", "met" if same else "missed",
                    f"{len(kn)} pairs, same single-failure metric; memory median {saving:.2f}× vital's"])
        fill_rows = res["fills"]
        mean_wins = [(z, m) for z in fill_rows if z["fill"] == "zeros" for m in fill_rows
                     if m["fill"] == "mean" and m["policy"] == z["policy"]]
        out.append([f"{name}: mean fill against zeros", "better" if any(m["mean_1"] > z["mean_1"]
                                                                         for z, m in mean_wins) else "not better",
                    "; ".join(f"{z['policy']}: {z['mean_1']:.3f} → {m['mean_1']:.3f}" for z, m in mean_wins)])
    p = results.get("parity")
    if p:
        err = max(s["max_abs_error"] for s in p["sets"])
        rel = max(s["max_rel_error"] for s in p["sets"])
        mem = p["memory"]
        ok = err <= 1e-5 or rel <= 1e-5
        out.append(["vit: parity recovers single failures of its layers exactly (≤ 1e-5)", "met" if ok else "missed",
                    f"{p['coded_regions']} of {p['regions']} regions coded; max abs error {err:.2e}, max rel "
                    f"{rel:.2e}"])
        out.append(["vit: parity memory ≤ N/(N−1) + 5 % of the plain split on its layers",
                    "met" if mem["memory_vs_plain"] <= mem["bound"] * 1.05 else "missed",
                    f"{mem['memory_vs_plain']:.3f}× against N/(N−1) = {mem['bound']:.3f}"])
    t = results["timing"]["headline"]
    out.append(["full evaluation (4 devices, every single and double failure, 1000 images) < 2 min",
                "met" if t["evaluate_s"] < 120 else "missed",
                f"{t['model']}: {t['evaluate_s']:.1f} s for {1 + sum(t['sets'].values())} evaluations "
                f"(+ {t['prepare_s']:.1f} s to prepare)"])
    for name, res in results.get("search", {}).items():
        gain = res["gain_over_uniform"]
        out.append([f"{name}: searched fraction vector (NSGA-II) beats uniform r at equal memory",
                    "met" if gain and gain["gain"] > 0 else "missed",
                    f"+{gain['gain']:.3f} mean single-failure {results['models'][name]['metric']} "
                    f"({gain['uniform_mean']:.3f} → {gain['mean']:.3f}) at {gain['memory_vs_plain']:.2f}× memory, "
                    f"against the best uniform r using no more" if gain else "no uniform point to compare"])
        best = best_under([{**p, "kept_mean": p["mean_1"] / res["fault_free"]} for p in res["front"]], 1.5)
        if best is not None:
            out.append([f"{name}: searched vector, ≥ 95 % of fault-free at ≤ 1.5× memory, one device lost (mean)",
                        "met" if best["kept_mean"] >= 0.95 else "missed",
                        f"{best['kept_mean']:.3f} of fault-free (worst set {best['worst_1']:.3f}) at "
                        f"{best['memory_vs_plain']:.2f}×"])
    return out


def plot(results: dict[str, Any], path: Path) -> None:
    """Per model, the mean metric under single failures against memory: one curve per policy and importance."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = results["models"]
    fig, axes = plt.subplots(1, len(models), figsize=(5.2 * len(models), 4.4), squeeze=False)
    colours: dict[str, str] = {}  # one colour per curve label across the models
    for ax, (name, res) in zip(axes[0], models.items()):
        curves: dict[str, list[tuple[float, float]]] = {}
        for r in res["rows"]:
            label = r["policy"] + (f" ({r['importance']})" if r["importance"] else "")
            curves.setdefault(label, []).append((r["memory_vs_plain"], r["mean_1"]))
        for label, points in curves.items():
            points.sort()
            marker = {"none": "s", "full": "*", "parity": "D"}.get(label, "o")
            ax.plot(*zip(*points), marker=marker, linestyle="-" if len(points) > 1 else "none", label=label, ms=5,
                    color=colours.setdefault(label, f"C{len(colours) % 10}"))
        front = results.get("search", {}).get(name, {}).get("front")
        if front:
            ax.plot([p["memory_vs_plain"] for p in front], [p["mean_1"] for p in front], marker="^", ms=5,
                    linestyle="--", color="black", label="k-of-n (activation), searched per-region r")
        ax.axvline(1.5, color="grey", linestyle=":", linewidth=1)
        ax.set_title(f"{name} ({res['metric']}, {DEVICES} devices)")
        ax.set_xlabel("max per-device parameter memory / plain split's")
        ax.set_ylabel("mean over single failures")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="200 images, no growth table")
    ap.add_argument("--no-minilm", action="store_true")
    ap.add_argument("--only", help="comma list of parts to run again (search, neighbours, smollm), keeping the other "
                    "results of results/robustness.json")
    ap.add_argument("--population", type=int, default=16)
    ap.add_argument("--generations", type=int, default=6)
    args = ap.parse_args()
    if args.only:
        results = json.loads((RESULTS / "robustness.json").read_text())
        parts = args.only.split(",")
        if "search" in parts:
            results["search"] = search_all(args, 200 if args.quick else 1000)
        if "neighbours" in parts:
            results["neighbours"] = neighbours()
        if "smollm" in parts:
            results["smollm"] = smollm()
        finish(results)
        return
    samples = 200 if args.quick else 1000
    results: dict[str, Any] = {"devices": DEVICES, "rs": list(RS), "models": {}, "timing": {}}
    with tempfile.TemporaryDirectory() as tmp:
        data, calibration = mnist_files(Path(tmp), samples)
        cnn, vit = shipped_model("mnist_cnn"), shipped_model("mnist_vit")
        for name, model, extra in (("cnn", cnn, ()), ("vit", vit, (Policy.PARITY,))):
            res = policies(model, data, calibration, Strategy.HORIZONTAL, ALL_IMPORTANCE, extra)
            res["fills"] = fills(model, data, calibration, Strategy.HORIZONTAL)
            results["models"][name] = res
            print(f"{name}: {len(res['rows'])} rows in {res['seconds']:.1f} s")
        results["parity"] = parity_exactness(vit, data)
        results["parity_cnn_refused"] = parity_refusal(cnn, data)
        if not args.no_minilm:
            path, m_data, m_cal, count = minilm_files(Path(tmp))
            res = policies(path, m_data, m_cal, Strategy.HEADS, (Importance.WEIGHT, Importance.ACTIVATION),
                           output="sentence_embedding")
            res["fills"] = fills(path, m_data, m_cal, Strategy.HEADS, output="sentence_embedding")
            res["sentences"] = count
            results["models"]["minilm"] = res
            print(f"minilm: {len(res['rows'])} rows in {res['seconds']:.1f} s")
        for name, model in (("cnn", cnn), ("vit", vit)):
            results["timing"][name] = {**timing(model, data, calibration, DEVICES, (1, 2), args.repeats),
                                       "model": name}
        results["timing"]["headline"] = max((results["timing"][n] for n in ("cnn", "vit")),
                                            key=lambda t: t["evaluate_s"])
        growth = []
        if not args.quick:
            for devices in (3, 4, 6, 8):
                sizes = tuple(k for k in (1, 2, 3) if k < devices - 1)
                growth.append(timing(vit, data, calibration, devices, sizes, 1))
        results["timing"]["growth"] = growth
    results["search"] = search_all(args, samples)
    if not args.no_minilm:
        results["neighbours"] = neighbours()
    finish(results)


def neighbours() -> dict[str, Any]:
    """MiniLM: the agreement of each sentence's nearest neighbour among the evaluated sentences (cosine of the
    sentence embeddings) with the unsplit model's, per policy."""
    with tempfile.TemporaryDirectory() as tmp:
        path, data, calibration, _ = minilm_files(Path(tmp))
        req = study.Request(path, Cluster.simulated(DEVICES), data, calibration, (Policy.NONE, Policy.FULL,
                            Policy.K_OF_N), RS, (Importance.ACTIVATION,), (1,), Strategy.HEADS, metric="neighbours",
                            output="sentence_embedding")
        rows, prepared, seconds = run_study(req)
    return {"samples": len(prepared.study.samples), "seconds": seconds,
            "rows": [row_dict(r, "activation") for r in rows]}


def search_all(args: argparse.Namespace, samples: int) -> dict[str, Any]:
    """--search on the CNN and the ViT (one fraction per region) and MiniLM (one per Transformer block)."""
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        data, calibration = mnist_files(Path(tmp), samples)
        for name in ("cnn", "vit"):
            out[name] = searched(shipped_model(f"mnist_{name}"), data, calibration, Strategy.HORIZONTAL,
                                 args.population, args.generations)
            print(f"{name}: search {out[name]['evaluations']} vectors in {out[name]['seconds']:.0f} s")
        if not args.no_minilm:
            path, m_data, m_cal, _ = minilm_files(Path(tmp))
            out["minilm"] = searched(path, m_data, m_cal, Strategy.HEADS, args.population, args.generations,
                                     output="sentence_embedding")
    return out


def finish(results: dict[str, Any]) -> None:
    results["goals"] = goals(results)
    write_report("robustness", "Robust split inference (issue 10)", results, sections(results))
    plot(results, ROOT / "benchmarks" / "results" / "robustness.png")
    print(markdown_table(["goal", "status", "measured"], results["goals"]))


def sections(results: dict[str, Any]) -> list[tuple[str, str]]:
    out = [("Goals", markdown_table(["goal", "status", "measured"], results["goals"]))]
    for name, res in results["models"].items():
        head = (f"{res['samples']} samples, metric {res['metric']}, {DEVICES} devices (not failed, their loss is "
                f"fatal: {', '.join(res['fatal']) or 'none'}); {res['seconds']:.0f} s.\n\n")
        out.append((f"{name}: policies under single failures", head + policies_table(res["rows"])))
        fills_md = markdown_table(["fill", "policy", "r", "memory vs plain", "1 failed: mean", "1 failed: worst"],
                                  [[r["fill"], r["policy"], r["r"], r["memory_vs_plain"], r["mean_1"], r["worst_1"]]
                                   for r in res["fills"]])
        out.append((f"{name}: mean against zeros fill (activation importance)", fills_md))
    p = results["parity"]
    body = (f"ViT: {p['coded_regions']} of {p['regions']} regions are linear and coded; coded layers' max "
            f"per-device memory {p['memory']['memory_vs_plain']:.3f}× the plain split's (N/(N−1) = "
            f"{p['memory']['bound']:.3f}). The MLP regions (fused channels, GELU inside) stay plain, so the model's "
            f"accuracy under a failure is not exact; the coded parts are, per tensor, on 256 images:\n\n")
    body += markdown_table(["failed", "coded parts rebuilt", "degraded", "max abs error", "max rel error"],
                           [[", ".join(s["failed"]), s["coded_parts_rebuilt"], s["degraded"], s["max_abs_error"],
                             s["max_rel_error"]] for s in p["sets"]])
    body += f"\n\nCNN: refused — {results['parity_cnn_refused']}"
    out.append(("parity", body))
    t = results["timing"]
    rows = [[n, t[n]["samples"], 1 + sum(t[n]["sets"].values()), t[n]["prepare_s"], t[n]["evaluate_s"],
             t[n]["per_set_s"]] for n in ("cnn", "vit")]
    body = markdown_table(["model", "samples", "evaluations", "prepare s", "evaluate s (median)", "s per evaluation"],
                          rows)
    if t["growth"]:
        body += "\n\nViT, vital r = 0.25, growth with devices and failure size (one run each):\n\n"
        body += markdown_table(["devices", "sets per size", "evaluate s", "s per evaluation"],
                               [[g["devices"], ", ".join(f"{k}: {v}" for k, v in g["sets"].items()),
                                 g["evaluate_s"], g["per_set_s"]] for g in t["growth"]])
    out.append(("Time of a full evaluation (every single and double failure)", body))
    if results.get("neighbours"):
        n = results["neighbours"]
        out.append(("minilm: nearest-neighbour ranking agreement (--metric neighbours)",
                    f"Each of {n['samples']} sentences' nearest neighbour among them (cosine of the sentence "
                    f"embeddings) against the unsplit model's; {n['seconds']:.0f} s.\n\n" + policies_table(n["rows"])))
    if results.get("smollm"):
        m = results["smollm"]
        cols = ["policy", "r", "memory vs plain", "fault-free", "1 failed: mean", "1 failed: worst",
                "perplexity fault-free", "perplexity 1 failed: mean", "perplexity 1 failed: worst"]
        out.append(("smollm2-135m: next-token agreement and perplexity (--strategy heads)",
                    f"{m['samples']} windows of {m['tokens_per_sample']} tokens of numpy's LICENSE.txt (an installed "
                    f"package's text, offline); next-token agreement with the unsplit model, weight importance; "
                    f"{m['seconds']:.0f} s.\n\n" + markdown_table(cols, [
                        [r["policy"], r["r"], r["memory_vs_plain"], r["fault_free"], r["mean_1"], r["worst_1"],
                         r["perplexity"], r["perplexity_1_mean"], r["perplexity_1_worst"]] for r in m["rows"]])))
    if results.get("search"):
        out.append(("NSGA-II over per-region fractions (--search) against uniform r", search_section(results)))
    return out


def search_section(results: dict[str, Any]) -> str:
    found = results["search"]
    any_run = next(iter(found.values()))
    body = (f"k-of-n, activation importance; each fraction from {any_run['grid']} (0 and the r values above), one "
            f"per region (MiniLM: per Transformer block); population {any_run['population']}, "
            f"{any_run['generations']} generations, seeded with the uniform vectors; objectives: max per-device "
            f"parameter memory and the mean metric under single failures. Gain: the largest rise of a front point "
            f"over the best uniform-r point using no more memory. Measured {any_run['measured']}.\n\n")
    rows = []
    for name, res in found.items():
        gain = res["gain_over_uniform"] or {}
        rows.append([name, len(res["groups"]), res["samples"], res["evaluations"], res["seconds"], len(res["front"]),
                     gain.get("memory_vs_plain", "-"), gain.get("uniform_mean", "-"), gain.get("mean", "-"),
                     gain.get("gain", "-")])
    body += markdown_table(["model", "variables", "samples", "vectors evaluated", "search s", "front points",
                            "at memory vs plain", "best uniform r ≤ that memory", "searched", "gain"], rows)
    for name, res in found.items():
        uniform = "; ".join(f"r = {r:g}: {u['memory_vs_plain']:.2f}×, {u['mean_1']:.3f}"
                            for r, u in zip(res["grid"], res["uniform"]))
        body += f"\n\n{name}, uniform r (memory, mean): {uniform}. The front (fractions in region / block order):\n\n"
        body += markdown_table(["memory vs plain", "MACs vs plain", "1 failed: mean", "1 failed: worst", "fractions"],
                               [[p["memory_vs_plain"], p["macs_vs_plain"], p["mean_1"], p["worst_1"],
                                 " ".join(f"{v:g}" for v in p["fractions"].values())] for p in res["front"]])
    return body


if __name__ == "__main__":
    main()
