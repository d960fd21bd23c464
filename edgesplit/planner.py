"""The planner: (graph, cluster, layout | strategy) -> Plan, the one function the CLI and the API call.

A layout is the rewritten graph's regions plus a device for every node. `layout` makes one from a strategy or a
mapping (all placement is in edgesplit.place, all surgery in edgesplit.rewrite); `with_replicas` adds replicas of
parts' units on other devices; `plan` checks a layout (every problem at once), every device's memory, and cuts it
into stages. Nothing here reads or writes files.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

from edgesplit import standby
from edgesplit.cluster import Cluster
from edgesplit.errors import MappingError, PlacementError
from edgesplit.graph import Graph
from edgesplit.layout import KvCache, Layout, SplitFamily, Strategy, Sync
from edgesplit.place import balance, check_memory, from_mapping
from edgesplit.place.heads import split_heads
from edgesplit.place.horizontal import horizontal
from edgesplit.place.mapping import is_horizontal
from edgesplit.plan import Plan, cut
from edgesplit.rewrite.base import SplitError
from edgesplit.rewrite.exchange import exchange
from edgesplit.rewrite.replicas import ReplicaRequest, add_replicas
from edgesplit.rewrite.transformer import TransformerSplitWarning


def partition(graph: Graph, cluster: Cluster, mapping: Any = None, *, strategy: Strategy | str = Strategy.VERTICAL,
              split: SplitFamily | str = SplitFamily.AUTO, dims: Mapping[str, int] | None = None,
              kv_cache: KvCache | str = KvCache.GATHER, replicas: Sequence[ReplicaRequest] = (),
              standby: Sequence[str] = (), sync: Sync | str = Sync.EXCHANGE) -> Plan:
    """Place every layer (from `mapping` if given, else by `strategy`), add `replicas`, and cut it into a Plan
    (with the standby stages `standby` asks for: 'auto', 'STAGE=DEVICE', 'DEVICE=DEVICE'; see edgesplit.standby).

    `vertical` balances contiguous layer ranges; `horizontal` / `hybrid` (or a mapping with horizontal regions)
    split layers into parts first, `split` choosing channels, spatial or auto; `heads` splits Transformers by
    attention heads, MLP neurons and vocabulary, `kv_cache="shard"` giving each device the KV cache of its heads.
    `sync="exchange"` (the default) has every device that reads a region's result combine its parts itself
    (edgesplit.rewrite.exchange); `"gather"` leaves the combine on one device, which sends the result on.
    """
    rewritten, placement = layout(graph, cluster, mapping, strategy=strategy, split=split, dims=dims,
                                  kv_cache=kv_cache)
    if replicas:
        rewritten, placement = with_replicas(rewritten, placement, replicas)
    if _parse(Sync, sync, "--sync") is Sync.EXCHANGE:
        rewritten, placement = exchange(rewritten, placement)
    return with_standbys(plan(rewritten, cluster, placement), rewritten, standby)


def with_standbys(cut_plan: Plan, graph: Graph, requests: Sequence[str]) -> Plan:
    """The plan with standby copies of its stages on other devices (memory budgets checked)."""
    if not requests:
        return cut_plan
    layers = {s.name: s.layers for s in cut_plan.stages}
    devices = {s.name: s.device for s in cut_plan.stages}
    chosen = standby.choose(graph, cut_plan.cluster, layers, devices, requests)
    return dataclasses.replace(cut_plan, standbys=cut_plan.standbys + chosen)


def layout(graph: Graph, cluster: Cluster, mapping: Any = None, *, strategy: Strategy | str = Strategy.VERTICAL,
           split: SplitFamily | str = SplitFamily.AUTO, dims: Mapping[str, int] | None = None,
           kv_cache: KvCache | str = KvCache.GATHER) -> tuple[Graph, dict[str, str]]:
    """The rewritten graph (its regions' parts on their devices) and the device of every node."""
    strategy = _parse(Strategy, strategy, "--strategy")
    split, kv_cache = _parse(SplitFamily, split, "--split"), _parse(KvCache, kv_cache, "--kv-cache")
    if strategy is Strategy.HEADS:
        if mapping is not None:
            raise SplitError("strategy 'heads' places every part itself; expected no mapping, got one")
        # devices a sub-block cannot use (fewer KV-head groups than devices) are left out of it, with a warning
        heads, placement = split_heads(graph, cluster, dims=dims, kv_cache=kv_cache, allow_idle=True)
        for skipped in heads.skipped:
            warnings.warn(str(skipped), TransformerSplitWarning, stacklevel=3)
        return heads.graph, placement
    if strategy is not Strategy.VERTICAL or is_horizontal(mapping):
        return horizontal(graph, cluster, mapping, strategy=strategy, split=split, dims=dims)
    return graph, from_mapping(graph, cluster, mapping) if mapping is not None else balance(graph, cluster)


def _parse(kind: type, value: Any, what: str) -> Any:
    try:
        return kind.parse(value, what)
    except ValueError as exc:
        raise MappingError(str(exc)) from None


def with_replicas(graph: Graph, placement: Mapping[str, str],
                  requests: Sequence[ReplicaRequest]) -> tuple[Graph, dict[str, str]]:
    """The graph with the requested replicas, and the placement with every replica node on its device."""
    out = add_replicas(graph, requests)
    where = dict(placement)
    for region in out.regions:
        for rep in region.replicas:
            where.update(dict.fromkeys(rep.nodes, rep.device))
    return out, where


def plan(graph: Graph, cluster: Cluster, placement: Mapping[str, str]) -> Plan:
    """Check the layout, every device's memory budget, and cut it into a Plan."""
    layout = Layout(graph.regions, placement)
    problems = layout.validate(cluster.names, (layer.name for layer in graph.layers))
    unplaced = [layer.name for layer in graph.layers if layer.name not in placement]
    if unplaced:
        problems.append(f"{len(unplaced)} node(s) have no device: {unplaced[:5]}")
    if problems:
        raise PlacementError("invalid layout:\n  " + "\n  ".join(problems))
    check_memory(graph, cluster, placement)
    return cut(graph, cluster, placement)
