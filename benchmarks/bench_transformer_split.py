"""Transformer split (issue 5): synchronisations, bytes on the wire and per-device weights, from the plans.

For each model and device count N (identical devices), `split_heads` + `cut`:
1. Synchronisations per block: Sum combines per block (must be 2), and cross-device stage edges per block divided
   by the 2 (N - 1) edges one star reduction needs (reduce to the root, then send the next input out).
2. Bytes exchanged per token per block, measured from the plan's transfers (hidden states out, partial sums back,
   and the small shape vectors riding with them), against the minimum of the plan's pattern: a star per
   reduction = (N - 1) x hidden x 4 B gathered + (N - 1) x hidden x 4 B sent out. (A ring all-reduce moves the
   same total, 2 (N - 1) x hidden x 4 B, but spread evenly: 2 (N - 1) / N x hidden x 4 B per device; the star puts
   it all through the root, listed as "root B/token/block".)
3. Per-device parameter bytes for N = 2 and 4: block weights held by each device against total / N (goal
   <= 1.05), the replicated weights of the root (norms, biases added once), embeddings and LM head reported apart.
   (The head-group granularity makes this uneven when N does not divide the KV heads; the MLP compensates.)

python benchmarks/bench_transformer_split.py [--smollm2] [--devices 2 3 4]
Writes benchmarks/results/transformer_split.json and transformer_split.md.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import warnings
from collections import defaultdict
from pathlib import Path

import math

import numpy as np

import edgesplit
from edgesplit.bench import transformers_zoo as zoo
from edgesplit.bench.harness import markdown_table, write_report
from edgesplit.cluster import Cluster
from edgesplit import probe
from edgesplit.graph import Graph
from edgesplit.layout import SplitKind
from edgesplit.place.heads import split_heads
from edgesplit.plan import Plan, cut
from edgesplit.rewrite.transformer import HeadsSplit

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

SEQ = 16  # tokens per request in the byte counts (batch 1)


def models(smollm2: bool, tmp: Path) -> dict[str, tuple[Graph, dict]]:
    from test_transformer_split_models import export  # small Llama-GQA and ViT, exported here

    cache = zoo.default_cache_dir()
    out = {
        "GPT-2 config (6 heads, 96)": (edgesplit.load(zoo.gpt2(cache, kv_cache=False).path),
                                       {"batch": 1, "sequence": SEQ, "total_sequence": SEQ}),
        "all-MiniLM-L6-v2 (12 heads, 384)": (edgesplit.load(zoo.minilm(cache).path), {"batch": 1, "sequence": SEQ}),
        "Llama GQA 9/3 (108)": (edgesplit.load(export("llama93", tmp)), {"batch": 1, "seq": SEQ}),
        "ViT (6 heads, 48)": (edgesplit.load(export("vit", tmp)), {"batch": 1}),
    }
    if smollm2:
        out["SmolLM2-135M (9/3 heads, 576)"] = (edgesplit.load(zoo.smollm2(cache, kv_cache=False).path),
                                                {"batch": 1, "sequence": SEQ, "total_sequence": SEQ})
    return out


def block_of_nodes(graph: Graph) -> dict[str, object]:
    where: dict[str, object] = {}
    for r in graph.regions:
        tag = r.block if r.kind in (SplitKind.HEADS, SplitKind.NEURONS) and r.block is not None else r.kind
        for p in r.parts:
            for n in p.nodes:
                where[n] = tag
    return where


def wire(split: HeadsSplit, plan: Plan, sizes: dict[str, int]) -> dict:
    """Cross-device bytes per block: a star transfer goes between the root and another device, and belongs to the
    block whose parts the non-root stage runs. `sizes`: bytes of every tensor at the benchmark's dims."""
    where = block_of_nodes(split.graph)
    stage_block = {s.name: next((where[l] for l in s.layers if l in where), None) for s in plan.stages}
    stage_device = {s.name: s.device for s in plan.stages}
    root = plan.stages[0].device
    per_block: dict[object, int] = defaultdict(int)
    edges: dict[object, set] = defaultdict(set)
    root_bytes: dict[object, int] = defaultdict(int)
    for t in plan.cross_device_transfers:
        b = stage_block[t.src if stage_device[t.src] != root else t.dst]
        per_block[b] += sizes[t.tensor]
        edges[b].add((t.src, t.dst))
        if root in (stage_device[t.src], stage_device[t.dst]):
            root_bytes[b] += sizes[t.tensor]
    blocks = [b for b in per_block if isinstance(b, int)]
    return {"bytes": per_block, "edges": edges, "root": root_bytes, "blocks": blocks}


