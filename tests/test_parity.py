"""The parity policy (coded computing): linear regions re-split into N−1 parts plus a coded part, their sum; any
single lost part rebuilt exactly, against the unsplit model run by onnxruntime."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from edgesplit.cli import main
from edgesplit.cluster import Cluster
from edgesplit.datasets import shipped_model
from edgesplit.errors import MappingError
from edgesplit.graph import load
from edgesplit.plan import Plan
from edgesplit.planner import layout
from edgesplit.robust.evaluate import Samples, prepare, run_batched
from edgesplit.robust.policies import Policy, coded
from edgesplit.runtime.local import LocalExecutor, run_whole_model

EXACT = dict(rtol=1e-5, atol=1e-5)


def linear_model(path: Path) -> Path:
    """A Conv with its bias input, a Softmax, then a MatMul + bias Add: two linear regions of 10 units (over 3
    parts: 4, 3, 3, so the coded part pads the narrower ones)."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.normal(size=s).astype(np.float32), n)
             for n, s in (("w1", (10, 3, 3, 3)), ("b1", (10,)), ("w2", (640, 10)), ("b2", (10,)))]
    nodes = [helper.make_node("Conv", ["input", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1], name="conv"),
             helper.make_node("Softmax", ["c1"], ["s1"], axis=1, name="soft"),
             helper.make_node("Flatten", ["s1"], ["f"], name="flat"),
             helper.make_node("MatMul", ["f", "w2"], ["m2"], name="fc"),
             helper.make_node("Add", ["m2", "b2"], ["logits"], name="fc_bias")]
    x = helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, 8, 8])
    y = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])
    graph = helper.make_graph(nodes, "linear", [x], [y], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


@pytest.fixture(scope="module")
def linear(tmp_path_factory):
    path = linear_model(tmp_path_factory.mktemp("parity") / "linear.onnx")
    source, cluster = load(path), Cluster.simulated(4)
    rewritten, placement = layout(source, cluster, strategy="horizontal")
    x = np.random.default_rng(1).normal(size=(16, 3, 8, 8)).astype(np.float32)
    study = prepare(rewritten, placement, cluster, source, Samples({"input": x}), (1, 2))
    plan = study.plan(Policy.PARITY, 0.0, None)
    return path, study, plan, run_whole_model(source.model, {"input": x})["logits"]


def test_every_linear_region_gets_a_coded_part_on_a_rotating_device(linear):
    _, study, plan, _ = linear
    assert [r.name for r in plan.regions] == [r.name for r in study.graph.regions]
    coded_on = []
    for before, region in zip(study.graph.regions, plan.regions):
        devices = {p.device for p in before.parts}
        assert region.coded is not None and len(region.parts) == len(before.parts) - 1
        assert {p.device for p in region.parts} | {region.coded.device} == devices
        assert sorted(len(p.units) for p in region.parts) == [3, 3, 4] and region.coded.width == 4
        coded_on.append(region.coded.device)
    assert len(set(coded_on)) == len(coded_on)


def test_any_single_failure_of_coded_layers_is_recovered_exactly(linear):
    _, study, plan, unsplit = linear
    np.testing.assert_allclose(run_batched(LocalExecutor(plan), study.samples), unsplit, **EXACT)
    devices = sorted({p.device for r in plan.regions for p in r.parts} | {r.coded.device for r in plan.regions})
    assert len(devices) == 4
    for device in devices:
        executor = LocalExecutor(plan, failed={device}, allow_degraded=True)
        try:
            got = executor.run(study.samples.inputs)
        except Exception as exc:  # only the device holding the combines may not fail
            assert device in study.fatal, (device, exc)
            continue
        assert not got.degraded, device
        np.testing.assert_allclose(got.outputs["logits"], unsplit, **EXACT)
    row = study.evaluate(Policy.PARITY, 0.0, plan)
    assert all(v == pytest.approx(1.0) for v in row.failures[1].values())  # the evaluator agrees
    double = LocalExecutor(plan, failed=study.sets[2][0], allow_degraded=True).run(study.samples.inputs)
    assert double.degraded  # two parts of one region lost: beyond one parity part, filled


def test_coded_layers_cost_n_over_n_minus_1_of_the_plain_split(linear):
    _, study, _, _ = linear
    memory = study.coded_memory()
    assert memory.bound == pytest.approx(4 / 3)
    # 10 units: 4 + 3 + 3 against the plain split's 3 + 3 + 2 + 2, so 4/3 exactly per device
    assert 1.0 < memory.ratio <= memory.bound * 1.05


def test_a_saved_and_loaded_parity_plan_recovers_a_lost_part(linear, tmp_path):
    _, study, plan, unsplit = linear
    plan.save(tmp_path / "plan")
    loaded = Plan.load(tmp_path / "plan")
    assert [r.coded for r in loaded.regions] == [r.coded for r in plan.regions]
    lost = loaded.regions[0].parts[-1].device
    got = LocalExecutor(loaded, failed={lost}, allow_degraded=True).run(study.samples.inputs)
    assert not got.degraded
    np.testing.assert_allclose(got.outputs["logits"], unsplit, **EXACT)


def test_parity_on_the_vit_codes_its_linear_regions_and_leaves_the_rest(tmp_path):
    source, cluster = load(shipped_model("mnist_vit")), Cluster.simulated(4)
    rewritten, _ = layout(source, cluster, strategy="horizontal")
    requests = coded(rewritten)
    lop = [r.name for r in rewritten.regions if r.kind.value == "lop"]
    assert [q.region for q in requests] == lop and len(lop) < len(rewritten.regions)
    mlp = next(r.name for r in rewritten.regions if r.kind.value == "fused-channels")
    with pytest.raises(MappingError, match="parity needs an output-channel split"):
        coded(rewritten, only=[mlp])


def test_the_cli_shows_the_coded_layers_memory_and_refuses_parity_without_linear_regions(linear, tmp_path):
    path, study, _, _ = linear
    np.savez(tmp_path / "data.npz", input=study.samples.inputs["input"])
    result = CliRunner().invoke(main, ["robustness", str(path), "--devices", "4", "--data", str(tmp_path / "data.npz"),
                                       "--policy", "parity,none", "--json", str(tmp_path / "r.json"),
                                       "-o", str(tmp_path / "plan")])
    assert result.exit_code == 0, result.output
    verified = CliRunner().invoke(main, ["verify", str(tmp_path / "plan")])
    assert verified.exit_code == 0 and "yes" in verified.output, verified.output
    assert "parity: 2 coded region(s)" in " ".join(result.output.split())
    doc = json.loads((tmp_path / "r.json").read_text())
    assert [r["policy"] for r in doc["rows"]] == ["parity", "none"]
    assert doc["parity"]["memory_vs_plain"] <= doc["parity"]["bound"] * 1.05
    mnist = tmp_path / "mnist.npz"
    np.savez(mnist, input=np.zeros((8, 1, 28, 28), np.float32))
    out = tmp_path / "out"
    refused = CliRunner().invoke(main, ["robustness", str(shipped_model("mnist_cnn")), "--devices", "4", "--data",
                                        str(mnist), "--policy", "parity", "--json", str(out / "r.json")])
    assert refused.exit_code == 2, refused.output
    assert "parity: expected linear regions" in " ".join(refused.output.split())
    assert not out.exists()
