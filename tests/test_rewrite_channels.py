"""Channel splits (lop, lip, fused channel pairs) on every zoo model and 2-5 parts, exact against onnxruntime."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import edgesplit
from edgesplit.cluster import Cluster, Device
from edgesplit.errors import MappingError
from edgesplit.layout import Region
from edgesplit.place.parts import HorizontalSpec, place
from edgesplit.plan import cut
from edgesplit.rewrite.base import SplitError, SplitRequest, ranges_from, sizes
from edgesplit.rewrite.cnn import apply
from tests.conftest import assert_plan_matches, ZOO

RTOL = 1e-5
PARTS = (2, 3, 4, 5)

# one layer (or chain) per model and kind, chosen to exercise followers: Concat merge (densenet, inception),
# depthwise / grouped Conv (mobilenet), pooling + Flatten before Gemm (vgg, mobilenet), residual Add (resnet).
CHANNEL_CASES = {
    "resnet": {
        "lop": ["/body/body.4/c1/Conv"],
        "lip": ["/body/body.5/c2/Conv"],
        "fused-channels": ["/body/body.5/c1/Conv", "/body/body.5/b1/BatchNormalization", "/body/body.5/Relu",
                           "/body/body.5/c2/Conv"],
    },
    "densenet": {
        "lop": ["/body/body.1/f/f.5/Conv"],
        "lip": ["/body/body.5/Conv"],
        "fused-channels": ["/body/body.1/f/f.2/Conv", "/body/body.1/f/f.3/BatchNormalization", "/body/body.1/f/f.4/Relu",
                           "/body/body.1/f/f.5/Conv"],
    },
    "vgg": {
        "lop": ["/body/body.11/Conv"],
        "lip": ["/fc/fc.0/Gemm"],
        "fused-channels": ["/body/body.11/Conv", "/body/body.12/BatchNormalization", "/body/body.13/Relu",
                           "/pool/AveragePool", "/Flatten", "/fc/fc.0/Gemm"],
    },
    "mobilenet": {
        "lop": ["/body/body.3/f/f.0/Conv"],
        "lip": ["/body/body.6/Conv"],
        "fused-channels": ["/body/body.6/Conv", "/body/body.7/BatchNormalization", "/body/body.8/Clip",
                           "/head/pool/GlobalAveragePool", "/head/Flatten", "/head/fc/Gemm"],
    },
    "inception": {
        "lop": ["/body/body.4/b1/b1.0/Conv"],
        "lip": ["/body/body.5/b3/b3.2/Conv"],
        "fused-channels": ["/body/body.4/b2/b2.0/Conv", "/body/body.4/b2/b2.1/Relu", "/body/body.4/b2/b2.2/Conv"],
    },
}


def devices(k: int) -> tuple[str, ...]:
    return tuple(f"dev{i}" for i in range(k))


def split_plan(graph, requests, cluster):
    """Rewrite, put part i of every region on dev<i> (shares: the devices' speeds), place every node and cut."""
    spec = HorizontalSpec(tuple(requests), tuple(devices(r.parts) for r in requests)).by_speed(cluster)
    rewritten = apply(graph, spec.requests)
    assert all(p.device is None for r in rewritten.regions for p in r.parts)  # rewrites know no devices
    rewritten, where = place(rewritten, cluster, spec.region_devices(rewritten))
    plan = cut(rewritten, cluster, where)
    assert plan.validate() == []
    return rewritten, plan


def assert_exact(plan, graph, batch: int = 2) -> None:
    assert_plan_matches(plan, graph, batch, RTOL)


def assert_region(rewritten, kind: str, k: int) -> Region:
    region = next(r for r in rewritten.regions if r.kind == kind)
    assert region.validate() == []
    assert Region.from_dict(region.to_dict()) == region  # round-trips through plan.json
    assert len(region.parts) == k
    assert abs(sum(p.share for p in region.parts) - 1) < 1e-6
    names = {l.name for l in rewritten.layers}
    assert region.combine_node in names
    for p in region.parts:
        assert p.nodes and set(p.nodes) <= names and p.output in rewritten.tensors
    return region


@pytest.mark.parametrize("k", PARTS)
@pytest.mark.parametrize("kind", ("lop", "lip", "fused-channels"))
@pytest.mark.parametrize("name", ZOO)
def test_channel_split_is_exact(name, kind, k, zoo_graphs):
    graph = zoo_graphs[name]
    layers = CHANNEL_CASES[name][kind]
    cluster = Cluster.simulated(k)
    rewritten, plan = split_plan(graph, [SplitRequest(kind, tuple(layers), k)], cluster)
    region = assert_region(rewritten, kind, k)
    assert set(layers) <= set(region.layers)
    assert {s.device for s in plan.stages} == set(devices(k))
    assert_exact(plan, graph)


def test_followers_do_not_combine_early(zoo_graphs):
    """BatchNorm and ReLU follow an output-channel split; the combine comes after them."""
    graph = zoo_graphs["vgg"]
    rewritten, _ = split_plan(graph, [SplitRequest("lop", ("/body/body.4/Conv",), 2)], Cluster.simulated(2))
    region = rewritten.regions[0]
    assert list(region.layers) == ["/body/body.4/Conv", "/body/body.5/BatchNormalization", "/body/body.6/Relu"]
    combine = rewritten.layer(region.combine_node)
    assert combine.op_type == "Concat" and combine.outputs == ("/body/body.6/Relu_output_0",)


def test_concat_of_split_tensors_takes_the_parts(zoo_graphs):
    """A split feeding a channel Concat needs no combine of its own: the Concat becomes the combine."""
    graph = zoo_graphs["inception"]
    rewritten, plan = split_plan(graph, [SplitRequest("lop", ("/body/body.4/b1/b1.0/Conv",), 3)],
                                 Cluster.simulated(3))
    region = rewritten.regions[0]
    assert region.combine_node == "/body/body.4/Concat"
    assert len(rewritten.layer("/body/body.4/Concat").inputs) == 3 + 3
    assert_exact(plan, graph)


def test_add_of_identically_split_tensors_follows(zoo_graphs):
    """Two output-channel splits with the same slices meet at the residual Add: one region, one combine."""
    graph = zoo_graphs["resnet"]
    reqs = [SplitRequest("lop", ("/body/body.5/c2/Conv",), 2, points=(6,)),
            SplitRequest("lop", ("/body/body.5/short/short.0/Conv",), 2, points=(6,))]
    rewritten, plan = split_plan(graph, reqs, Cluster.simulated(2))
    assert len(rewritten.regions) == 1
    region = rewritten.regions[0]
    assert "/body/body.5/Add" in region.layers and "/body/body.5/Relu_1" in region.layers
    assert [p.share for p in region.parts] == [pytest.approx(6 / 16), pytest.approx(10 / 16)]
    assert_exact(plan, graph)


def test_merged_requests_must_ask_for_the_same_devices(zoo_graphs):
    """Splits meet by their units, not their devices: two requests that become one region need the same devices."""
    graph = zoo_graphs["resnet"]
    reqs = (SplitRequest("lop", ("/body/body.5/c2/Conv",), 2, points=(6,)),
            SplitRequest("lop", ("/body/body.5/short/short.0/Conv",), 2, points=(6,)))
    rewritten = apply(graph, reqs)
    owner = {layer: r.name for r in rewritten.regions for layer in r.layers}
    assert owner[reqs[0].layers[0]] == owner[reqs[1].layers[0]]
    spec = HorizontalSpec(reqs, (("dev0", "dev1"), ("dev1", "dev2")))
    with pytest.raises(MappingError, match=r"meet at one node .* expected the same devices"):
        spec.region_devices(rewritten)


def test_rewrites_know_no_devices(zoo_graphs):
    """Parts in the request's part order, no devices; each region named by its request's first layer."""
    graph = zoo_graphs["vgg"]
    reqs = [SplitRequest("lop", ("/body/body.11/Conv",), 3, weights=(1, 2, 1)),
            SplitRequest("height", ("/body/body.0/Conv",), 2, points=(5,))]
    rewritten = apply(graph, reqs)
    by_first = {r.layers[0]: r for r in rewritten.regions}
    lop, height = by_first["/body/body.11/Conv"], by_first["/body/body.0/Conv"]
    assert [len(p.units) for p in lop.parts] == sizes(lop.units, [1, 2, 1], "x")
    assert [p.units[0] for p in height.parts] == [0, 5]
    assert all(p.device is None for r in (lop, height) for p in r.parts)
    cluster = Cluster.simulated(3)
    placed, where = place(rewritten, cluster, {lop.name: ("dev2", "dev0", "dev1"), height.name: ("dev1", "dev0")})
    assert {r.name: [p.device for p in r.parts] for r in placed.regions} == {lop.name: ["dev2", "dev0", "dev1"],
                                                                             height.name: ["dev1", "dev0"]}
    assert all(where[n] == p.device for r in placed.regions for p in r.parts for n in p.nodes)
    assert_exact(cut(placed, cluster, where), graph)


def test_depthwise_follows_and_grouped_lop_splits_by_groups(zoo_graphs):
    graph = zoo_graphs["mobilenet"]
    rewritten, plan = split_plan(graph, [SplitRequest("lop", ("/body/body.3/f/f.0/Conv",), 2)],
                                 Cluster.simulated(2))
    layers = rewritten.regions[0].layers
    assert "/body/body.3/f/f.3/Conv" in layers  # depthwise
    assert "/body/body.3/f/f.6/Conv" in layers  # group 2, aligned with the 2-way split
    assert_exact(plan, graph)
    rewritten, plan = split_plan(graph, [SplitRequest("lop", ("/body/body.4/f/f.3/Conv",), 3)],
                                 Cluster.simulated(3))
    part = rewritten.layer(rewritten.regions[0].parts[0].nodes[0])
    assert part.op_type == "Conv" and rewritten.regions[0].scatter
    assert_exact(plan, graph)


def test_uneven_shares_are_rounded_to_the_groups_of_a_grouped_conv_after_them(zoo_graphs):
    """Speed shares 3 : 1 would cut the 2-group Conv's input channels mid-group and combine before it; the head's
    ranges are rounded to whole groups of that Conv (through BatchNorm, Clip and the depthwise Conv) so it follows."""
    graph = zoo_graphs["mobilenet"]
    head, grouped = "/body/body.3/f/f.0/Conv", "/body/body.3/f/f.6/Conv"
    half = graph.tensors[graph.layer(grouped).inputs[0]].shape[1] // 2
    cluster = Cluster(tuple(Device(f"dev{i}", 1, 2**30, speed=s) for i, s in enumerate((3.0, 1.0))))
    rewritten, plan = split_plan(graph, [SplitRequest("lop", (head,), 2)], cluster)
    region = rewritten.regions[0]
    assert grouped in region.layers
    assert [p.share for p in region.parts] == [pytest.approx(0.5), pytest.approx(0.5)]
    assert len(region.parts[0].units) == len(region.parts[1].units)  # whole groups of the grouped Conv's outputs
    assert_exact(plan, graph)
    # three parts cannot take whole groups of a 2-group Conv: the shares stand and the split is combined before it
    three = Cluster(tuple(Device(f"dev{i}", 1, 2**30, speed=s) for i, s in enumerate((3.0, 1.0, 1.0))))
    rewritten, plan = split_plan(graph, [SplitRequest("lop", (head,), 3)], three)
    region = rewritten.regions[0]
    assert grouped not in region.layers and half * 2 == sum(len(p.units) for p in region.parts)
    assert region.parts[0].share == pytest.approx(0.6, abs=0.05)
    assert_exact(plan, graph)


def test_mlp_pair_of_gemms(zoo_graphs):
    graph = zoo_graphs["vgg"]
    req = SplitRequest("fused-channels", ("/fc/fc.0/Gemm", "/fc/fc.1/Relu", "/fc/fc.2/Gemm"), 5)
    rewritten, plan = split_plan(graph, [req], Cluster.simulated(5))
    assert rewritten.layer(rewritten.regions[0].combine_node).op_type == "Sum"
    assert_exact(plan, graph)


def test_uneven_shares_follow_device_speed(zoo_graphs):
    graph = zoo_graphs["densenet"]
    cluster = Cluster(tuple(Device(f"dev{i}", 1, 2**30, speed=s) for i, s in enumerate((3.0, 1.0, 2.0))))
    rewritten, plan = split_plan(graph, [SplitRequest("lop", ("/body/body.1/f/f.2/Conv",), 3)], cluster)
    shares = [p.share for p in rewritten.regions[0].parts]
    assert shares == [pytest.approx(16 / 32), pytest.approx(5 / 32), pytest.approx(11 / 32)]
    assert_exact(plan, graph)


def test_sizes_are_proportional_and_exhaustive():
    assert sizes(10, [1, 1, 1], "x") == [4, 3, 3]
    assert sizes(7, [1] * 7, "x") == [1] * 7
    assert sum(sizes(1000, [0.3, 2.5, 1, 1, 7], "x")) == 1000
    assert ranges_from(12, [1, 1, 1], [2, 9], "x") == [(0, 2), (2, 9), (9, 12)]
    assert ranges_from(12, [1, 1], [0, 5, 12], "x") == [(0, 5), (5, 12)]
    assert ranges_from(12, [1, 1], None, "x", unit=4) == [(0, 8), (8, 12)]


# ----- small models for shapes the zoo lacks ------------------------------------------------------------------------
def _model(nodes, inputs, outputs, inits) -> onnx.ModelProto:
    g = helper.make_graph(nodes, "m", inputs, outputs, [numpy_helper.from_array(v, k) for k, v in inits.items()])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def _vi(name, shape):
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


@pytest.fixture(scope="session")
def gemm_graph():
    rng = np.random.default_rng(1)
    nodes = [
        helper.make_node("Gemm", ["x", "w1", "b1"], ["h"], name="fc1", transB=1),
        helper.make_node("Relu", ["h"], ["r"], name="relu"),
        helper.make_node("MatMul", ["r", "w2"], ["m"], name="mm"),
        helper.make_node("Gemm", ["m", "w3", "b3"], ["y"], name="fc3", transA=1, alpha=0.5, beta=2.0),
    ]
    inits = {"w1": rng.standard_normal((13, 7)).astype(np.float32), "b1": rng.standard_normal(13).astype(np.float32),
             "w2": rng.standard_normal((13, 6)).astype(np.float32), "w3": rng.standard_normal((5, 4)).astype(np.float32),
             "b3": rng.standard_normal((6, 4)).astype(np.float32)}
    return edgesplit.load(_model(nodes, [_vi("x", [5, 7])], [_vi("y", [6, 4])], inits))


@pytest.mark.parametrize("k", PARTS)
@pytest.mark.parametrize("kind,layers", [("lop", ["fc1"]), ("lip", ["fc1"]), ("lop", ["mm"]), ("lip", ["mm"]),
                                         ("lip", ["fc3"]), ("lop", ["fc3"]), ("fused-channels", ["fc1", "relu", "mm"])])
def test_gemm_and_matmul_splits(gemm_graph, kind, layers, k):
    if layers == ["fc3"] and kind == "lop" and k > 4:  # 4 output neurons
        with pytest.raises(SplitError, match="fc3"):
            split_plan(gemm_graph, [SplitRequest(kind, tuple(layers), k)], Cluster.simulated(k))
        return
    _, plan = split_plan(gemm_graph, [SplitRequest(kind, tuple(layers), k)], Cluster.simulated(k))
    assert_exact(plan, gemm_graph)


@pytest.fixture(scope="session")
def grouped_graph():
    rng = np.random.default_rng(2)
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["y"], name="gconv", group=4, pads=[1, 0, 0, 1], strides=[2, 1]),
             helper.make_node("Relu", ["y"], ["z"], name="relu")]
    inits = {"w": rng.standard_normal((8, 3, 3, 3)).astype(np.float32), "b": rng.standard_normal(8).astype(np.float32)}
    return edgesplit.load(_model(nodes, [_vi("x", [1, 12, 9, 7])], [_vi("z", [1, 8, 4, 6])], inits))