def params(split: HeadsSplit, plan: Plan) -> dict:
    regions = [r for r in split.graph.regions if r.kind in (SplitKind.HEADS, SplitKind.NEURONS) and r.layers]
    part_nodes = {n: p.device for r in regions for p in r.parts for n in p.nodes}
    vocab_nodes = {n: p.device for r in split.graph.regions if r.kind == SplitKind.VOCAB for p in r.parts
                   for n in p.nodes}
    per_device: dict[str, dict[str, int]] = {d: defaultdict(int) for d in plan.devices}
    for s in plan.stages:
        seen: set[str] = set()
        for layer_name in s.layers:
            layer = split.graph.layer(layer_name)
            for w in layer.weights:
                if w in seen:
                    continue
                seen.add(w)
                nbytes = split.graph.tensors[w].nbytes
                if layer_name in part_nodes:
                    kind = "block"
                elif layer_name in vocab_nodes:
                    kind = "lm_head"
                elif layer.op_type == "Gather" and len(split.graph.tensors[w].shape) == 2:
                    kind = "embedding"
                else:
                    kind = "replicated"
                per_device[s.device][kind] += nbytes
    block_total = sum(v.get("block", 0) for v in per_device.values())  # the parts' slices add up to the blocks
    return {"block_total": block_total, "per_device": {d: dict(v) for d, v in per_device.items()}}


