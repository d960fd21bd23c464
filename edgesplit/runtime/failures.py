"""Failure sets: which stages run, which part outputs come from a replica or are filled, and the typed events.

Both executors route every request through `route(...)`: stages on a down device do not run (a stage with a standby
on a live device runs there instead, `Router.stand_by`); a stage input that is
the output of a lost part is rebuilt from the live replicas of its units (several, on different devices), the units
none holds filled (only when degraded answers are allowed and the region has a fill); any other missing tensor makes
the request fail with `DeviceFailedError` naming the device and stage at the root of the loss. Stages whose outputs
nobody needs are not run: standby replicas run only for a loss, hot ones on every request.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np

from edgesplit.errors import DeviceFailedError, PlanError
from edgesplit.layout import Combine, Fill, Part, Region, ReplicaMode
from edgesplit.plan import Plan
from edgesplit.runtime.stages import Declared, StageSpec, bind_dims, declared, stage_specs, standby_specs

@dataclass(frozen=True)
class Piece:
    """A replica's output standing in for some of a lost part's units: `positions` index the part's units."""

    tensor: str
    positions: tuple[int, ...]


@dataclass(frozen=True)
class StandIn:
    """How the output of a lost part is rebuilt: from replicas' pieces, the units no piece holds filled.

    Concat: each piece is placed at its positions along `axis`; Sum: the pieces' partial sums are added (a lost
    unit contributes zeros); Max: the pieces' maxima. With no pieces, the output is filled whole from its declared
    type (symbolic dims bound per request). A region with fill "mean" puts each filled unit's calibrated mean in
    place of the zeros (Concat) or adds its mean contribution (Sum).
    """

    tensor: str
    combine: Combine
    axis: int
    size: int  # units of the part
    pieces: tuple[Piece, ...]
    dtype: str
    shape: tuple[int | str | None, ...]
    filled: tuple[int, ...]  # positions no piece holds
    siblings: tuple[str, ...] = ()  # the region's other part outputs: they give dimensions the inputs do not bind
    fill_values: tuple[tuple[float, ...], ...] = ()  # fill "mean": the calibrated value of each filled position
    fill_axis: int = 1  # Sum: the axis of the output the values lie along
    coded: str = ""  # the region's coded part output: the part is rebuilt as it minus `others`
    others: tuple[str, ...] = ()  # with `coded`: every other part's output

    @property
    def degraded(self) -> bool:
        return bool(self.filled)

    @property
    def sources(self) -> tuple[str, ...]:
        """Every tensor the rebuilt output is made from."""
        return (self.coded, *self.others) if self.coded else tuple(p.tensor for p in self.pieces)

    def array(self, pieces: Mapping[str, np.ndarray], dims: Mapping[str, int] | None = None) -> np.ndarray:
        return self._filled(self._rebuilt(pieces, dims or {}))

    def _rebuilt(self, pieces: Mapping[str, np.ndarray], dims: Mapping[str, int]) -> np.ndarray:
        if self.coded:
            return self._decoded(pieces)
        got = [pieces[p.tensor] for p in self.pieces]
        if not got:
            return np.zeros(self._shape(dims, pieces), dtype=self.dtype)
        if self.combine is Combine.SUM:
            return np.sum(got, axis=0, dtype=self.dtype) if len(got) > 1 else got[0]
        if self.combine is Combine.MAX:
            return np.maximum.reduce(got) if len(got) > 1 else got[0]
        if len(got) == 1 and self.pieces[0].positions == tuple(range(self.size)):
            return got[0]
        shape = list(got[0].shape)
        shape[self.axis] = self.size
        out = np.zeros(shape, dtype=got[0].dtype)
        for piece, value in zip(self.pieces, got):
            index = [slice(None)] * out.ndim
            index[self.axis] = list(piece.positions)
            out[tuple(index)] = value
        return out

    def _decoded(self, values: Mapping[str, np.ndarray]) -> np.ndarray:
        """The coded output minus every other part's (each over its own leading units), cut to this part's."""
        out = np.array(values[self.coded], dtype=np.float64)
        axis = self.axis % out.ndim
        for t in self.others:
            other = values[t]
            index = [slice(None)] * out.ndim
            index[axis] = slice(0, other.shape[axis])
            out[tuple(index)] -= other
        index = [slice(None)] * out.ndim
        index[axis] = slice(0, self.size)
        return out[tuple(index)].astype(values[self.coded].dtype)

    def _filled(self, out: np.ndarray) -> np.ndarray:
        """Zeros are there already; calibrated means replace them (Concat) or are added (Sum)."""
        if not self.fill_values:
            return out
        out = out.copy() if not out.flags.writeable else out
        if self.combine is Combine.CONCAT:  # one value per unit, or one per unit and channel (`fill_axis`)
            index = [slice(None)] * out.ndim
            index[self.axis] = list(self.filled)
            values = np.array(self.fill_values, dtype=out.dtype)  # [filled units, 1 or channels]
            shape = [1] * out.ndim
            shape[self.axis] = len(self.filled)
            if values.shape[1] > 1:
                shape[self.fill_axis] = values.shape[1]
                values = values if self.axis % out.ndim < self.fill_axis % out.ndim else values.T
            out[tuple(index)] = values.reshape(shape)
            return out
        shape = [1] * out.ndim
        shape[self.fill_axis] = -1
        return out + np.sum(self.fill_values, axis=0, dtype=out.dtype).reshape(shape)

    def _shape(self, dims: Mapping[str, int], values: Mapping[str, np.ndarray]) -> tuple[int, ...]:
        shape = [d if isinstance(d, int) else dims.get(d) if d else None for d in self.shape]
        like = next((values[t] for t in self.siblings if t in values and values[t].ndim == len(shape)), None)
        if like is not None:  # a live part of the region has the same shape (but the split axis, for a Concat)
            split = self.axis % len(shape) if self.combine is Combine.CONCAT else None
            shape = [like.shape[i] if d is None and i != split else d for i, d in enumerate(shape)]
        if any(d is None for d in shape):
            raise PlanError(f"cannot fill missing part {self.tensor!r}: its shape {list(self.shape)} has a dimension "
                            f"not bound by the model inputs ({dict(dims)})")
        return tuple(int(d) for d in shape)  # type: ignore[arg-type]


