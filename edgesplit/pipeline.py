"""The pipeline as functions: partition (place + cut) and verify (plan against the whole model)."""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np

from edgesplit.cluster import Cluster
from edgesplit.compare import Difference, compare
from edgesplit.graph import Graph
from edgesplit.place import balance, check_memory, from_mapping
from edgesplit.plan import Plan, cut
from edgesplit.runtime.local import LocalExecutor, run_whole_model

__all__ = ["Difference", "compare", "partition", "verify"]


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
        from edgesplit.place.heads import split_heads
        from edgesplit.rewrite.base import SplitError
        from edgesplit.rewrite.transformer import TransformerSplitWarning

        if mapping is not None:
            raise SplitError("strategy 'heads' places every part itself; expected no mapping, got one")
        # devices a sub-block cannot use (fewer KV-head groups than devices) are left out of it, with a warning
        heads, placement = split_heads(graph, cluster, dims=dims, kv_cache=kv_cache, allow_idle=True)
        for skipped in heads.skipped:
            warnings.warn(str(skipped), TransformerSplitWarning, stacklevel=2)
        check_memory(heads.graph, cluster, placement)
        return cut(heads.graph, cluster, placement)
    if strategy != "vertical" or is_horizontal(mapping):
        rewritten, where = horizontal(graph, cluster, mapping, strategy=strategy, split=split, dims=dims)
        check_memory(rewritten, cluster, where)
        return cut(rewritten, cluster, where)
    placement = from_mapping(graph, cluster, mapping) if mapping is not None else balance(graph, cluster)
    check_memory(graph, cluster, placement)
    return cut(graph, cluster, placement)


def verify(plan: Plan, graph: Graph, inputs: Mapping[str, np.ndarray], rtol: float = 1e-5, threads: int | None = None) -> list[Difference]:
    """Run the plan and the whole model on the same inputs and compare every output."""
    got = LocalExecutor(plan, threads=threads).run(inputs).outputs
    ref = run_whole_model(graph.model, inputs, threads=threads)
    return compare(got, {o.name: ref[o.name] for o in plan.outputs}, rtol)
