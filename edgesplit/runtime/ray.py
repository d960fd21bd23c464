"""The ray executor: one long-lived actor per device, tensors from actor to actor, many requests in flight.

The driver feeds inputs and collects outputs; every intermediate tensor is an ObjectRef handed from the producing
actor's call to the consuming actor's call (or, in the steady state, a Ray Compiled Graph channel). Results come
back in submission order. A device that dies is marked down, every request in flight that used it is re-routed
(`failures.route`: replica, else fill if degraded answers are allowed, else a `DeviceFailedError`), and a down
device is probed until it answers again, when it rejoins. A device whose stage has not finished by a request's
deadline is late (`rayroute`): routed around in the same way, without being declared dead, until it catches up.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np
import ray
from ray.exceptions import RayError

from edgesplit.errors import EdgesplitError, PlanError
from edgesplit.layout import Dataplane
from edgesplit.plan import Plan
from edgesplit.runtime import raycluster
from edgesplit.runtime.common import RunResult
from edgesplit.runtime.failures import (
    DeviceLate,
    DeviceLost,
    DeviceRejoined,
    Event,
    Route,
    Router,
)
from edgesplit.runtime.raygraph import cause_line, quiet_teardown
from edgesplit.runtime.raypeer import PeerMesh
from edgesplit.runtime.rayroute import LateDevices
from edgesplit.runtime.raysession import MAX_IN_FLIGHT, Session
from edgesplit.runtime.rayworker import DeviceWorker
from edgesplit.signing import Key

WARMUP_TIMEOUT = 120.0
START_TIMEOUT = 180.0  # seconds for every device's actor to start (a busy 2-core machine took over 60)
COMPILE_COOLDOWN = 5.0
TEARDOWN_WAIT = 2.0
COMPILED_MARGIN = 1.1  # seconds of ordinary actor calls after a failure before a compiled graph is built again
LATE_MARGIN = 1.0  # seconds a request re-routed around a late device gets for the stages it still runs


class RayExecutor:
    """Deploys a Plan on Ray (a cluster at `address`, else a local instance simulating the plan's devices). Each
    device checks the plan's signature with its own key before it loads a stage (`signing.check_stages`)."""

    def __init__(self, plan: Plan, address: str | None = None, threads: int | None = None, allow_degraded: bool = False,
                 deadline: float = 30.0, dataplane: Dataplane | str = Dataplane.AUTO, rejoin_interval: float | None = 1.0,
                 connect_timeout: float = 10.0, ready_timeout: float = START_TIMEOUT, ping_timeout: float = 5.0,
                 key: Key | None = None, trust_unsigned: bool = False, margin: float = LATE_MARGIN) -> None:
        try:
            plane = Dataplane.parse(dataplane, "dataplane")
        except ValueError as exc:
            raise EdgesplitError(str(exc)) from None
        if not deadline > 0:
            raise EdgesplitError(f"expected a deadline > 0 seconds, got {deadline}")
        problems = plan.validate()
        if problems:
            raise PlanError("refusing an invalid plan:\n  " + "\n  ".join(problems))
        self.plan = plan
        self.seal = plan.device_seal(key)
        self.trust_unsigned = trust_unsigned
        self.router = Router(plan, allow_degraded)
        self.deadline = deadline
        self.margin = margin  # a request is answered within its deadline plus this per re-route around a late device
        self.ping_timeout = min(ping_timeout, deadline)  # a live device answers a ping at once, even when busy
        self.dataplane = plane
        self.chosen: Dataplane | None = None if plane is Dataplane.AUTO else plane  # auto: decided by calibrate()
        self.calibration: dict[str, float] = {}
        self.compile_error = ""  # why the last attempt at a compiled graph failed (then actor calls are used)
        self.rejoin_interval = rejoin_interval
        self.threads = threads
        self.started_ray = raycluster.connect(plan.cluster, plan.devices, address, connect_timeout)
        self.cpus = raycluster.local_cpus(plan.cluster, plan.devices) if threads is None else {}
        self.down: dict[str, str] = {}  # device -> why ("died" | "silent")
        self.late = LateDevices(lambda d: self.actors[d].ping.remote(), self._emit)
        self.listeners: list[Callable[[Event], None]] = []
        self._probes: dict[str, ray.ObjectRef] = {}
        self._last_probe = 0.0
        self._compiled: Any = None
        self._sized_for = (0, 0)  # the chunk size and bytes per request the compiled graph's channels hold
        self._compile_after = 0.0
        self._teardown: threading.Thread | None = None
        self._default: Session | None = None
        self.mesh = PeerMesh(self.router.inputs, self.router.outputs, timeout=self.ping_timeout * 5)
        specs = (*self.router.specs, *self.router.standbys)  # a device holds its stages and its standbys
        devices = tuple(dict.fromkeys(s.device for s in specs))
        self._models = {d: ray.put([(s.name, s.inputs, s.outputs, s.model) for s in specs if s.device == d])
                        for d in devices}
        self.actors = {d: self._spawn(d) for d in devices}
        self._wait_ready(ready_timeout)

    # ---- actors ----

    def _spawn(self, device: str) -> Any:
        threads = self.threads or self.plan.cluster.device(device).cores
        pinned = DeviceWorker.options(resources={raycluster.resource(device): 0.001})
        return pinned.remote(device, [self._models[device]], threads, self.cpus.get(device, ()),
                             self.plan.cluster.device(device).providers, self.seal, self.trust_unsigned)

    def _wait_ready(self, timeout: float) -> None:
        problems = raycluster.wait_ready(self.actors, timeout, cause_line)
        if problems:
            self.close()
            raise raycluster.ClusterError("device actors did not start:\n  " + "\n  ".join(problems))

    def check(self, devices: Iterable[str]) -> dict[str, str]:
        """Ping devices (not already down); those that fail are 'died', those that do not answer in time 'silent'."""
        refs = {d: self.actors[d].ping.remote() for d in devices if d not in self.down}
        if not refs:
            return {}
        ready, _ = ray.wait(list(refs.values()), num_returns=len(refs), timeout=self.ping_timeout)
        lost = {}
        for d, ref in refs.items():
            if ref not in ready:
                lost[d] = "silent"
                continue
            try:
                ray.get(ref)
            except RayError:
                lost[d] = "died"
        return lost

    def mark_down(self, device: str, reason: str, stage: str, request: int) -> None:
        if device not in self.down:
            self.down[device] = reason
            self.late.forget(device)
            self._probes.pop(device, None)
            self.drop_compiled()
            self.mesh.invalidate()
            self._emit(DeviceLost(device, stage, request, reason))

    def mark_late(self, device: str, stage: str, request: int, owed: list[Any]) -> None:
        """Route around a device until the calls it `owed` have finished and it answers a ping."""
        if device in self.down:
            return
        if self.late.add(device, owed):
            self.drop_compiled()
            self._emit(DeviceLate(device, stage, request))

    def probe(self, force: bool = False) -> tuple[str, ...]:
        """Give down devices a chance to rejoin and late ones to catch up (non-blocking); returns the devices
        that rejoined."""
        for device in self.late.poll()[1]:
            self.mark_down(device, "died", "", -1)
        now = time.monotonic()
        due = self.rejoin_interval is not None and now - self._last_probe >= self.rejoin_interval
        if not self.down or not (force or due):
            return ()
        self._last_probe = now
        back = []
        for d, reason in list(self.down.items()):
            ref = self._probes.get(d)
            if ref is None:
                if reason == "died":  # a fresh actor: Ray places it once a node advertising the device is alive
                    self.actors[d] = self._spawn(d)
                self._probes[d] = self.actors[d].ping.remote()
                continue
            if not ray.wait([ref], timeout=0)[0]:
                continue
            del self._probes[d]
            try:
                ray.get(ref)
            except RayError:
                self.down[d] = "died"
                continue
            del self.down[d]
            back.append(d)
            self._emit(DeviceRejoined(d))
        return tuple(back)

    def rejoin(self, timeout: float = 30.0) -> tuple[str, ...]:
        """Wait up to `timeout` for every down device to answer again; returns those that rejoined."""
        back: list[str] = []
        end = time.monotonic() + timeout
        while self.down and time.monotonic() < end:
            back.extend(self.probe(force=True))
            time.sleep(0.05)
        return tuple(back)

    def _emit(self, event: Event) -> None:
        for listener in self.listeners:
            listener(event)

    def peer_for(self, route: Route) -> bool:
        """Whether a request on `route` goes through the peer mesh: chosen, and every device up and on time (a
        rebuilt part is made on actor calls)."""
        return self.chosen == Dataplane.PEER and not self.down and not self.late and not route.stand_ins

    # ---- compiled graph for the steady state (all devices up) ----

    def compiled_for(self, route: Route, arrays: Mapping[str, list[np.ndarray]], chunk: int = 1) -> Any:
        if self.chosen != Dataplane.COMPILED or self.down or self.late or route.stand_ins:
            return None
        request_bytes = sum(values[0].nbytes for values in arrays.values() if values)
        if self._compiled is not None and (chunk > self._sized_for[0] or request_bytes > self._sized_for[1]):
            self.drop_compiled(cooldown=False)  # its channels are too small for these chunks: build a larger one
        if self._compiled is None:
            if time.monotonic() < self._compile_after:
                return None
            if self._teardown is not None:
                self._teardown.join(TEARDOWN_WAIT)  # an actor taking part in two graphs at once is refused
            if self._teardown is not None and self._teardown.is_alive():
                return None
            self._compiled = self._compile(route, arrays, chunk, request_bytes)
            self._sized_for = (chunk, request_bytes)
        return self._compiled

    def channel_bytes(self, route: Route, chunk: int, request_bytes: int) -> int:
        """A compiled graph's channel buffer, large enough for a chunk's largest message (the requests' inputs, or
        one stage's outputs), for requests of `request_bytes` of inputs each. Ray grows a buffer that is too small by itself, but (Ray 2.60) after many chunks
        larger than the buffers the actors' processes created from their own default, teardown found an actor's
        loop still running and waited 30 s for it."""
        from ray.dag import DAGContext

        nbytes = {t.tensor: t.nbytes for t in self.plan.transfers}
        planned = sum(nbytes.get(t, 0) for t in self.router.inputs)
        scale = max(1.0, request_bytes / planned) if planned else 1.0  # a larger batch or sequence than planned
        largest = max([planned, *(sum(nbytes.get(t, 0) for t in spec.outputs) for spec in route.stages)])
        return max(DAGContext.get_current().buffer_size_bytes, int(largest * scale * chunk * 1.25) + 2**16)

    def _compile(self, route: Route, arrays: Mapping[str, list[np.ndarray]], chunk: int, request_bytes: int) -> Any:
        from ray.dag import InputNode, MultiOutputNode

        without = [spec.name for spec in route.stages if not spec.inputs]
        if without:  # nothing in the graph would tell them how many requests a chunk holds
            self.compile_error = f"stages without inputs {without} run on ordinary actor calls"
            self._compile_after = time.monotonic() + COMPILE_COOLDOWN
            return None
        with InputNode() as inp:
            nodes: dict[str, Any] = {t: inp[i] for i, t in enumerate(self.router.inputs)}
            for spec in route.stages:
                k = len(spec.outputs)
                call = self.actors[spec.device].run.options(num_returns=k)
                node = call.bind(spec.name, *(nodes[t] for t in spec.inputs))
                nodes.update(zip(spec.outputs, [node[i] for i in range(k)] if k > 1 else [node]))
            dag = MultiOutputNode([nodes[t] for t in self.router.outputs])
        try:
            nbytes = self.channel_bytes(route, chunk, request_bytes)
            ray.get([self.actors[d].set_channel_bytes.remote(nbytes) for d in route.devices],
                    timeout=self.ping_timeout * 5)
            compiled = dag.experimental_compile(_max_inflight_executions=MAX_IN_FLIGHT, _buffer_size_bytes=nbytes)
            # the first execution (one request) sets the channels up (seconds); keep that out of any deadline
            first = {t: values[:1] for t, values in arrays.items()}
            ray.get(compiled.execute(*(first[t] for t in self.router.inputs)), timeout=WARMUP_TIMEOUT)
            return compiled
        except Exception as exc:  # noqa: BLE001 - any compile failure falls back to ordinary actor calls
            self.compile_error = f"cannot build a Ray Compiled Graph for this plan: {cause_line(exc)}"
            self._compile_after = time.monotonic() + COMPILE_COOLDOWN
            return None

    @property
    def compiled_graph_active(self) -> bool:
        return self._compiled is not None

    def calibrate(self, inputs: Mapping[str, object], burst: int = 12, rounds: int = 2, chunk: int = 1,
                  max_in_flight: int | None = None) -> dict[str, float]:
        """Requests per second of short pipelined bursts (at least 3 chunks) on each dataplane (best of `rounds`,
        alternating); the faster one is kept.

        Compiled Graphs cut the per-hop cost several times but their channel readers poll: on a device with few
        cores that polling takes CPU from the stages, so which one wins depends on the plan and the devices. The
        peer mesh makes one call per device per request and one hop per exchange."""
        rates = {Dataplane.TASKS: 0.0, Dataplane.PEER: 0.0, Dataplane.COMPILED: 0.0}
        burst = max(burst, 3 * chunk)
        for _ in range(rounds):
            for plane in rates:
                self.chosen = plane
                session = Session(self, max_in_flight or burst, listen=False, chunk=chunk)
                list(session.stream([inputs] * 2))
                if plane is Dataplane.COMPILED and self._compiled is None:
                    continue  # no compiled graph for this plan
                t0 = time.perf_counter()
                answers = list(session.stream([inputs] * burst))
                if not any(isinstance(a, EdgesplitError) for a in answers):
                    rates[plane] = max(rates[plane], burst / (time.perf_counter() - t0))
                if plane is Dataplane.COMPILED:
                    self.drop_compiled(cooldown=False)  # its polling must not slow the next tasks burst
        # compiled must win clearly: it also costs a rebuild (seconds) after every failure, and CPU while idle
        best = max((Dataplane.PEER, Dataplane.TASKS), key=lambda plane: rates[plane])
        faster = rates[Dataplane.COMPILED] > COMPILED_MARGIN * rates[best]
        self.chosen = Dataplane.COMPILED if faster else best
        self.calibration = rates
        return rates

    def drop_compiled(self, cooldown: bool = True) -> None:
        """Tear the compiled graph down in the background: a silent actor must not stall the driver."""
        if self._compiled is not None:
            dag = self._compiled
            self._teardown = threading.Thread(target=quiet_teardown, args=(dag,), daemon=True)
            self._teardown.start()
            self._compile_after = time.monotonic() + (COMPILE_COOLDOWN if cooldown else 0.0)
        self._compiled = None

    # ---- running ----

    def session(self, max_in_flight: int | None = None, chunk: int = 1) -> Session:
        return Session(self, max_in_flight, chunk=chunk)

    def run(self, inputs: Mapping[str, object]) -> RunResult:
        self._default = self._default or self.session(1)
        return self._default.run(inputs)

    def stats(self) -> dict[str, dict[str, Any]]:
        """Per live device: process memory (before and after loading its stages), bytes received, stage seconds."""
        live = {d: a for d, a in self.actors.items() if d not in self.down}
        refs = {d: a.stats.remote() for d, a in live.items()}
        return dict(zip(refs, ray.get(list(refs.values()), timeout=self.ping_timeout * 5)))

    def close(self) -> None:
        if self._compiled is not None:  # the actors go too: a loop stuck on a channel must not hold the close up
            quiet_teardown(self._compiled, kill_actors=True)
            self._compiled = None
        for actor in getattr(self, "actors", {}).values():
            ray.kill(actor)
        self.actors = {}
        if self.started_ray:
            ray.shutdown()
            self.started_ray = False

    def __enter__(self) -> RayExecutor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
