"""Automatic horizontal and hybrid plans: exact, DAG-shaped, fused where possible, weights spread by share."""

from __future__ import annotations

import itertools

import pytest

from edgesplit.cluster import Cluster
from edgesplit.planner import partition
from edgesplit.place.regions import device_groups
from edgesplit.rewrite.base import SplitRequest
from edgesplit.rewrite.cnn import apply
from tests.conftest import ZOO
from tests.test_rewrite_channels import assert_exact, split_plan

CASES = [(m, s, p) for m, s, p in itertools.product(ZOO, ("horizontal", "hybrid"), ("channels", "spatial", "auto"))]


@pytest.mark.parametrize("name,strategy,split", CASES)
def test_automatic_plans_are_exact(name, strategy, split, zoo_graphs):
    k = 2 + CASES.index((name, strategy, split)) % 4  # every model sees several part counts across the table
    graph = zoo_graphs[name]
    plan = partition(graph, Cluster.simulated(k), strategy=strategy, split=split)
    assert plan.regions, "expected at least one horizontal region"
    assert plan.validate() == []
    kinds = {r.kind for r in plan.regions}
    if split == "channels":
        assert kinds <= {"lop", "lip", "fused-channels"}
    if split == "spatial":
        assert kinds <= {"height", "width", "grid", "fused-spatial"}
    assert_exact(plan, graph)


def test_hybrid_cuts_vertically_and_splits_inside_groups(zoo_graphs):
    graph = zoo_graphs["vgg"]
    cluster = Cluster.simulated(4)
    plan = partition(graph, cluster, strategy="hybrid", split="auto")
    groups = [{d.name for d in g} for g in device_groups(cluster)]
    assert groups == [{"dev0", "dev1"}, {"dev2", "dev3"}]
    for region in plan.regions:
        used = {p.device for p in region.parts}
        assert any(used <= g for g in groups), f"{region.name} straddles groups: {used}"
    assert {g for r in plan.regions for g in range(2) if {p.device for p in r.parts} <= groups[g]} == {0, 1}
    assert plan.validate() == []  # includes the acyclicity check of the stage graph
    assert_exact(plan, graph)


def test_fused_regions_halve_the_synchronisations(zoo_graphs):
    graph = zoo_graphs["resnet"]
    chain = ("/body/body.5/c1/Conv", "/body/body.5/b1/BatchNormalization", "/body/body.5/Relu", "/body/body.5/c2/Conv")
    fused = apply(graph, [SplitRequest("fused-channels", chain, 4)])
    per_layer = apply(graph, [SplitRequest("lop", chain[:1], 4), SplitRequest("lip", chain[-1:], 4)])
    syncs = lambda g: len({r.combine_node for r in g.regions})  # noqa: E731
    assert syncs(fused) * 2 <= syncs(per_layer)


def test_channel_split_spreads_parameters(zoo_graphs):
    """A 4-way output-channel split puts about a quarter of the layer's weights on each device."""
    graph = zoo_graphs["vgg"]
    layer = graph.layer("/body/body.11/Conv")
    rewritten, plan = split_plan(graph, [SplitRequest("lop", (layer.name,), 4)], Cluster.simulated(4))
    region = rewritten.regions[0]
    for part in region.parts:
        conv = rewritten.layer(part.nodes[0])
        assert conv.param_bytes <= 1.05 * layer.param_bytes / 4
    assert plan.validate() == []
