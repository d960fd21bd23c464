"""Requests in flight on a RayExecutor: chunks of requests sent through the devices (actor calls, a compiled
graph, or the peer mesh), answered in submission order, re-routed around devices that die or are late."""

from __future__ import annotations

import itertools
import time
from collections import deque
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import ray
from ray.exceptions import GetTimeoutError, RayChannelTimeoutError, RayError

from edgesplit.errors import DeviceFailedError, EdgesplitError, InputError, StageError
from edgesplit.runtime.common import RunResult, check_inputs
from edgesplit.runtime.failures import RequestFailed, Route, RunReport, Tally
from edgesplit.runtime.raygraph import CompiledLate, cause_line, is_channel_error
from edgesplit.runtime.raypeer import PeerCall
from edgesplit.runtime.rayroute import around_late, calls_on, late_stages, untouched

if TYPE_CHECKING:
    from edgesplit.runtime.ray import RayExecutor

MAX_IN_FLIGHT = 32  # the compiled graph is built for at most this many executions in flight
LATE_POLL = 0.1  # seconds between looks at late devices while waiting
LATE_PROBE = 0.5  # seconds a device on the peer mesh has to say what it is doing for a late exchange


@dataclass(eq=False)
class _Chunk:
    """Consecutive requests sent through the devices together: one actor call per stage carries them all."""

    ids: list[int]
    arrays: list[dict[str, np.ndarray]] = field(default_factory=list)
    route: Route | None = None
    refs: dict[str, list[Any]] = field(default_factory=dict)  # stage -> output refs
    values: dict[str, Any] = field(default_factory=dict)  # tensor -> its value or ref, for this route
    outputs: list[Any] = field(default_factory=list)
    compiled: Any = None  # a CompiledDAGRef when sent through the compiled graph, until it is read
    via_compiled: bool = False
    peer: PeerCall | None = None  # when sent through the peer mesh, until it is answered or re-routed
    tasks_only: bool = False  # the peer mesh failed this chunk once: actor calls tell which stage is at fault
    error: EdgesplitError | None = None  # the answer to every request of the chunk
    head_since: float | None = None
    late_at: float | None = None  # when the stages still running are late: the deadline, then each margin after

    def inputs(self, names: Iterable[str]) -> dict[str, list[np.ndarray]]:
        return {t: [a[t] for a in self.arrays] for t in names}


