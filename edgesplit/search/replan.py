"""A new plan for the devices that remain after some leave for good: the search over the survivors, seeded with
the current plan (each lost device's layers joined to the range before them), its picked point cut into a plan.

The profiles are measured (or loaded) when the `Replanner` is made, so a loss costs only the search and the cut.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence

from edgesplit.cluster import Cluster
from edgesplit.errors import InputError
from edgesplit.graph import Graph
from edgesplit.plan import Plan
from edgesplit.search import front
from edgesplit.search.cost import CostModel, Costs, Overheads
from edgesplit.search.nsga import Objective, Pick
from edgesplit.search.profile import Profile, profile, threads_of
from edgesplit.search.space import Vertical, to_plan


def survivors(cluster: Cluster, lost: Collection[str]) -> Cluster:
    """The cluster without the lost devices (and their links)."""
    unknown = sorted(set(lost) - set(cluster.names))
    if unknown:
        raise InputError(f"expected lost devices among the plan's {list(cluster.names)}, got {unknown}")
    keep = tuple(d for d in cluster.devices if d.name not in lost)
    if not keep:
        raise InputError(f"every device of the plan is lost ({sorted(lost)}): nothing is left to re-plan on")
    links = {pair: link for pair, link in cluster.links.items() if not set(pair) & set(lost)}
    return Cluster(keep, cluster.default_link, links)


def seed_layout(plan: Plan, graph: Graph, cluster: Cluster) -> Vertical | None:
    """The plan's layer ranges on `cluster` (its survivors): a lost device's layers join the range before them (the
    one after, at the start); None when the plan is not contiguous ranges of `graph`'s layers (a rewritten plan)."""
    names = cluster.names
    owners = [plan.placement.get(layer.name) for layer in graph.layers]
    if not owners or any(o is None for o in owners):
        return None
    kept: list[str | None] = []
    for o in owners:
        kept.append(o if o in names else (kept[-1] if kept else None))
    first = next((o for o in kept if o is not None), names[0])
    runs: list[tuple[str, int]] = []  # (device, first layer)
    for i, o in enumerate(o or first for o in kept):
        if not runs or runs[-1][0] != o:
            runs.append((o, i))
    devices = [d for d, _ in runs]
    if len(set(devices)) != len(devices):
        return None
    unused = [d for d in names if d not in devices]
    cuts = [start for _, start in runs[1:]] + [len(graph.layers)] * len(unused)
    return Vertical(tuple(cuts), tuple(names.index(d) for d in devices + unused))


def objectives_for(pick: Pick) -> tuple[Objective, ...]:
    """What the re-planning search minimises to pick by `pick`: latency and memory, and the picked one."""
    extra = {Pick.THROUGHPUT: Objective.THROUGHPUT, Pick.ENERGY: Objective.ENERGY}.get(pick)
    return (Objective.LATENCY, Objective.MEMORY) + ((extra,) if extra else ())


class Replanner:
    """plan, lost devices -> the plan for the survivors: NSGA-II over their layouts (`front.run_search`, seeded with
    the current plan and the baselines), the point `pick` chooses; one device left takes the whole model."""

    def __init__(self, graph: Graph, cluster: Cluster, objectives: Sequence[Objective] = (Objective.LATENCY,
                 Objective.MEMORY), pick: Pick = Pick.LATENCY, population: int = 60, generations: int = 60,
                 seed: int = 0, dims: Mapping[str, int] | None = None, overheads: Overheads | None = None,
                 profiles: Mapping[int, Profile] | None = None) -> None:
        self.graph, self.objectives, self.pick = graph, tuple(objectives), pick
        self.population, self.generations, self.seed = population, generations, seed
        self.dims = dict(dims or {})
        self.overheads = overheads or Overheads()
        kinds = {threads_of(d.cores) for d in cluster.devices}
        given = dict(profiles or {})
        self.profiles = given | {t: profile(graph, t, dims=self.dims) for t in sorted(kinds - set(given))}
        self.why = ""  # why the last plan's point was picked
        self.costs: Costs | None = None  # the last plan's predicted costs (None: one device left, no search)

    def __call__(self, plan: Plan, lost: Collection[str]) -> Plan:
        cluster = survivors(plan.cluster, lost)
        front.check_fits(self.graph, cluster)
        if len(cluster.devices) == 1:
            self.why = "one device left: it takes the whole model"
            self.costs = None
            return to_plan(self.graph, cluster, Vertical((), (0,)), None, self.dims)
        model = CostModel(self.graph, cluster, self.profiles, self.overheads)
        seeds = [s for s in (seed_layout(plan, self.graph, cluster),) if s is not None]
        result, _, chosen, self.why = front.run_search(model, self.objectives, self.population, self.generations,
                                                       self.seed, self.pick, seeds=seeds)
        layout, self.costs = result.front[chosen].layout, result.front[chosen].costs
        return to_plan(self.graph, cluster, layout, model.splits if layout.horizontal else None, self.dims)