@dataclass(frozen=True)
class Route:
    """How one request runs under a failure set."""

    stages: tuple[StageSpec, ...]  # to run, in an order where producers come first
    stand_ins: Mapping[str, StandIn]  # lost part output -> how it is rebuilt
    missing_devices: tuple[str, ...]  # down devices some of whose units were filled

    @property
    def devices(self) -> frozenset[str]:
        return frozenset(s.device for s in self.stages)


@dataclass(frozen=True)
class _Lost:
    region: Region
    part: Part


def route(
    specs: tuple[StageSpec, ...],
    regions: tuple[Region, ...],
    declared: Mapping[str, Declared],
    inputs: Iterable[str],
    outputs: Iterable[str],
    down: frozenset[str] = frozenset(),
    allow_degraded: bool = False,
) -> Route:
    """The stages to run and the stand-ins to build when the devices in `down` are lost."""
    part_of = {p.output: _Lost(r, p) for r in regions for p in r.parts}
    available = set(inputs)
    stand_ins: dict[str, StandIn] = {}
    done: list[StageSpec] = []
    pending = [s for s in specs if s.device not in down]
    while True:  # a fixed point, because a replica may sit in a stage that comes later in the plan's order
        progress = True
        while progress:
            progress = False
            for spec in list(pending):
                whole = {t: _stand_in(part_of[t], available, declared) for t in spec.inputs
                         if t not in available and t in part_of and part_of[t].part.device in down}
                if all(t in available or (t in whole and not whole[t].degraded) for t in spec.inputs):
                    stand_ins.update(whole)
                    done.append(spec)
                    pending.remove(spec)
                    available.update(spec.outputs)
                    progress = True
        # only when nothing else can run: a replica that is still coming wins over a fill
        if not (allow_degraded and _fill_one(pending, part_of, available, declared, stand_ins)):
            break
    need = list(outputs)
    for t in need:
        if t not in available:
            raise _failure(t, specs, down, available, part_of, allow_degraded)
    kept = _needed(done, need, stand_ins, regions)
    inputs_kept = {t for k in kept for t in k.inputs}
    used = {t: s for t, s in stand_ins.items() if t in inputs_kept}
    missing = sorted({d for t, s in used.items() if s.degraded and (d := part_of[t].part.device) is not None})
    return Route(tuple(kept), used, tuple(missing))


def _stand_in(lost: _Lost, available: set[str], declared: Mapping[str, Declared]) -> StandIn:
    """The part rebuilt from the coded part when it and every other part are there, else from the replicas
    computed so far (largest first, each unit taken once)."""
    decoded = _decoded(lost, available, declared)
    if decoded is not None:
        return decoded
    position = {u: i for i, u in enumerate(lost.part.units)}
    pieces, have = [], set()
    for rep in sorted(lost.part.replicas, key=lambda r: -len(r.units)):
        if rep.output in available and not set(rep.units) <= have:
            if lost.region.combine is not Combine.CONCAT and set(rep.units) & have:
                continue  # overlapping partial sums would count a unit twice
            pieces.append(Piece(rep.output, tuple(position[u] for u in rep.units)))
            have.update(rep.units)
    d = declared.get(lost.part.output)
    if d is None and not pieces:
        raise PlanError(f"cannot fill missing part {lost.part.output!r}: no stage declares its type")
    filled = tuple(i for u, i in position.items() if u not in have)
    region = lost.region
    means = tuple(region.fill_values[u] for u in lost.part.units if u not in have) \
        if region.fill is Fill.MEAN and region.fill_values else ()
    return StandIn(lost.part.output, region.combine, region.axis, len(lost.part.units), tuple(pieces),
                   d.dtype if d else "float32", d.shape if d else (), filled,
                   tuple(p.output for p in region.parts if p is not lost.part), means, region.fill_axis)


