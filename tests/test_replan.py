"""Re-planning when a device leaves for good: the plan for the survivors (search seeded with the current plan), and
a Ray stream that switches to it without losing or repeating a request."""

from __future__ import annotations

import numpy as np
import pytest

import edgesplit
from edgesplit.cluster import Cluster, Device
from edgesplit.errors import DeviceFailedError, InputError
from edgesplit.planner import plan as plan_of
from edgesplit.runtime.common import RunResult, random_inputs
from edgesplit.runtime.local import LocalExecutor, run_whole_model
from edgesplit.search.cost import CostModel
from edgesplit.search.nsga import Pick
from edgesplit.search.replan import Replanner, objectives_for, seed_layout, survivors
from test_ray import answers_meanwhile, executor, kill, ray_instance  # noqa: F401 - ray_instance: a fixture


@pytest.fixture(scope="module")
def resnet3(zoo_graphs):
    """The zoo ResNet in three contiguous thirds on dev0, dev1, dev2."""
    graph = zoo_graphs["resnet"]
    n = len(graph.layers)
    placement = {layer.name: f"dev{3 * i // n}" for i, layer in enumerate(graph.layers)}
    return graph, plan_of(graph, Cluster.simulated(3), placement)


@pytest.fixture(scope="module")
def replanner(resnet3):
    graph, plan = resnet3
    return Replanner(graph, plan.cluster, population=16, generations=8)


def _requests(plan, n):
    return [random_inputs(plan.inputs, {"batch": 1}, seed=i) for i in range(n)]


def _matches_whole_model(answer, graph, x):
    assert isinstance(answer, RunResult) and not answer.degraded, answer
    reference = run_whole_model(graph.model, x)
    for name, value in reference.items():
        np.testing.assert_allclose(answer.outputs[name], value, rtol=1e-4, atol=1e-5)


def test_the_lost_devices_layers_join_the_range_before_them(resnet3):
    graph, plan = resnet3
    left = survivors(plan.cluster, {"dev1"})
    assert left.names == ("dev0", "dev2")
    seed = seed_layout(plan, graph, left)
    placed = seed.placement(graph, left)
    for layer in graph.layers:
        was = plan.placement[layer.name]
        assert placed[layer.name] == ("dev0" if was == "dev1" else was)
    # the first device lost: its layers go to the next range
    left = survivors(plan.cluster, {"dev0"})
    placed = seed_layout(plan, graph, left).placement(graph, left)
    assert [placed[layer.name] for layer in graph.layers] == \
        [{"dev0": "dev1"}.get(plan.placement[layer.name], plan.placement[layer.name]) for layer in graph.layers]


def test_the_new_plan_runs_on_the_survivors_and_matches_the_model(resnet3, replanner):
    graph, plan = resnet3
    new = replanner(plan, frozenset({"dev1"}))
    assert set(new.devices) <= {"dev0", "dev2"} and "dev1" not in new.cluster.names
    x = _requests(new, 1)[0]
    _matches_whole_model(LocalExecutor(new, threads=1).run(x), graph, x)
    one = replanner(plan, frozenset({"dev0", "dev1"}))
    assert one.devices == ("dev2",)
    _matches_whole_model(LocalExecutor(one, threads=1).run(x), graph, x)


@pytest.mark.parametrize("how", [Pick.LATENCY, Pick.THROUGHPUT, Pick.MEMORY])
def test_the_replan_goes_on_with_the_point_it_was_told_to_pick(resnet3, replanner, how):
    """The picked point is at least as good by its measure as the seed (the old plan, the lost ranges joined)."""
    graph, plan = resnet3
    picky = Replanner(graph, plan.cluster, objectives_for(how), how, population=16, generations=8,
                      profiles=replanner.profiles)
    new = picky(plan, frozenset({"dev1"}))
    left = survivors(plan.cluster, {"dev1"})
    seed = CostModel(graph, left, picky.profiles, picky.overheads).costs(seed_layout(plan, graph, left))
    measure = {Pick.LATENCY: lambda c: c.latency, Pick.THROUGHPUT: lambda c: c.period,
               Pick.MEMORY: lambda c: c.max_memory}[how]
    assert picky.costs is not None and measure(picky.costs) <= measure(seed) * (1 + 1e-9)
    assert how.value in picky.why and set(new.devices) <= {"dev0", "dev2"}


def test_no_plan_for_no_devices_or_too_little_memory(resnet3, replanner):
    graph, plan = resnet3
    with pytest.raises(InputError, match="every device of the plan is lost"):
        replanner(plan, frozenset(plan.cluster.names))
    with pytest.raises(InputError, match="expected lost devices among"):
        replanner(plan, frozenset({"dev9"}))
    small = Cluster(tuple(Device(f"dev{i}", 1, int(graph.total_param_bytes * 0.6)) for i in range(3)))
    tight = plan_of(graph, small, dict(plan.placement))
    with pytest.raises(InputError, match="MiB short"):
        replanner(tight, frozenset({"dev1", "dev2"}))


