"""Late devices for the Ray executor: who did not finish within the deadline, routes around them, and when they
are used again.

A request still unanswered at its deadline has *late stages*: stages whose inputs are all there but whose outputs
are not. Their devices become late (`DeviceLate`): not dead, but routed around (`around_late`) by this request and
by every request after it, so the request is answered from replicas or fill (or fails) within the deadline plus
`Session.margin`. A late device owes the calls abandoned on it; once they have all finished and it answers a ping,
it has caught up (`DeviceCaughtUp`) and takes requests again.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import ray
from ray.exceptions import RayError

from edgesplit.errors import DeviceFailedError
from edgesplit.runtime.failures import DeviceCaughtUp, Event, Route, Router


@dataclass
class _Owed:
    refs: list[Any] = field(default_factory=list)  # outputs of calls abandoned on the device
    ping: Any = None


class LateDevices:
    """Devices that missed a deadline but are not known dead; polled without blocking."""

    def __init__(self, ping: Callable[[str], Any], emit: Callable[[Event], None]) -> None:
        self._ping = ping
        self._emit = emit
        self._owed: dict[str, _Owed] = {}

    def __contains__(self, device: object) -> bool:
        return device in self._owed

    def __bool__(self) -> bool:
        return bool(self._owed)

    @property
    def devices(self) -> frozenset[str]:
        return frozenset(self._owed)

    def add(self, device: str, refs: list[Any]) -> bool:
        """Note calls a device owes; True when the device was not late before."""
        new = device not in self._owed
        owed = self._owed.setdefault(device, _Owed())
        owed.refs.extend(refs)
        owed.ping = None  # caught up only after these too
        return new

    def forget(self, device: str) -> None:
        self._owed.pop(device, None)

    def poll(self) -> tuple[list[str], list[str]]:
        """(caught up, died): a device whose owed calls are all done is pinged; one that answers has caught up,
        one whose ping fails has died."""
        back, died = [], []
        for device, owed in list(self._owed.items()):
            if owed.refs:
                _, owed.refs = ray.wait(owed.refs, num_returns=len(owed.refs), timeout=0, fetch_local=False)
                if owed.refs:
                    continue
            if owed.ping is None:
                owed.ping = self._ping(device)
                continue
            if not ray.wait([owed.ping], timeout=0)[0]:
                continue
            del self._owed[device]
            try:
                ray.get(owed.ping)
            except RayError:
                died.append(device)
                continue
            back.append(device)
            self._emit(DeviceCaughtUp(device))
        return back, died


def around_late(router: Router, down: frozenset[str], late: frozenset[str]) -> Route:
    """The route that leaves out the down and the late devices; when none exists, the error says which late
    device's stage has no replica or fallback."""
    try:
        return router.route(down | late)
    except DeviceFailedError as exc:
        if exc.device not in late:
            raise
        raise DeviceFailedError(exc.device, exc.stage, f"device {exc.device!r} is late (no answer within the "
                                f"deadline) and stage {exc.stage!r} has no live replica or fallback") from None


def is_ready(value: Any) -> bool:
    """A driver-side value is there already; an ObjectRef once its call has finished (with or without an error)."""
    if not isinstance(value, ray.ObjectRef):
        return True
    return bool(ray.wait([value], timeout=0, fetch_local=False)[0])


def late_stages(route: Route, values: Mapping[str, Any]) -> list[str]:
    """Names of the route's stages whose inputs are all there but whose outputs are not (the rebuild of a
    stand-in counts as part of the stage that reads it: its inputs are the pieces)."""
    late = []
    for spec in route.stages:
        outputs = [values[t] for t in spec.outputs if t in values]
        if all(is_ready(v) for v in outputs):
            continue
        inputs = []
        for t in spec.inputs:
            stand_in = route.stand_ins.get(t)
            inputs.extend([p.tensor for p in stand_in.pieces] if stand_in is not None else [t])
        if all(is_ready(values[t]) for t in inputs if t in values):
            late.append(spec.name)
    return late


def untouched(route: Route, refs: Mapping[str, list[Any]], late: frozenset[str]) -> dict[str, list[Any]]:
    """The calls of a route that a re-route around `late` can keep: stages on other devices whose inputs do not
    come, even through other stages, from a late device."""
    tainted: set[str] = set()
    keep = {}
    for spec in route.stages:
        inputs = set()
        for t in spec.inputs:
            stand_in = route.stand_ins.get(t)
            inputs.update([p.tensor for p in stand_in.pieces] if stand_in is not None else [t])
        if spec.device in late or inputs & tainted:
            tainted.update(spec.outputs)
        elif spec.name in refs:
            keep[spec.name] = refs[spec.name]
    return keep


def calls_on(route: Route, refs: Mapping[str, list[Any]], devices: frozenset[str]) -> dict[str, list[Any]]:
    """The outputs of a route's calls on each of `devices` (what a re-route abandons there)."""
    found: dict[str, list[Any]] = {}
    for spec in route.stages:
        if spec.device in devices and spec.name in refs:
            found.setdefault(spec.device, []).extend(refs[spec.name])
    return found
