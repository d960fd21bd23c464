"""`edgesplit demo` and the shipped models split over devices: same answers as the whole model."""

from __future__ import annotations

import importlib.util
import io
import random
from pathlib import Path

import numpy as np
import pytest
import yaml
from click.testing import CliRunner
from onnx import TensorProto, helper
from rich.console import Console

import edgesplit as es
from edgesplit.cli import main
from edgesplit.datasets import accuracy, mnist_split, provenance, shipped_model
from edgesplit.demo import activation_peak, run_demo
from edgesplit.errors import ClusterError, EdgesplitError
from edgesplit.runtime.local import verify
from edgesplit.runtime.local import LocalExecutor, run_whole_model

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.fixture(scope="session")
def test_digits():
    return mnist_split().test


@pytest.fixture(scope="session")
def demo_run():
    out = io.StringIO()
    numbers = run_demo(devices=3, console=Console(file=out, width=120))
    return numbers, out.getvalue()


@pytest.fixture(scope="session")
def vit():
    return es.load(shipped_model("mnist_vit"))


@pytest.fixture(scope="session")
def cnn():
    return es.load(shipped_model("mnist_cnn"))


def test_demo_reports_equal_accuracy(demo_run):
    numbers, text = demo_run
    assert numbers["devices"] == ["dev0", "dev1", "dev2"] and numbers["stages"] == 3
    assert numbers["accuracy_split"] == numbers["accuracy_unsplit"] >= 0.97
    assert numbers["accuracy_unsplit"] == pytest.approx(provenance()["mnist_cnn"]["test_accuracy"], abs=0.005)
    assert numbers["predictions_equal"] and numbers["max_rel_diff"] <= 1e-5
    assert numbers["test_digits"] == 1000 and numbers["wire_bytes_per_digit"] > 0
    assert f"{numbers['accuracy_unsplit']:.2%}" in text and "equal" in text
    for heading in ("plan for mnist_cnn", "transfers between devices", "memory per device", "estimate", "measured"):
        assert heading in text


def test_demo_loses_a_device_and_keeps_accuracy_with_replicas(demo_run):
    numbers, text = demo_run
    lost = numbers["robustness"]
    assert lost["plain"] < lost["fault_free"] - 0.1  # the plain split loses a third of every split layer
    assert lost["plain"] < lost["replicated"] <= lost["fault_free"]
    assert 1 < lost["memory_vs_plain"] < 2
    assert f"device {lost['lost']} lost" in text and f"{lost['replicated']:.2%}" in text
    assert lost["devices"] == 4  # the CNN split over 4 devices, though the demo's vertical plan uses 3


def test_demo_loses_the_device_mid_stream_and_the_answers_say_so(demo_run):
    numbers, text = demo_run
    stream = numbers["robustness"]["stream"]
    assert stream["answers"] == ["full"] * 4 + ["degraded"] * 5  # 9 batches of 100 digits, lost after the 4th
    assert stream["accuracy_after"] == stream["evaluated_after"] > numbers["robustness"]["plain"]
    assert f"accuracy after the loss {stream['accuracy_after']:.2%}" in " ".join(text.split())


def test_demo_memory_per_device(demo_run, cnn):
    memory = demo_run[0]["memory"]
    assert [m["device"] for m in memory] == ["dev0", "dev1", "dev2"]
    assert sum(m["param_bytes"] for m in memory) == cnn.total_param_bytes
    for m in memory:
        assert m["activation_peak_bytes"] > 0 and m["estimate_bytes"] == m["param_bytes"] + m["activation_peak_bytes"]
        assert m["rss_delta_bytes"] > 0
    # the device holding the 1568x64 classifier has to hold its weights: RSS must show them
    biggest = max(memory, key=lambda m: m["param_bytes"])
    assert biggest["rss_delta_bytes"] >= biggest["param_bytes"]


def test_demo_split_outputs_equal_the_whole_model(cnn, test_digits):
    inputs = {"input": test_digits.images}
    reference = run_whole_model(cnn.model, inputs)["logits"]
    for devices in (2, 3, 4):
        plan = es.partition(cnn, es.Cluster.simulated(devices))
        got = LocalExecutor(plan).run(inputs).outputs["logits"]
        assert np.max(np.abs(got - reference)) <= 1e-5 * np.max(np.abs(reference))
        assert accuracy(got, test_digits.labels) == accuracy(reference, test_digits.labels)


def test_random_non_contiguous_placements_of_the_cnn(cnn, test_digits):
    rng = random.Random(0)
    cluster = es.Cluster.simulated(3)
    for _ in range(5):
        mapping: dict[str, list[str]] = {d: [] for d in cluster.names}
        for layer in cnn.layers:
            mapping[rng.choice(cluster.names)].append(layer.name)
        plan = es.partition(cnn, cluster, mapping)
        diffs = verify(plan, cnn, {"input": test_digits.images[:50]}, rtol=1e-5)
        assert all(d.ok for d in diffs), diffs


