"""`robustness --search`: NSGA-II (pymoo) over the vital fraction of each region (of each Transformer block with
`--strategy heads`), two objectives minimised: the max per-device parameter memory against the plain split, and
minus the mean metric under single failures (the worst set is reported beside it).

A candidate picks each group's fraction from a grid (0 and the asked --r values): a key in [0, len(grid)) per
group, floored. Every distinct vector is evaluated once, in-process (`Study.single_failures`), and kept; the uniform
vectors (one r everywhere) start the first population and are taken from the rows already evaluated, so the front
can only improve on the uniform-r curve.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from pymoo.algorithms.moo.nsga2 import NSGA2
from pymoo.core.problem import Problem
from pymoo.optimize import minimize

from edgesplit.graph import Graph
from edgesplit.layout import Choice
from edgesplit.plan import Plan
from edgesplit.robust.evaluate import Row, Study, max_macs, max_param_bytes
from edgesplit.robust.policies import Policy

Levels = tuple[int, ...]
Groups = tuple[tuple[str, tuple[str, ...]], ...]


class Pick(Choice):
    MEMORY = "memory"
    METRIC = "metric"
    KNEE = "knee"


@dataclass(frozen=True)
class Point:
    levels: Levels  # per group, an index into the grid
    memory_vs_plain: float
    macs_vs_plain: float
    mean: float  # over single failures
    worst: float


@dataclass(frozen=True)
class Front:
    policy: Policy
    groups: Groups  # (label, its region names), one per variable
    grid: tuple[float, ...]
    points: tuple[Point, ...]  # non-dominated, by memory
    uniform: tuple[Point, ...]  # one r everywhere, by r
    evaluations: int  # distinct vectors evaluated
    seconds: float

    def fractions(self, point: Point) -> dict[str, float]:
        """Region name -> r of a point, as `replicas` takes it."""
        return fractions(self.groups, self.grid, point.levels)

    def gain(self) -> dict[str, float] | None:
        """The largest rise of the mean metric of a front point over the best uniform point using no more memory."""
        best = None
        for p in self.points:
            fits = [u.mean for u in self.uniform if u.memory_vs_plain <= p.memory_vs_plain + 1e-9]
            if fits and (best is None or p.mean - max(fits) > best["gain"]):
                best = {"gain": p.mean - max(fits), "memory_vs_plain": p.memory_vs_plain, "mean": p.mean,
                        "uniform_mean": max(fits)}
        return best

    def to_dict(self) -> dict[str, object]:
        def point(p: Point) -> dict[str, object]:
            return {"fractions": {label: self.grid[v] for (label, _), v in zip(self.groups, p.levels)},
                    "memory_vs_plain": p.memory_vs_plain, "macs_vs_plain": p.macs_vs_plain,
                    "mean_1": p.mean, "worst_1": p.worst}
        return {"policy": self.policy.value, "grid": list(self.grid),
                "groups": {label: list(names) for label, names in self.groups},
                "evaluations": self.evaluations, "seconds": self.seconds, "gain_over_uniform": self.gain(),
                "front": [point(p) for p in self.points], "uniform": [point(p) for p in self.uniform]}


def fractions(groups_: Groups, grid: Sequence[float], levels: Levels) -> dict[str, float]:
    return {name: grid[level] for (_, names), level in zip(groups_, levels) for name in names}


def groups(graph: Graph, per_block: bool) -> tuple[tuple[str, tuple[str, ...]], ...]:
    """One variable per region, or per Transformer block (the regions sharing a block index; a region outside
    every block is its own group)."""
    out: dict[str, list[str]] = {}
    for region in graph.regions:
        label = f"block {region.block}" if per_block and region.block is not None else region.name
        out.setdefault(label, []).append(region.name)
    return tuple((label, tuple(names)) for label, names in out.items())


class _Scorer:
    """Each distinct level vector's point, evaluated once."""

    def __init__(self, study: Study, policy: Policy, scores: Mapping[str, np.ndarray], f: int,
                 groups_: Groups, grid: Sequence[float], on_evaluation: Callable[[], None]) -> None:
        self.study, self.policy, self.scores, self.f = study, policy, scores, f
        self.groups, self.grid = groups_, tuple(grid)
        self.cache: dict[Levels, Point] = {}
        self.on_evaluation = on_evaluation

    def plan(self, levels: Levels) -> Plan:
        return self.study.plan(self.policy, fractions(self.groups, self.grid, levels), self.scores, f=self.f)

    def __call__(self, levels: Levels) -> Point:
        if levels not in self.cache:
            plan = self.plan(levels)
            values = [v or 0.0 for v in self.study.single_failures(plan).values()]
            self.cache[levels] = Point(levels, max_param_bytes(plan) / max_param_bytes(self.study.plain),
                                       max_macs(plan) / max_macs(self.study.plain), float(np.mean(values)),
                                       float(min(values)))
            self.on_evaluation()
        return self.cache[levels]


