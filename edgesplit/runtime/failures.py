"""Failure sets: which stages run, which part outputs come from a replica or are filled, and the typed events.

Both executors route every request through `route(...)`: stages on a down device do not run; a stage input that is
the output of a region's part is taken from a live replica, else filled (when degraded answers are allowed and the
region's fill is "zeros"); any other missing tensor makes the request fail with `DeviceFailedError` naming the
device and stage at the root of the loss. Stages whose outputs nobody needs are not run (replicas are cold standby).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np

from edgesplit.errors import DeviceFailedError, PlanError
from edgesplit.plan import Plan
from edgesplit.runtime.stages import Declared, StageSpec, bind_dims, declared, stage_specs

FILLS = ("zeros",)


@dataclass(frozen=True)
class Replica:
    device: str
    output: str


@dataclass(frozen=True)
class Part:
    output: str
    device: str | None
    replicas: tuple[Replica, ...]


@dataclass(frozen=True)
class Region:
    name: str
    combine: str
    fill: str | None
    parts: tuple[Part, ...]


def parse_regions(raw: Iterable[Mapping]) -> tuple[Region, ...]:
    """The plan's `regions` entries as typed data; every malformed entry is reported at once."""
    regions, problems = [], []
    for i, r in enumerate(raw):
        try:
            fill = r.get("fill", "zeros")
            if fill not in (*FILLS, None):
                problems.append(f"regions[{i}] ({r.get('name')}): expected fill one of {list(FILLS)} or null, "
                                f"got {fill!r}")
            parts = tuple(
                Part(p["output"], p.get("device"),
                     tuple(Replica(x["device"], x["output"]) for x in p.get("replicas") or ()))
                for p in r["parts"]
            )
            regions.append(Region(r["name"], r["combine"], fill, parts))
        except (KeyError, TypeError) as exc:
            problems.append(f"regions[{i}]: expected name, combine and parts with an output each, missing {exc}")
    if problems:
        raise PlanError("invalid regions in plan:\n  " + "\n  ".join(problems))
    return tuple(regions)


@dataclass(frozen=True)
class Fill:
    """A part output replaced by zeros of its declared type; symbolic dims are bound per request."""

    tensor: str
    dtype: str
    shape: tuple[int | str | None, ...]

    def resolved(self, dims: Mapping[str, int]) -> Fill:
        shape = [d if isinstance(d, int) else dims.get(d) if d else None for d in self.shape]
        if any(d is None for d in shape):
            raise PlanError(f"cannot fill missing part {self.tensor!r}: its shape {list(self.shape)} has a dimension "
                            f"not bound by the model inputs ({dict(dims)})")
        return Fill(self.tensor, self.dtype, tuple(shape))

    def array(self, dims: Mapping[str, int] | None = None) -> np.ndarray:
        return np.zeros(self.resolved(dims or {}).shape, dtype=self.dtype)


@dataclass(frozen=True)
class Route:
    """How one request runs under a failure set."""

    stages: tuple[StageSpec, ...]  # to run, in an order where producers come first
    sources: Mapping[str, str]  # part output -> replica output that stands in for it
    fills: Mapping[str, Fill]  # part output -> zeros
    missing_devices: tuple[str, ...]  # down devices whose parts were filled

    @property
    def devices(self) -> frozenset[str]:
        return frozenset(s.device for s in self.stages)

    def source(self, tensor: str) -> str:
        return self.sources.get(tensor, tensor)


def route(
    specs: tuple[StageSpec, ...],
    regions: tuple[Region, ...],
    declared: Mapping[str, Declared],
    inputs: Iterable[str],
    outputs: Iterable[str],
    down: frozenset[str] = frozenset(),
    allow_degraded: bool = False,
) -> Route:
    """The stages to run and the substitutions to make when the devices in `down` are lost."""
    part_of = {p.output: (r, p) for r in regions for p in r.parts}
    available = set(inputs)
    sources: dict[str, str] = {}
    fills: dict[str, Fill] = {}
    done: list[StageSpec] = []
    pending = [s for s in specs if s.device not in down]
    while True:  # a fixed point, because a replica may sit in a stage that comes later in the plan's order
        progress = True
        while progress:
            progress = False
            for spec in list(pending):
                if all(t in available or _stand_in(t, part_of, available) for t in spec.inputs):
                    sources.update({t: _stand_in(t, part_of, available) for t in spec.inputs if t not in available})
                    done.append(spec)
                    pending.remove(spec)
                    available.update(spec.outputs)
                    progress = True
        # only when nothing else can run: a replica that is still coming wins over zeros
        if not (allow_degraded and _fill_one(pending, part_of, available, declared, fills)):
            break
    need = list(outputs)
    for t in need:
        if t not in available:
            device, stage = _root(t, specs, down, available)
            message = f"device {device!r} is down and stage {stage!r} has no live replica or fallback"
            fillable = sorted({part_of[p][0].name for p in part_of if p not in available and part_of[p][0].fill})
            if fillable and not allow_degraded:
                message += f"; region(s) {fillable} could be answered degraded (allow degraded answers to get zeros)"
            raise DeviceFailedError(device, stage, message)
    kept = _needed(done, need, sources)
    used_sources = {t: s for t, s in sources.items() if any(t in k.inputs for k in kept)}
    used_fills = {t: f for t, f in fills.items() if any(t in k.inputs for k in kept)}
    missing = sorted({_root(t, specs, down, available)[0] for t in used_fills})
    return Route(tuple(kept), used_sources, used_fills, tuple(missing))


