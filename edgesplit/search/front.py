"""`edgesplit search` as a library call: check the request, profile, search, then write the front and its plans."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgesplit.cluster import Cluster
from edgesplit.errors import InputError, PlacementError
from edgesplit.graph import Graph
from edgesplit.layout import Choice
from edgesplit.place import balance
from edgesplit.search import validate
from edgesplit.search.cost import CostModel, Costs, Overheads
from edgesplit.search.space import Vertical, equal_layers, from_placement
from edgesplit.search.nsga import Objective, Pick, Point, Result, objective_value, pick, search
from edgesplit.search.profile import Profile

log = logging.getLogger("edgesplit")


class Space(Choice):
    VERTICAL = "vertical"
    HORIZONTAL = "horizontal"
    REPLICATION = "replication"




def parse_names(kind: type[Choice], text: str, what: str) -> tuple[Any, ...]:
    names = [t.strip() for t in text.split(",") if t.strip()]
    if not names:
        raise InputError(f"{what}: expected a comma-separated list of {list(kind.names())}, got {text!r}")
    try:
        return tuple(dict.fromkeys(kind.parse(n, what) for n in names))
    except ValueError as exc:
        raise InputError(str(exc)) from None


def check_spaces(spaces: Sequence[Space]) -> None:
    if Space.VERTICAL not in spaces:
        raise InputError(f"--space: expected 'vertical' among {[s.value for s in spaces]} (the layouts searched are "
                         "vertical ranges; 'horizontal' lets neighbouring ranges join into a group that splits its "
                         "layers by channels, 'replication' adds standby copies of their stages)")


def check_fits(graph: Graph, cluster: Cluster) -> None:
    need, have = graph.total_param_bytes, sum(d.memory for d in cluster.devices)
    if need > have:
        raise InputError(f"the model's parameters need {need / 2**20:.1f} MiB but the devices hold "
                         f"{have / 2**20:.1f} MiB in all: {(need - have) / 2**20:.1f} MiB short")


@dataclass(frozen=True)
class Baseline:
    name: str
    layout: Vertical
    costs: Costs
    feasible: bool


def baselines(model: CostModel) -> list[Baseline]:
    """AutoDiCE-style equal layer counts, and today's balance (when some vertical placement fits)."""
    out = [("equal layers", equal_layers(model.n, model.k))]
    try:
        out.append(("balance", from_placement(model.graph, model.cluster, balance(model.graph, model.cluster))))
    except PlacementError as exc:
        log.warning(f"no balance baseline: {exc}")
    return [Baseline(name, v, c, model.over_budget(c) <= 0) for name, v in out for c in [model.costs(v)]]


def spread(count: int, k: int, must: int) -> list[int]:
    """At most k indices of 0..count-1 spread evenly, always including `must`."""
    chosen = sorted({int(round(i)) for i in np.linspace(0, count - 1, max(min(k, count), 1))})
    if must not in chosen:
        chosen[int(np.argmin([abs(i - must) for i in chosen]))] = must
    return sorted(set(chosen))


def point_dict(model: CostModel, v: Vertical, c: Costs, objectives: Sequence[Objective]) -> dict[str, Any]:
    names = model.cluster.names
    return {
        "layout": v.to_dict(model.graph, model.cluster),
        "predicted": {
            "latency_s": c.latency, "throughput_per_s": c.throughput, "max_memory_bytes": c.max_memory,
            "memory_bytes": dict(zip(names, c.memory)), "wire_bytes": c.wire_bytes,
            "received_bytes": dict(zip(names, c.received)), "energy_j_estimate": dict(zip(names, c.energy)),
            "survived_single_failures": c.survived,
            "objectives": {o.value: objective_value(o, c) for o in objectives},
        },
    }


