"""Partial replicas built through the API, every failure set, against an independent reference: the unsplit model
run by onnxruntime with exactly the lost units zeroed."""

from __future__ import annotations

import itertools

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import edgesplit
from edgesplit.bench import zoo
from edgesplit.cluster import Cluster
from edgesplit.layout import Combine, Fill, Region, ReplicaMode
from edgesplit.planner import plan as plan_of
from edgesplit.planner import with_replicas
from edgesplit.rewrite.replicas import ReplicaRequest
from edgesplit.runtime.common import random_inputs
from edgesplit.runtime.local import LocalExecutor, run_whole_model
from test_failures import REST, split_layout

CHANNELS = 4  # conv1 has 8 output channels, conv2 8 input channels
HOT, STANDBY = ReplicaMode.HOT, ReplicaMode.STANDBY
DEVICES = ("dev1", "dev2", "dev3")


def failure_sets(devices=DEVICES):
    return [frozenset(c) for k in range(len(devices) + 1) for c in itertools.combinations(devices, k)]


def lost_units(region: Region, down: frozenset[str]) -> list[int]:
    """Units of parts on down devices that no live replica holds."""
    lost = []
    for part in region.parts:
        if part.device in down:
            held = {u for r in part.replicas if r.device not in down for u in r.units}
            lost += [u for u in part.units if u not in held]
    return lost


def zeroed(model: onnx.ModelProto, weight: str, axis: int, units: list[int], bias: str | None = None) -> onnx.ModelProto:
    """The model with `units` of `weight` (along `axis`) and of `bias` set to zero."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for t in out.graph.initializer:
        if t.name in (weight, bias):
            a = numpy_helper.to_array(t).copy()
            index = [slice(None)] * a.ndim
            index[axis if t.name == weight else 0] = units
            a[tuple(index)] = 0
            t.CopyFrom(numpy_helper.from_array(a, t.name))
    return out


def replicated(kind: str, layer: str, replicas) -> tuple:
    graph = edgesplit.load(zoo.split_conv(CHANNELS))
    cluster = Cluster.simulated(4)
    rest = {n: "dev0" for n in REST + ["conv1", "conv2"] if n != layer}
    split, where = split_layout(graph, cluster, layer, kind, ("dev1", "dev2"), rest, "dev0")
    region = split.regions[0]
    requests = [ReplicaRequest(region.name, part, units, device, mode) for part, units, device, mode in replicas]
    split, where = with_replicas(split, where, requests)
    return plan_of(split, cluster, where), graph


# part 0 holds units 0-3 (dev1), part 1 units 4-7 (dev2): pieces of each on the other devices, hot and standby
SPREAD = [(0, (0, 1), "dev2", STANDBY), (0, (3,), "dev3", HOT), (1, (4, 5, 6), "dev3", STANDBY),
          (1, (7,), "dev1", HOT)]


@pytest.mark.parametrize("kind, layer, weight, axis, bias", [
    ("lop", "conv1", "w1", 0, "b1"),  # Concat: lost output channels are zeros
    ("lip", "conv2", "w2", 1, None),  # Sum: lost input channels contribute nothing
])
def test_every_failure_set_equals_the_model_with_the_lost_units_zeroed(kind, layer, weight, axis, bias):
    plan, graph = replicated(kind, layer, SPREAD)
    region = plan.regions[0]
    assert region.combine is (Combine.CONCAT if kind == "lop" else Combine.SUM)
    assert [len(p.replicas) for p in region.parts] == [2, 2]
    x = random_inputs(plan.inputs, {"batch": 2}, seed=3)
    ex = LocalExecutor(plan, allow_degraded=True)
    for down in failure_sets():
        lost = lost_units(region, down)
        got = ex.run(x, failed=down)
        want = run_whole_model(zeroed(graph.model, weight, axis, lost, bias), x)["y"]
        np.testing.assert_allclose(got.outputs["y"], want, rtol=1e-4, atol=1e-5, err_msg=f"down {sorted(down)}")
        assert got.degraded == bool(lost), (sorted(down), lost)
    # the reference can tell: losing unit 2 (no replica) changes the answer
    assert not np.allclose(ex.run(x, failed={"dev1"}).outputs["y"], run_whole_model(graph.model, x)["y"])


def test_replicas_covering_a_part_give_a_full_answer_from_two_devices():
    plan, graph = replicated("lop", "conv1", [(0, (0, 1), "dev2", STANDBY), (0, (2, 3), "dev3", STANDBY)])
    x = random_inputs(plan.inputs, {"batch": 1}, seed=4)
    got = LocalExecutor(plan).run(x, failed={"dev1"})  # no degraded answers allowed: the replicas cover it all
    assert not got.degraded
    np.testing.assert_allclose(got.outputs["y"], run_whole_model(graph.model, x)["y"], rtol=1e-4, atol=1e-5)


def test_a_plain_output_channel_replica_holds_only_its_weights():
    plan, _ = replicated("lop", "conv1", [(0, (1,), "dev3", STANDBY)])
    part = plan.regions[0].parts[0]
    (stage,) = [s for s in plan.stages if set(part.replicas[0].nodes) <= set(s.layers)]
    (own,) = [s for s in plan.stages if set(part.nodes) <= set(s.layers)]
    assert stage.param_bytes * len(part.units) == own.param_bytes  # one of the part's four channels


def test_standby_replicas_run_only_after_a_loss():
    plan, _ = replicated("lip", "conv2", SPREAD)
    router = LocalExecutor(plan, allow_degraded=True).router
    hot = {r.device for p in plan.regions[0].parts for r in p.replicas if r.mode is HOT}
    full = router.route()
    stages = {s.name for s in full.stages}
    standby = [s.name for s in plan.stages for p in plan.regions[0].parts for r in p.replicas
               if r.mode is STANDBY and set(r.nodes) <= set(s.layers)]
    assert standby and not stages & set(standby)
    assert hot <= full.devices
    assert set(standby) & {s.name for s in router.route(frozenset({"dev1"})).stages}


@pytest.mark.parametrize("request_, message", [
    (ReplicaRequest("lop:conv1", 0, (5,), "dev3"), "subset of the part's units"),
    (ReplicaRequest("lop:conv1", 0, (0,), "dev1"), "holds the part itself"),
    (ReplicaRequest("lop:nope", 0, (0,), "dev3"), "no such region"),
])
def test_bad_replica_requests_are_refused(request_, message):
    graph = edgesplit.load(zoo.split_conv(CHANNELS))
    cluster = Cluster.simulated(4)
    split, where = split_layout(graph, cluster, "conv1", "lop", ("dev1", "dev2"), {n: "dev0" for n in REST + ["conv2"]},
                                "dev0")
    with pytest.raises(edgesplit.EdgesplitError, match=message):
        with_replicas(split, where, [request_])


# ---- Transformer regions: attention heads and MLP neurons (Sum) ----

def exit_rows_zeroed(model: onnx.ModelProto, lost: dict[str, tuple[int, list[int]]]) -> onnx.ModelProto:
    """The model with, per exit layer, the input rows of the lost units zeroed (units: equal blocks of rows)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    nodes = {n.name: n for n in out.graph.node}
    producer = {o: n for n in out.graph.node for o in n.output}
    inits = {t.name: t for t in out.graph.initializer}
    for exit_name, (units, gone) in lost.items():
        node = nodes[exit_name]
        weight, transposed = node.input[1], False
        if weight not in inits:  # a Transpose of the weight
            weight, transposed = producer[weight].input[0], True
        w = numpy_helper.to_array(inits[weight]).copy()
        axis = 0 if (node.op_type == "MatMul") != transposed else 1
        if node.op_type == "Gemm" and not transposed:
            axis = 1 if any(a.name == "transB" and a.i for a in node.attribute) else 0
        per = w.shape[axis] // units
        for u in gone:
            index = [slice(None)] * w.ndim
            index[axis] = slice(u * per, (u + 1) * per)
            w[tuple(index)] = 0
        inits[weight].CopyFrom(numpy_helper.from_array(w, weight))
    return out


