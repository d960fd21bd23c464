"""Horizontal and hybrid placement end to end: requests and their devices (from a mapping, or chosen
automatically) -> the CNN rewrite -> parts on their devices and a device for every node."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from edgesplit.cluster import Cluster
from edgesplit.errors import MappingError
from edgesplit.graph import Graph
from edgesplit.layout import Strategy
from edgesplit.place.mapping import is_horizontal, parse
from edgesplit.place.parts import HorizontalSpec, place
from edgesplit.place.regions import choose
from edgesplit.rewrite import cnn
from edgesplit.rewrite.base import SplitError


def horizontal(graph: Graph, cluster: Cluster, mapping: Any = None, strategy: Strategy | str = Strategy.HORIZONTAL,
               split: str = "auto", dims: Mapping[str, int] | None = None) -> tuple[Graph, dict[str, str]]:
    """The rewritten graph (regions with their part devices) and the device of every node. The regions come from
    `mapping` (AutoDiCE horizontal spec or `regions:` form) or, without one, from the automatic choice for
    `strategy` / `split`; shares not given are the devices' speeds."""
    if mapping is not None and not is_horizontal(mapping):
        raise MappingError(f"--strategy {strategy} with a vertical-only mapping: expected horizontal regions in the "
                           f"mapping (AutoDiCE {{layer: [kind, [points], [devices]]}} or a 'regions:' list), "
                           f"or no mapping")
    spec = parse(graph, cluster, mapping) if mapping is not None else choose(graph, cluster, strategy, split)
    check(graph, cluster, spec)
    spec = spec.by_speed(cluster)
    rewritten = cnn.apply(graph, spec.requests, dims)
    return place(rewritten, cluster, spec.region_devices(rewritten), spec.base)


def check(graph: Graph, cluster: Cluster, spec: HorizontalSpec) -> None:
    """Every problem of the requests and of their devices at once."""
    problems = list(dict.fromkeys(cnn.problems(graph, spec.requests) + spec.device_problems(cluster)))
    if problems:
        raise SplitError("invalid horizontal split:\n  " + "\n  ".join(problems))
