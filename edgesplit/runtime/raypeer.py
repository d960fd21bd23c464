"""The driver's side of the peer data plane (`runtime.peer`) on Ray: the mesh of device connections, each route's
programs, and one call per device per chunk of requests."""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import ray
from ray.exceptions import RayError

from edgesplit.runtime.failures import Route
from edgesplit.runtime.peer import PeerError, Program, programs


class PeerFailed(RayError):
    """A device gave an exchange up (a peer went away, or the driver aborted it)."""


@dataclass(eq=False)
class PeerCall:
    """A chunk sent through the mesh: one call per device."""

    xid: int
    refs: dict[str, Any]  # device -> ObjectRef of its peer_run


class PeerMesh:
    """Every device connected to every other; rebuilt (a new epoch) after a device is lost and back."""

    def __init__(self, inputs: Sequence[str], outputs: Sequence[str], timeout: float) -> None:
        self.inputs, self.outputs = tuple(inputs), tuple(outputs)
        self.timeout = timeout
        self.epoch = 0
        self.devices: frozenset[str] = frozenset()  # those the current epoch connected; empty: to build
        self._seq: dict[str, itertools.count] = {}
        self._keys: dict[tuple[tuple[str, str], ...], str] = {}  # a route's (stage, device)s -> its programs' key
        self._programs: dict[str, dict[str, Program]] = {}  # key -> device -> program
        self._installed: set[tuple[str, str]] = set()  # (route key, device)
        self._xids = itertools.count()

    def invalidate(self) -> None:
        self.devices = frozenset()

    def build(self, actors: Mapping[str, Any]) -> None:
        self.epoch += 1
        addresses = dict(zip(actors, ray.get([a.peer_open.remote() for a in actors.values()], timeout=self.timeout)))
        ray.get([a.peer_connect.remote(self.epoch, addresses) for a in actors.values()], timeout=self.timeout)
        self.devices = frozenset(actors)
        self._seq = {d: itertools.count() for d in actors}
        self._installed.clear()

    def dispatch(self, actors: Mapping[str, Any], route: Route, chunk: Sequence[Mapping[str, np.ndarray]],
                 **options: Any) -> PeerCall:
        """Send a chunk through the mesh (built first if it is not), one call per device; `options` go to every
        device's `peer_run`."""
        if not self.devices or not route.devices <= self.devices:
            self.build(actors)
        key = self._keys.setdefault(tuple((s.name, s.device) for s in route.stages), f"route{len(self._keys)}")
        progs = self._programs.get(key)
        if progs is None:
            progs = self._programs[key] = programs(route.stages, self.inputs, self.outputs)
        missing = [d for d in progs if (key, d) not in self._installed]
        ray.get([actors[d].peer_program.remote(key, progs[d]) for d in missing], timeout=self.timeout)
        self._installed.update((key, d) for d in missing)
        xid = next(self._xids)
        refs = {}
        for d, prog in progs.items():
            feeds = [{t: request[t] for t in prog.feeds} for request in chunk]
            refs[d] = actors[d].peer_run.remote(self.epoch, next(self._seq[d]), key, xid, feeds, **options)
        return PeerCall(xid, refs)

    def ready(self, call: PeerCall, timeout: float) -> bool:
        refs = list(call.refs.values())
        done, _ = ray.wait(refs, num_returns=len(refs), timeout=timeout)
        return len(done) == len(refs)

    def outputs_of(self, call: PeerCall, chunk: Sequence[Mapping[str, np.ndarray]]) -> list[list[np.ndarray]]:
        """Each model output's values for the chunk's requests (raises the RayError of a device that failed)."""
        answers = ray.get(list(call.refs.values()))
        for answer in answers:
            if isinstance(answer, PeerError):
                raise PeerFailed(str(answer))
        merged: list[dict[str, np.ndarray]] = [dict(request) for request in chunk]  # an input may be an output
        for per_request in answers:
            for i, values in enumerate(per_request):
                merged[i].update(values)
        return [[m[t] for m in merged] for t in self.outputs]

    def late(self, actors: Mapping[str, Any], call: PeerCall, timeout: float) -> dict[str, str]:
        """The devices holding an exchange up (device -> the stage it runs, or "" when it does not answer within
        `timeout`): not waiting for a peer or for its turn, and not finished."""
        pending = [d for d, ref in call.refs.items() if not ray.wait([ref], timeout=0)[0]]
        asked = {d: actors[d].peer_doing.remote(call.xid) for d in pending}
        answered, _ = ray.wait(list(asked.values()), num_returns=len(asked), timeout=timeout)
        late = {}
        for d, ref in asked.items():
            if ref not in answered:
                late[d] = ""
                continue
            doing, what = ray.get(ref)
            if doing == "run":
                late[d] = what
        return late

    def abort(self, actors: Mapping[str, Any], call: PeerCall, down: Sequence[str] = ()) -> None:
        """Tell every device still up to give the exchange up (no wait: a stalled device is told when it resumes)."""
        for d in call.refs:
            if d not in down and d in actors:
                actors[d].peer_abort.remote(call.xid)
