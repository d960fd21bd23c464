"""Replication policies: a layout transformation giving replicas of parts' units on other devices.

Every policy keeps the regions and their parts as they are and only asks for copies
(`edgesplit.rewrite.replicas.ReplicaRequest`), to apply with `edgesplit.planner.with_replicas`:
- `none`: the plain split, no copies;
- `full`: every part's units on every other device of its region;
- `vital`: the top fraction r of each region's units by importance held by every device of the region (each
  part's vital units copied to every other device);
- `random`: the same number of units of each part as `vital` copies, chosen at random (seeded): the baseline an
  importance score must beat;
- `k-of-n`: each part's vital units on `f` more devices, the next ones round-robin after the part's own, so any
  `f` failures leave at least one copy — less memory than `vital` for `f` < devices − 1;
- `parity` (coded computing, `coded`): every linear region re-split into N−1 parts plus a coded part (their sum),
  the coded part's device rotating from region to region; any one lost part of those regions is recovered
  exactly. Regions that are not linear keep the plain split; with no linear region at all it is an error.

Replicas are standby by default: they cost memory but no compute until their part is lost (hot replicas only buy
time on requests that do not need re-running, see docs/plan-format.md).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

from edgesplit.errors import MappingError
from edgesplit.graph import Graph
from edgesplit.layout import Choice, Region, ReplicaMode
from edgesplit.rewrite.coded import CodedRequest, linear_problems, rotation
from edgesplit.rewrite.replicas import ReplicaRequest


class Policy(Choice):
    NONE = "none"
    FULL = "full"
    RANDOM = "random"
    VITAL = "vital"
    K_OF_N = "k-of-n"
    PARITY = "parity"


Fractions = float | Mapping[str, float]  # one r for every region, or one per region name


def replicas(graph: Graph, policy: Policy | str, importance: Mapping[str, np.ndarray] | None = None,
             r: Fractions = 0.0, *, f: int = 1, seed: int = 0,
             mode: ReplicaMode = ReplicaMode.STANDBY) -> list[ReplicaRequest]:
    """The replica requests of `policy` for a rewritten graph whose regions' parts have devices."""
    policy = Policy.parse(policy, "--policy")
    if not graph.regions:
        raise MappingError(f"policy {policy.value!r} needs a plan with horizontal regions; this one has none "
                           f"(use --strategy horizontal or heads)")
    check_fractions(r, graph.regions)
    rng = np.random.default_rng(seed)
    requests: list[ReplicaRequest] = []
    for region in graph.regions:
        if policy in (Policy.NONE, Policy.PARITY):
            continue
        if policy is Policy.FULL:
            chosen = [tuple(p.units) for p in region.parts]
        else:
            chosen = _vital_of_parts(region, _scores(importance, region), _fraction(r, region))
            if policy is Policy.RANDOM:
                chosen = [_random_of_part(region.parts[i].units, len(c), rng) for i, c in enumerate(chosen)]
        spread = _next_devices(region, f) if policy is Policy.K_OF_N else _other_devices(region)
        requests += [ReplicaRequest(region.name, i, units, device, mode)
                     for i, units in enumerate(chosen) if units for device in spread[i]]
    return requests


def coded(graph: Graph, only: Sequence[str] | None = None) -> list[CodedRequest]:
    """The parity policy's coded regions: every linear one (or the regions named in `only`, each of which must
    be linear), the coded part on the next device of the region's in turn."""
    problems = linear_problems(graph, [r for r in graph.regions if only is None or r.name in only])
    unknown = sorted(set(only or ()) - {r.name for r in graph.regions})
    if unknown:
        raise MappingError(f"parity: unknown regions {unknown}; expected some of {[r.name for r in graph.regions]}")
    reasons = [why for why in problems.values() if why]
    if only is not None and reasons:
        raise MappingError("parity: " + "; ".join(reasons))
    linear = [r for r in graph.regions if r.name in problems and not problems[r.name]]
    if not linear:
        raise MappingError("parity: expected linear regions (a Conv / Gemm / MatMul split by output channels, then "
                           "at most a bias, meeting at a Concat), got none: " + "; ".join(reasons[:3]))
    return [rotation(region, k) for k, region in enumerate(linear)]


def check_fractions(r: Fractions, regions: Sequence[Region]) -> None:
    values = dict(r) if isinstance(r, Mapping) else {"": r}
    bad = {k: v for k, v in values.items() if not 0.0 <= float(v) <= 1.0}
    if bad:
        raise MappingError(f"expected every fraction r in [0, 1], got {bad if len(values) > 1 else bad['']}")
    unknown = sorted(set(values) - {""} - {g.name for g in regions})
    if unknown:
        raise MappingError(f"fractions name unknown regions {unknown}; expected some of {[g.name for g in regions]}")


def vital_count(region: Region, r: float) -> int:
    """How many of a region's units are vital at fraction r (at least one when r > 0)."""
    return min(region.units, max(1, math.ceil(r * region.units - 1e-9))) if r > 0 else 0


def _fraction(r: Fractions, region: Region) -> float:
    return float(r.get(region.name, 0.0)) if isinstance(r, Mapping) else float(r)


def _scores(importance: Mapping[str, np.ndarray] | None, region: Region) -> np.ndarray:
    if importance is None or region.name not in importance:
        raise ValueError(f"region {region.name!r}: expected importance scores for its units, got none")
    scores = np.asarray(importance[region.name], dtype=np.float64)
    if scores.shape != (region.units,):
        raise ValueError(f"region {region.name!r}: expected {region.units} scores, got shape {scores.shape}")
    return scores


def _vital_of_parts(region: Region, scores: np.ndarray, r: float) -> list[tuple[int, ...]]:
    """Per part, its units among the region's top `vital_count` by score (ties: the lower unit first)."""
    order = np.lexsort((np.arange(region.units), -scores))
    vital = set(order[:vital_count(region, r)].tolist())
    return [tuple(u for u in p.units if u in vital) for p in region.parts]


def _random_of_part(units: Sequence[int], count: int, rng: np.random.Generator) -> tuple[int, ...]:
    if count == 0:
        return ()
    picked = set(rng.choice(np.asarray(units), size=count, replace=False).tolist())
    return tuple(u for u in units if u in picked)


def region_devices(region: Region) -> list[str]:
    """The devices holding the region's parts, in part order, each once."""
    return list(dict.fromkeys(p.device for p in region.parts if p.device is not None))


def _other_devices(region: Region) -> list[list[str]]:
    devices = region_devices(region)
    return [[d for d in devices if d != p.device] for p in region.parts]


def _next_devices(region: Region, f: int) -> list[list[str]]:
    """For each part, the `f` devices after its own in the region's device order (round-robin)."""
    devices = region_devices(region)
    if not 1 <= f < len(devices):
        raise MappingError(f"k-of-n: expected 1 <= f < {len(devices)} (the devices of region {region.name!r}), "
                           f"got f={f}")
    out = []
    for p in region.parts:
        start = devices.index(p.device)
        out.append([devices[(start + k) % len(devices)] for k in range(1, f + 1)])
    return out
