"""A stream that outlives devices leaving for good: when a device has been down for `grace` seconds without
rejoining, a new plan for the devices that remain is made (`edgesplit.search.replan.Replanner`), deployed, and
the stream goes on with it.

No request is lost or answered twice, and answers come in submission order. A request the old plan could not
answer because of the loss (a DeviceFailedError: no replica, no degraded answers) is held, the answers after it
waiting their turn, and sent again once the lost device rejoins or the new plan runs; one answered (in full or
degraded) is never sent again. Requests in flight when the switch is due are answered by the old plan first. If
no plan can be made for the devices left, the held requests get the old plan's errors.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, replace

from edgesplit.errors import DeviceFailedError, EdgesplitError
from edgesplit.plan import Plan
from edgesplit.runtime.common import RunResult
from edgesplit.runtime.failures import DeviceLost, DeviceRejoined, Event, RequestFailed, RunReport, Tally
from edgesplit.runtime.ray import RayExecutor
from edgesplit.runtime.raysession import Session

log = logging.getLogger("edgesplit")
WAIT_STEP = 0.05  # seconds between looks at a down device while requests wait for it


@dataclass(frozen=True)
class Switch:
    """One re-plan: the devices lost, the new plan, and how long each step took (seconds)."""

    lost: tuple[str, ...]
    plan: Plan
    planning_seconds: float  # search and cut
    deploy_seconds: float  # the new plan's actors started (the old ones closed)
    first_answer_seconds: float  # from the loss's detection to the first answer of the new plan
    resent: int  # requests the old plan could not answer, answered by the new one


class Replanning:
    """Streams requests on `executor` and switches to a new plan `replan(plan, lost)` when devices stay down for
    `grace` seconds; `make_executor(plan)` deploys it (the old executor's Ray instance is handed over)."""

    def __init__(self, executor: RayExecutor, replan: Callable[[Plan, frozenset[str]], Plan], grace: float,
                 make_executor: Callable[[Plan], RayExecutor], max_in_flight: int | None = None,
                 chunk: int = 1) -> None:
        if not grace >= 0:
            raise EdgesplitError(f"expected a grace period of at least 0 seconds, got {grace}")
        self.ex = executor
        self.replan, self.grace, self.make_executor = replan, grace, make_executor
        self.max_in_flight, self.chunk = max_in_flight, chunk
        self.switches: list[Switch] = []
        self.failed_replans: dict[frozenset[str], str] = {}  # lost set -> why no plan was made for it
        self.tally = Tally()
        self._lost_at: dict[str, float] = {}  # down device -> when its loss was detected
        self._first_answer_after: float | None = None  # the switched loss's detection, until the new plan answers
        executor.listeners.append(self._event)

    def report(self) -> RunReport:
        return self.tally.report()

    def _event(self, e: Event) -> None:
        if isinstance(e, DeviceLost):
            self._lost_at.setdefault(e.device, e.at)
        elif isinstance(e, DeviceRejoined):
            self._lost_at.pop(e.device, None)
        if not isinstance(e, RequestFailed):
            self.tally.event(e)

    def _holding(self) -> bool:
        """Whether requests that fail for want of a down device wait: it may rejoin, or a new plan take over."""
        return bool(self.ex.down) and frozenset(self.ex.down) not in self.failed_replans

    def _due(self) -> bool:
        """A device has been down for longer than the grace period (and no re-plan for the devices down failed)."""
        now = time.monotonic()
        return self._holding() and any(now - t >= self.grace for d, t in self._lost_at.items() if d in self.ex.down)

    def stream(self, inputs: Iterable[Mapping[str, object]]) -> Iterator[RunResult | EdgesplitError]:
        """Answers in submission order, each request answered once."""
        source, ids = iter(inputs), itertools.count()
        held: dict[int, Mapping[str, object]] = {}  # requests to send again, by index
        answers: dict[int, RunResult | EdgesplitError] = {}
        done, more = 0, True

        def feed(fed: deque[tuple[int, Mapping[str, object]]]) -> Iterator[Mapping[str, object]]:
            nonlocal more
            while not self._due() and not (held and not self._holding()):
                item = next(source, None)
                if item is None:
                    more = False
                    return
                fed.append((next(ids), item))
                yield item

        def run(items: Iterable[Mapping[str, object]], fed: deque[tuple[int, Mapping[str, object]]]):
            nonlocal done
            session = Session(self.ex, self.max_in_flight, listen=False, chunk=self.chunk)
            for answer in session.stream(items):
                i, request = fed.popleft()
                if isinstance(answer, DeviceFailedError) and self._holding():
                    held[i] = request
                    continue
                answers[i] = answer
                self._answered(answer)
                while done in answers:
                    yield answers.pop(done)
                    done += 1

        while more or held:
            fed: deque[tuple[int, Mapping[str, object]]] = deque()
            yield from run(feed(fed), fed)
            while held and self._holding() and not self._due():
                self.ex.probe()
                time.sleep(WAIT_STEP)
            if self._due():
                self._switch(len(held))
            if held:
                again = deque(sorted(held.items()))
                held.clear()
                yield from run([r for _, r in again], again)

    def _answered(self, answer: RunResult | EdgesplitError) -> None:
        if not isinstance(answer, RunResult):
            self.tally.failed += 1
            return
        self.tally.answered(answer.degraded)
        if self._first_answer_after is not None:
            last = self.switches[-1]
            self.switches[-1] = replace(last, first_answer_seconds=time.monotonic() - self._first_answer_after)
            self._first_answer_after = None

    def _switch(self, held: int) -> None:
        lost = frozenset(self.ex.down)
        detected = min(self._lost_at.get(d, time.monotonic()) for d in lost)
        old = self.ex
        t0 = time.monotonic()
        try:
            plan = self.replan(old.plan, lost)
        except EdgesplitError as exc:
            return self._failed(lost, f"no new plan for the devices left after losing {sorted(lost)}: {exc}")
        t1 = time.monotonic()
        started, old.started_ray = old.started_ray, False  # the new executor runs on the same Ray instance
        try:
            new = self.make_executor(plan)
        except EdgesplitError as exc:
            return self._failed(lost, f"the new plan for the devices left after losing {sorted(lost)} did not "
                                      f"start: {exc}")
        finally:
            old.started_ray = started
        new.started_ray, old.started_ray = old.started_ray or new.started_ray, False
        old.close()
        t2 = time.monotonic()
        self.ex = new
        new.listeners.append(self._event)
        self._lost_at.clear()
        self._first_answer_after = detected
        self.switches.append(Switch(tuple(sorted(lost)), plan, t1 - t0, t2 - t1, -1.0, held))
        log.info(f"re-planned without {sorted(lost)}: {len(plan.stages)} stages on {list(plan.devices)}")

    def _failed(self, lost: frozenset[str], why: str) -> None:
        log.warning(why)
        self.failed_replans[lost] = why