@pytest.mark.slow
def test_transformer_heads_and_neurons_every_failure_set(tmp_path):
    from test_transformer_split_models import export

    from edgesplit.place.heads import split_heads
    from edgesplit.probe import sample_inputs

    graph = edgesplit.load(export("bert", tmp_path))
    cluster = Cluster.simulated(3)
    split, placement = split_heads(graph, cluster, devices=["dev0", "dev1"], vocab=False)
    sums = [r for r in split.graph.regions if r.kind in ("heads", "neurons")]
    assert len(sums) == 2 * split.blocks
    requests = []
    for r in sums:  # dev1's part of every block: half its units on dev2 (standby), one unit on dev0 (hot)
        part = next(i for i, p in enumerate(r.parts) if p.device == "dev1")
        units = r.parts[part].units
        requests += [ReplicaRequest(r.name, part, units[: len(units) // 2], "dev2"),
                     ReplicaRequest(r.name, part, units[-1:], "dev0", HOT)]
    graph2, where = with_replicas(split.graph, placement, requests)
    plan = plan_of(graph2, cluster, where)
    x = sample_inputs(graph, {"batch": 2, "seq": 5}, seed=2)
    ex = LocalExecutor(plan, allow_degraded=True)
    for down in failure_sets(("dev1", "dev2")):  # dev0 holds everything outside the parts
        lost = {r.name.split(":", 1)[1]: (r.units, lost_units(r, down)) for r in plan.regions
                if r.kind in ("heads", "neurons")}
        want = run_whole_model(exit_rows_zeroed(graph.model, lost), x)["out"]
        got = ex.run(x, failed=down)
        np.testing.assert_allclose(got.outputs["out"], want, rtol=1e-4, atol=1e-4, err_msg=f"down {sorted(down)}")
        assert got.degraded == any(g for _, g in lost.values())
    assert not np.allclose(ex.run(x, failed={"dev1"}).outputs["out"], run_whole_model(graph.model, x)["out"],
                           atol=1e-4)


def test_an_input_channel_replica_holds_only_its_units_weights():
    plan, _ = replicated("lip", "conv2", [(0, (1,), "dev3", STANDBY)])
    part = plan.regions[0].parts[0]

    def conv_weight(nodes) -> tuple[int, ...]:
        (stage,) = [s for s in plan.stages if set(nodes) <= set(s.layers)]
        model = plan.stage_model(stage.name)
        inits = {t.name: tuple(t.dims) for t in model.graph.initializer}
        (conv,) = [n for n in model.graph.node if n.op_type == "Conv"]
        return inits[conv.input[1]]

    own, replica = conv_weight(part.nodes), conv_weight(part.replicas[0].nodes)
    assert own[1] == len(part.units) and replica == (own[0], 1, *own[2:])  # one of the part's input channels


# ---- calibrated mean fills ----

def with_means(model: onnx.ModelProto, tensor: str, axis: int, lost: list[int], means: np.ndarray) -> onnx.ModelProto:
    """The model with `tensor`'s lost units (along `axis`) replaced by `means` (one per unit, or per unit x channel)."""
    from onnx import helper

    out = onnx.ModelProto()
    out.CopyFrom(model)
    keep = np.ones(means.shape[0], dtype=np.float32)
    keep[lost] = 0
    shape = [1] * (4 if tensor == "r1" else 2)  # relu1 is NCHW, fc's input is [batch, features]
    shape[axis] = -1
    users = [n for n in out.graph.node if tensor in n.input]
    out.graph.initializer.extend([numpy_helper.from_array(keep.reshape(shape), f"{tensor}.keep"),
                                  numpy_helper.from_array(((1 - keep) * means).astype(np.float32).reshape(shape),
                                                          f"{tensor}.mean")])
    for n in users:
        n.input[list(n.input).index(tensor)] = f"{tensor}.filled"
    at = next(i for i, n in enumerate(out.graph.node) if tensor in n.output) + 1
    for node in reversed([helper.make_node("Mul", [tensor, f"{tensor}.keep"], [f"{tensor}.kept"]),
                          helper.make_node("Add", [f"{tensor}.kept", f"{tensor}.mean"], [f"{tensor}.filled"])]):
        out.graph.node.insert(at, node)
    return out


@pytest.mark.parametrize("kind, layer, tensor, axis", [
    ("lop", "conv1", "r1", 1),  # Concat: lost channels at the combine (after relu1) are their calibrated means
    ("lip", "fc", "f", 1),  # Sum: lost input features of fc contribute what their means contribute
])
def test_mean_fill_equals_the_model_with_the_lost_units_at_their_means(kind, layer, tensor, axis):
    from edgesplit.probe import exposing, run_model
    from edgesplit.robust.fills import mean_fills

    graph = edgesplit.load(zoo.split_conv(CHANNELS))
    cluster = Cluster.simulated(4)
    rest = {n: "dev0" for n in REST + ["conv1", "conv2"] if n != layer}
    split, where = split_layout(graph, cluster, layer, kind, ("dev1", "dev2"), rest, "dev0")
    calibration = random_inputs(edgesplit.partition(graph, cluster).inputs, {"batch": 16}, seed=7)
    filled = mean_fills(split, calibration)
    region = filled.regions[0]
    assert region.fill is Fill.MEAN and len(region.fill_values) == region.units
    plan = plan_of(filled, cluster, where)
    seen = run_model(exposing(graph.model, [tensor]), calibration)[tensor]
    means = seen.mean(axis=tuple(i for i in range(seen.ndim) if i != axis))
    x = random_inputs(plan.inputs, {"batch": 2}, seed=3)
    got = LocalExecutor(plan, allow_degraded=True).run(x, failed={"dev2"})
    lost = list(region.parts[1].units)
    want = run_whole_model(with_means(graph.model, tensor, axis, lost, means), x)["y"]
    np.testing.assert_allclose(got.outputs["y"], want, rtol=1e-4, atol=1e-5)
    zeros = LocalExecutor(plan_of(split, cluster, where), allow_degraded=True).run(x, failed={"dev2"})
    assert not np.allclose(zeros.outputs["y"], got.outputs["y"])  # the fill made a difference