class _Fractions(Problem):
    def __init__(self, scorer: _Scorer, variables: int, levels: int) -> None:
        self.scorer, self.levels = scorer, levels
        super().__init__(n_var=variables, n_obj=2, xl=0.0, xu=float(levels))

    def _evaluate(self, X: np.ndarray, out: dict, *args, **kwargs) -> None:
        points = [self.scorer(decode(x, self.levels)) for x in X]
        out["F"] = np.array([[p.memory_vs_plain, -p.mean] for p in points])


def decode(x: np.ndarray, levels: int) -> Levels:
    return tuple(int(v) for v in np.minimum(np.floor(x), levels - 1))


def search(study: Study, policy: Policy, scores: Mapping[str, np.ndarray], rs: Sequence[float], rows: Sequence[Row],
           *, f: int = 1, per_block: bool = False, population: int = 20, generations: int = 10, seed: int = 0,
           on_evaluation: Callable[[], None] = lambda: None) -> Front:
    """The front of per-group fractions for `policy`; `rows` (already evaluated) give the uniform points free."""
    t0 = time.perf_counter()
    grid = tuple(sorted({0.0, *(float(r) for r in rs)}))
    variables = groups(study.graph, per_block)
    scorer = _Scorer(study, policy, scores, f, variables, grid, on_evaluation)
    n = len(variables)
    for row in rows:
        if row.policy in (policy, Policy.NONE) and row.r in grid and 1 in row.failures:
            level = grid.index(row.r)
            scorer.cache.setdefault((level,) * n, Point((level,) * n, row.memory_vs_plain, row.macs_vs_plain,
                                                        row.mean(1), row.worst(1)))
    uniform = [scorer((k,) * n) for k in range(len(grid))]
    rng = np.random.default_rng(seed)
    start = np.array([np.full(n, k + 0.5) for k in range(len(grid))] +
                     [rng.random(n) * len(grid) for _ in range(max(population - len(grid), 0))])

    algorithm = NSGA2(pop_size=max(population, len(grid)), sampling=start, eliminate_duplicates=True)
    minimize(_Fractions(scorer, n, len(grid)), algorithm, ("n_gen", generations), seed=seed, verbose=False)
    return Front(policy, variables, grid, pareto(list(scorer.cache.values())), tuple(uniform), len(scorer.cache),
                 time.perf_counter() - t0)


def pareto(points: Sequence[Point]) -> tuple[Point, ...]:
    """The non-dominated points (least memory, highest mean), one per objective pair, by memory."""
    by_value: dict[tuple[float, float], Point] = {}
    for p in sorted(points, key=lambda p: sum(p.levels)):  # ties: the vector with fewer replicas
        by_value.setdefault((p.memory_vs_plain, -p.mean), p)
    values = list(by_value)
    keep = [v for v in values if not any(w[0] <= v[0] and w[1] <= v[1] and w != v for w in values)]
    return tuple(by_value[v] for v in sorted(keep))


def pick(front: Front, how: Pick) -> tuple[Point, str]:
    """The point `--pick` writes as a plan, and why."""
    points = front.points
    if how is Pick.MEMORY:
        return points[0], "least memory"
    if how is Pick.METRIC:
        return max(points, key=lambda p: (p.mean, -p.memory_vs_plain)), "best mean metric under single failures"
    values = np.array([[p.memory_vs_plain, -p.mean] for p in points])
    span = np.where(np.ptp(values, axis=0) > 0, np.ptp(values, axis=0), 1.0)
    distance = np.linalg.norm((values - values.min(axis=0)) / span, axis=1)
    return points[int(np.argmin(distance))], "knee: closest to the ideal point, both objectives scaled to [0, 1]"