def plot(path: Path, front: Sequence[Point], bases: Sequence[Baseline], objectives: Sequence[Objective],
         chosen: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x_obj, y_obj = objectives[0], objectives[1] if len(objectives) > 1 else Objective.MEMORY
    scale = {Objective.LATENCY: (1e3, "latency (ms)"), Objective.MEMORY: (2**-20, "max per-device memory (MiB)"),
             Objective.ENERGY: (1.0, "energy per inference (J, estimate)"),
             Objective.THROUGHPUT: (1e3, "time per answer, pipelined (ms)"),
             Objective.ROBUSTNESS: (100.0, "single-device losses not survived (%)")}

    def xy(c: Costs) -> tuple[float, float]:
        return (objective_value(x_obj, c) * scale[x_obj][0], objective_value(y_obj, c) * scale[y_obj][0])

    fig, ax = plt.subplots(figsize=(6, 4.2))
    pts = sorted(xy(p.costs) for p in front)
    ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label="front (predicted)")
    for b, marker in zip(bases, ("s", "^", "D")):
        ax.plot(*xy(b.costs), marker, markersize=9, label=f"{b.name}{'' if b.feasible else ' (over budget)'}")
    ax.plot(*xy(front[chosen].costs), "*", markersize=16, color="gold", markeredgecolor="k", label="picked")
    ax.set_xlabel(scale[x_obj][1])
    ax.set_ylabel(scale[y_obj][1])
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


@dataclass(frozen=True)
class Outcome:
    result: Result
    bases: list[Baseline]
    chosen: int
    why: str
    checks: dict[int, validate.Check]  # front index -> measured


def run_search(model: CostModel, objectives: Sequence[Objective], population: int, generations: int, seed: int,
               how: Pick, on_generation: Callable[[], None] = lambda: None,
               standbys: bool = False, horizontal: bool = False,
               seeds: Sequence[Vertical] = ()) -> tuple[Result, list[Baseline], int, str]:
    """The front (its first population: `seeds`, then the feasible baselines), the baselines and the pick."""
    bases = baselines(model)
    seeds = list(dict.fromkeys([*seeds, *(b.layout for b in bases if b.feasible)]))
    result = search(model, objectives, seeds, population, generations, seed, on_generation, standbys, horizontal)
    if not result.front:
        raise InputError("no layout fits every device's memory budget; give devices more memory or add devices")
    chosen, why = pick(result.front, objectives, how)
    return result, bases, chosen, why


def document(model: CostModel, outcome: Outcome, objectives: Sequence[Objective], profiles: Mapping[int | str, Profile],
             overheads: Overheads, written: dict[int, str], backend: str) -> dict[str, Any]:
    def point(i: int, p: Point) -> dict[str, Any]:
        d = point_dict(model, p.layout, p.costs, objectives)
        d["plan"] = written.get(i)
        check = outcome.checks.get(i)
        if check is not None:
            names = model.cluster.names
            as_run = {"latency_s": check.predicted.latency,
                      "model_memory_bytes": dict(zip(names, validate.model_memory(model, check.predicted)))}
            d["measured"] = {"latency_s": check.measured.latency,
                             "model_memory_bytes": dict(zip(names, check.measured.memory)),
                             "predicted_as_run": as_run, "backend": backend}
        return d

    return {
        "model": model.graph.path or model.graph.name, "model_sha256": model.graph.sha256,
        "devices": [d.name for d in model.cluster.devices], "objectives": [o.value for o in objectives],
        "overheads": {"base_s": overheads.base, "step_s": overheads.step, "bandwidth_bytes_per_s": overheads.bandwidth,
                      "backend": backend},
        "profiles": {str(t): {"threads": p.threads, "whole_s": p.whole_seconds, "machine": p.machine,
                              "measured_on": p.device or "this machine"} for t, p in profiles.items()},
        "speed_note": "device times are the profile of the device itself where it was measured on it (`edgesplit "
                      "profile --address`), else this machine's profile divided by the device's `speed`",
        "energy_note": "energy is an estimate from each device's power profile (busy/idle watts), not a reading",
        "evaluations": outcome.result.evaluations, "search_seconds": outcome.result.seconds,
        "picked": {"index": outcome.chosen, "why": outcome.why, "plan": written.get(outcome.chosen)},
        "baselines": [{"name": b.name, "feasible": b.feasible, **point_dict(model, b.layout, b.costs, objectives)}
                      for b in outcome.bases],
        "front": [point(i, p) for i, p in enumerate(outcome.result.front)],
    }


def write_json(path: Path, doc: dict[str, Any]) -> None:
    path.write_text(json.dumps(doc, indent=1))
