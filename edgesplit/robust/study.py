"""`edgesplit robustness` as a library call: check everything first, evaluate every (policy, r), then write."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from edgesplit.cluster import Cluster
from edgesplit.errors import InputError
from edgesplit.graph import load
from edgesplit.layout import Fill, Strategy
from edgesplit.plan import Plan
from edgesplit.planner import layout
from edgesplit.robust import data, frontier, report
from edgesplit.robust.evaluate import Row, Samples, Study, prepare
from edgesplit.robust.fills import mean_fills
from edgesplit.robust.frontier import Pick
from edgesplit.robust.importance import Importance, importance
from edgesplit.robust.policies import Policy, check_fractions, coded

log = logging.getLogger("edgesplit")
STRATEGIES = (Strategy.HORIZONTAL.value, Strategy.HEADS.value)
RANKED = (Policy.VITAL, Policy.RANDOM, Policy.K_OF_N)


@dataclass(frozen=True)
class Search:
    """`--search`: NSGA-II over per-region (per-block) fractions; `pick` the front point written as a plan."""

    generations: int = 10
    population: int = 20
    seed: int = 0
    pick: Pick | None = None


@dataclass(frozen=True)
class Request:
    model: Path
    cluster: Cluster
    data: Path
    calibration: Path | None = None
    policies: tuple[Policy, ...] = tuple(Policy)
    rs: tuple[float, ...] = (0.0, 0.1, 0.25, 0.5)
    importance: tuple[Importance, ...] = (Importance.WEIGHT,)  # several: vital, random, k-of-n rows for each
    failures: tuple[int, ...] = (1,)
    strategy: Strategy = Strategy.HORIZONTAL
    metric: str | None = None
    f: int = 1  # failures k-of-n tolerates
    fill: Fill = Fill.ZEROS
    output: str | None = None  # the model output scored (default: the first)
    search: Search | None = None


Config = tuple[Policy, float, Importance | None]  # importance only for the ranked policies


@dataclass(frozen=True)
class Prepared:
    study: Study
    configs: list[Config]
    scores: dict[Importance, dict[str, np.ndarray]]

    @property
    def steps(self) -> int:
        return len(self.configs) * self.study.steps_per_row


def configs(policies: Sequence[Policy], rs: Sequence[float],
            importances: Sequence[Importance] = (Importance.WEIGHT,)) -> list[Config]:
    """(policy, r, importance) in the order asked: `none`, `full` and `parity` once each (r 0, 1 and 0), the
    ranked policies at every r with every importance."""
    fixed = {Policy.NONE: 0.0, Policy.FULL: 1.0, Policy.PARITY: 0.0}
    out: list[Config] = []
    for p in policies:
        out += [(p, fixed[p], None)] if p in fixed else [(p, r, i) for r in rs for i in importances]
    return list(dict.fromkeys(out))


def check_search(search: Search | None, asked: Sequence[str], plan_dir: Path | None) -> None:
    """--generations, --population, --seed and --pick only with --search; --pick only with -o."""
    if search is None and asked:
        raise InputError(f"{', '.join(asked)}: only with --search (its front and the point written); expected "
                         f"--search, got none")
    if search is not None and search.pick is not None and plan_dir is None:
        raise InputError("--pick writes the chosen point as a plan: expected -o PLAN_DIR, got none")


def search_policy(req: Request) -> Policy:
    """The ranked policy the search tunes: k-of-n if asked, else vital."""
    for policy in (Policy.K_OF_N, Policy.VITAL):
        if policy in req.policies:
            return policy
    raise InputError(f"--search tunes the fractions of vital or k-of-n: expected one in --policy, got "
                     f"{[p.value for p in req.policies]}")


def prepare_request(req: Request) -> Prepared:
    """Every check that can fail on the user's input, before any evaluation (and so before anything is written)."""
    data.check_rs(req.rs)
    if req.search is not None:
        search_policy(req)
        if 1 not in req.failures:
            raise InputError(f"--search scores single failures: expected 1 in --failures, got {list(req.failures)}")
    data.check_sizes(req.failures, len(req.cluster.devices))
    if req.strategy.value not in STRATEGIES:
        raise InputError(f"--strategy: expected one of {list(STRATEGIES)}, got {req.strategy.value!r}")
    source = load(req.model)
    rewritten, placement = layout(source, req.cluster, strategy=req.strategy)
    if not rewritten.regions:
        raise InputError(f"policies need a plan with horizontal regions; strategy {req.strategy.value!r} found none "
                         f"in {req.model}")
    for r in req.rs:
        check_fractions(r, rewritten.regions)
    samples = data.read_samples(req.data, tuple(source.tensors[n] for n in source.inputs))
    calibration, samples = _calibration(req, source, samples)
    if req.fill is Fill.MEAN:
        rewritten = mean_fills(rewritten, dict(calibration.inputs))
    study = prepare(rewritten, placement, req.cluster, source, samples, req.failures, req.metric, req.output)
    log.info("metric: %s%s; %d evaluated samples; failure sets over %s%s", study.metric.value,
             f" (and perplexity of {study.tokens!r})" if study.tokens and study.metric.value == "next-token" else "",
             len(samples),
             [d for d in req.cluster.names if d not in study.fatal],
             f" (left out, their loss is fatal: {list(study.fatal)})" if study.fatal else "")
    if Policy.PARITY in req.policies:
        coded(rewritten)  # a clear error now, before any evaluation, when no region is linear
    ranked = any(p in RANKED for p in req.policies)
    batch = dict(calibration.inputs) if calibration is not None else None
    scores = {m: importance(rewritten, m, batch if m.needs_data else None) for m in req.importance} if ranked else {}
    return Prepared(study, configs(req.policies, req.rs, req.importance), scores)


