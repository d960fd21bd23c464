"""Bad input gets a clear message (expected vs given), never a traceback, and nothing half-written."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import edgesplit
from conftest import resign
from edgesplit.cli import main
from edgesplit.cluster import Cluster
from edgesplit.errors import ClusterError, InputError, MappingError, PlacementError, PlanError


def _cli(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_mapping_names_unknown_layers_and_suggests(zoo_graphs):
    graph = zoo_graphs["vgg"]
    real = graph.layers[0].name
    mapping = {"dev0": [real[:-1] + "X"] + [l.name for l in graph.layers[1:]], "dev1": []}
    with pytest.raises(MappingError) as exc:
        edgesplit.partition(graph, Cluster.simulated(2), mapping)
    assert f"unknown layer {real[:-1] + 'X'!r}; did you mean {real!r}" in str(exc.value)
    assert "1 layer(s) are not assigned" in str(exc.value)


def test_mapping_reports_every_problem_at_once(zoo_graphs):
    graph = zoo_graphs["vgg"]
    names = [l.name for l in graph.layers]
    mapping = {"dev0": names[:5], "dev1": names[4:-1], "ghost": []}
    with pytest.raises(MappingError) as exc:
        edgesplit.partition(graph, Cluster.simulated(2), mapping)
    text = str(exc.value)
    assert f"layer {names[4]!r} is assigned to two devices: 'dev0' and 'dev1'" in text
    assert "device 'ghost' is not in the cluster; expected one of ['dev0', 'dev1']" in text
    assert f"not assigned to any device: {names[-1]}" in text


def test_mapping_ranges_in_yaml(zoo_graphs, tmp_path: Path):
    graph = zoo_graphs["resnet"]
    names = [l.name for l in graph.layers]
    (tmp_path / "m.yaml").write_text(
        f"devices:\n  dev0:\n    - {{from: '{names[0]}', to: '{names[9]}'}}\n    - '{names[-1]}'\n"
        f"  dev1:\n    - {{from: '{names[10]}', to: '{names[-2]}'}}\n"
    )
    plan = edgesplit.partition(graph, Cluster.simulated(2), edgesplit.place.load_mapping(tmp_path / "m.yaml"))
    assert [s.device for s in plan.stages] == ["dev0", "dev1", "dev0"]
    (tmp_path / "bad.yaml").write_text(f"dev0:\n  - {{from: '{names[9]}', to: '{names[0]}'}}\n")
    with pytest.raises(MappingError, match="comes after"):
        edgesplit.partition(graph, Cluster.simulated(2), edgesplit.place.load_mapping(tmp_path / "bad.yaml"))


def test_cluster_missing_fields_and_impossible_values(tmp_path: Path):
    (tmp_path / "c.yaml").write_text(
        "devices:\n"
        "  - {name: a, cores: 4}\n"
        "  - {name: b, cores: 0, memory: 1GiB}\n"
        "  - {name: c, cores: 2, memory: lots}\n"
        "  - {name: b, cores: 1, memory: 1GiB, speed: -1}\n"
        "links:\n  default: {bandwidth: 100mbit, latency: 2ms}\n"
    )
    with pytest.raises(ClusterError) as exc:
        Cluster.load(tmp_path / "c.yaml")
    text = str(exc.value)
    assert "devices[0] (a): missing field(s) ['memory']" in text
    assert "expected a size like 4GiB" in text and "'lots'" in text
    (tmp_path / "d.yaml").write_text("devices:\n  - {name: b, cores: 0, memory: 1GiB}\n  - {name: b, cores: 1, memory: 1GiB, speed: -1}\n")
    with pytest.raises(ClusterError) as exc:
        Cluster.load(tmp_path / "d.yaml")
    assert "expected cores >= 1, got 0" in str(exc.value)
    assert "'b' appears 2 times" in str(exc.value)
    assert "expected speed > 0, got -1" in str(exc.value)
    with pytest.raises(ClusterError, match="expected a mapping with a non-empty 'devices' list"):
        Cluster.from_dict([1, 2])


def test_cluster_round_trips(tmp_path: Path):
    c = Cluster.from_dict({
        "devices": [{"name": "pi", "cores": 4, "memory": "4GiB", "speed": 1.5, "power": {"idle_w": 2.7, "busy_w": 6.4}},
                    {"name": "nano", "cores": 4, "memory": "2GiB"}],
        "links": {"default": {"bandwidth": "100mbit", "latency": "2ms"},
                  "pairs": [{"between": ["pi", "nano"], "bandwidth": "1gbit", "latency": "0.5ms"}]},
    })
    c.save(tmp_path / "c.yaml")
    again = Cluster.load(tmp_path / "c.yaml")
    assert again == c
    assert c.link("nano", "pi").bandwidth == 1e9 / 8 and c.link("pi", "pi").latency == 2e-3


def test_memory_budget_shows_the_numbers(zoo_graphs):
    graph = zoo_graphs["vgg"]
    tiny = Cluster((edgesplit.Device("a", 1, 20_000), edgesplit.Device("b", 1, 20_000)))
    with pytest.raises(PlacementError, match=r"budgets are a=0.02 MiB, b=0.02 MiB"):
        edgesplit.partition(graph, tiny)
    mapping = {"a": [l.name for l in graph.layers], "b": []}
    with pytest.raises(PlacementError, match=r"device 'a' needs 0.\d+ MiB .* but its budget is 0.02 MiB"):
        edgesplit.partition(graph, tiny, mapping)


def test_balance_respects_memory_budgets(zoo_graphs):
    graph = zoo_graphs["vgg"]
    need = edgesplit.place.memory_need(graph, [l.name for l in graph.layers])
    # the big Gemm cannot go to the small device; the balancer must route around it
    small, big = edgesplit.Device("small", 1, need // 3), edgesplit.Device("big", 1, need * 2)
    plan = edgesplit.partition(graph, Cluster((small, big)))
    assert all(s.param_bytes <= need // 3 for s in plan.device_stages("small"))


def test_tampered_or_missing_stage_file_is_refused(zoo_graphs, tmp_path: Path):
    plan = edgesplit.partition(zoo_graphs["resnet"], Cluster.simulated(2))
    plan.save(tmp_path / "p")
    stage_file = tmp_path / "p" / plan.stages[1].file
    stage_file.write_bytes(stage_file.read_bytes() + b"\x00")
    with pytest.raises(PlanError, match=f"signature does not match its files \\({stage_file.name}: signed sha256"):
        edgesplit.Plan.load(tmp_path / "p")
    result = _cli("run", tmp_path / "p", "--input", tmp_path / "x.npz", "-o", tmp_path / "y.npz")
    assert result.exit_code == 2 and "does not match" in result.output and "Traceback" not in result.output
    resign(tmp_path / "p")  # signed as it is now: the sha256 plan.json gives it still refuses it
    with pytest.raises(PlanError, match=f"stage {plan.stages[1].name!r}: its ONNX file's sha256 does not match"):
        edgesplit.Plan.load(tmp_path / "p")
    stage_file.unlink()
    with pytest.raises(PlanError, match=f"{stage_file.name}: signed sha256 .*, found missing"):
        edgesplit.Plan.load(tmp_path / "p")
    with pytest.raises(PlanError, match="expected a plan directory containing plan.json"):
        edgesplit.Plan.load(tmp_path)


def test_run_inputs_missing_wrong_shape_or_dtype(zoo_graphs):
    plan = edgesplit.partition(zoo_graphs["resnet"], Cluster.simulated(2))
    ex = edgesplit.LocalExecutor(plan)
    with pytest.raises(InputError, match=r"missing input\(s\) \['input'\]"):
        ex.run({"x": np.zeros((1, 3, 32, 32), np.float32)})
    with pytest.raises(InputError, match=r"expected shape \[batch, 3, 32, 32\], got \[1, 3, 31, 32\] \(axis 2\)"):
        ex.run({"input": np.zeros((1, 3, 31, 32), np.float32)})
    with pytest.raises(InputError, match="expected dtype float32, got float64"):
        ex.run({"input": np.zeros((1, 3, 32, 32))})
    with pytest.raises(InputError, match=r"rank 4\), got \[3, 32, 32\]"):
        ex.run({"input": np.zeros((3, 32, 32), np.float32)})


def test_cli_errors_exit_2_without_traceback_and_write_nothing(zoo_dir: Path, tmp_path: Path):
    out = tmp_path / "plan"
    (tmp_path / "m.json").write_text(json.dumps({"dev0": ["nope"]}))
    for args in (
        ("partition", zoo_dir / "vgg.onnx", "--devices", 2, "--mapping", tmp_path / "m.json", "-o", out),
        ("partition", zoo_dir / "vgg.onnx", "-o", out),
        ("partition", tmp_path / "m.json", "--devices", 2, "-o", out),
        ("partition", zoo_dir / "vgg.onnx", "--cluster", tmp_path / "none.yaml", "-o", out),
        ("inspect", tmp_path / "missing.onnx"),
        ("verify", tmp_path),
    ):
        result = _cli(*args)
        assert result.exit_code == 2, (args, result.output)
        assert "error:" in result.output and "Traceback" not in result.output, result.output
        assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.json"]


def test_existing_non_plan_directory_is_not_overwritten(zoo_graphs, tmp_path: Path):
    (tmp_path / "precious").mkdir()
    (tmp_path / "precious" / "notes.txt").write_text("keep me")
    plan = edgesplit.partition(zoo_graphs["vgg"], Cluster.simulated(2))
    with pytest.raises(PlanError, match="new directory, an empty one or an existing plan"):
        plan.save(tmp_path / "precious")
    assert (tmp_path / "precious" / "notes.txt").read_text() == "keep me"