@pytest.mark.parametrize("k", (2, 3, 4))
def test_grouped_conv_lop_by_groups(grouped_graph, k):
    rewritten, plan = split_plan(grouped_graph, [SplitRequest("lop", ("gconv",), k)], Cluster.simulated(k))
    assert all(r % 2 == 0 for r in (round(p.share * 8) for p in rewritten.regions[0].parts))
    assert_exact(plan, grouped_graph)


@pytest.mark.parametrize("k", PARTS)
@pytest.mark.parametrize("shape", ([0, -1], [-1, 120], [2, 120]))
def test_reshape_before_gemm_follows_the_channel_split(shape, k):
    rng = np.random.default_rng(4)
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"], name="relu"),
             helper.make_node("Reshape", ["r", "shape"], ["f"], name="reshape"),
             helper.make_node("Gemm", ["f", "fw", "fb"], ["y"], name="fc", transB=1)]
    inits = {"w": rng.standard_normal((6, 3, 3, 3)).astype(np.float32), "shape": np.array(shape, dtype=np.int64),
             "fw": rng.standard_normal((7, 120)).astype(np.float32), "fb": rng.standard_normal(7).astype(np.float32)}
    graph = edgesplit.load(_model(nodes, [_vi("x", [2, 3, 5, 4])], [_vi("y", [2, 7])], inits))
    req = SplitRequest("fused-channels", ("conv", "relu", "reshape", "fc"), k)
    rewritten, plan = split_plan(graph, [req], Cluster.simulated(k))
    assert list(rewritten.regions[0].layers) == ["conv", "relu", "reshape", "fc"]
    assert_exact(plan, graph)


