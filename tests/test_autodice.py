"""AutoDiCE's own files as AutoDiCE writes them (parrotsky/AutoDiCE and AutoDiCE_examples): host_resource keys,
layer names in its `_` form, horizontal specs with one value per device, the hybrid mapping + horizontal.json
pair, platform.txt, old opsets, and execution providers on devices. Every plan is checked against onnxruntime on
the unsplit (original) model within 1e-5."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper

import edgesplit
from edgesplit.cli import main
from edgesplit.cluster import Cluster
from edgesplit.errors import ClusterError, MappingError, ModelError, PlacementError
from edgesplit.planner import partition
from edgesplit.place.autodice import cluster_from_mapping
from edgesplit.plan import Plan
from edgesplit.runtime import random_inputs
from tests.conftest import assert_plan_matches

RTOL = 1e-5
ABSENT = "CUDAExecutionProvider" if "CUDAExecutionProvider" not in ort.get_available_providers() \
    else "NoSuchExecutionProvider"


def autodice_names(path: Path) -> list[str]:
    """The layer names AutoDiCE's format_onnx gives the model's nodes: first output, `/` -> `_`, in graph order."""
    return [n.output[0].replace("/", "_") for n in onnx.load(str(path)).graph.node]


def write(path: Path, data: object) -> Path:
    path.write_text(json.dumps(data))
    return path


def cli(*args: object):
    return CliRunner().invoke(main, [str(a) for a in args])


def assert_matches_original(plan: Plan, source: Path) -> None:
    """The plan's outputs equal one onnxruntime session on the file as given (not edgesplit's loaded copy)."""
    x = random_inputs(plan.inputs, {"batch": 2}, seed=3)
    got = edgesplit.LocalExecutor(plan, threads=1).run(x).outputs
    session = ort.InferenceSession(str(source), providers=["CPUExecutionProvider"])
    for out, want in zip(session.get_outputs(), session.run(None, x)):
        err = np.max(np.abs(got[out.name] - want)) / max(np.max(np.abs(want)), 1e-30)
        assert err <= RTOL, f"{out.name}: relative error {err:.2e}"


# 1. devices from the mapping's keys, 2. AutoDiCE's layer names ------------------------------------------------

def test_devices_from_autodice_keys_and_names(zoo_dir: Path, tmp_path: Path):
    model = zoo_dir / "vgg.onnx"
    names = autodice_names(model)
    mapping = write(tmp_path / "mapping.json", {"lenovo_cpu0": names[:5], "lenovo_cpu012345": names[5:14],
                                                "nx01_gpu": names[14:]})
    result = cli("partition", model, "--mapping", mapping, "-o", tmp_path / "plan")
    assert result.exit_code == 0, result.output
    assert "devices from the mapping's keys" in result.output and "GPU gpu" in result.output
    plan = Plan.load(tmp_path / "plan")
    devices = {d.name: d for d in plan.cluster.devices}
    assert list(devices) == ["lenovo_cpu0", "lenovo_cpu012345", "nx01_gpu"]
    assert [d.cores for d in devices.values()] == [1, 6, 1]
    assert devices["lenovo_cpu0"].host == devices["lenovo_cpu012345"].host == "lenovo"
    assert devices["nx01_gpu"].gpu and "CUDAExecutionProvider" in devices["nx01_gpu"].providers
    local = plan.cluster.link("lenovo_cpu0", "lenovo_cpu012345")
    assert local.bandwidth > plan.cluster.link("lenovo_cpu0", "nx01_gpu").bandwidth * 100
    assert plan.placement["/body/body.4/Conv"] == "lenovo_cpu0" and plan.placement["/Softmax"] == "nx01_gpu"
    verified = cli("verify", tmp_path / "plan", "--rtol", RTOL)
    assert verified.exit_code == 0, verified.output


def test_a_cluster_file_names_win(zoo_dir: Path, tmp_path: Path):
    model = zoo_dir / "vgg.onnx"
    names = autodice_names(model)
    mapping = write(tmp_path / "mapping.json", {"lenovo_cpu0": names[:9], "lenovo_cpu1": names[9:]})
    for how in (["--devices", 2], ["--cluster", "examples/mixed.yaml"]):
        result = cli("partition", model, "--mapping", mapping, *how, "-o", tmp_path / "plan")
        assert result.exit_code == 2 and "Traceback" not in result.output
        assert "device 'lenovo_cpu0' is not in the cluster" in result.output
        assert "the cluster's device names win" in result.output
        assert not (tmp_path / "plan").exists()


def test_layer_by_node_name_first_output_or_autodice_form(zoo_graphs):
    graph = zoo_graphs["resnet"]
    nodes = graph.model.graph.node
    forms = [n.name if i % 3 == 0 else n.output[0] if i % 3 == 1 else n.output[0].replace("/", "_")
             for i, n in enumerate(nodes)]
    half = len(forms) // 2
    mapping = {"lenovo_cpu0": forms[:half], "lenovo_cpu1": forms[half:]}
    plan = partition(graph, cluster_from_mapping(mapping), mapping)
    assert plan.placement[nodes[0].name] == "lenovo_cpu0" and plan.placement[nodes[-1].name] == "lenovo_cpu1"
    assert_plan_matches(plan, graph, rtol=RTOL)


def test_constant_nodes_autodice_lists_are_ignored(zoo_dir: Path, zoo_graphs):
    names = autodice_names(zoo_dir / "mobilenet.onnx")  # Clip bounds are Constant nodes, folded by edgesplit
    assert any("Constant" in n for n in names)
    mapping = {"nx01_arm0123": names[: len(names) // 2], "nx02_arm0123": names[len(names) // 2:]}
    plan = partition(zoo_graphs["mobilenet"], cluster_from_mapping(mapping), mapping)
    assert set(plan.placement.values()) == {"nx01_arm0123", "nx02_arm0123"}
    assert_matches_original(plan, zoo_dir / "mobilenet.onnx")


def test_ambiguous_autodice_name_names_the_candidates():
    relu = [helper.make_node("Relu", [i], [o], name=n) for i, o, n in (("x", "p/q", "r1"), ("p/q", "p.q", "r2"),
                                                                         ("p.q", "y", "r3"))]
    vi = [helper.make_tensor_value_info(t, TensorProto.FLOAT, [1, 4]) for t in ("x", "y")]
    graph = edgesplit.load(helper.make_model(helper.make_graph(relu, "g", vi[:1], vi[1:]),
                                             opset_imports=[helper.make_opsetid("", 17)]))
    with pytest.raises(MappingError, match=r"'p_q' is ambiguous: it names \['r1', 'r2'\]"):
        partition(graph, Cluster.simulated(2), {"dev0": ["p_q"], "dev1": ["r3"]})


# 3. opsets below 13 -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("opset", [9, 12])
def test_old_opset_converted_and_checked(tmp_path: Path, opset: int, caplog):
    import torch

    from edgesplit.bench import zoo

    factory, shape = zoo.MODELS["vgg"]
    torch.manual_seed(0)
    path = tmp_path / f"vgg{opset}.onnx"
    torch.onnx.export(factory().eval(), (torch.randn(*shape),), str(path), dynamo=False, opset_version=opset,
                      input_names=["input"], output_names=["output"], dynamic_axes={"input": {0: "batch"}})
    with caplog.at_level(logging.WARNING, logger="edgesplit"):
        graph = edgesplit.load(path)
    notes = [r.getMessage() for r in caplog.records if "converted it to opset" in r.getMessage()]
    assert len(notes) == 1 and f"opset {opset}" in notes[0]
    names = autodice_names(path)
    mapping = {"nx01_arm0123": names[:7], "nx02_arm0123": names[7:]}
    plan = partition(graph, cluster_from_mapping(mapping), mapping)
    assert_matches_original(plan, path)


def _opset9_model() -> onnx.ModelProto:
    w = onnx.numpy_helper.from_array(np.arange(16, dtype=np.float32).reshape(4, 4) / 10, "w")
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"), helper.make_node("Relu", ["h"], ["y"])]
    vi = [helper.make_tensor_value_info(t, TensorProto.FLOAT, [2, 4]) for t in ("x", "y")]
    return helper.make_model(helper.make_graph(nodes, "g", vi[:1], vi[1:], [w]),
                             opset_imports=[helper.make_opsetid("", 9)])


def test_old_opset_refused_with_the_reason(monkeypatch):
    def broken(model, target):
        raise RuntimeError("No adapter for Relu from 9 to 17")

    monkeypatch.setattr(onnx.version_converter, "convert_version", broken)
    with pytest.raises(ModelError, match="got opset 9.*cannot convert it to 17: No adapter for Relu"):
        edgesplit.load(_opset9_model())


def test_old_opset_conversion_that_changes_outputs_is_refused(monkeypatch):
    convert = onnx.version_converter.convert_version

    def wrong(model, target):
        out = convert(model, target)
        out.graph.initializer[0].CopyFrom(onnx.numpy_helper.from_array(np.zeros((4, 4), np.float32), "w"))
        return out

    monkeypatch.setattr(onnx.version_converter, "convert_version", wrong)
    with pytest.raises(ModelError, match="changed what it computes"):
        edgesplit.load(_opset9_model())


# 4. horizontal specs in AutoDiCE's syntax, every kind ------------------------------------------------------------

def test_autodice_horizontal_values_every_kind(zoo_dir: Path, zoo_graphs):
    graph = zoo_graphs["vgg"]
    name = {n: n.replace("/", "_") + "_output_0" for n in ("/body/body.0/Conv", "/body/body.4/Conv",
                                                            "/body/body.7/Conv", "/body/body.11/Conv", "/fc/fc.0/Gemm")}
    devices = ["lenovo_cpu0", "lenovo_cpu1"]
    spec = {name["/body/body.0/Conv"]: ["height", [5, 11], devices],       # rows of each part
            name["/body/body.4/Conv"]: ["lop", [6, 65535], devices],       # cumulative end, 65535 = to the end
            name["/body/body.7/Conv"]: ["lip", [4, 12], devices],          # input channels of each part
            name["/body/body.11/Conv"]: ["width", [1, 3], devices],        # columns of each part
            name["/fc/fc.0/Gemm"]: ["lop", [20, 32], devices]}             # the end may be the total
    plan = partition(graph, cluster_from_mapping(spec), spec)
    shares = {r.name: [round(p.share * total) for p in r.parts] for r, total in
              zip(sorted(plan.regions, key=lambda r: r.name), [16, 16, 16, 32, 4])}
    assert shares == {"height:/body/body.0/Conv": [5, 11], "lip:/body/body.7/Conv": [4, 12],
                      "lop:/body/body.4/Conv": [6, 10], "lop:/fc/fc.0/Gemm": [20, 12],
                      "width:/body/body.11/Conv": [1, 3]}
    assert_plan_matches(plan, graph, rtol=RTOL)


def test_regions_form_takes_autodice_values_too(zoo_graphs):
    graph = zoo_graphs["vgg"]
    mapping = {"regions": [{"layers": "/body/body.4/Conv", "split": "lop", "points": [6, 65535],
                            "devices": ["dev0", "dev1"]},
                           {"layers": "/body/body.7/Conv", "split": "lip", "points": [10], "devices": ["dev0", "dev1"]}]}
    plan = partition(graph, Cluster.simulated(2), mapping)
    assert {r.name: [round(p.share * 16) for p in r.parts] for r in plan.regions} == {
        "lop:/body/body.4/Conv": [6, 10], "lip:/body/body.7/Conv": [10, 6]}
    assert_plan_matches(plan, graph, rtol=RTOL)


@pytest.mark.parametrize("entry, message", [
    (["lip", [4, 10], ["a_cpu0", "a_cpu1"]], "expected positive sizes summing to its 16 input channels"),
    (["lop", [6, 12], ["a_cpu0", "a_cpu1"]], "expected the last cumulative end to be 16 .* or 65535"),
    (["height", [5, 5], ["a_cpu0", "a_cpu1"]], "summing to its 8 output rows, got \\[5, 5\\]"),
])
def test_autodice_values_that_do_not_fit(zoo_graphs, entry, message):
    spec = {"/body/body.7/Conv": entry}
    with pytest.raises(MappingError, match=message):
        partition(zoo_graphs["vgg"], cluster_from_mapping(spec), spec)


# 5. the hybrid pair: mapping (split layers under every device) + horizontal.json ---------------------------------

def test_hybrid_pair_from_the_command_line(zoo_dir: Path, tmp_path: Path):
    model = zoo_dir / "vgg.onnx"
    names = autodice_names(model)
    conv, fc = "_body_body.4_Conv_output_0", "_fc_fc.0_Gemm_output_0"
    hmapping = write(tmp_path / "hmapping.json", {"lenovo_cpu0": names[:17], "lenovo_cpu1": [conv, fc, *names[17:]]})
    horizontal = write(tmp_path / "horizontal.json", {conv: ["lop", [6, 65535], ["lenovo_cpu0", "lenovo_cpu1"]],
                                                      fc: ["lop", [20, 65535], ["lenovo_cpu0", "lenovo_cpu1"]]})
    result = cli("partition", model, "--mapping", hmapping, "--horizontal", horizontal, "-o", tmp_path / "plan")
    assert result.exit_code == 0, result.output
    plan = Plan.load(tmp_path / "plan")
    assert sorted(r.name for r in plan.regions) == ["lop:/body/body.4/Conv", "lop:/fc/fc.0/Gemm"]
    assert all([p.device for p in r.parts] == ["lenovo_cpu0", "lenovo_cpu1"] for r in plan.regions)
    assert plan.placement["/Softmax"] == "lenovo_cpu1" and plan.placement["/body/body.0/Conv"] == "lenovo_cpu0"
    verified = cli("verify", tmp_path / "plan", "--rtol", RTOL)
    assert verified.exit_code == 0, verified.output


def test_hybrid_pair_that_disagrees(zoo_dir: Path, tmp_path: Path):
    model = zoo_dir / "vgg.onnx"
    names = autodice_names(model)
    conv = "_body_body.4_Conv_output_0"
    hmapping = write(tmp_path / "hmapping.json", {"lenovo_cpu0": names[:17], "lenovo_cpu1": names[17:]})
    horizontal = write(tmp_path / "horizontal.json", {conv: ["lop", [6, 65535], ["lenovo_cpu0", "lenovo_cpu1"]]})
    result = cli("partition", model, "--mapping", hmapping, "--horizontal", horizontal, "-o", tmp_path / "plan")
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "listed under ['lenovo_cpu0'] in the mapping" in result.output and not (tmp_path / "plan").exists()


# 6. platform.txt -------------------------------------------------------------------------------------------------

def test_platform_file_is_a_cluster(tmp_path: Path):
    platform = tmp_path / "platform.txt"
    platform.write_text("nx01, arm, slots=0-5, gpu=NVIDIAVolta (CUDA)\nnx02, arm, slots=0-5, gpu=NVIDIAVolta (CUDA)\n")
    as_yaml = Cluster.from_dict({"devices": [
        {"name": n, "cores": 6, "memory": "4GiB", "gpu": "NVIDIAVolta (CUDA)",
         "providers": ["CUDAExecutionProvider", "CPUExecutionProvider"]} for n in ("nx01", "nx02")]})
    assert Cluster.load(platform) == as_yaml
    platform.write_text("tx01:192.168.178.66\ntx02:192.168.178.206\nnx01, arm, slots=0-3, memory=8GiB\n"
                        "links, bandwidth=1gbit, latency=0.5ms\n")
    cluster = Cluster.load(platform)
    assert cluster.names == ("tx01", "tx02", "nx01") and cluster.device("nx01").memory == 8 * 2**30
    assert cluster.device("nx01").cores == 4 and cluster.default_link.bandwidth == 1e9 / 8
    platform.write_text("nx01, arm, slots=zero\n")
    with pytest.raises(ClusterError, match="line 1 .*slots: expected core numbers"):
        Cluster.load(platform)


def test_platform_file_from_the_command_line(zoo_dir: Path, tmp_path: Path):
    model = zoo_dir / "vgg.onnx"
    platform = tmp_path / "platform.txt"
    platform.write_text("nx01, arm, slots=0-5, gpu=NVIDIAVolta (CUDA)\nnx02, arm, slots=0-5\n")
    names = autodice_names(model)
    mapping = write(tmp_path / "mapping.json", {"nx01": names[:10], "nx02": names[10:]})
    result = cli("partition", model, "--cluster", platform, "--mapping", mapping, "-o", tmp_path / "plan")
    assert result.exit_code == 0, result.output
    assert "are defaults" in result.output and "4 GiB per host" in result.output
    verified = cli("verify", tmp_path / "plan", "--rtol", RTOL)
    assert verified.exit_code == 0, verified.output


def test_keys_of_one_host_share_its_memory(zoo_graphs):
    graph = zoo_graphs["vgg"]
    names = [l.name for l in graph.layers]
    mapping = {"pi_cpu0": names[:10], "pi_cpu1": names[10:]}
    keys = cluster_from_mapping(mapping)
    small = Cluster(tuple(d.__class__(d.name, d.cores, 40_000, host=d.host) for d in keys.devices))
    with pytest.raises(PlacementError, match="host 'pi' .* together but shares"):
        partition(graph, small, mapping)


# 7. execution providers --------------------------------------------------------------------------------------

def test_absent_provider_falls_back_to_cpu_with_one_warning(zoo_graphs, tmp_path: Path, caplog):
    graph = zoo_graphs["vgg"]
    cluster = Cluster.from_dict({"devices": [
        {"name": "jetson", "cores": 6, "memory": "8GiB", "providers": [ABSENT, "CPUExecutionProvider"]},
        {"name": "pi", "cores": 4, "memory": "4GiB"}]})
    plan = Plan.load(partition(graph, cluster).save(tmp_path / "plan"))
    assert plan.cluster.device("jetson").providers == (ABSENT, "CPUExecutionProvider")
    with caplog.at_level(logging.WARNING, logger="edgesplit"):
        executor = edgesplit.LocalExecutor(plan)
    warned = [r.getMessage() for r in caplog.records if r.name == "edgesplit"]
    assert len(warned) == 1 and "'jetson'" in warned[0] and ABSENT in warned[0]
    assert all(s.get_providers() == ["CPUExecutionProvider"] for s in executor.sessions.values())
    assert_plan_matches(plan, graph, rtol=RTOL)


@pytest.mark.skipif("CUDAExecutionProvider" not in ort.get_available_providers(), reason="no CUDA provider here")
def test_cuda_provider_is_used_where_present(zoo_graphs):
    graph = zoo_graphs["vgg"]
    cluster = Cluster.from_dict({"devices": [{"name": "gpu", "cores": 1, "memory": "8GiB",
                                              "providers": ["CUDAExecutionProvider", "CPUExecutionProvider"]}]})
    plan = partition(graph, cluster)
    executor = edgesplit.LocalExecutor(plan)
    assert all(s.get_providers()[0] == "CUDAExecutionProvider" for s in executor.sessions.values())
    assert_plan_matches(plan, graph, rtol=1e-4)  # GPU kernels sum in another order


def test_device_list_shows_providers():
    from edgesplit.runtime import raynodes

    class Info:
        resources_total = {"CPU": 4.0, "memory": 2.0**31, "object_store_memory": 1e8, "edgesplit_device:nx01": 1.0,
                           "edgesplit_provider:CUDAExecutionProvider": 1.0,
                           "edgesplit_provider:CPUExecutionProvider": 1.0}
        node_id, node_manager_address, state, is_head_node = bytes(4), "10.0.0.2", 0, False

        def HasField(self, name):  # noqa: N802 - the protobuf method this stands for
            return False

    node = raynodes._node(Info())
    assert node.providers == ("CPUExecutionProvider", "CUDAExecutionProvider")
    assert node.to_dict()["providers"] == ["CPUExecutionProvider", "CUDAExecutionProvider"]
    started = raynodes.NodeOptions(name="nx01").ray_args()
    resources = json.loads(started[started.index("--resources") + 1])
    assert {f"edgesplit_provider:{p}" for p in ort.get_available_providers()} <= set(resources)
