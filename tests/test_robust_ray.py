"""A replicated plan (k-of-n, the shipped MNIST CNN over 4 devices) on the Ray executor agrees with the in-process
evaluation of `edgesplit robustness`: a device killed mid-stream, and a device late for one request only."""

from __future__ import annotations

import time

import numpy as np
import pytest

from edgesplit.cluster import Cluster
from edgesplit.datasets import mnist_split, shipped_model
from edgesplit.graph import load
from edgesplit.planner import layout
from edgesplit.robust.evaluate import Samples, prepare, run_batched
from edgesplit.robust.importance import importance
from edgesplit.robust.policies import Policy
from edgesplit.runtime.common import RunResult
from edgesplit.runtime.failures import DeviceLate, DeviceLost
from edgesplit.runtime.local import LocalExecutor
from test_ray import answers_meanwhile, executor, kill, ray_instance, stall  # noqa: F401 - ray_instance: a fixture

pytestmark = pytest.mark.ray
BATCH, REQUESTS = 8, 10
DEAD = "dev2"
DEADLINE = 4.0


@pytest.fixture(scope="module")
def robust():
    """The k-of-n plan at r = 0.25, the requests (batches of test digits) and the in-process evaluation of the
    fault-free run and of DEAD's loss, per request."""
    test = mnist_split().test
    source, cluster = load(shipped_model("mnist_cnn")), Cluster.simulated(4)
    rewritten, placement = layout(source, cluster, strategy="horizontal")
    samples = Samples({"input": test.images[:BATCH * REQUESTS]}, test.labels[:BATCH * REQUESTS])
    study = prepare(rewritten, placement, cluster, source, samples, (1,))
    assert DEAD not in study.fatal
    plan = study.plan(Policy.K_OF_N, 0.25, importance(rewritten, "weight"))
    evaluator = LocalExecutor(plan, allow_degraded=True)
    free, lost = run_batched(evaluator, samples), run_batched(evaluator, samples, (DEAD,))
    requests = [samples.take(slice(i, i + BATCH)).inputs for i in range(0, len(samples), BATCH)]
    per_request = [(free[i:i + BATCH], lost[i:i + BATCH]) for i in range(0, len(samples), BATCH)]
    return plan, requests, per_request, evaluator.run(requests[0], failed=(DEAD,)).degraded


def check(answers, per_request, dead: str) -> tuple[int, int]:
    """Every request answered; a degraded answer is the evaluation of `dead`'s loss, a full one the fault-free
    evaluation (1e-5); returns (full, degraded)."""
    assert len(answers) == len(per_request) and all(isinstance(a, RunResult) for a in answers), answers
    for answer, (free, lost) in zip(answers, per_request):
        assert answer.missing_devices == ((dead,) if answer.degraded else ())
        np.testing.assert_allclose(answer.outputs["logits"], lost if answer.degraded else free, rtol=1e-5, atol=1e-5)
    degraded = sum(a.degraded for a in answers)
    return len(answers) - degraded, degraded


def caught_up(ex, device: str, timeout: float = 60.0) -> None:
    """Wait (on the executor's own probes) until a late device has finished what it owed and answered a ping."""
    end = time.monotonic() + timeout
    while device in ex.late.devices and time.monotonic() < end:
        ex.probe()
        time.sleep(0.05)
    assert device not in ex.late.devices, f"{device} still late after {timeout} s"


def test_a_device_killed_mid_stream_gives_the_evaluation_of_its_failure_set(ray_instance, robust):
    plan, requests, per_request, loss_degrades = robust
    assert loss_degrades  # r = 0.25: the units no copy holds are filled, so its loss shows
    with executor(plan, dataplane="tasks", allow_degraded=True, rejoin_interval=None) as ex:
        session = ex.session(4)
        answers = answers_meanwhile(session.stream(requests), {2: lambda: kill(ex, DEAD)})
        report = session.report()
    full, degraded = check(answers, per_request, DEAD)
    assert all(not a.degraded for a in answers[:3]) and all(a.degraded for a in answers[-3:])
    assert (report.full, report.degraded, report.failed) == (full, degraded, 0)
    assert [(type(e), e.device) for e in report.events if isinstance(e, DeviceLost)] == [(DeviceLost, DEAD)]


def test_a_device_late_for_one_request_is_routed_around_for_it_and_answers_the_next(ray_instance, robust):
    plan, requests, per_request, _ = robust
    with executor(plan, dataplane="tasks", allow_degraded=True, deadline=DEADLINE, rejoin_interval=0.2) as ex:
        session = ex.session(1)
        answers = [session.run(requests[0])]
        stall(ex, DEAD, DEADLINE + 1.0)  # busy past one request's deadline, then free
        answers.append(session.run(requests[1]))
        caught_up(ex, DEAD)
        answers += [session.run(x) for x in requests[2:]]
        report = session.report()
    check(answers, per_request, DEAD)
    assert [a.degraded for a in answers] == [False, True] + [False] * (REQUESTS - 2)
    kinds = [type(e) for e in report.events]
    assert DeviceLate in kinds and DeviceLost not in kinds
