"""`sync="exchange"`: every device of a split region combines the parts itself (edgesplit.rewrite.exchange).

Outputs equal the unsplit model's on channel, spatial, hybrid and head splits; after the first region no combined
tensor crosses between devices (only parts do: one exchange per synchronisation); lost parts are still filled or
replicated; the Ray executor's peer data plane gives the local executor's outputs; and the cut sends each tensor as
soon as it exists, so a region's parts run at once.
"""

from __future__ import annotations

from importlib import resources

import numpy as np
import pytest
from conftest import assert_plan_matches
from test_failures import CHANNELS, HYBRID
from test_ray import _requests, _same, executor, ray_instance  # noqa: F401 - fixture

import edgesplit
from edgesplit.cluster import Cluster
from edgesplit.errors import MappingError
from edgesplit.layout import ReplicaMode
from edgesplit.planner import partition
from edgesplit.rewrite.exchange import exchange
from edgesplit.runtime.common import random_inputs
from edgesplit.runtime.local import LocalExecutor

VIT = resources.files("edgesplit") / "data" / "mnist_vit.onnx"


@pytest.fixture(scope="module")
def vit():
    return edgesplit.load(str(VIT))


@pytest.mark.parametrize("name,strategy,split,k", [
    ("resnet", "horizontal", "channels", 2), ("resnet", "horizontal", "spatial", 3), ("resnet", "hybrid", "auto", 4),
    ("densenet", "horizontal", "auto", 2), ("mobilenet", "horizontal", "channels", 3),
    ("inception", "horizontal", "spatial", 2),
])
def test_exchange_plans_match_the_whole_model(zoo_graphs, name, strategy, split, k):
    graph = zoo_graphs[name]
    plan = partition(graph, Cluster.simulated(k), strategy=strategy, split=split, sync="exchange")
    assert any("@" in n for s in plan.stages for n in s.layers)  # some combine was copied
    assert_plan_matches(plan, graph)


def _hops(plan) -> int:
    """Cross-device transfers on the longest path of the stage graph: the serial hops of one request."""
    longest: dict[str, int] = {}
    for stage in plan.order():
        longest[stage.name] = max((longest[t.src] + t.cross_device for t in plan.transfers
                                   if t.dst == stage.name and t.src in longest), default=0)
    return max(longest.values())


@pytest.mark.parametrize("k", [2, 3])
def test_head_split_exchanges_parts_only(vit, k):
    from edgesplit.planner import layout, plan as cut_plan

    cluster = Cluster.simulated(k)
    rewritten, placement = layout(vit, cluster, strategy="heads")
    gather = cut_plan(rewritten, cluster, placement)
    swapped_graph, swapped_placement = exchange(rewritten, placement)
    swapped = cut_plan(swapped_graph, cluster, swapped_placement)
    assert_plan_matches(swapped, vit)
    producer = swapped_graph.producers()
    parts = {p.output for r in swapped.regions for p in r.parts}
    first = min(swapped_graph.position(n) for r in swapped.regions for n in r.nodes)
    late = [t.tensor for t in swapped.cross_device_transfers if t.tensor not in parts
            and swapped_graph.position(producer[t.tensor]) > first]
    assert not late  # after the first region, only parts cross: nobody waits for a combined result
    # gather: two hops per synchronisation (parts to the root, the result back); exchange: one
    syncs = len(swapped.regions)
    assert _hops(gather) >= 2 * syncs - 1
    assert _hops(swapped) <= syncs + 1


def test_a_graph_without_regions_is_unchanged(zoo_graphs):
    graph = zoo_graphs["vgg"]
    placement = {layer.name: "dev0" for layer in graph.layers}
    assert exchange(graph, placement) == (graph, placement)


def test_unknown_sync_is_a_clear_error(zoo_graphs):
    with pytest.raises(MappingError, match=r"--sync: expected one of \['gather', 'exchange'\], got 'all'"):
        partition(zoo_graphs["resnet"], Cluster.simulated(2), strategy="horizontal", sync="all")


