"""Failure-set semantics (edgesplit.runtime.failures) through the local executor, the fast reference.

`zoo.split_conv` with conv1 split by output channels into parts A (dev1) and B (dev2) and a standby replica of A
built through the API (planner.with_replicas). test_ray.py imports the plans below.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

import edgesplit
from conftest import resign
from edgesplit.bench import zoo
from edgesplit.cluster import Cluster
from edgesplit.errors import DeviceFailedError, PlanError
from edgesplit.layout import ReplicaMode
from edgesplit.planner import partition
from edgesplit.place.parts import place
from edgesplit.rewrite.base import SplitRequest
from edgesplit.rewrite.cnn import apply
from edgesplit.runtime.common import random_inputs
from edgesplit.runtime.failures import DeviceLost, Tally
from edgesplit.runtime.local import LocalExecutor, run_whole_model

CHANNELS = 4
REST = ["stem_conv", "stem_relu", "relu1", "conv2", "relu2", "gap", "flatten", "fc"]
# horizontal: parts on dev1 / dev2, the replica of A alone on dev3, everything else (and the combine) on dev0
HORIZONTAL = {"parts": ("dev1", "dev2"), "replica": "dev3", "rest": dict.fromkeys(REST, "dev0"), "combine": "dev0"}
# hybrid: also cut vertically; the replica of A sits on part B's device, the tail has its own device
HYBRID = {"parts": ("dev1", "dev2"), "replica": "dev2", "combine": "dev0",
          "rest": {**dict.fromkeys(REST[:2], "dev0"), **dict.fromkeys(REST[2:], "dev3")}}


def split_layout(graph, cluster, layer: str, kind: str, devices: tuple[str, ...], rest, combine=None):
    """A horizontal split through the API: rewrite, parts on their devices, the rest as given."""
    split = apply(graph, [SplitRequest(kind, (layer,), len(devices))])
    combines = dict.fromkeys((n for r in split.regions for n in r.combine_nodes), combine) if combine else {}
    return place(split, cluster, {f"{kind}:{layer}": devices}, {**rest, **combines})


def split_conv_plan(layout: dict, mode: ReplicaMode = ReplicaMode.STANDBY):
    return zoo.replicated_split_conv(layout["parts"], layout["replica"], layout["rest"], layout["combine"],
                                     Cluster.simulated(4), mode, channels=CHANNELS)


@pytest.fixture(scope="module")
def horizontal():
    return split_conv_plan(HORIZONTAL)


@pytest.fixture(scope="module")
def hybrid():
    return split_conv_plan(HYBRID)


@pytest.fixture(scope="module")
def without_b() -> onnx.ModelProto:
    return edgesplit.load(zoo.split_conv(CHANNELS, zero_units=tuple(range(CHANNELS, 2 * CHANNELS)))).model


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
    nothing = edgesplit.load(zoo.split_conv(CHANNELS, zero_units=tuple(range(2 * CHANNELS)))).model
    np.testing.assert_allclose(got.outputs["y"], run_whole_model(nothing, _x(plan))["y"], rtol=1e-5, atol=1e-6)


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
    (part_a,) = [p for p in plan.regions[0].parts if p.device == "dev1"]
    stand_in = ex.router.route(frozenset({"dev1"})).stand_ins[part_a.output]
    assert [p.tensor for p in stand_in.pieces] == [part_a.replicas[0].output] and not stand_in.degraded
    assert set(ex.router.route(frozenset({"dev1"})).devices) == {"dev0", "dev2", "dev3"}


def test_hot_replica_runs_on_every_request():
    plan, _ = split_conv_plan(HORIZONTAL, ReplicaMode.HOT)
    assert "dev3" in LocalExecutor(plan).router.route().devices


def test_replica_output_is_a_stage_output(hybrid):
    plan, _ = hybrid
    replica = plan.regions[0].parts[0].replicas[0]
    (stage,) = [s for s in plan.stages if set(replica.nodes) <= set(s.layers)]
    assert stage.device == "dev2" and replica.output in stage.outputs
    assert not set(stage.layers) & set(plan.regions[0].parts[1].nodes)  # a stage of its own: standby costs nothing


@pytest.mark.parametrize("edit, message", [
    (lambda r: r.update(fill="median"), "fill: expected one of"),
    (lambda r: r.update(fill="mean"), "fill 'mean' needs one non-empty value vector per unit"),
    (lambda r: r["parts"][0].pop("units"), "missing field 'units'"),
    (lambda r: r["parts"][0].update(units=[0, 99]), "outside"),
    (lambda r: r["parts"][0]["replicas"][0].update(units=[7]), "subset of the part's units"),
    (lambda r: r["parts"][0]["replicas"][0].update(device="nope"), "not in the cluster"),
    (lambda r: r.update(kind="diagonal"), "kind: expected one of"),
])
def test_malformed_regions_are_refused_at_load(horizontal, tmp_path, edit, message):
    plan, _ = horizontal
    plan.save(tmp_path / "plan")
    path = tmp_path / "plan" / "plan.json"
    d = json.loads(path.read_text())
    edit(d["regions"][0])
    path.write_text(json.dumps(d))
    resign(path.parent)
    with pytest.raises(PlanError, match=message):
        edgesplit.Plan.load(tmp_path / "plan")


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