class Session:
    """Requests in flight on a RayExecutor, answered in order; `report()` counts full / degraded / failed.

    `chunk` > 1 sends up to that many consecutive requests through each device in one call, which divides Ray's
    per-call cost (bench_ray's per-hop overhead) by the chunk; a device still runs them one at a time, so results
    are unchanged. At most `max_in_flight` chunks are in flight, and the deadline covers each request of a chunk:
    a chunk of n has n times the deadline. A chunk that a stage fails on is sent again one request at a time, so a
    request that fails fails alone."""

    def __init__(self, executor: RayExecutor, max_in_flight: int | None = None, listen: bool = True,
                 chunk: int = 1) -> None:
        if chunk < 1:
            raise EdgesplitError(f"expected a chunk of at least 1 request, got {chunk}")
        self.ex = executor
        self.max_in_flight = min(max_in_flight or max(4, 2 * len(executor.router.specs)), MAX_IN_FLIGHT)
        self.chunk = chunk
        self.tally = Tally()
        self._ids = itertools.count()
        if listen:
            executor.listeners.append(self.tally.event)

    def report(self) -> RunReport:
        return self.tally.report()

    def run(self, inputs: Mapping[str, object]) -> RunResult:
        (result,) = list(self.stream([inputs], raise_errors=True))
        return result

    def stream(self, inputs: Iterable[Mapping[str, object]],
               raise_errors: bool = False) -> Iterator[RunResult | EdgesplitError]:
        """Answers in submission order: a RunResult, or the error that request got (raised if `raise_errors`)."""
        source = iter(inputs)
        if self.ex.chosen is None and not self.ex.down:
            first = next(source, None)
            if first is None:
                return
            source = itertools.chain([first], source)
            try:
                self.ex.calibrate(check_inputs(self.ex.plan.inputs, first), chunk=self.chunk,
                                  max_in_flight=self.max_in_flight)
            except InputError:
                pass  # that request will get its error in turn; calibrate on a later stream
        queue: deque[_Chunk] = deque()
        pending: deque[Mapping[str, object]] = deque()
        more = True
        while True:
            while more and len(queue) < self.max_in_flight:
                while len(pending) < self.chunk:
                    item = next(source, None)
                    if item is None:
                        more = False
                        break
                    pending.append(item)
                queue.extend(self._submit(pending))
            if not queue:
                return
            answers = self._collect(queue)
            queue.popleft()
            for answer in answers:
                if raise_errors and isinstance(answer, EdgesplitError):
                    raise answer
                yield answer

    def _submit(self, pending: deque[Mapping[str, object]]) -> list[_Chunk]:
        """Chunks of the pending requests, in order; a request with bad inputs is a chunk of its own, answered
        with its error."""
        chunks: list[_Chunk] = []
        valid: _Chunk | None = None
        while pending:
            req_id = next(self._ids)
            try:
                arrays = check_inputs(self.ex.plan.inputs, pending.popleft())
            except InputError as exc:
                chunks.append(_Chunk([req_id], error=exc))
                valid = None
                continue
            if valid is None:
                valid = _Chunk([])
                chunks.append(valid)
            valid.ids.append(req_id)
            valid.arrays.append(arrays)
        for c in chunks:
            if c.error is None:
                self._dispatch(c)
        return chunks

    def _dispatch(self, req: _Chunk, keep: Mapping[str, list[Any]] | None = None) -> None:
        """Send a chunk through its route; the calls in `keep` (stage -> refs) were made already and are reused."""
        ex = self.ex
        ex.probe()
        if req.peer is not None:  # sent through the mesh before: the devices give that exchange up
            ex.mesh.abort(ex.actors, req.peer, tuple(ex.down))
        req.refs, req.outputs, req.compiled, req.via_compiled, req.peer = {}, [], None, False, None
        try:
            route = req.route = around_late(ex.router, frozenset(ex.down), ex.late.devices)
        except DeviceFailedError as exc:
            req.error = exc
            return
        size = len(req.arrays)
        inputs = req.inputs(ex.router.inputs)
        dag = ex.compiled_for(route, inputs, self.chunk)
        if dag is not None:
            try:
                req.compiled = dag.execute(*(inputs[t] for t in ex.router.inputs))
                req.via_compiled = True
                return
            except RayError:  # the graph broke since the last request (an actor died): find out who, go on without
                self._lose(req, deque(), ex.check(route.devices), rerun_compiled=True)
                req.head_since = req.late_at = None
                return self._dispatch(req)
        if not req.tasks_only and ex.peer_for(route):
            try:
                req.peer = ex.mesh.dispatch(ex.actors, route, req.arrays)
                return
            except RayError:  # the mesh could not be built or programmed: this chunk goes on actor calls
                ex.mesh.invalidate()
                req.tasks_only = True
        dims = [ex.router.dims(a) for a in req.arrays] if route.stand_ins else []
        values: dict[str, Any] = dict(inputs)
        req.values = values
        for spec in route.stages:
            for t in spec.inputs:  # a lost part is rebuilt on the device that reads it
                if t in route.stand_ins and t not in values:
                    s = route.stand_ins[t]
                    # with no pieces, a live sibling part gives the dims the inputs do not bind
                    names = list(s.sources) or [n for n in s.siblings if n in values][:1]
                    values[t] = ex.actors[spec.device].rebuild.remote(s, dims, names, *(values[n] for n in names))
            if keep and spec.name in keep:
                req.refs[spec.name] = keep[spec.name]
            else:
                args = [values[t] for t in spec.inputs]
                k = len(spec.outputs)
                out = ex.actors[spec.device].run.options(num_returns=k).remote(spec.name, *args, size=size)
                req.refs[spec.name] = [out] if k == 1 else list(out)
            values.update(zip(spec.outputs, req.refs[spec.name]))
        outputs = [values[t] for t in ex.router.outputs]
        req.outputs = [v if isinstance(v, ray.ObjectRef) else ray.put(v) for v in outputs]

    def _collect(self, queue: deque[_Chunk]) -> list[RunResult | EdgesplitError]:
        while True:
            req = queue[0]  # a chunk whose stage failed is replaced by its requests, one chunk each
            if req.error is not None:
                self.tally.failed += len(req.ids)
                device, stage = getattr(req.error, "device", ""), getattr(req.error, "stage", "")
                for i in req.ids:
                    self.tally.event(RequestFailed(i, device, stage, str(req.error)))
                return [req.error] * len(req.ids)
            if req.head_since is None:
                req.head_since = time.monotonic()
            if req.late_at is None:
                req.late_at = req.head_since + self.ex.deadline * len(req.ids)
            self.ex.probe()
            left = max(0.0, req.late_at - time.monotonic())
            try:
                values = self._wait(req, left)
            except CompiledLate:
                self._on_late(req, queue)
                continue
            except RayError as exc:
                self._on_error(req, queue, exc)
                continue
            if values is not None:
                assert req.route is not None
                answers: list[RunResult | EdgesplitError] = []
                for i in range(len(req.ids)):
                    result = RunResult({t: v[i] for t, v in zip(self.ex.router.outputs, values)},
                                       req.route.missing_devices)
                    self.tally.answered(result.degraded)
                    answers.append(result)
                return answers
            if time.monotonic() >= req.late_at:
                self._on_late(req, queue)

    def _wait(self, req: _Chunk, left: float) -> list[list[np.ndarray]] | None:
        if req.peer is not None:
            return self.ex.mesh.outputs_of(req.peer, req.arrays) if self.ex.mesh.ready(req.peer, left) else None
        if req.compiled is not None:
            ref, req.compiled = req.compiled, None  # a CompiledDAGRef can be read only once
            try:
                # the arrays read are views of the graph's output buffers, which stay taken while a view lives:
                # an answer kept by the caller would stall the graph once every buffer is held
                return [[np.array(a, copy=True) for a in values] for values in ray.get(ref, timeout=left)]
            except (RayChannelTimeoutError, GetTimeoutError) as exc:
                raise CompiledLate(str(exc)) from None
        step = min(left, self.ex.rejoin_interval) if self.ex.down and self.ex.rejoin_interval else left
        step = min(step, LATE_POLL) if self.ex.late else step
        ready, _ = ray.wait(req.outputs, num_returns=len(req.outputs), timeout=step)
        if len(ready) < len(req.outputs):
            return None
        return ray.get(req.outputs)

    def _on_error(self, req: _Chunk, queue: deque[_Chunk], exc: RayError) -> None:
        assert req.route is not None
        compiled = req.via_compiled
        lost = self.ex.check(req.route.devices)
        if req.peer is not None:  # find out on actor calls (or around the lost device) what went wrong
            req.tasks_only = not lost
            if not lost:
                return self._dispatch(req)
        if not lost and compiled:
            pass  # every device answers: retry on actor calls, which can tell which stage stalls or fails
        elif not lost and not is_channel_error(exc):
            if len(req.ids) > 1:  # one request's failure must not fail the rest of its chunk
                self._split(req, queue)
                return
            device, stage = self._failed_stage(req)
            req.error = StageError(device, stage, req.ids[0], cause_line(exc))
            return
        self._lose(req, queue, lost, rerun_compiled=compiled)

    def _split(self, req: _Chunk, queue: deque[_Chunk]) -> None:
        """Send the head chunk's requests again, one per chunk, in its place."""
        singles = [_Chunk([i], [arrays]) for i, arrays in zip(req.ids, req.arrays)]
        for single in singles:
            self._dispatch(single)
        queue.popleft()
        queue.extendleft(reversed(singles))

    def _on_late(self, req: _Chunk, queue: deque[_Chunk]) -> None:
        """The head chunk missed its deadline: route it, and every chunk in flight through the same late devices,
        around them (keeping the calls already made elsewhere); it then gets `margin` more seconds."""
        ex = self.ex
        req.late_at = time.monotonic() + ex.margin
        if req.peer is not None:  # the devices say who holds the exchange up; the mesh's chunks go on actor calls
            for device, stage in ex.mesh.late(ex.actors, req.peer, timeout=min(ex.ping_timeout, LATE_PROBE)).items():
                first = next(s.name for s in req.route.stages if s.device == device) if req.route else ""
                ex.mark_late(device, stage or first, req.ids[0], [req.peer.refs[device]])
            for r in queue:
                if r.peer is not None:
                    r.tasks_only = True
                    self._dispatch(r)
            return
        if req.via_compiled:  # a compiled graph cannot tell which stage is late: run on actor calls, which can
            ex.drop_compiled()
            for r in queue:
                if r.error is None and r.route is not None and (r is req or r.compiled is not None):
                    self._dispatch(r)
            return
        assert req.route is not None
        device_of = {s.name: s.device for s in req.route.stages}
        for stage in late_stages(req.route, req.values):
            ex.mark_late(device_of[stage], stage, req.ids[0], [])
        late = ex.late.devices
        for r in queue:
            if r.error is not None or r.route is None or not (r.compiled is not None or r.route.devices & late):
                continue
            for device, refs in calls_on(r.route, r.refs, late).items():
                ex.late.add(device, refs)
            self._dispatch(r, keep=untouched(r.route, r.refs, late))

    def _lose(self, req: _Chunk, queue: deque[_Chunk], lost: Mapping[str, str], rerun_compiled: bool) -> None:
        for device, reason in lost.items():
            stage = next((s.name for s in req.route.stages if s.device == device), "") if req.route else ""
            self.ex.mark_down(device, reason, stage, req.ids[0])
        if rerun_compiled:
            self.ex.drop_compiled()
        for r in queue:
            if r.error is None and r.route is not None and (
                    r is req or r.compiled is not None or rerun_compiled or r.route.devices & set(lost)):
                self._dispatch(r)
        req.head_since, req.late_at = time.monotonic(), None  # a re-run after a death gets a whole deadline

    def _failed_stage(self, req: _Chunk) -> tuple[str, str]:
        assert req.route is not None
        for spec in req.route.stages:
            try:
                ray.get(req.refs.get(spec.name, []), timeout=0)
            except (RayError, GetTimeoutError):
                return spec.device, spec.name
        return "?", "?"
