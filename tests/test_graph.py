"""load: shapes, names, parameters, MACs, external data, and clear errors for bad models."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import edgesplit
from edgesplit.errors import ModelError
from edgesplit.runtime import random_inputs, run_whole_model


def _conv_model(names=("", "")) -> onnx.ModelProto:
    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((4, 3, 3, 3)).astype(np.float32), "w")
    k = helper.make_node("Constant", [], ["k"], value=numpy_helper.from_array(np.array([1.5], np.float32)))
    conv = helper.make_node("Conv", ["x", "w"], ["y"], name=names[0], pads=[1, 1, 1, 1])
    mul = helper.make_node("Mul", ["y", "k"], ["z"], name=names[1])
    g = helper.make_graph(
        [k, conv, mul], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, ["N", 4, 8, 8])],
        initializer=[w],
    )
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def test_stable_names_for_empty_and_duplicate_names():
    graph = edgesplit.load(_conv_model(names=("dup", "dup")))
    names = [layer.name for layer in graph.layers]
    assert len(set(names)) == len(names) == 2
    assert names[0] == "dup" and names[1] != "dup"
    again = edgesplit.load(_conv_model(names=("dup", "dup")))
    assert [layer.name for layer in again.layers] == names  # deterministic


def test_constants_become_initializers_and_costs_are_counted():
    graph = edgesplit.load(_conv_model())
    assert [layer.op_type for layer in graph.layers] == ["Conv", "Mul"]
    conv = graph.layers[0]
    assert conv.params == 4 * 3 * 3 * 3
    assert conv.param_bytes == 4 * 3 * 3 * 3 * 4
    assert conv.macs == 4 * 8 * 8 * 3 * 3 * 3  # out elements x (Cin x kH x kW), batch counted as 1
    assert graph.tensors["y"].shape == ("N", 4, 8, 8)
    assert graph.tensors["y"].nbytes == 4 * 8 * 8 * 4
    assert edgesplit.load(_conv_model(), dims={"N": 5}).tensors["y"].nbytes == 5 * 4 * 8 * 8 * 4


def test_gemm_macs(zoo_graphs):
    vgg = zoo_graphs["vgg"]
    gemms = [layer for layer in vgg.layers if layer.op_type == "Gemm"]
    assert gemms[0].macs == 32 * 32 * 4 * 4 and gemms[1].macs == 10 * 32


def test_external_data_model_loads_and_runs(tmp_path: Path, zoo_dir: Path):
    model = onnx.load(zoo_dir / "resnet.onnx")
    onnx.save_model(model, tmp_path / "ext.onnx", save_as_external_data=True, all_tensors_to_one_file=True,
                    location="ext.data", size_threshold=0)
    assert (tmp_path / "ext.data").stat().st_size > 10_000
    graph = edgesplit.load(tmp_path / "ext.onnx")
    assert graph.total_params == edgesplit.load(zoo_dir / "resnet.onnx").total_params
    plan = edgesplit.partition(graph, edgesplit.Cluster.simulated(2))
    x = random_inputs(plan.inputs)
    got = edgesplit.LocalExecutor(plan).run(x).outputs["output"]
    np.testing.assert_allclose(got, run_whole_model(tmp_path / "ext.onnx", x)["output"], rtol=1e-5, atol=1e-7)


def test_not_onnx(tmp_path: Path):
    bad = tmp_path / "bad.onnx"
    bad.write_text("this is not a protobuf")
    with pytest.raises(ModelError, match="not an ONNX model"):
        edgesplit.load(bad)
    with pytest.raises(ModelError, match="does not exist"):
        edgesplit.load(tmp_path / "missing.onnx")


def test_checker_failure(tmp_path: Path):
    model = _conv_model()
    model.graph.node[1].op_type = "NoSuchOp"
    onnx.save(model, tmp_path / "m.onnx")
    with pytest.raises(ModelError, match="onnx.checker"):
        edgesplit.load(tmp_path / "m.onnx")


def test_shape_inference_failure_names_the_tensor():
    model = _conv_model()
    # a Reshape to a target of unknown length: rank unknown, so its output cannot be inferred
    model.graph.node.append(helper.make_node("Reshape", ["z", "target"], ["r"], name="reshape_me"))
    model.graph.input.append(helper.make_tensor_value_info("target", TensorProto.INT64, [None]))
    del model.graph.output[:]
    model.graph.output.append(helper.make_tensor_value_info("r", TensorProto.FLOAT, None))
    with pytest.raises(ModelError, match="'r'.*reshape_me"):
        edgesplit.load(model)


def test_old_opset_is_converted():  # refusals (no adapter, changed outputs): tests/test_autodice.py
    model = _conv_model()
    model.opset_import[0].version = 11
    graph = edgesplit.load(model)
    assert next(o.version for o in graph.model.opset_import if o.domain in ("", "ai.onnx")) == 17


def test_data_dependent_shapes_are_probed_and_stages_stay_runnable(tmp_path: Path):
    """torch's MultiheadAttention export has Reshapes whose rank static inference cannot find."""
    import torch
    from torch import nn

    class Attn(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn = nn.MultiheadAttention(16, 4, batch_first=True)
            self.out = nn.Linear(16, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.out(self.attn(x, x, x)[0])

    torch.manual_seed(0)
    path = tmp_path / "mha.onnx"
    torch.onnx.export(Attn().eval(), (torch.randn(2, 5, 16),), str(path), dynamo=False, opset_version=17,
                      input_names=["x"], output_names=["y"], dynamic_axes={"x": {0: "b", 1: "s"}, "y": {0: "b", 1: "s"}})
    with pytest.raises(ModelError, match=r"give them \(CLI: --dim NAME=SIZE"):
        edgesplit.load(path)  # the export baked sequence length 5 into a Reshape: probing with s=1 fails
    graph = edgesplit.load(path, dims={"b": 2, "s": 5})
    assert all(graph.tensors[t].nbytes > 0 for layer in graph.layers for t in layer.outputs)
    plan = edgesplit.partition(graph, edgesplit.Cluster.simulated(3))
    x = {"x": np.random.default_rng(0).standard_normal((3, 5, 16)).astype(np.float32)}  # another batch size
    np.testing.assert_allclose(edgesplit.LocalExecutor(plan).run(x).outputs["y"], run_whole_model(path, x)["y"],
                               rtol=1e-5, atol=1e-6)


def test_identity_of_an_initializer_is_folded_not_sent_between_devices():
    w = numpy_helper.from_array(np.arange(16, dtype=np.float32).reshape(4, 4), "w")
    nodes = [helper.make_node("Identity", ["w"], ["w_shared"], name="share"),
             helper.make_node("MatMul", ["x", "w_shared"], ["h"], name="mm0"),
             helper.make_node("MatMul", ["h", "w_shared"], ["y"], name="mm1")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])], initializer=[w])
    graph = edgesplit.load(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]))
    assert [layer.name for layer in graph.layers] == ["mm0", "mm1"]
    plan = edgesplit.partition(graph, edgesplit.Cluster.simulated(2), {"dev0": ["mm0"], "dev1": ["mm1"]})
    assert [t.tensor for t in plan.transfers if t.cross_device and t.src != "@input" and t.dst != "@output"] == ["h"]
    x = {"x": np.ones((1, 4), np.float32)}
    np.testing.assert_array_equal(edgesplit.LocalExecutor(plan).run(x).outputs["y"], run_whole_model(graph.model, x)["y"])
