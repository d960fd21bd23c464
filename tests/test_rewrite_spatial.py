"""Spatial tiles (height, width, grid) and fused tile runs with growing halos, exact against onnxruntime."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import helper

import edgesplit
from edgesplit.cluster import Cluster
from edgesplit.rewrite.base import SplitError, SplitRequest
from tests.conftest import ZOO
from tests.test_rewrite_channels import PARTS, _model, _vi, assert_exact, assert_region, split_plan

SPATIAL_CASES = {
    "resnet": {
        "height": ["/body/body.0/Conv"],  # 7x7, stride 2, pad 3
        "width": ["/body/body.3/MaxPool"],
        "grid": ["/body/body.4/c1/Conv"],
        "fused-spatial": ("/body/body.0/Conv", "/body/body.4/Relu_1"),  # stem + a residual block
    },
    "densenet": {
        "height": ["/body/body.5/Conv"],
        "width": ["/body/body.6/AveragePool"],
        "grid": ["/body/body.0/Conv"],
        "fused-spatial": ("/body/body.3/BatchNormalization", "/body/body.6/AveragePool"),
    },
    "vgg": {
        "height": ["/body/body.4/Conv"],
        "width": ["/body/body.7/Conv"],
        "grid": ["/body/body.0/Conv"],
        "fused-spatial": ("/body/body.0/Conv", "/body/body.9/Relu"),
    },
    "mobilenet": {
        "height": ["/body/body.4/f/f.3/Conv"],  # depthwise, stride 2
        "width": ["/body/body.0/Conv"],
        "grid": ["/body/body.3/f/f.3/Conv"],
        "fused-spatial": ("/body/body.3/f/f.0/Conv", "/body/body.3/Add"),  # inverted residual with its skip
    },
    "inception": {
        "height": ["/body/body.4/b3/b3.2/Conv"],  # 5x5
        "width": ["/body/body.4/b4/b4.0/MaxPool"],
        "grid": ["/body/body.0/Conv"],
        "fused-spatial": ("/body/body.4/b1/b1.0/Conv", "/body/body.4/Concat"),  # four branches, one Concat
    },
}


def _layers(graph, case):
    if isinstance(case, tuple):
        a, b = graph.position(case[0]), graph.position(case[1])
        return tuple(l.name for l in graph.layers[a: b + 1])
    return tuple(case)


@pytest.mark.parametrize("k", PARTS)
@pytest.mark.parametrize("kind", ("height", "width", "grid", "fused-spatial"))
@pytest.mark.parametrize("name", ZOO)
def test_spatial_split_is_exact(name, kind, k, zoo_graphs):
    graph = zoo_graphs[name]
    layers = _layers(graph, SPATIAL_CASES[name][kind])
    rewritten, plan = split_plan(graph, [SplitRequest(kind, layers, k)], Cluster.simulated(k))
    region = assert_region(rewritten, kind, k)
    assert set(layers) <= set(region.layers)
    assert_exact(plan, graph)


def test_fused_region_has_one_sync_and_reports_halo_macs(zoo_graphs):
    graph = zoo_graphs["vgg"]
    layers = _layers(graph, SPATIAL_CASES["vgg"]["fused-spatial"])
    fused, _ = split_plan(graph, [SplitRequest("fused-spatial", layers, 4)], Cluster.simulated(4))
    convs = [l for l in layers if graph.layer(l).op_type in ("Conv", "MaxPool")]
    per_layer, _ = split_plan(graph, [SplitRequest("height", (l,), 4) for l in convs], Cluster.simulated(4))
    assert len(fused.regions) == 1 and len(per_layer.regions) == len(convs) == 4
    region = fused.regions[0]
    assert region.stats.redundant_macs > 0
    assert region.stats.part_macs > region.stats.macs  # the halos are computed twice
    assert all(r.stats.redundant_macs == 0 for r in per_layer.regions)  # one layer: halos are read, not recomputed


def test_padding_only_at_the_border(zoo_graphs):
    """Tiles of a padded Conv: the first tile pads its top, the last its bottom, none pads an interior edge."""
    graph = zoo_graphs["vgg"]
    rewritten, _ = split_plan(graph, [SplitRequest("height", ("/body/body.4/Conv",), 3)], Cluster.simulated(3))
    pads = []
    for part in rewritten.regions[0].parts:
        node = next(n for n in rewritten.model.graph.node if n.name == part.nodes[0])
        pads.append(list(next(a.ints for a in node.attribute if a.name == "pads")))
    assert pads == [[1, 1, 0, 1], [0, 1, 0, 1], [0, 1, 1, 1]]


@pytest.mark.parametrize("op", ("GlobalAveragePool", "GlobalMaxPool"))
@pytest.mark.parametrize("k", (2, 5))
def test_global_pool_tiles_combine_partials(op, k):
    nodes = [helper.make_node("Relu", ["x"], ["r"], name="relu"), helper.make_node(op, ["r"], ["y"], name="pool")]
    graph = edgesplit.load(_model(nodes, [_vi("x", [2, 3, 7, 5])], [_vi("y", [2, 3, 1, 1])], {}))
    rewritten, plan = split_plan(graph, [SplitRequest("fused-spatial", ("relu", "pool"), k)], Cluster.simulated(k))
    assert rewritten.layer(rewritten.regions[0].combine_node).op_type == ("Sum" if op == "GlobalAveragePool" else "Max")
    assert_exact(plan, graph)


# ----- odd shapes: not divisible, stride 2, dilation 2, asymmetric pads, 1x1 and 7x7, ceil mode, SAME padding -------
def _odd_graph():
    rng = np.random.default_rng(3)
    w = lambda *s: rng.standard_normal(s).astype(np.float32)  # noqa: E731
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="dil", strides=[2, 2], dilations=[2, 2], pads=[0, 1, 2, 0]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("MaxPool", ["r1"], ["p1"], name="maxceil", kernel_shape=[3, 3], strides=[2, 2], ceil_mode=1),
        helper.make_node("Conv", ["p1", "w2"], ["c2"], name="k7", pads=[3, 3, 3, 3]),
        helper.make_node("AveragePool", ["c2"], ["p2"], name="avgpad", kernel_shape=[3, 2], pads=[1, 0, 1, 1],
                         count_include_pad=1),
        helper.make_node("Conv", ["p2", "w3", "b3"], ["c3"], name="same", strides=[2, 1], auto_pad="SAME_UPPER"),
        helper.make_node("Conv", ["c3", "w4"], ["c4"], name="k1s2", strides=[2, 2]),
        helper.make_node("AveragePool", ["c3"], ["p3"], name="avgex", kernel_shape=[2, 3], pads=[1, 1, 0, 1],
                         strides=[2, 2], count_include_pad=0),
        helper.make_node("Add", ["c4", "p3"], ["y"], name="add"),
    ]
    inits = {"w1": w(4, 3, 3, 3), "b1": w(4), "w2": w(6, 4, 7, 7), "w3": w(5, 6, 3, 3), "b3": w(5), "w4": w(5, 5, 1, 1)}
    return edgesplit.load(_model(nodes, [_vi("x", [1, 3, 45, 41])], [_vi("y", [1, 5, 3, 5])], inits))


@pytest.fixture(scope="session")
def odd_graph():
    return _odd_graph()


ODD_LAYERS = ("dil", "maxceil", "k7", "avgpad", "same", "k1s2", "avgex")


@pytest.mark.parametrize("k", (2, 3))
@pytest.mark.parametrize("kind", ("height", "width", "grid"))
@pytest.mark.parametrize("layer", ODD_LAYERS)
def test_odd_shapes_per_layer(odd_graph, layer, kind, k):
    _, plan = split_plan(odd_graph, [SplitRequest(kind, (layer,), k)], Cluster.simulated(k))
    assert_exact(plan, odd_graph)


@pytest.mark.parametrize("k", PARTS)
@pytest.mark.parametrize("axis", ("height", "width", "grid"))
def test_odd_shapes_fused_over_all_layers(odd_graph, axis, k):
    if axis == "height" and k > 3:  # the output has 3 rows
        with pytest.raises(SplitError, match=r"'add'.*3"):
            split_plan(odd_graph, [SplitRequest("fused-spatial", tuple(l.name for l in odd_graph.layers), k,
                                                axis=axis)], Cluster.simulated(k))
        return
    req = SplitRequest("fused-spatial", tuple(l.name for l in odd_graph.layers), k, axis=axis)
    rewritten, plan = split_plan(odd_graph, [req], Cluster.simulated(k))
    assert len(rewritten.regions) == 1 and rewritten.regions[0].stats.redundant_macs > 0
    assert_exact(plan, odd_graph)


@pytest.mark.parametrize("k", PARTS)
def test_odd_shapes_channel_splits(odd_graph, k):
    reqs = [SplitRequest("lop", ("dil",), min(k, 4)),  # 4 output channels
            SplitRequest("fused-channels", ("k7", "avgpad", "same"), k),
            SplitRequest("lop", ("k1s2",), k)]
    _, plan = split_plan(odd_graph, reqs, Cluster.simulated(k))
    assert_exact(plan, odd_graph)


def _norm_graph(op: str, **attrs):
    rng = np.random.default_rng(5)
    extra = {"InstanceNormalization": ["s", "b"]}.get(op, [])
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node(op, ["c", *extra], ["y"], name="norm", **attrs)]
    inits = {"w": rng.standard_normal((6, 3, 3, 3)).astype(np.float32),
             "s": rng.standard_normal(6).astype(np.float32), "b": rng.standard_normal(6).astype(np.float32)}
    return edgesplit.load(_model(nodes, [_vi("x", [1, 3, 9, 7])], [_vi("y", [1, 6, 9, 7])],
                                 {k: v for k, v in inits.items() if k == "w" or k in extra}))


def test_lrn_is_tiled_and_instance_norm_is_refused():
    graph = _norm_graph("LRN", size=3)
    _, plan = split_plan(graph, [SplitRequest("fused-spatial", ("conv", "norm"), 3)], Cluster.simulated(3))
    assert_exact(plan, graph)
    graph = _norm_graph("InstanceNormalization")
    with pytest.raises(SplitError, match=r"'norm' \(InstanceNormalization\) cannot be split spatially"):
        split_plan(graph, [SplitRequest("fused-spatial", ("conv", "norm"), 3)], Cluster.simulated(3))
    rewritten, plan = split_plan(graph, [SplitRequest("lop", ("conv",), 3)], Cluster.simulated(3))
    assert list(rewritten.regions[0].layers) == ["conv", "norm"]  # per channel: it follows a channel split
    assert_exact(plan, graph)


def test_a_follower_taken_by_the_region_before_is_refused(zoo_graphs):
    graph = zoo_graphs["vgg"]
    reqs = [SplitRequest("height", ("/body/body.0/Conv",), 2),  # extends over BN and ReLU
            SplitRequest("fused-spatial", ("/body/body.2/Relu", "/body/body.3/MaxPool"), 2)]
    with pytest.raises(SplitError, match=r"'/body/body.2/Relu'\] of the fused-spatial region .* already in another"):
        split_plan(graph, reqs, Cluster.simulated(2))