def _calibration(req: Request, source, samples: Samples) -> tuple[Samples | None, Samples]:
    if not any(m.needs_data for m in req.importance) and req.fill is not Fill.MEAN:
        return None, samples
    if req.calibration is not None:
        return data.read_samples(req.calibration, tuple(source.tensors[n] for n in source.inputs), False), samples
    calibration, evaluated = data.split_calibration(samples)
    log.info("calibration: the first %d samples of %s (not evaluated)", len(calibration), req.data)
    return calibration, evaluated


def evaluate_all(prepared: Prepared, f: int = 1, on_step: Callable[[], None] = lambda: None) -> tuple[list[Row], Plan]:
    """Every (policy, r) row, and the plan of the first one."""
    rows, first = [], None
    compared = len({m for _, _, m in prepared.configs if m is not None}) > 1
    for policy, r, method in prepared.configs:
        plan = prepared.study.plan(policy, r, prepared.scores.get(method) if method else None, f=f)
        first = first or plan
        row = prepared.study.evaluate(policy, r, plan, on_step)
        rows.append(replace(row, importance=method.value) if compared and method else row)
    assert first is not None
    return rows, first


def search_front(prepared: Prepared, req: Request, rows: Sequence[Row], f: int = 1,
                 on_evaluation: Callable[[], None] = lambda: None) -> frontier.Front:
    assert req.search is not None
    policy = search_policy(req)
    return frontier.search(prepared.study, policy, prepared.scores[req.importance[0]], req.rs,
                           [r for r in rows if not r.importance or r.importance == req.importance[0].value], f=f,
                           per_block=req.strategy is Strategy.HEADS, population=req.search.population,
                           generations=req.search.generations, seed=req.search.seed, on_evaluation=on_evaluation)


def picked_plan(prepared: Prepared, req: Request, front: frontier.Front, f: int = 1) -> tuple[Plan, str]:
    """The plan of the front point --pick chooses, and a line saying which and why."""
    assert req.search is not None and req.search.pick is not None
    point, why = frontier.pick(front, req.search.pick)
    plan = prepared.study.plan(front.policy, front.fractions(point), prepared.scores[req.importance[0]], f=f)
    return plan, (f"{front.policy.value}, searched fractions ({why}): memory {point.memory_vs_plain:.3f}x, "
                  f"mean {point.mean:.4f}")


def write(rows: Sequence[Row], prepared: Prepared, req: Request, plan: Plan, json_path: Path | None,
          plot_path: Path | None, plan_dir: Path | None, front: frontier.Front | None = None,
          f: int = 1) -> list[str]:
    written = []
    chosen = f"{prepared.configs[0][0].value}, r={prepared.configs[0][1]:g}"
    if front is not None and req.search is not None and req.search.pick is not None:
        plan, chosen = picked_plan(prepared, req, front, f)
    for path in (json_path, plot_path, plan_dir):
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
    if json_path is not None:
        doc = report.document(rows, prepared.study, str(req.model), ",".join(m.value for m in req.importance))
        if any(r.policy is Policy.PARITY for r in rows):
            doc["parity"] = prepared.study.coded_memory().to_dict()
        if front is not None:
            doc["search"] = front.to_dict()
        json_path.write_text(json.dumps(doc, indent=1))
        written.append(str(json_path))
    if plot_path is not None:
        report.plot(rows, prepared.study, plot_path, front)
        written.append(str(plot_path))
    if plan_dir is not None:
        plan.save(plan_dir)
        written.append(f"{plan_dir} ({chosen})")
    return written