@pytest.fixture(scope="session")
def silu_graph():
    """conv -> x * sigmoid(x) (SiLU, two consumers reconverging) -> conv; and an MLP with GELU on 3-D tokens."""
    rng = np.random.default_rng(6)
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Sigmoid", ["c1"], ["s"], name="sigmoid"),
             helper.make_node("Mul", ["c1", "s"], ["silu"], name="silu"),
             helper.make_node("Conv", ["silu", "w2"], ["c2"], name="conv2"),
             helper.make_node("Flatten", ["c2"], ["f"], name="flatten"),
             helper.make_node("Reshape", ["f", "tok"], ["t"], name="tokens"),
             helper.make_node("MatMul", ["t", "m1"], ["h"], name="fc1"),
             helper.make_node("Div", ["h", "sqrt2"], ["d"], name="div"),
             helper.make_node("Erf", ["d"], ["e"], name="erf"),
             helper.make_node("Add", ["e", "one"], ["e1"], name="add1"),
             helper.make_node("Mul", ["h", "e1"], ["g"], name="gelu"),
             helper.make_node("MatMul", ["g", "m2"], ["y"], name="fc2")]
    f32 = lambda *s: rng.standard_normal(s).astype(np.float32)  # noqa: E731
    inits = {"w1": f32(6, 3, 3, 3), "w2": f32(4, 6, 1, 1), "tok": np.array([2, 10, 12], dtype=np.int64),
             "m1": f32(12, 10), "m2": f32(10, 5), "sqrt2": np.array(2 ** 0.5, dtype=np.float32),
             "one": np.array(1.0, dtype=np.float32)}
    return edgesplit.load(_model(nodes, [_vi("x", [2, 3, 6, 5])], [_vi("y", [2, 10, 5])], inits))