def test_vit_splits_vertically_over_3_devices(vit, test_digits):
    plan = es.partition(vit, es.Cluster.simulated(3))
    assert len(plan.stages) == 3 and len(plan.devices) == 3
    inputs = {"input": test_digits.images[:100]}
    diffs = verify(plan, vit, inputs, rtol=1e-5)
    assert all(d.ok for d in diffs), diffs
    got = LocalExecutor(plan).run(inputs).outputs["logits"]
    reference = run_whole_model(vit.model, inputs)["logits"]
    assert np.array_equal(got.argmax(1), reference.argmax(1))


def test_demo_with_the_vit():
    numbers = run_demo(devices=3, console=Console(file=io.StringIO()), model="mnist_vit")
    assert numbers["model"] == "mnist_vit" and numbers["stages"] == 3
    assert numbers["accuracy_split"] == numbers["accuracy_unsplit"] >= 0.90
    assert numbers["max_rel_diff"] <= 1e-5


def test_demo_rejects_an_unknown_model():
    with pytest.raises(EdgesplitError, match=r"expected one of the shipped models .*got 'resnet'"):
        run_demo(console=Console(file=io.StringIO()), model="resnet")


def test_demo_on_an_example_cluster():
    out = io.StringIO()
    numbers = run_demo(console=Console(file=out, width=120), cluster=EXAMPLES / "mixed.yaml")
    assert numbers["devices"] == ["pi4", "pi5", "nano", "xnx"]
    assert numbers["accuracy_split"] == numbers["accuracy_unsplit"]


def test_cli_demo_runs_and_rejects_bad_input(tmp_path):
    runner = CliRunner()
    done = runner.invoke(main, ["demo", "--devices", "2"])
    assert done.exit_code == 0, done.output
    assert "equal" in done.output and "split over 2 devices" in done.output
    missing = runner.invoke(main, ["demo", "--cluster", str(tmp_path / "nope.yaml")])
    assert missing.exit_code == 2 and "nope.yaml" in missing.output and "Traceback" not in missing.output
    zero = runner.invoke(main, ["demo", "--devices", "0"])
    assert zero.exit_code == 2


def test_cli_demo_without_mlxtend_names_the_pip_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlxtend" else real(name, *a))
    done = CliRunner().invoke(main, ["demo"])
    assert done.exit_code == 2 and "pip install" in done.output and "Traceback" not in done.output


def test_run_demo_rejects_zero_devices():
    with pytest.raises(ClusterError, match="at least 1 device"):
        run_demo(devices=0, console=Console(file=io.StringIO()))


def test_activation_peak_follows_liveness():
    """x -> Relu -> a -> Relu -> b; Add(a, b) -> y: a stays live until Add, so the peak is a + b + y."""
    info = lambda name: helper.make_tensor_value_info(name, TensorProto.FLOAT, [1, 4])  # 16 bytes each
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["a"], name="r1"), helper.make_node("Relu", ["a"], ["b"], name="r2"),
         helper.make_node("Add", ["a", "b"], ["y"], name="add")],
        "chain", [info("x")], [info("y")])
    g = es.load(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    (stage,) = es.partition(g, es.Cluster.simulated(1)).stages
    assert activation_peak(g, stage) == 48


def _cluster_files() -> list[Path]:
    """Example YAML files that describe clusters (a 'devices' list); examples/ also holds mapping files."""
    return [p for p in sorted(EXAMPLES.glob("*.yaml")) if isinstance((yaml.safe_load(p.read_text()) or {}).get("devices"), list)]


BOARDS = ("rpi4-4gb.yaml", "rpi5-8gb.yaml", "jetson-nano-4gb.yaml", "jetson-xavier-nx-8gb.yaml", "mixed.yaml")


@pytest.mark.parametrize("path", _cluster_files(), ids=lambda p: p.name)
def test_every_example_cluster_loads(path):
    cluster = es.Cluster.load(path)
    assert es.Cluster.from_dict(cluster.to_dict()) == cluster


@pytest.mark.parametrize("name", BOARDS)
def test_board_examples_are_plausible_and_cite_sources(name):
    assert EXAMPLES / name in _cluster_files()
    cluster = es.Cluster.load(EXAMPLES / name)
    assert len(cluster.devices) >= 3
    for device in cluster.devices:
        assert device.power is not None and 0 < device.power.idle_w < device.power.busy_w <= 20
        assert 2 * 2**30 <= device.memory < 8 * 2**30 and 0.5 <= device.speed <= 2.0 and device.cores in (4, 6)
    text = (EXAMPLES / name).read_text()
    assert "estimate" in text and ("Raspberry Pi" in text or "NVIDIA" in text)  # sources are cited
    pi4 = es.Cluster.load(EXAMPLES / "rpi4-4gb.yaml").devices[0]
    assert pi4.speed == 1.0  # the reference every speed is relative to
