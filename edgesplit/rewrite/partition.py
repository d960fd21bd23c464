"""Horizontal and hybrid partitioning end to end: requests (from a mapping or automatic) -> rewrite -> place -> cut."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from edgesplit.cluster import Cluster
from edgesplit.errors import MappingError
from edgesplit.graph import Graph
from edgesplit.place import check_memory
from edgesplit.plan import Plan, cut
from edgesplit.rewrite import apply
from edgesplit.rewrite.assign import placement
from edgesplit.rewrite.auto import choose
from edgesplit.rewrite.spec import is_horizontal, parse, vertical_placement


def partition(graph: Graph, cluster: Cluster, mapping: Any = None, strategy: str = "horizontal", split: str = "auto",
              dims: Mapping[str, int] | None = None) -> Plan:
    """A plan whose regions come from `mapping` (AutoDiCE horizontal spec or `regions:` form) or, without one,
    from the automatic choice for `strategy` / `split`."""
    if mapping is not None and is_horizontal(mapping):
        spec = parse(graph, cluster, mapping)
        requests = list(spec.requests)
        covered = {l for r in requests for l in r.layers}
        base = vertical_placement(graph, cluster, spec.vertical, covered) if spec.vertical else None
    elif mapping is not None:
        raise MappingError(f"--strategy {strategy} with a vertical-only mapping: expected horizontal regions in the "
                           f"mapping (AutoDiCE {{layer: [kind, [points], [devices]]}} or a 'regions:' list), "
                           f"or no mapping")
    else:
        requests, base = choose(graph, cluster, strategy, split)
    rewritten = apply(graph, cluster, requests, dims)
    where = placement(rewritten, cluster, base)
    check_memory(rewritten, cluster, where)
    return cut(rewritten, cluster, where)
