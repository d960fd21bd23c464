"""The command line end to end: inspect, partition, run, verify."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
from click.testing import CliRunner

import edgesplit
from edgesplit.cli import main
from edgesplit.runtime import random_inputs, run_whole_model


def _cli(*args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    return result


def test_inspect_table_and_json(zoo_dir: Path):
    result = _cli("inspect", zoo_dir / "mobilenet.onnx")
    assert result.exit_code == 0, result.output
    assert "Conv" in result.output and "total" in result.output
    data = json.loads(_cli("inspect", zoo_dir / "mobilenet.onnx", "--json").output)
    graph = edgesplit.load(zoo_dir / "mobilenet.onnx")
    assert len(data["layers"]) == len(graph.layers)
    assert data["totals"]["macs"] == sum(r["macs"] for r in data["layers"]) == graph.total_macs
    assert {"name", "op_type", "output_shape", "params", "macs", "output_bytes"} <= set(data["layers"][0])


def test_partition_run_verify(zoo_dir: Path, tmp_path: Path):
    model = zoo_dir / "inception.onnx"
    (tmp_path / "cluster.yaml").write_text(
        "devices:\n  - {name: pi-a, cores: 1, memory: 1GiB}\n  - {name: pi-b, cores: 1, memory: 1GiB}\n"
        "  - {name: pi-c, cores: 1, memory: 1GiB, speed: 2}\n"
    )
    result = _cli("partition", model, "--cluster", tmp_path / "cluster.yaml", "-o", tmp_path / "plan")
    assert result.exit_code == 0, result.output
    assert "pi-c" in result.output and "MACs share" in result.output
    x = random_inputs(edgesplit.Plan.load(tmp_path / "plan").inputs, {"batch": 3})
    np.savez(tmp_path / "x.npz", **x)
    result = _cli("run", tmp_path / "plan", "--input", tmp_path / "x.npz", "-o", tmp_path / "y.npz")
    assert result.exit_code == 0, result.output
    with np.load(tmp_path / "y.npz") as y:
        np.testing.assert_allclose(y["output"], run_whole_model(model, x)["output"], rtol=1e-5, atol=1e-7)
    result = _cli("verify", tmp_path / "plan")
    assert result.exit_code == 0 and "yes" in result.output, result.output
    plan_json = json.loads((tmp_path / "plan" / "plan.json").read_text())
    assert plan_json["model"]["path"] == str(model.resolve())
    table = _cli("inspect", tmp_path / "plan")
    assert table.exit_code == 0 and "transfers between devices" in table.output


def test_verify_fails_above_tolerance(zoo_dir: Path, tmp_path: Path, monkeypatch):
    from edgesplit.runtime.common import RunResult
    from edgesplit.runtime.local import LocalExecutor

    _cli("partition", zoo_dir / "vgg.onnx", "--devices", 2, "-o", tmp_path / "plan")
    real_run = LocalExecutor.run

    def off_by_a_bit(self, inputs, failed=None):
        result = real_run(self, inputs, failed)
        return RunResult({k: v * np.float32(1.001) for k, v in result.outputs.items()})

    monkeypatch.setattr(LocalExecutor, "run", off_by_a_bit)
    result = _cli("verify", tmp_path / "plan")
    assert result.exit_code == 1 and "NO" in result.output, result.output
    assert _cli("verify", tmp_path / "plan", "--rtol", "0.01").exit_code == 0


def test_console_script_is_installed(zoo_dir: Path):
    out = subprocess.run([sys.executable, "-m", "edgesplit.cli", "inspect", str(zoo_dir / "vgg.onnx"), "--json"],
                         capture_output=True, text=True, check=True)
    assert json.loads(out.stdout)["totals"]["layers"] == len(edgesplit.load(zoo_dir / "vgg.onnx").layers)
