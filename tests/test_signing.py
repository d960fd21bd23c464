"""Plans are signed (issue 14, point 2): an HMAC-SHA256 over plan.json and every file it names, with the cluster's
key, checked by Plan.load before any stage is read and by every Ray device with its own key."""

from __future__ import annotations

import hashlib
import json
import secrets
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import numpy_helper

import edgesplit
from conftest import SESSION_KEY, write_tiny_cnn
from edgesplit.cli import main
from edgesplit.cluster import Cluster
from edgesplit.errors import PlanError
from edgesplit.files import save_npz
from edgesplit.signing import Key, check_stages, find_key


def _cli(*args: object):
    return CliRunner().invoke(main, [str(a) for a in args])


def _plan(tmp_path: Path, name: str = "p", scale: float = 1.0, key: Key | None = None) -> Path:
    """A tiny CNN over two devices, saved (signed with `key`, else the suite's key); `scale` multiplies its
    weights, so two plans have stages with the same interface and different weights."""
    model = onnx.load(write_tiny_cnn(tmp_path / f"{name}.onnx"))
    for t in model.graph.initializer:
        t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t) * np.float32(scale), t.name))
    onnx.save(model, tmp_path / f"{name}.onnx")
    plan = edgesplit.partition(edgesplit.load(tmp_path / f"{name}.onnx"), Cluster.simulated(2))
    return plan.save(tmp_path / name, **({"key": key} if key else {}))  # else as every test saves


def _replace_stage(plan_dir: Path, stage: int, data: bytes) -> None:
    """What an attacker with write access does: new stage bytes, and their sha256 in plan.json."""
    d = json.loads((plan_dir / "plan.json").read_text())
    (plan_dir / d["stages"][stage]["file"]).write_bytes(data)
    d["stages"][stage]["sha256"] = hashlib.sha256(data).hexdigest()
    (plan_dir / "plan.json").write_text(json.dumps(d, indent=1))


def _other_key(tmp_path: Path) -> Key:
    path = tmp_path / "other.key"
    path.write_text(secrets.token_hex(32))
    return find_key(path)


def test_zeroed_weights_with_their_hash_updated_are_refused(tmp_path):
    plan_dir = _plan(tmp_path)
    first = plan_dir / "s0_dev0.onnx"
    model = onnx.load(first)
    for t in model.graph.initializer:
        t.CopyFrom(numpy_helper.from_array(np.zeros_like(numpy_helper.to_array(t)), t.name))
    _replace_stage(plan_dir, 0, model.SerializeToString())
    with pytest.raises(PlanError, match="its signature does not match its files") as exc:
        edgesplit.Plan.load(plan_dir)
    assert "plan.json: signed sha256" in str(exc.value) and "s0_dev0.onnx: signed sha256" in str(exc.value)


def test_a_stage_swapped_for_another_valid_stage_with_hashes_updated_is_refused(tmp_path):
    plan_dir, other = _plan(tmp_path), _plan(tmp_path, "q", scale=2.0)
    _replace_stage(plan_dir, 1, (other / "s1_dev1.onnx").read_bytes())  # same inputs and outputs, other weights
    with pytest.raises(PlanError, match="its signature does not match its files"):
        edgesplit.Plan.load(plan_dir)
    result = _cli("inspect", plan_dir)
    assert result.exit_code == 2 and "signature does not match" in result.output
    assert "Traceback" not in result.output


def test_an_unsigned_plan_is_refused_unless_trusted(tmp_path):
    plan_dir = _plan(tmp_path)
    (plan_dir / "plan.sig").unlink(missing_ok=True)  # (the old code writes none)
    with pytest.raises(PlanError, match=r"it is unsigned \(no plan.sig\).*--trust-unsigned"):
        edgesplit.Plan.load(plan_dir)
    assert edgesplit.Plan.load(plan_dir, trust_unsigned=True).stages
    save_npz(tmp_path / "x.npz", {"x": np.ones((1, 3, 8, 8), np.float32)}, "x")
    refused = _cli("run", plan_dir, "--input", tmp_path / "x.npz", "-o", tmp_path / "y.npz")
    assert refused.exit_code == 2, refused.output
    assert refused.output.startswith("error: refusing plan") and refused.output.count("\n") == 1, refused.output
    assert "unsigned" in refused.output and "Traceback" not in refused.output
    assert not (tmp_path / "y.npz").exists()
    trusted = _cli("run", plan_dir, "--input", tmp_path / "x.npz", "-o", tmp_path / "y.npz", "--trust-unsigned")
    assert trusted.exit_code == 0, trusted.output
    assert (tmp_path / "y.npz").is_file()