def _fill_one(pending: list[StageSpec], part_of: Mapping[str, tuple[Region, Part]], available: set[str],
              declared: Mapping[str, Declared], fills: dict[str, Fill]) -> bool:
    """Fill the missing part outputs of the first blocked stage that only lacks fillable parts."""
    for spec in pending:
        missing = [t for t in spec.inputs if t not in available]
        if all(t in part_of and part_of[t][0].fill == "zeros" for t in missing):
            for t in missing:
                d = declared.get(t)
                if d is None:
                    raise PlanError(f"cannot fill missing part {t!r}: no stage declares its type")
                fills[t] = Fill(t, d.dtype, d.shape)
                available.add(t)
            return True
    return False


def _stand_in(tensor: str, part_of: Mapping[str, tuple[Region, Part]], available: set[str]) -> str:
    if tensor not in part_of:
        return ""
    return next((r.output for r in part_of[tensor][1].replicas if r.output in available), "")


def _needed(done: list[StageSpec], outputs: list[str], sources: Mapping[str, str]) -> list[StageSpec]:
    need = {sources.get(t, t) for t in outputs}
    kept = []
    for spec in reversed(done):
        if need.intersection(spec.outputs):
            kept.append(spec)
            need.update(sources.get(t, t) for t in spec.inputs)
    return kept[::-1]


def _root(tensor: str, specs: tuple[StageSpec, ...], down: frozenset[str], available: set[str]) -> tuple[str, str]:
    """The (device, stage) at the origin of a missing tensor: follow missing inputs back to a down device."""
    producer = {t: s for s in specs for t in s.outputs}
    seen: set[str] = set()
    t = tensor
    while t in producer and producer[t].name not in seen:
        spec = producer[t]
        seen.add(spec.name)
        if spec.device in down:
            return spec.device, spec.name
        t = next((i for i in spec.inputs if i not in available), "")
    spec = producer.get(tensor)
    return (spec.device, spec.name) if spec else ("?", "?")


# ---- typed events, in the past tense; every one names the device, stage and request it concerns ----


@dataclass(frozen=True)
class DeviceLost:
    device: str
    stage: str
    request: int
    reason: str  # "died": the actor or its node is gone; "silent": alive by Ray but no answer before the deadline
    at: float = field(default_factory=time.monotonic)


@dataclass(frozen=True)
class DeviceRejoined:
    device: str
    at: float = field(default_factory=time.monotonic)


@dataclass(frozen=True)
class RequestFailed:
    request: int
    device: str
    stage: str
    message: str
    at: float = field(default_factory=time.monotonic)


Event = DeviceLost | DeviceRejoined | RequestFailed


@dataclass(frozen=True)
class RunReport:
    """Per run: how many requests were answered in full, degraded or failed, and how fast answers resumed."""

    full: int
    degraded: int
    failed: int
    seconds: float
    recovery_seconds: tuple[float, ...]  # per device loss: time from its detection to the first answer after it
    events: tuple[Event, ...]

    @property
    def requests(self) -> int:
        return self.full + self.degraded + self.failed

    @property
    def throughput(self) -> float:
        return self.requests / self.seconds if self.seconds > 0 else 0.0

    def summary(self) -> str:
        text = (f"{self.requests} requests in {self.seconds:.2f} s ({self.throughput:.1f}/s): "
                f"{self.full} full, {self.degraded} degraded, {self.failed} failed")
        if self.recovery_seconds:
            resumed = ", ".join(f"{s * 1e3:.0f} ms" for s in self.recovery_seconds)
            text += f"; answers resumed {resumed} after a loss"
        return text


class Tally:
    """Mutable counter behind a RunReport (one per session)."""

    def __init__(self) -> None:
        self.full = self.degraded = self.failed = 0
        self.start = time.monotonic()
        self.events: list[Event] = []
        self.recovery: list[float] = []
        self._since: list[float] = []  # detection times of losses not yet followed by an answer

    def event(self, e: Event) -> None:
        self.events.append(e)
        if isinstance(e, DeviceLost):
            self._since.append(e.at)

    def answered(self, degraded: bool) -> None:
        now = time.monotonic()
        self.recovery.extend(now - t for t in self._since)
        self._since.clear()
        if degraded:
            self.degraded += 1
        else:
            self.full += 1

    def report(self) -> RunReport:
        return RunReport(self.full, self.degraded, self.failed, time.monotonic() - self.start,
                         tuple(self.recovery), tuple(self.events))


class Router:
    """A plan's routes, one per failure set, computed once each."""

    def __init__(self, plan: Plan, allow_degraded: bool = False) -> None:
        self.specs = stage_specs(plan)
        self.regions = parse_regions(plan.regions)
        self.declared = declared(self.specs)
        self.inputs = tuple(t.name for t in plan.inputs)
        self.outputs = tuple(t.name for t in plan.outputs)
        self.allow_degraded = allow_degraded
        self._routes: dict[frozenset[str], Route | DeviceFailedError] = {}

    def route(self, down: frozenset[str] = frozenset()) -> Route:
        if down not in self._routes:
            try:
                self._routes[down] = route(self.specs, self.regions, self.declared, self.inputs, self.outputs, down,
                                           self.allow_degraded)
            except DeviceFailedError as exc:
                self._routes[down] = exc
        found = self._routes[down]
        if isinstance(found, DeviceFailedError):
            raise DeviceFailedError(found.device, found.stage, str(found))
        return found

    def dims(self, arrays: Mapping[str, object]) -> dict[str, int]:
        return bind_dims({t: self.declared[t] for t in self.inputs if t in self.declared}, arrays)

    def spec(self, name: str) -> StageSpec:
        return next(s for s in self.specs if s.name == name)
