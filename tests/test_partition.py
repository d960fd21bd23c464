"""place + cut + local run: every cut point and random placements reproduce the whole model."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import onnx
import pytest

import edgesplit
from edgesplit.place import balance
from edgesplit.plan import SINK, SOURCE, Plan
from tests.conftest import ZOO, assert_plan_matches



def _mapping(graph, devices, assign) -> dict[str, list[str]]:
    mapping: dict[str, list[str]] = {d: [] for d in devices}
    for layer, device in zip(graph.layers, assign):
        mapping[device].append(layer.name)
    return mapping


@pytest.mark.parametrize("name", ZOO)
def test_every_single_cut_point(name, zoo_graphs):
    graph = zoo_graphs[name]
    cluster = edgesplit.Cluster.simulated(2)
    n = len(graph.layers)
    for cut_at in range(1, n):
        plan = edgesplit.partition(graph, cluster, _mapping(graph, cluster.names, ["dev0"] * cut_at + ["dev1"] * (n - cut_at)))
        assert plan.validate() == []
        assert {s.device for s in plan.stages} == {"dev0", "dev1"}
        assert_plan_matches(plan, graph, batch=1 + cut_at % 3)


@pytest.mark.parametrize("name", ZOO)
def test_random_non_contiguous_placements(name, zoo_graphs):
    graph = zoo_graphs[name]
    rng = random.Random(name)
    for devices in (2, 3, 4, 5):
        cluster = edgesplit.Cluster.simulated(devices)
        for _ in range(4):
            plan = edgesplit.partition(graph, cluster, _mapping(graph, cluster.names, [rng.choice(cluster.names) for _ in graph.layers]))
            assert plan.validate() == []
            assert_plan_matches(plan, graph, batch=rng.randint(1, 4))


def test_first_and_last_blocks_on_one_device(zoo_graphs):
    graph = zoo_graphs["resnet"]
    n = len(graph.layers)
    third = n // 3
    assign = ["a"] * third + ["b"] * third + ["a"] * (n - 2 * third)
    cluster = edgesplit.Cluster((edgesplit.Device("a", 1, 2**30), edgesplit.Device("b", 1, 2**30)))
    plan = edgesplit.partition(graph, cluster, _mapping(graph, ("a", "b"), assign))
    devices = [s.device for s in plan.stages]
    assert devices[0] == devices[-1] == "a" and "b" in devices  # device a holds the first and the last stages
    # b's output that a's shortcut conv needs is sent as soon as it exists: a computes it while b goes on
    shortcut = next(s for s in plan.stages if s.device == "a" and 0 < plan.stages.index(s) < len(plan.stages) - 1)
    assert all(plan.stage(t.src).device == "b" for t in plan.transfers if t.dst == shortcut.name)
    assert_plan_matches(plan, graph)


def test_stages_are_valid_onnx_and_keep_dynamic_batch(zoo_graphs, tmp_path: Path):
    graph = zoo_graphs["densenet"]
    plan = edgesplit.partition(graph, edgesplit.Cluster.simulated(3))
    plan.save(tmp_path / "plan")
    for stage in plan.stages:
        path = tmp_path / "plan" / stage.file
        onnx.checker.check_model(str(path), full_check=True)
        model = onnx.load(path)
        assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    assert_plan_matches(Plan.load(tmp_path / "plan"), graph, batch=7)


def test_plan_json_records_hashes_transfers_and_cluster(zoo_graphs, zoo_dir: Path, tmp_path: Path):
    graph = zoo_graphs["inception"]
    plan = edgesplit.partition(graph, edgesplit.Cluster.simulated(3))
    plan.save(tmp_path / "p")
    data = json.loads((tmp_path / "p" / "plan.json").read_text())
    assert data["model"]["sha256"] == graph.sha256 == edgesplit.graph.sha256_file(zoo_dir / "inception.onnx")
    for stage in data["stages"]:
        assert stage["sha256"] == edgesplit.graph.sha256_file(tmp_path / "p" / stage["file"])
    assert [d["name"] for d in data["cluster"]["devices"]] == ["dev0", "dev1", "dev2"]
    assert set(data["placement"]) == {layer.name for layer in graph.layers}
    cross = [t for t in data["transfers"] if t["cross_device"] and SOURCE != t["src"] and SINK != t["dst"]]
    assert cross and all(t["bytes"] == graph.tensors[t["tensor"]].nbytes for t in cross)
    assert sum(t["bytes"] for t in cross) == plan.wire_bytes()
    loaded = Plan.load(tmp_path / "p")
    assert loaded.to_dict() == plan.to_dict()


def test_every_graph_input_reaches_the_stages_that_read_it(zoo_graphs):
    graph = zoo_graphs["resnet"]
    plan = edgesplit.partition(graph, edgesplit.Cluster.simulated(4), _mapping(graph, ("dev0", "dev1", "dev2", "dev3"),
                               ["dev3"] + ["dev0"] * (len(graph.layers) - 1)))
    feeds = [t for t in plan.transfers if t.src == SOURCE]
    assert [(t.tensor, t.dst) for t in feeds] == [("input", plan.stages[0].name)]


@pytest.mark.parametrize("name", ZOO)
def test_balance_is_contiguous_and_within_tolerance_of_the_best_bottleneck(name, zoo_graphs):
    import itertools

    graph = zoo_graphs[name]
    cluster = edgesplit.Cluster.simulated(4)
    placement = balance(graph, cluster, tolerance=0.05)
    order = [cluster.names.index(placement[layer.name]) for layer in graph.layers]
    assert order == sorted(order)
    cost = np.array([layer.macs + 1.0 for layer in graph.layers])
    got = max(cost[[i for i, d in enumerate(order) if d == k]].sum() for k in range(4))
    prefix = np.concatenate([[0.0], np.cumsum(cost)])
    n = len(cost)
    best = min(
        max(prefix[b] - prefix[a] for a, b in zip((0, *cuts), (*cuts, n)))
        for cuts in itertools.combinations_with_replacement(range(n + 1), 3)
    )
    assert got <= best * 1.05 + 1e-9


def test_balance_weights_by_speed(zoo_graphs):
    graph = zoo_graphs["densenet"]
    fast, slow = edgesplit.Device("fast", 4, 2**30, speed=3.0), edgesplit.Device("slow", 1, 2**30, speed=1.0)
    placement = balance(graph, edgesplit.Cluster((fast, slow)))
    share = sum(layer.macs for layer in graph.layers if placement[layer.name] == "fast") / graph.total_macs
    assert share > 0.6


def test_balance_prefers_small_cuts():
    """Two cut points give the same balance; the one with the smaller crossing tensor wins."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    inits, nodes = [], []
    # x(1x64) -> MatMul 64x64 -> a -> MatMul 64x4 -> b (small) -> MatMul 4x64 -> c -> MatMul 64x64 -> y
    sizes = [(64, 64), (64, 4), (4, 64), (64, 64)]
    prev = "x"
    for i, (k, m) in enumerate(sizes):
        inits.append(numpy_helper.from_array(rng.standard_normal((k, m)).astype(np.float32), f"w{i}"))
        out = f"t{i}" if i < 3 else "y"
        nodes.append(helper.make_node("MatMul", [prev, f"w{i}"], [out], name=f"mm{i}"))
        prev = out
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 64])], initializer=inits)
    graph = edgesplit.load(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]))
    # mm0+mm1 = 4096+256, mm2+mm3 = 256+4096: cutting after mm1 (4 floats) beats after mm0 or mm2 (64 floats)
    placement = balance(graph, edgesplit.Cluster.simulated(2), tolerance=0.05)
    assert [placement[f"mm{i}"] for i in range(4)] == ["dev0", "dev0", "dev1", "dev1"]