def test_a_plan_signed_with_another_key_is_refused_naming_both_key_ids(tmp_path):
    other = _other_key(tmp_path)
    plan_dir = _plan(tmp_path, key=other)
    ours = find_key(SESSION_KEY)
    with pytest.raises(PlanError, match=f"signed with key id {other.key_id}, expected key id {ours.key_id}"):
        edgesplit.Plan.load(plan_dir)
    assert edgesplit.Plan.load(plan_dir, key=other).seal.key_id == other.key_id
    assert _cli("verify", plan_dir, "--key-file", tmp_path / "other.key").exit_code == 0
    assert _cli("verify", plan_dir).exit_code == 2


def test_partition_signs_with_the_key_and_says_which(tmp_path, monkeypatch):
    model = write_tiny_cnn(tmp_path / "m.onnx")
    other = _other_key(tmp_path)
    result = _cli("partition", model, "--devices", 2, "-o", tmp_path / "p", "--key-file", tmp_path / "other.key")
    assert result.exit_code == 0, result.output
    assert f"note: signed the plan (plan.sig) with key id {other.key_id}, from --key-file" in result.output
    assert json.loads((tmp_path / "p" / "plan.sig").read_text())["key_id"] == other.key_id
    for var in ("EDGESPLIT_KEY_FILE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    result = _cli("partition", model, "--devices", 2, "-o", tmp_path / "p", "--force")
    assert result.exit_code == 0, result.output
    token = tmp_path / "home" / ".ray" / "auth_token"  # a first plan here: the cluster key is made, mode 600
    assert "note: no key found" in result.output and f"created the cluster key {token}" in result.output
    assert token.stat().st_mode & 0o777 == 0o600
    assert json.loads((tmp_path / "p" / "plan.sig").read_text())["key_id"] == find_key(token).key_id
    name = edgesplit.Plan.load(tmp_path / "p", key=find_key(token)).inputs[0].name
    np.savez(tmp_path / "x.npz", **{name: np.ones((1, 3, 8, 8), dtype=np.float32)})
    result = _cli("run", tmp_path / "p", "--input", tmp_path / "x.npz", "-o", tmp_path / "y.npz")
    assert result.exit_code == 0, result.output  # the same machine finds the same key: no flag needed
    missing = _cli("partition", model, "--devices", 2, "-o", tmp_path / "r", "--key-file", tmp_path / "nope")
    assert missing.exit_code == 2 and "expected a key file" in missing.output and not (tmp_path / "r").exists()


def test_a_device_whose_key_differs_refuses_its_stages(tmp_path):
    """The check each Ray device actor runs in its constructor (DeviceWorker.__init__), called directly."""
    plan = edgesplit.Plan.load(_plan(tmp_path))
    stages = {s.name: plan.stage_models[s.name] for s in plan.device_stages("dev1")}
    ours = find_key(SESSION_KEY)
    check_stages("dev1", plan.seal, stages, ours)  # the same key: accepted
    other = _other_key(tmp_path)
    with pytest.raises(PlanError, match=f"device 'dev1' refuses its stages: the plan is signed with key id "
                                        f"{ours.key_id}, but this device's key is key id {other.key_id}"):
        check_stages("dev1", plan.seal, stages, other)
    with pytest.raises(PlanError, match="device 'dev1' refuses its stages: stage 's1_dev1' is not the signed one"):
        check_stages("dev1", plan.seal, {"s1_dev1": b"\0" + stages["s1_dev1"]}, ours)
    with pytest.raises(PlanError, match="device 'dev1' refuses its stages: the plan it was sent is unsigned"):
        check_stages("dev1", None, stages, ours)