def run(model_set: dict[str, tuple[Graph, dict]], counts: list[int]) -> tuple[list, list, list, list]:
    sync_rows, byte_rows, param_rows, head_rows = [], [], [], []
    for name, (graph, dims) in model_set.items():
        for n in counts:
            cluster = Cluster.simulated(n)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                split, placement = split_heads(graph, cluster, dims=dims, allow_idle=True)
            plan = cut(split.graph, cluster, placement)
            shapes = probe.run(split.graph, probe.sample_inputs(split.graph, dims)).shapes
            sizes = {t: math.prod(shapes[t]) * np.dtype(info.dtype).itemsize for t, info in split.graph.tensors.items()
                     if t in shapes}
            w = wire(split, plan, sizes)
            x = next(r for r in split.graph.regions if r.kind == SplitKind.HEADS)
            hidden = shapes[x.parts[0].output][-1]
            tokens = 17 if "ViT" in name else SEQ  # ViT: 16 patches + class token
            blocks = w["blocks"]
            sums = defaultdict(int)
            for r in split.graph.regions:
                if r.kind in (SplitKind.HEADS, SplitKind.NEURONS) and r.layers:
                    sums[r.block] += 1
            heads_parts = [len(r.parts) for r in split.graph.regions if r.kind == SplitKind.HEADS and r.layers]
            # two reductions, each (parts-1) gathered + (parts-1) sent out (attention may have fewer parts: KV groups)
            mlp_parts = min(len(r.parts) for r in split.graph.regions if r.kind == SplitKind.NEURONS and r.layers)
            star = 2 * ((min(heads_parts) - 1) + (mlp_parts - 1)) * hidden * 4
            ring_device = 2 * ((min(heads_parts) - 1) / min(heads_parts) + (mlp_parts - 1) / mlp_parts) * hidden * 4
            measured = sum(w["bytes"][b] for b in blocks) / len(blocks) / tokens
            root = sum(w["root"][b] for b in blocks) / len(blocks) / tokens
            edges = sum(len(w["edges"][b]) for b in blocks) / len(blocks)
            star_edges = 2 * (min(heads_parts) - 1) + 2 * (n - 1)  # attention parts may be fewer (KV groups)
            sync_rows.append([name, n, split.blocks, min(sums.values()), max(sums.values()), edges, star_edges,
                              len(plan.stages)])
            byte_rows.append([name, n, hidden, round(measured), star, round(measured / star, 4), round(root),
                              round(ring_device)])
            vocab = [r for r in split.graph.regions if r.kind == SplitKind.VOCAB]
            if vocab and "ViT" not in name:
                pieces = {p.output for p in vocab[0].parts}
                concat = sum(sizes[t.tensor] for t in plan.transfers if t.cross_device and t.tensor in pieces)
                argmax = (len(vocab[0].parts) - 1) * 2 * 4  # each other part: its best logit and index, float32
                head_rows.append([name, n, round(concat / tokens), argmax, round(concat / tokens / argmax)])
            if n in (2, 4):
                p = params(split, plan)
                due = p["block_total"] / n
                for d, kinds in p["per_device"].items():
                    held = kinds.get("block", 0)
                    param_rows.append([name, n, d, held, round(due), round(held / due, 3), kinds.get("replicated", 0),
                                       kinds.get("embedding", 0), kinds.get("lm_head", 0)])
            print(name, n, "ok", flush=True)
    return sync_rows, byte_rows, param_rows, head_rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smollm2", action="store_true", help="also SmolLM2-135M (30 blocks; minutes)")
    ap.add_argument("--devices", type=int, nargs="+", default=[2, 3, 4])
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        sync_rows, byte_rows, param_rows, head_rows = run(models(args.smollm2, Path(tmp)), args.devices)
    sync_cols = ["model", "devices", "blocks", "Sums/block (min)", "Sums/block (max)", "cross-device edges/block",
                 "edges of 2 star reductions", "stages"]
    byte_cols = ["model", "devices", "hidden", "B/token/block", "star minimum", "ratio", "root B/token/block",
                 "ring per-device"]
    param_cols = ["model", "devices", "device", "block weights B", "total/N B", "ratio", "replicated B",
                  "embedding B", "LM head B"]
    head_cols = ["model", "devices", "concat B/token", "argmax B/token", "ratio"]
    data = {"seq": SEQ, "synchronisations": [dict(zip(sync_cols, r)) for r in sync_rows],
            "lm_head": [dict(zip(head_cols, r)) for r in head_rows],
            "bytes": [dict(zip(byte_cols, r)) for r in byte_rows],
            "params": [dict(zip(param_cols, r)) for r in param_rows]}
    path = write_report("transformer_split", "Transformer split: heads, neurons, vocabulary", data, [
        ("Synchronisations per block", "Sum combines per block (goal: exactly 2), and the cross-device stage edges "
         "of each block against the 2 (parts - 1) edges each of its two star reductions needs (hidden state out "
         "to every other part, partial sum back).\n\n"
         + markdown_table(sync_cols, sync_rows)),
        ("Bytes per token per block", f"Batch 1, {SEQ} tokens (ViT: 17 patches+class). The plan is a star: the "
         "root gathers the partial sums and sends the next normalised hidden state out; 'star minimum' is "
         "2 (parts-1) x hidden x 4 B per reduction, two reductions (attention has fewer parts than devices when the "
         "KV groups are fewer); the excess is the small shape vectors and, once per device, the mask / rotary "
         "tables that could not be recomputed locally (counted in block 0); 'ring per-device' is what a ring "
         "all-reduce would put on each device.\n\n" + markdown_table(byte_cols, byte_rows)),
        ("Per-device parameter bytes", "Block weights held by each device against total block weights / N "
         "(goal <= 1.05); the root also holds the replicated norms and the biases added once after each Sum; "
         "embeddings stay on the root; the LM head is split by vocabulary.\n\n"
         + markdown_table(param_cols, param_rows)),
        ("LM head by vocabulary", "Bytes per token the vocabulary-split LM head sends to the root: the logits "
         "slices (lm_head=\"concat\", measured from the plan) against the distributed argmax (lm_head=\"argmax\": "
         "each other part sends its best logit and its index, 8 B; its correctness is tested, the figure is "
         "computed).\n\n" + markdown_table(head_cols, head_rows)),
    ])
    print(f"wrote {path} and {path.with_suffix('.json')}")


if __name__ == "__main__":
    main()