@pytest.mark.parametrize("k", PARTS)
def test_fanned_out_elementwise_ops_follow(silu_graph, k):
    reqs = [SplitRequest("fused-channels", ("conv1", "sigmoid", "silu", "conv2"), min(k, 6)),
            SplitRequest("fused-channels", ("fc1", "div", "erf", "add1", "gelu", "fc2"), k)]
    rewritten, plan = split_plan(silu_graph, reqs, Cluster.simulated(k))
    assert [len(r.layers) for r in rewritten.regions] == [4, 6]
    assert_exact(plan, silu_graph)
    auto = edgesplit.partition(silu_graph, Cluster.simulated(k), strategy="horizontal", split="channels")
    assert {r.kind for r in auto.regions} == {"fused-channels"}
    assert_exact(auto, silu_graph)


@pytest.mark.parametrize("k", (2, 3, 5))
def test_squeeze_excitation_scale_is_sliced_not_combined(k):
    """x * sigmoid(fc(pool(x))): the per-channel scale is sliced for each part; the split of x goes on."""
    rng = np.random.default_rng(7)
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("GlobalAveragePool", ["x"], ["g"], name="squeeze"),
             helper.make_node("Conv", ["g", "we"], ["z"], name="excite"),
             helper.make_node("Sigmoid", ["z"], ["s"], name="gate"),
             helper.make_node("Mul", ["c", "s"], ["m"], name="scale"),
             helper.make_node("Relu", ["m"], ["r"], name="relu"),
             helper.make_node("Conv", ["r", "w2"], ["y"], name="conv2")]
    f32 = lambda *s: rng.standard_normal(s).astype(np.float32)  # noqa: E731
    inits = {"w1": f32(8, 3, 3, 3), "we": f32(8, 3, 1, 1), "w2": f32(4, 8, 1, 1)}
    graph = edgesplit.load(_model(nodes, [_vi("x", [2, 3, 6, 5])], [_vi("y", [2, 4, 6, 5])], inits))
    req = SplitRequest("fused-channels", ("conv1", "scale", "relu", "conv2"), k)
    rewritten, plan = split_plan(graph, [req], Cluster.simulated(k))
    assert list(rewritten.regions[0].layers) == ["conv1", "scale", "relu", "conv2"]
    assert_exact(plan, graph)
    auto = edgesplit.partition(graph, Cluster.simulated(k), strategy="horizontal", split="channels")
    assert any(r.kind == "fused-channels" and r.layers[0] == "conv1" for r in auto.regions)
    assert_exact(auto, graph)
