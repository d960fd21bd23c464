"""The pipeline as functions: partition (place + cut) and verify (plan against the whole model)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from edgesplit.cluster import Cluster
from edgesplit.graph import Graph
from edgesplit.place import balance, check_memory, from_mapping
from edgesplit.plan import Plan, cut
from edgesplit.runtime.local import LocalExecutor, run_whole_model


def partition(graph: Graph, cluster: Cluster, mapping: Any = None, *, strategy: str = "vertical", split: str = "auto",
              dims: Mapping[str, int] | None = None, kv_cache: str = "gather") -> Plan:
    """Place every layer (from `mapping` if given, else balanced vertically) and cut the placement into a Plan.

    `strategy` horizontal / hybrid (or a mapping with horizontal regions) rewrites layers into parts first
    (edgesplit.rewrite); `split` picks channels, spatial or auto for the automatic choice. With strategy "heads",
    `kv_cache="shard"` gives each device the KV cache of its own heads (for `edgesplit generate`).
    """
    from edgesplit.place.horizontal import horizontal
    from edgesplit.place.mapping import is_horizontal

    if strategy == "heads":  # Transformers: attention by heads, MLP by neurons, LM head by vocabulary
        from edgesplit.rewrite.transformer import partition_transformer

        return partition_transformer(graph, cluster, mapping, dims=dims, kv_cache=kv_cache)
    if strategy != "vertical" or is_horizontal(mapping):
        rewritten, where = horizontal(graph, cluster, mapping, strategy=strategy, split=split, dims=dims)
        check_memory(rewritten, cluster, where)
        return cut(rewritten, cluster, where)
    placement = from_mapping(graph, cluster, mapping) if mapping is not None else balance(graph, cluster)
    check_memory(graph, cluster, placement)
    return cut(graph, cluster, placement)


@dataclass(frozen=True)
class Difference:
    output: str
    max_abs: float
    max_rel: float  # max |a-b| / max(|b|) over the output: robust to near-zero elements
    ok: bool


def compare(plan_outputs: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray], rtol: float) -> list[Difference]:
    diffs = []
    for name, ref in reference.items():
        got = plan_outputs[name]
        if got.shape != ref.shape or got.dtype != ref.dtype:
            diffs.append(Difference(name, float("inf"), float("inf"), False))
            continue
        if ref.dtype.kind not in "fc":
            bad = float(np.count_nonzero(got != ref))
            diffs.append(Difference(name, bad, bad, bad == 0))
            continue
        err = float(np.max(np.abs(got.astype(np.float64) - ref), initial=0.0))
        scale = float(np.max(np.abs(ref), initial=0.0))
        rel = err / scale if scale > 0 else err
        diffs.append(Difference(name, err, rel, rel <= rtol))
    return diffs


def verify(plan: Plan, graph: Graph, inputs: Mapping[str, np.ndarray], rtol: float = 1e-5, threads: int | None = None) -> list[Difference]:
    """Run the plan and the whole model on the same inputs and compare every output."""
    got = LocalExecutor(plan, threads=threads).run(inputs).outputs
    ref = run_whole_model(graph.model, inputs, threads=threads)
    return compare(got, {o.name: ref[o.name] for o in plan.outputs}, rtol)