def _conv_split(mode: ReplicaMode, sync: str):
    """conv1 split over dev1 and dev2 (part 0 replicated on dev2), the combine on dev0, what follows on dev3."""
    from edgesplit.bench import zoo
    from edgesplit.place.parts import place
    from edgesplit.planner import plan, with_replicas
    from edgesplit.rewrite import cnn
    from edgesplit.rewrite.base import SplitRequest
    from edgesplit.rewrite.replicas import ReplicaRequest

    cluster = Cluster.simulated(4)
    graph = edgesplit.load(zoo.split_conv(channels=CHANNELS))
    split = cnn.apply(graph, [SplitRequest("lop", ("conv1",), 2)])
    combines = dict.fromkeys((n for r in split.regions for n in r.combine_nodes), HYBRID["combine"])
    split, where = place(split, cluster, {"lop:conv1": HYBRID["parts"]}, {**HYBRID["rest"], **combines})
    region = split.regions[0]
    split, where = with_replicas(split, where, [ReplicaRequest(region.name, 0, region.parts[0].units, "dev2", mode)])
    if sync == "exchange":
        split, where = exchange(split, where)
    return plan(split, cluster, where)


@pytest.mark.parametrize("mode", [ReplicaMode.STANDBY, ReplicaMode.HOT])
def test_lost_parts_are_replicated_or_filled_as_with_gather(mode):
    gather, swapped = _conv_split(mode, "gather"), _conv_split(mode, "exchange")
    assert any("@dev3" in n for s in swapped.stages for n in s.layers)  # dev3 combines the parts itself
    x = random_inputs(gather.inputs, {"batch": 2}, seed=1)
    for failed, degraded in ((set(), False), ({"dev1"}, False), ({"dev1", "dev2"}, True)):
        want = LocalExecutor(gather, allow_degraded=degraded).run(x, failed=failed)
        got = LocalExecutor(swapped, allow_degraded=degraded).run(x, failed=failed)
        assert got.missing_devices == want.missing_devices
        for name, value in want.outputs.items():
            np.testing.assert_allclose(got.outputs[name], value, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("sync", ["gather", "exchange"])
def test_parts_run_at_once_the_cut_sends_a_tensor_as_soon_as_it_exists(zoo_graphs, sync):
    """The root's own part is a stage apart from the stage feeding the other parts, so they start together."""
    plan = partition(zoo_graphs["resnet"], Cluster.simulated(2), strategy="horizontal", split="channels", sync=sync)
    stage_of = {n: s.name for s in plan.stages for n in s.layers}
    for region in plan.regions:
        feeding = {t.src for t in plan.transfers if t.dst in {stage_of[n] for p in region.parts for n in p.nodes}
                   and t.cross_device}
        for part in region.parts:
            assert not feeding & {stage_of[n] for n in part.nodes}, region.name


@pytest.mark.ray
def test_peer_plane_runs_exchange_plans_as_the_local_executor(ray_instance, zoo_graphs, vit):  # noqa: F811
    for graph, strategy in ((zoo_graphs["resnet"], "horizontal"), (vit, "heads")):
        plan = partition(graph, Cluster.simulated(2), strategy=strategy, sync="exchange")
        local = LocalExecutor(plan, threads=1)
        requests = _requests(plan, 3, batch=1)
        with executor(plan, dataplane="peer") as ex:
            for r in requests:
                _same(ex.run(r), local.run(r))


def test_cli_partition_with_exchange_writes_a_plan_that_verifies(tmp_path):
    from test_cli import _cli

    plan_dir = tmp_path / "plan"
    result = _cli("partition", VIT, "--devices", 2, "--strategy", "heads", "--sync", "exchange", "-o", plan_dir)
    assert result.exit_code == 0, result.output
    plan = edgesplit.Plan.load(plan_dir)
    assert any("@" in n for s in plan.stages for n in s.layers)  # the combines were copied onto the devices
    result = _cli("verify", plan_dir)
    assert result.exit_code == 0 and "yes" in result.output, result.output