def _decoded(lost: _Lost, available: set[str], declared: Mapping[str, Declared]) -> StandIn | None:
    region, coded = lost.region, lost.region.coded
    others = tuple(p.output for p in region.parts if p is not lost.part)
    if coded is None or coded.output not in available or not all(t in available for t in others):
        return None
    d = declared.get(lost.part.output)
    return StandIn(lost.part.output, region.combine, region.axis, len(lost.part.units), (),
                   d.dtype if d else "float32", d.shape if d else (), (), others, coded=coded.output, others=others)


def _fill_one(pending: list[StageSpec], part_of: Mapping[str, _Lost], available: set[str],
              declared: Mapping[str, Declared], stand_ins: dict[str, StandIn]) -> bool:
    """Rebuild, with fills, the missing part outputs of the first blocked stage that only lacks fillable parts."""
    for spec in pending:
        missing = [t for t in spec.inputs if t not in available]
        if all(t in part_of and part_of[t].region.fill is not None for t in missing):
            for t in missing:
                stand_ins[t] = _stand_in(part_of[t], available, declared)
                available.add(t)
            return True
    return False


def _failure(tensor: str, specs: tuple[StageSpec, ...], down: frozenset[str], available: set[str],
             part_of: Mapping[str, _Lost], allow_degraded: bool) -> DeviceFailedError:
    device, stage = _root(tensor, specs, down, available)
    message = f"device {device!r} is down and stage {stage!r} has no live replica or fallback"
    fillable = sorted({x.region.name for t, x in part_of.items() if t not in available and x.region.fill})
    if fillable and not allow_degraded:
        message += f"; region(s) {fillable} could be answered degraded (allow degraded answers to get fills)"
    return DeviceFailedError(device, stage, message)


def _needed(done: list[StageSpec], outputs: list[str], stand_ins: Mapping[str, StandIn],
            regions: tuple[Region, ...]) -> list[StageSpec]:
    """The stages the outputs need, and every stage of a hot replica (computed on every request)."""
    hot = {r.output for region in regions for r in region.replicas if r.mode is ReplicaMode.HOT}
    need = set(outputs) | hot
    kept = []
    for spec in reversed(done):
        if need.intersection(spec.outputs):
            kept.append(spec)
            for t in spec.inputs:
                need.update(stand_ins[t].sources) if t in stand_ins else need.add(t)
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
class DeviceLate:
    """The device's stage had not finished by the request's deadline: routed around, not declared dead."""

    device: str
    stage: str
    request: int
    at: float = field(default_factory=time.monotonic)


@dataclass(frozen=True)
class DeviceCaughtUp:
    """A late device finished what it owed and answered a ping: it takes requests again."""

    device: str
    at: float = field(default_factory=time.monotonic)


@dataclass(frozen=True)
class RequestFailed:
    request: int
    device: str
    stage: str
    message: str
    at: float = field(default_factory=time.monotonic)


Event = DeviceLost | DeviceRejoined | DeviceLate | DeviceCaughtUp | RequestFailed


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
        self.standbys = standby_specs(plan)
        self.regions = plan.regions
        self.declared = declared(self.specs)
        self.inputs = tuple(t.name for t in plan.inputs)
        self.outputs = tuple(t.name for t in plan.outputs)
        self.allow_degraded = allow_degraded
        self._routes: dict[frozenset[str], Route | DeviceFailedError] = {}

    def route(self, down: frozenset[str] = frozenset()) -> Route:
        if down not in self._routes:
            try:
                self._routes[down] = route(self.stand_by(down), self.regions, self.declared, self.inputs,
                                           self.outputs, down, self.allow_degraded)
            except DeviceFailedError as exc:
                self._routes[down] = exc
        found = self._routes[down]
        if isinstance(found, DeviceFailedError):
            raise DeviceFailedError(found.device, found.stage, str(found))
        return found

    def stand_by(self, down: frozenset[str]) -> tuple[StageSpec, ...]:
        """The stages, each on a down device replaced by its first standby on a live one."""
        return tuple(next((b for b in self.standbys if b.name == s.name and b.device not in down), s)
                     if s.device in down else s for s in self.specs)

    def dims(self, arrays: Mapping[str, object]) -> dict[str, int]:
        return bind_dims({t: self.declared[t] for t in self.inputs if t in self.declared}, arrays)

    def spec(self, name: str) -> StageSpec:
        return next(s for s in self.specs if s.name == name)
