"""Vertical failover: standby copies of whole stages on other devices (edgesplit.standby), chosen automatically or
by hand with memory budgets checked, recorded in plan.json, and used by both executors when a device is lost."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import resign
from test_ray import answers_meanwhile, executor, ray_instance  # noqa: F401 - ray_instance is a fixture

from edgesplit.cli import main
from edgesplit.cluster import Cluster, Device
from edgesplit.errors import DeviceFailedError, PlacementError, PlanError
from edgesplit.plan import Plan
from edgesplit.planner import partition
from edgesplit.runtime.common import RunResult, random_inputs
from edgesplit.runtime.failures import DeviceLost
from edgesplit.runtime.local import LocalExecutor, run_whole_model
from edgesplit.standby import Standby


@pytest.fixture(scope="module")
def resnet(zoo_graphs):
    graph = zoo_graphs["resnet"]
    return partition(graph, Cluster.simulated(3), standby=["auto"]), graph


def _x(plan, seed: int = 0):
    return random_inputs(plan.inputs, {"batch": 1}, seed=seed)


def _close(got: RunResult, graph, x) -> None:
    want = run_whole_model(graph.model, x, threads=1)
    for name, value in want.items():
        np.testing.assert_allclose(got.outputs[name], value, rtol=1e-4, atol=1e-5)


def test_auto_gives_every_stage_a_standby_on_another_device(resnet):
    plan, _ = resnet
    assert sorted(s.stage for s in plan.standbys) == sorted(s.name for s in plan.stages)
    device = {s.name: s.device for s in plan.stages}
    assert all(s.device != device[s.stage] for s in plan.standbys)


@pytest.mark.parametrize("lost", ["dev0", "dev1", "dev2"])
def test_local_executor_fails_over_to_standbys_with_exact_answers(resnet, lost):
    plan, graph = resnet
    x = _x(plan)
    result = LocalExecutor(plan, threads=1, failed={lost}).run(x)
    assert not result.degraded
    _close(result, graph, x)


def test_without_standby_a_lost_device_fails_the_request(resnet):
    _, graph = resnet
    bare = partition(graph, Cluster.simulated(3))
    with pytest.raises(DeviceFailedError):
        LocalExecutor(bare, threads=1, failed={"dev1"}).run(_x(bare))


def test_standbys_round_trip_through_a_saved_plan_and_a_bad_one_is_refused(resnet, tmp_path: Path):
    plan, _ = resnet
    plan.save(tmp_path / "plan")
    loaded = Plan.load(tmp_path / "plan")
    assert loaded.standbys == plan.standbys
    data = json.loads((tmp_path / "plan" / "plan.json").read_text())
    data["standbys"][0]["device"] = "nowhere"
    data["standbys"].append({"stage": "no-such-stage", "device": "dev0"})
    (tmp_path / "plan" / "plan.json").write_text(json.dumps(data))
    resign(tmp_path / "plan")
    with pytest.raises(PlanError, match=r"(?s)device 'nowhere' is not in the cluster.*'no-such-stage' is not a stage"):
        Plan.load(tmp_path / "plan")


def test_by_hand_and_memory_budgets(resnet):
    plan, graph = resnet
    first = plan.stages[0]
    other = next(d for d in ("dev0", "dev1", "dev2") if d != first.device)
    chosen = partition(graph, Cluster.simulated(3), standby=[f"{first.name}={other}"])
    assert chosen.standbys == (Standby(first.name, other),)
    whole = partition(graph, Cluster.simulated(3), standby=[f"{first.device}={other}"])
    assert {s.stage for s in whole.standbys} == {s.name for s in plan.stages if s.device == first.device}
    with pytest.raises(PlacementError, match=f"on '{first.device}' already"):
        partition(graph, Cluster.simulated(3), standby=[f"{first.name}={first.device}"])
    need = sum(s.param_bytes for s in plan.stages)
    tight = Cluster(tuple(Device(f"dev{i}", 1, int(need * 0.55)) for i in range(3)))  # a stage fits, a copy not
    with pytest.raises(PlacementError, match="standby.*memory|memory.*standby"):
        partition(graph, tight, standby=["auto"])


def test_cli_partition_with_standby_and_a_bad_request(zoo_dir: Path, tmp_path: Path):
    model = zoo_dir / "resnet.onnx"
    ok = CliRunner().invoke(main, ["partition", str(model), "--devices", "2", "--standby", "auto",
                                   "-o", str(tmp_path / "plan")])
    assert ok.exit_code == 0, ok.output
    assert json.loads((tmp_path / "plan" / "plan.json").read_text())["standbys"]
    bad = CliRunner().invoke(main, ["partition", str(model), "--devices", "2", "--standby", "dev0",
                                    "-o", str(tmp_path / "bad")])
    assert bad.exit_code == 2 and "expected --standby auto, STAGE=DEVICE or DEVICE=DEVICE" in bad.output
    assert "Traceback" not in bad.output and not (tmp_path / "bad").exists()


@pytest.mark.ray
@pytest.mark.usefixtures("ray_instance")
def test_ray_fails_over_to_a_standby_mid_stream_with_no_request_lost(resnet):
    import ray

    plan, graph = resnet
    requests = [_x(plan, seed=i) for i in range(24)]
    dead = plan.stages[1].device
    with executor(plan, dataplane="tasks", rejoin_interval=None) as ex:
        session = ex.session(4)
        answers = answers_meanwhile(session.stream(requests), {5: lambda: ray.kill(ex.actors[dead])})
        report = session.report()
    assert len(answers) == 24 and all(isinstance(a, RunResult) and not a.degraded for a in answers)
    for answer, x in zip(answers, requests):
        _close(answer, graph, x)
    assert [(e.device, e.reason) for e in report.events if isinstance(e, DeviceLost)] == [(dead, "died")]
    assert report.full == 24 and len(report.recovery_seconds) == 1