@pytest.mark.ray
def test_a_device_gone_for_good_is_replanned_around_and_no_request_is_lost_or_repeated(ray_instance, resnet3,
                                                                                       replanner):
    from edgesplit.runtime.replan import Replanning

    graph, plan = resnet3
    requests = _requests(plan, 24)
    make = lambda p: executor(p, dataplane="tasks", rejoin_interval=None)  # noqa: E731
    stream = Replanning(make(plan), replanner, grace=0.5, make_executor=make, max_in_flight=4)
    try:
        answers = answers_meanwhile(stream.stream(requests), {3: lambda: kill(stream.ex, "dev1")})
    finally:
        stream.ex.close()
    assert len(answers) == len(requests)
    for answer, x in zip(answers, requests):  # each request's own answer, in order, in full
        _matches_whole_model(answer, graph, x)
    (switch,) = stream.switches
    assert switch.lost == ("dev1",) and "dev1" not in switch.plan.devices
    assert 0 < switch.planning_seconds < switch.first_answer_seconds
    report = stream.report()
    assert (report.full, report.degraded, report.failed) == (len(requests), 0, 0)


@pytest.mark.ray
def test_a_device_that_rejoins_within_the_grace_period_keeps_the_plan(ray_instance, resnet3, replanner):
    from edgesplit.runtime.replan import Replanning

    graph, plan = resnet3
    requests = _requests(plan, 12)
    first = executor(plan, dataplane="tasks", rejoin_interval=0.2)  # a killed actor is started again: it rejoins
    stream = Replanning(first, replanner, grace=120.0, make_executor=lambda p: pytest.fail("re-planned"),
                        max_in_flight=4)
    try:
        answers = answers_meanwhile(stream.stream(requests), {2: lambda: kill(first, "dev2")})
    finally:
        first.close()
    assert stream.switches == [] and stream.ex is first
    for answer, x in zip(answers, requests):
        _matches_whole_model(answer, graph, x)
    assert [type(e).__name__ for e in stream.report().events] == ["DeviceLost", "DeviceRejoined"]


@pytest.mark.ray
def test_when_no_plan_fits_the_survivors_the_held_requests_get_their_errors(ray_instance, resnet3, replanner):
    from edgesplit.runtime.replan import Replanning

    _, plan = resnet3
    requests = _requests(plan, 10)
    first = executor(plan, dataplane="tasks", rejoin_interval=None)
    refuse = lambda p, lost: replanner(p, frozenset(p.cluster.names))  # noqa: E731 - "every device is lost"
    stream = Replanning(first, refuse, grace=0.2, make_executor=lambda p: pytest.fail("deployed"), max_in_flight=4)
    try:
        answers = answers_meanwhile(stream.stream(requests), {1: lambda: kill(first, "dev2")})
    finally:
        first.close()
    assert len(answers) == len(requests) and stream.switches == []
    assert all(isinstance(a, RunResult) for a in answers[:2])
    errors = [a for a in answers if not isinstance(a, RunResult)]
    assert errors and all(isinstance(e, DeviceFailedError) and e.device == "dev2" for e in errors)
    assert frozenset({"dev2"}) in stream.failed_replans


def test_replan_options_are_checked_before_anything_runs(zoo_dir, tmp_path):
    from click.testing import CliRunner

    from edgesplit.cli import main

    def cli(*args):
        return CliRunner().invoke(main, [str(a) for a in args])

    assert cli("partition", zoo_dir / "resnet.onnx", "--devices", 2, "-o", tmp_path / "plan").exit_code == 0
    x = tmp_path / "x.npz"
    plan = edgesplit.Plan.load(tmp_path / "plan", trust_unsigned=True)
    np.savez(x, **random_inputs(plan.inputs, {"batch": 1}))
    run = ("run", tmp_path / "plan", "--input", x, "-o", tmp_path / "y.npz")
    result = cli(*run, "--replan-after", 5)
    assert result.exit_code == 2 and "expected --backend ray, got --backend local" in result.output
    result = cli(*run, "--model", zoo_dir / "resnet.onnx")
    assert result.exit_code == 2 and "expected --replan-after with it" in result.output
    result = cli(*run, "--backend", "ray", "--replan-pick", "throughput")
    assert result.exit_code == 2 and "expected --replan-after with it" in result.output
    result = cli(*run, "--backend", "ray", "--replan-after", 5, "--model", zoo_dir / "vgg.onnx")
    assert result.exit_code == 2 and "is not the model this plan was made from" in result.output
    assert not (tmp_path / "y.npz").exists()
