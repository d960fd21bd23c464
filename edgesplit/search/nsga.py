"""NSGA-II (pymoo) over vertical layouts, scored by the cost model only.

A candidate is a vector of random keys in [0, 1]: the first k-1 keys, sorted and scaled, are the cut points; the
order of the last k keys says which device takes each range. Candidates over a device's memory budget are repaired
(ranges sorted by need go to devices sorted by budget) and otherwise ranked below every feasible one. The first
population holds the baselines (today's balance, equal layer counts) so the front can only improve on them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from pymoo.algorithms.moo.nsga2 import NSGA2
from pymoo.core.callback import Callback
from pymoo.core.problem import Problem
from pymoo.core.repair import Repair
from pymoo.optimize import minimize

from edgesplit.errors import InputError
from edgesplit.layout import Choice
from edgesplit.search.cost import CostModel, Costs, Vertical


class Objective(Choice):
    LATENCY = "latency"
    MEMORY = "memory"
    ENERGY = "energy"
    THROUGHPUT = "throughput"
    ROBUSTNESS = "robustness"  # the share of single-device losses a stage does not survive (standbys)


class Pick(Choice):
    LATENCY = "latency"
    THROUGHPUT = "throughput"
    MEMORY = "memory"
    ENERGY = "energy"
    ROBUSTNESS = "robustness"
    KNEE = "knee"


def objective_value(objective: Objective, c: Costs) -> float:
    """The value minimised: seconds, bytes, joules, or seconds per answer (for throughput)."""
    return {Objective.LATENCY: c.latency, Objective.MEMORY: float(c.max_memory), Objective.ENERGY: sum(c.energy),
            Objective.THROUGHPUT: c.period, Objective.ROBUSTNESS: 1.0 - c.survived}[objective]


def genes(k: int, standbys: bool, horizontal: bool = False) -> int:
    return 2 * k - 1 + (k - 1 if horizontal else 0) + (k if standbys else 0)


def decode(x: np.ndarray, n: int, k: int) -> Vertical:
    """Cut keys, device keys, then (by the vector's length) k-1 join keys (> 0.5: range s+1 joins range s's
    horizontal group) and per range a standby key: k+1 choices, the last none (a range in a group has none)."""
    cuts = np.sort(np.minimum((x[: k - 1] * (n + 1)).astype(int), n))
    order = tuple(int(d) for d in np.argsort(x[k - 1: 2 * k - 1], kind="stable"))
    rest = x[2 * k - 1:]
    joined: tuple[bool, ...] = ()
    if len(rest) in (k - 1, 2 * k - 1):
        joined, rest = tuple(bool(j > 0.5) for j in rest[: k - 1]), rest[k - 1:]
    standby: tuple[int, ...] = ()
    if len(rest):
        grouped = [bool(joined) and ((s < k - 1 and joined[s]) or (s > 0 and joined[s - 1])) for s in range(k)]
        picks = np.minimum((rest * (k + 1)).astype(int), k)
        standby = tuple(-1 if e == k or e == d or g else int(e) for e, d, g in zip(picks, order, grouped))
    return Vertical(tuple(int(c) for c in cuts), order, standby, joined if any(joined) else ())


def encode(v: Vertical, n: int, k: int, standbys: bool = False, horizontal: bool = False) -> np.ndarray:
    keys = np.empty(k)
    keys[list(v.order)] = (np.arange(k) + 0.5) / k  # device order[s] gets the s-th smallest key
    out = [(np.asarray(v.cuts) + 0.5) / (n + 1), keys]
    if horizontal:
        out.append(np.where(np.asarray(v.joined or (False,) * (k - 1)), 0.75, 0.25))
    if standbys:
        picks = [e if e >= 0 else k for e in (v.standby or (-1,) * k)]
        out.append((np.asarray(picks) + 0.5) / (k + 1))
    return np.concatenate(out)


class _Layouts(Problem):
    def __init__(self, model: CostModel, objectives: Sequence[Objective], standbys: bool, horizontal: bool) -> None:
        self.model, self.objectives = model, tuple(objectives)
        super().__init__(n_var=genes(model.k, standbys, horizontal), n_obj=len(objectives), n_ieq_constr=1,
                         xl=0.0, xu=1.0)

    def _evaluate(self, X: np.ndarray, out: dict, *args, **kwargs) -> None:
        costs = [self.model.costs(decode(x, self.model.n, self.model.k)) for x in X]
        out["F"] = np.array([[objective_value(o, c) for o in self.objectives] for c in costs])
        out["G"] = np.array([[self.model.over_budget(c)] for c in costs])


class _MemoryRepair(Repair):
    """Over budget: keep the cuts, give the ranges that need most to the devices with most memory."""

    def _do(self, problem: _Layouts, X: np.ndarray, **kwargs) -> np.ndarray:
        model = problem.model
        for row, x in enumerate(X):
            v = decode(x, model.n, model.k)
            if model.memory_over_budget(v) <= 0:
                continue
            b = v.bounds(model.n)
            need = [model.param_prefix[b[s + 1]] - model.param_prefix[b[s]] for s in range(model.k)]
            by_need = np.argsort(need, kind="stable")[::-1]
            by_budget = np.argsort(model.budget, kind="stable")[::-1]
            order = np.empty(model.k, dtype=int)
            order[by_need] = by_budget
            X[row, : 2 * model.k - 1] = encode(Vertical(v.cuts, tuple(int(d) for d in order)), model.n, model.k)
        return X


@dataclass(frozen=True)
class Point:
    layout: Vertical
    costs: Costs
    feasible: bool


@dataclass(frozen=True)
class Result:
    front: tuple[Point, ...]  # feasible, non-dominated, sorted by the first objective
    evaluations: int
    seconds: float


def search(model: CostModel, objectives: Sequence[Objective], seeds: Sequence[Vertical], population: int = 100,
           generations: int = 100, seed: int = 0, on_generation: Callable[[], None] = lambda: None,
           standbys: bool = False, horizontal: bool = False) -> Result:
    """The Pareto front of layouts for `objectives` (at least one), the `seeds` in the first population; with
    `standbys`, each range may also get a standby copy on another device (the replication space); with
    `horizontal`, neighbouring ranges may join into a group that splits its layers by channels."""
    import time

    if not objectives:
        raise InputError("expected at least one objective, got none")
    if model.k < 2:
        raise InputError(f"expected at least 2 devices to search over, got {model.k}")
    t0 = time.perf_counter()
    evaluations = 0
    if horizontal:  # the vertical front first, as seeds: the horizontal front can then only improve on it
        vertical = search(model, objectives, seeds, population, generations, seed, standbys=standbys)
        seeds = list(dict.fromkeys([*seeds, *(p.layout for p in vertical.front)]))[:population]
        evaluations = vertical.evaluations
    rng = np.random.default_rng(seed)
    size = genes(model.k, standbys, horizontal)
    randoms = rng.random((max(population - len(seeds), 0), size))
    if horizontal:  # three in four start vertical: with even odds nearly every start would be split somewhere
        randoms[: 3 * len(randoms) // 4, 2 * model.k - 1: 3 * model.k - 2] *= 0.5
    start = np.array([encode(v, model.n, model.k, standbys, horizontal) for v in seeds] + list(randoms))
    problem = _Layouts(model, objectives, standbys, horizontal)

    class _Tick(Callback):
        def notify(self, algorithm) -> None:
            on_generation()

    algorithm = NSGA2(pop_size=population, sampling=start, repair=_MemoryRepair(), eliminate_duplicates=True)
    res = minimize(problem, algorithm, ("n_gen", generations), seed=seed, callback=_Tick(), verbose=False)
    pool = [decode(x, model.n, model.k) for x in np.atleast_2d(res.pop.get("X"))] + list(seeds)
    front = pareto(model, objectives, pool)
    return Result(front, evaluations + int(res.algorithm.evaluator.n_eval), time.perf_counter() - t0)


def pareto(model: CostModel, objectives: Sequence[Objective], layouts: Sequence[Vertical]) -> tuple[Point, ...]:
    """The feasible non-dominated layouts (one per distinct objective vector), by the first objective."""
    points = {}
    for v in layouts:
        c = model.costs(v)
        if model.over_budget(c) <= 0:
            points.setdefault(tuple(objective_value(o, c) for o in objectives), Point(v, c, True))
    values = list(points)
    keep = [p for p in values if not any(_dominates(q, p) for q in values)]
    return tuple(points[p] for p in sorted(keep))


def _dominates(a: Sequence[float], b: Sequence[float]) -> bool:
    return all(x <= y for x, y in zip(a, b)) and any(x < y for x, y in zip(a, b))


def pick(front: Sequence[Point], objectives: Sequence[Objective], how: Pick) -> tuple[int, str]:
    """The index of the default plan on the front, and why it was chosen."""
    if how is Pick.KNEE:
        values = np.array([[objective_value(o, p.costs) for o in objectives] for p in front])
        # an objective that barely moves on the front (under 1 % of its size) must not decide the knee
        span = np.maximum(np.ptp(values, axis=0), 0.01 * np.abs(values).max(axis=0))
        span = np.where(span > 0, span, 1.0)
        distance = np.linalg.norm((values - values.min(axis=0)) / span, axis=1)
        return int(np.argmin(distance)), "knee: closest to the ideal point with every objective scaled to [0, 1]"
    objective = Objective(how.value)
    values = [objective_value(objective, p.costs) for p in front]
    return int(np.argmin(values)), f"best predicted {objective.value}"
