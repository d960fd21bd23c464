"""Failure-set semantics (edgesplit.runtime.failures) through the local executor, the fast reference.

A hand-built horizontal model (`zoo.replicated_conv`): a Conv split into two output-channel parts A and B + Concat,
with a replica of A, recorded in `edgesplit.regions`. test_ray.py imports the plans below.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import edgesplit
from edgesplit.bench import zoo
from edgesplit.cluster import Cluster
from edgesplit.errors import DeviceFailedError, PlanError
from edgesplit.pipeline import partition
from edgesplit.runtime.common import random_inputs
from edgesplit.runtime.failures import DeviceLost, Tally, parse_regions
from edgesplit.runtime.local import LocalExecutor, run_whole_model

STEM = ["stem_conv", "stem_relu"]
TAIL = ["relu2", "gap", "flatten", "fc"]
# horizontal: parts on dev1 / dev2, the replica of A alone on dev3 (cold standby)
HORIZONTAL = {"dev0": [*STEM, "concat1", *TAIL], "dev1": ["conv1_a"], "dev2": ["conv1_b"], "dev3": ["conv1_a_r"]}
# hybrid: also cut vertically; the replica of A sits on part B's device, the tail has its own device
HYBRID = {"dev0": [*STEM, "concat1"], "dev1": ["conv1_a"], "dev2": ["conv1_b", "conv1_a_r"], "dev3": TAIL}


def split_conv_plan(mapping: dict, zero_b: bool = False):
    graph = edgesplit.load(zoo.replicated_conv(zero_b=zero_b))
    return partition(graph, Cluster.simulated(4), mapping), graph


@pytest.fixture(scope="module")
def horizontal():
    return split_conv_plan(HORIZONTAL)


@pytest.fixture(scope="module")
def hybrid():
    return split_conv_plan(HYBRID)


@pytest.fixture(scope="module")
def without_b() -> onnx.ModelProto:
    return edgesplit.load(zoo.replicated_conv(zero_b=True)).model


def _x(plan, batch: int = 2, seed: int = 1):
    return random_inputs(plan.inputs, {"batch": batch}, seed=seed)


@pytest.mark.parametrize("which", ["horizontal", "hybrid"])
def test_no_failure_matches_whole_model(which, request):
    plan, graph = request.getfixturevalue(which)
    x = _x(plan)
    got = LocalExecutor(plan).run(x)
    np.testing.assert_allclose(got.outputs["y"], run_whole_model(graph.model, x)["y"], rtol=1e-5, atol=1e-5)
    assert not got.degraded


@pytest.mark.parametrize("which", ["horizontal", "hybrid"])
def test_dead_part_with_live_replica_gives_full_answer(which, request):
    plan, graph = request.getfixturevalue(which)
    x = _x(plan)
    got = LocalExecutor(plan, failed={"dev1"}).run(x)
    assert got.missing_devices == ()
    np.testing.assert_allclose(got.outputs["y"], run_whole_model(graph.model, x)["y"], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("which", ["horizontal", "hybrid"])
def test_dead_part_without_replica_is_filled_with_zeros_when_allowed(which, request, without_b):
    plan, _ = request.getfixturevalue(which)
    x = _x(plan, batch=3)
    got = LocalExecutor(plan, failed={"dev2"}, allow_degraded=True).run(x)
    assert got.degraded and got.missing_devices == ("dev2",)
    np.testing.assert_allclose(got.outputs["y"], run_whole_model(without_b, x)["y"], rtol=1e-5, atol=1e-5)


def test_dead_part_without_replica_is_an_error_naming_the_device(horizontal):
    plan, _ = horizontal
    with pytest.raises(DeviceFailedError, match="dev2.*degraded") as info:
        LocalExecutor(plan, failed={"dev2"}).run(_x(plan))
    assert info.value.device == "dev2" and info.value.stage == plan.device_stages("dev2")[0].name


def test_part_and_its_replica_both_dead_fills_both(horizontal):
    plan, graph = horizontal
    got = LocalExecutor(plan, allow_degraded=True).run(_x(plan), failed={"dev1", "dev2", "dev3"})
    assert got.missing_devices == ("dev1", "dev2")  # dev3 only held a replica
    bias = numpy_helper.to_array(graph.initializers["bf"])  # all channels zero: only the classifier's bias is left
    np.testing.assert_allclose(got.outputs["y"], np.broadcast_to(bias, (2, 10)), rtol=1e-6)


def test_dead_combine_is_an_error_even_when_degraded_is_allowed(horizontal):
    plan, _ = horizontal
    with pytest.raises(DeviceFailedError, match="dev0"):
        LocalExecutor(plan, allow_degraded=True).run(_x(plan), failed={"dev0"})


def test_vertical_plan_with_a_dead_device_is_an_error(zoo_graphs):
    plan = partition(zoo_graphs["resnet"], Cluster.simulated(2))
    dead = plan.stages[-1].device
    with pytest.raises(DeviceFailedError) as info:
        LocalExecutor(plan, failed={dead}, allow_degraded=True).run(random_inputs(plan.inputs))
    assert info.value.device == dead


def test_replica_is_cold_standby_in_the_full_route(horizontal):
    plan, _ = horizontal
    ex = LocalExecutor(plan)
    assert "dev3" not in ex.router.route().devices
    assert ex.router.route(frozenset({"dev1"})).sources == {"a": "a_r"}
    assert set(ex.router.route(frozenset({"dev1"})).devices) == {"dev0", "dev2", "dev3"}


def test_replica_output_is_exposed_as_a_stage_output(hybrid):
    plan, _ = hybrid
    (stage,) = [s for s in plan.stages if "conv1_a_r" in s.layers]
    assert stage.device == "dev2" and "a_r" not in stage.outputs  # the plain cut keeps it internal
    spec = LocalExecutor(plan).router.spec(stage.name)
    assert "a_r" in spec.outputs


@pytest.mark.parametrize("bad, message", [
    ([{"name": "r", "combine": "c", "fill": "mean", "parts": []}], "expected fill"),
    ([{"name": "r", "combine": "c", "parts": [{"nodes": []}]}], "missing"),
])
def test_malformed_regions_are_plan_errors(bad, message):
    with pytest.raises(PlanError, match=message):
        parse_regions(bad)


def test_report_counts_and_recovery_time():
    tally = Tally()
    tally.answered(degraded=False)
    tally.event(DeviceLost("dev1", "s1_dev1", 3, "died", at=tally.start))
    tally.answered(degraded=True)
    tally.failed += 1
    report = tally.report()
    assert (report.full, report.degraded, report.failed, report.requests) == (1, 1, 1, 3)
    assert len(report.recovery_seconds) == 1 and report.recovery_seconds[0] >= 0
    assert "1 degraded" in report.summary()


def test_plans_from_the_rewrite_package_degrade_or_fail_per_device(zoo_graphs):
    graph = zoo_graphs["resnet"]
    plan = partition(graph, Cluster.simulated(3), strategy="hybrid")
    x = random_inputs(plan.inputs, {"batch": 2})
    ex = LocalExecutor(plan, allow_degraded=True)
    full = ex.run(x).outputs["output"]
    np.testing.assert_allclose(full, run_whole_model(graph.model, x)["output"], rtol=1e-4, atol=1e-5)
    degraded = []
    for device in plan.devices:
        with pytest.raises(DeviceFailedError, match=device):
            LocalExecutor(plan).run(x, failed={device})
        try:
            got = ex.run(x, failed={device})
        except DeviceFailedError as exc:
            assert exc.device == device
            continue
        assert got.missing_devices == (device,) and not np.allclose(got.outputs["output"], full)
        degraded.append(device)
    assert degraded, "a device holding only parts should give degraded answers"
