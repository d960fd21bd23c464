"""Horizontal specs (AutoDiCE and the regions: form), hybrid mappings, bad input, and the CLI around them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from edgesplit.cli import main
from edgesplit.cluster import Cluster, Device
from edgesplit.errors import EdgesplitError, MappingError
from edgesplit.planner import partition
from edgesplit.plan import Plan
from edgesplit.rewrite.base import SplitError, SplitRequest
from edgesplit.rewrite.cnn import apply
from tests.test_rewrite_channels import assert_exact

CONV = "/body/body.4/Conv"  # vgg: 8 -> 16 channels, 8x8


def test_autodice_horizontal_spec_as_is(zoo_graphs):
    graph = zoo_graphs["vgg"]
    spec = {CONV: ["lop", [4, 10], ["dev0", "dev1", "dev2"]],
            "/body/body.0/Conv": ["height", [5], ["dev1", "dev2"]],
            "/fc/fc.0/Gemm": ["lip", [], ["dev0", "dev2"]]}
    plan = partition(graph, Cluster.simulated(3), spec)
    kinds = {r.name: r for r in plan.regions}
    assert [round(p.share * 16) for p in kinds[f"lop:{CONV}"].parts] == [4, 6, 6]
    assert [round(p.share * 16) for p in kinds["height:/body/body.0/Conv"].parts] == [5, 11]
    assert [p.device for p in kinds["lip:/fc/fc.0/Gemm"].parts] == ["dev0", "dev2"]
    assert_exact(plan, graph)


def test_autodice_hybrid_spec_with_vertical_entries(zoo_graphs):
    graph = zoo_graphs["vgg"]
    names = [l.name for l in graph.layers]
    cut = graph.position("/body/body.10/MaxPool")
    spec = {"dev0": names[:cut], "dev3": names[cut:], CONV: ["lop", [], ["dev1", "dev2"]]}
    plan = partition(graph, Cluster.simulated(4), spec)
    assert plan.placement["/Softmax"] == "dev3" and plan.placement["/body/body.0/Conv"] == "dev0"
    assert {p.device for p in plan.regions[0].parts} == {"dev1", "dev2"}
    assert plan.validate() == []
    assert_exact(plan, graph)


def test_yaml_regions_hybrid_with_weights(zoo_graphs, tmp_path):
    graph = zoo_graphs["resnet"]
    cluster = Cluster(tuple(Device(f"dev{i}", 1, 2**30, speed=1.0 + i) for i in range(4)))
    mapping = {
        "devices": {"dev0": [{"from": "/body/body.0/Conv", "to": "/body/body.4/Relu_1"}],
                    "dev3": [{"from": "/body/body.5/c1/Conv", "to": "/head/Softmax"}]},
        "regions": [
            {"layers": {"from": "/body/body.0/Conv", "to": "/body/body.3/MaxPool"}, "split": "fused-spatial",
             "devices": ["dev0", "dev1"], "weights": [1, 3]},
            {"layers": {"from": "/body/body.5/c1/Conv", "to": "/body/body.5/c2/Conv"}, "split": "fused-channels",
             "devices": ["dev2", "dev3"]},
            {"layers": "/body/body.6/c1/Conv", "split": "grid", "devices": ["dev0", "dev1", "dev2", "dev3"], "grid": [2, 2]},
        ],
    }
    plan = partition(graph, cluster, mapping)
    by_kind = {r.kind: r for r in plan.regions}
    spatial, channels, grid = by_kind["fused-spatial"], by_kind["fused-channels"], by_kind["grid"]
    assert [p.share for p in spatial.parts] == [pytest.approx(0.25), pytest.approx(0.75)]
    assert [p.share for p in channels.parts] == [pytest.approx(7 / 16), pytest.approx(9 / 16)]  # speeds 3 and 4, 16 channels
    assert len(grid.combine_nodes) == 3  # two row concats and the final one
    assert plan.placement["/head/fc/Gemm"] == "dev3" and plan.placement["/body/body.4/c1/Conv"] == "dev0"
    assert plan.validate() == []
    assert_exact(plan, graph)


def test_range_with_per_layer_kind_gives_one_region_per_layer(zoo_graphs):
    graph = zoo_graphs["vgg"]
    mapping = {"regions": [{"layers": {"from": "/body/body.0/Conv", "to": "/body/body.9/Relu"}, "split": "lop",
                            "devices": ["dev0", "dev1"]}]}
    plan = partition(graph, Cluster.simulated(2), mapping)
    assert [r.layers[0] for r in plan.regions] == ["/body/body.0/Conv", "/body/body.4/Conv", "/body/body.7/Conv"]
    assert_exact(plan, graph)


BAD = [
    # (model, requests or mapping, error class, pattern)
    ("vgg", {"/body/body.2/Relu": ["lop", [], ["dev0", "dev1"]]}, SplitError, r"'/body/body.2/Relu' \(Relu\) cannot be split by output"),
    ("vgg", {"/fc/fc.0/Gemm": ["height", [], ["dev0", "dev1"]]}, SplitError, r"'/fc/fc.0/Gemm' \(Gemm\) cannot be split spatially"),
    ("vgg", {CONV: ["lop", [0], ["dev0", "dev1"]]}, SplitError, r"strictly between 0 and 16"),
    ("vgg", {CONV: ["lop", [16], ["dev0", "dev1"]]}, SplitError, r"strictly between 0 and 16"),
    ("vgg", {CONV: ["lop", [9, 3], ["dev0", "dev1", "dev2"]]}, SplitError, r"strictly increasing"),
    ("vgg", {CONV: ["lop", [3, 5, 9], ["dev0", "dev1"]]}, SplitError, r"expected 1 split points for 2 parts"),
    ("vgg", {CONV: ["width", [8], ["dev0", "dev1"]]}, SplitError, r"strictly between 0 and 8"),
    ("vgg", {"/body/body.0/Conv": ["lop", [], [f"dev{i}" for i in range(9)]]}, SplitError,
     r"'/body/body.0/Conv' \(Conv, 8 output channels\): 9 parts asked but it has only 8"),
    ("vgg", {"/body/body.11/Conv": ["height", [], [f"dev{i}" for i in range(5)]]}, SplitError,
     r"'/body/body.13/Relu' \(height 4\): 5 parts asked but it has only 4"),
    ("vgg", {"/fc/fc.2/Gemm": ["lip", [], [f"dev{i}" for i in range(33)]]}, SplitError, r"32 input channels\): 33 parts"),
    ("mobilenet", {"/body/body.3/f/f.3/Conv": ["lip", [], ["dev0", "dev1"]]}, SplitError, r"group 32.*expected group 1"),
    ("mobilenet", {"/body/body.3/f/f.6/Conv": ["lop", [3], ["dev0", "dev1"]]}, SplitError, r"multiples of 4"),
    ("vgg", {"nope": ["lop", [], ["dev0", "dev1"]]}, MappingError, r"unknown layer 'nope'"),
    ("vgg", {"regions": [{"layers": "/body/body.0/Conx", "split": "lop", "devices": ["dev0", "dev1"]}]}, MappingError,
     r"unknown layer '/body/body.0/Conx'; did you mean '/body/body.0/Conv'"),
    ("vgg", {CONV: ["lop", [], ["dev0", "devX"]]}, SplitError, r"device 'devX' is not in the cluster"),
    ("vgg", {CONV: ["lop", [], ["dev0"]]}, SplitError, r"at least 2 devices"),
    ("vgg", {CONV: ["grid", [], ["dev0", "dev1"]]}, MappingError, r"AutoDiCE horizontal kind must be one of"),
    ("vgg", {"regions": [{"layers": CONV, "split": "diagonal", "devices": ["dev0", "dev1"]}]}, MappingError,
     r"unknown split 'diagonal'"),
    ("vgg", {"regions": [{"layers": CONV, "devices": ["dev0", "dev1"]}]}, MappingError, r"missing key\(s\) \['split'\]"),
    ("vgg", {"regions": [{"layers": ["/body/body.0/Conv", "/body/body.7/Conv"], "split": "fused-channels",
                          "devices": ["dev0", "dev1"]}]}, SplitError, r"'/body/body.7/Conv' does not receive the channel split"),
    ("vgg", {"regions": [{"layers": {"from": "/body/body.11/Conv", "to": "/fc/fc.0/Gemm"}, "split": "fused-spatial",
                          "devices": ["dev0", "dev1"]}]}, SplitError, r"'/Flatten' \(Flatten\) cannot be split spatially"),
    ("resnet", {"regions": [{"layers": {"from": "/body/body.4/c1/Conv", "to": "/body/body.5/c1/Conv"},
                             "split": "fused-spatial", "devices": ["dev0", "dev1"]}]}, SplitError, r"expected exactly one"),
    ("vgg", {"regions": [{"layers": CONV, "split": "lop", "devices": ["dev0", "dev1"]},
                         {"layers": CONV, "split": "lip", "devices": ["dev0", "dev1"]}]}, SplitError, r"in two regions"),
    ("vgg", {"devices": {"dev0": ["/body/body.0/Conv"]}, "regions": [{"layers": CONV, "split": "lop", "devices": ["dev0", "dev1"]}]},
     MappingError, r"layer\(s\) outside the horizontal regions have no device"),
    ("inception", {"regions": [{"layers": "/body/body.0/Conv", "split": "grid", "grid": [2, 3], "devices": ["dev0", "dev1"]}]},
     SplitError, r"grid 2x3 .* expected rows x cols = 2"),
]


@pytest.mark.parametrize("model,mapping,error,pattern", BAD, ids=[f"bad{i}" for i in range(len(BAD))])
def test_bad_specs_name_the_layer_and_the_limit(model, mapping, error, pattern, zoo_graphs):
    with pytest.raises(error, match=pattern):
        partition(zoo_graphs[model], Cluster.simulated(40), mapping)


def test_partial_overlap_with_a_spatial_region_is_refused(zoo_graphs):
    graph = zoo_graphs["vgg"]
    reqs = [SplitRequest("fused-spatial", ("/body/body.0/Conv", "/body/body.1/BatchNormalization"), 2),
            SplitRequest("lop", ("/body/body.0/Conv",), 2)]
    with pytest.raises(SplitError, match="in two regions"):
        apply(graph, reqs)


def test_strategy_errors(zoo_graphs):
    graph = zoo_graphs["vgg"]
    with pytest.raises(EdgesplitError, match="at least 2 devices"):
        partition(graph, Cluster.simulated(1), strategy="horizontal")
    with pytest.raises(EdgesplitError, match="--split: expected one of"):
        partition(graph, Cluster.simulated(2), strategy="horizontal", split="diagonal")
    with pytest.raises(MappingError, match="vertical-only mapping"):
        partition(graph, Cluster.simulated(2), {"dev0": [l.name for l in graph.layers]}, strategy="hybrid")


# ----- CLI ------------------------------------------------------------------------------------------------------------
def test_cli_horizontal_partition_inspect_verify(zoo_dir: Path, tmp_path):
    runner = CliRunner()
    out = tmp_path / "plan"
    r = runner.invoke(main, ["partition", str(zoo_dir / "vgg.onnx"), "--devices", "3", "--strategy", "horizontal",
                             "--split", "spatial", "-o", str(out)])
    assert r.exit_code == 0, r.output
    assert "horizontal regions" in r.output and "fused-spatial" in r.output
    r = runner.invoke(main, ["inspect", str(out)])
    assert r.exit_code == 0 and "synchronisation points" in r.output and "halo overhead" in r.output
    r = runner.invoke(main, ["inspect", str(out), "--json"])
    summary = json.loads(r.output)["region_summary"]
    assert summary and all(set(s["shares"]) == {"dev0", "dev1", "dev2"} for s in summary)
    assert all(s["bytes_exchanged"] > 0 for s in summary)
    r = runner.invoke(main, ["verify", str(out)])
    assert r.exit_code == 0, r.output
    assert Plan.load(out).regions


def test_cli_mapping_files_and_bad_mapping_writes_nothing(zoo_dir: Path, tmp_path):
    runner = CliRunner()
    good = tmp_path / "h.json"
    good.write_text(json.dumps({CONV: ["lop", [8], ["dev0", "dev1"]]}))
    r = runner.invoke(main, ["partition", str(zoo_dir / "vgg.onnx"), "--devices", "2", "--mapping", str(good),
                             "-o", str(tmp_path / "p1")])
    assert r.exit_code == 0, r.output
    hybrid = tmp_path / "h.yaml"
    hybrid.write_text(yaml.safe_dump({"regions": [{"layers": {"from": "/body/body.0/Conv", "to": "/body/body.9/Relu"},
                                                   "split": "fused-spatial", "devices": ["dev0", "dev1"]}]}))
    r = runner.invoke(main, ["partition", str(zoo_dir / "vgg.onnx"), "--devices", "2", "--mapping", str(hybrid),
                             "-o", str(tmp_path / "p2")])
    assert r.exit_code == 0, r.output
    assert runner.invoke(main, ["verify", str(tmp_path / "p2")]).exit_code == 0
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({CONV: ["lop", [20], ["dev0", "dev1"]]}))
    r = runner.invoke(main, ["partition", str(zoo_dir / "vgg.onnx"), "--devices", "2", "--mapping", str(bad),
                             "-o", str(tmp_path / "p3")])
    assert r.exit_code == 2 and "strictly between 0 and 16" in r.output and "Traceback" not in r.output
    assert not (tmp_path / "p3").exists()


@pytest.mark.parametrize("example", ("horizontal-vgg.json", "hybrid-vgg.yaml"))
def test_shipped_examples(example, zoo_graphs):
    from edgesplit.place import load_mapping

    graph = zoo_graphs["vgg"]
    path = Path(__file__).resolve().parents[1] / "examples" / example
    plan = partition(graph, Cluster.simulated(4), load_mapping(path))
    assert plan.regions and plan.validate() == []
    assert_exact(plan, graph)


def test_cli_hybrid_with_uneven_cluster(zoo_dir: Path, tmp_path):
    cluster = tmp_path / "cluster.yaml"
    cluster.write_text(yaml.safe_dump({"devices": [{"name": f"pi{i}", "cores": 1, "memory": "1GiB", "speed": s}
                                                   for i, s in enumerate((1.0, 3.0, 1.0, 3.0))]}))
    runner = CliRunner()
    out = tmp_path / "plan"
    r = runner.invoke(main, ["partition", str(zoo_dir / "resnet.onnx"), "--cluster", str(cluster), "--strategy", "hybrid",
                             "--split", "channels", "-o", str(out)])
    assert r.exit_code == 0, r.output
    summary = json.loads(runner.invoke(main, ["inspect", str(out), "--json"]).output)["region_summary"]
    assert all(s["shares"]["pi1" if "pi1" in s["shares"] else "pi3"] > 0.6 for s in summary)  # speed 3 vs 1
    assert runner.invoke(main, ["verify", str(out)]).exit_code == 0
