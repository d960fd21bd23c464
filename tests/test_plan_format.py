"""plan.json format 2: the JSON Schema in docs/ describes what edgesplit writes, and format-1 plans load or say
what to do."""

from __future__ import annotations

import hashlib
import json

import pytest
from conftest import resign, schema_problems

import edgesplit
from edgesplit.cluster import Cluster
from edgesplit.errors import PlanError
from edgesplit.plan import FORMAT
from test_failures import HORIZONTAL, split_conv_plan


@pytest.fixture(scope="module")
def replicated():
    return split_conv_plan(HORIZONTAL)[0]


def test_a_replicated_plan_follows_the_schema_and_round_trips(replicated, tmp_path):
    replicated.save(tmp_path / "p")
    assert schema_problems(tmp_path / "p" / "plan.json") == []
    loaded = edgesplit.Plan.load(tmp_path / "p")
    assert loaded.regions == replicated.regions and loaded.regions[0].parts[0].replicas


@pytest.mark.parametrize("edit, where", [
    (lambda d: d["regions"][0].update(kind="diagonal"), "regions/0/kind"),
    (lambda d: d["regions"][0]["parts"][0]["replicas"][0].update(mode="lukewarm"), "replicas/0/mode"),
    (lambda d: d["regions"][0]["parts"][0].update(units=[]), "parts/0/units"),
    (lambda d: d["stages"][0].update(file="../../etc/passwd.onnx"), "stages/0/file"),
    (lambda d: d.update(format="edgesplit-plan/3"), "format"),
])
def test_the_schema_refuses_what_edgesplit_would_not_write(replicated, tmp_path, edit, where):
    replicated.save(tmp_path / "p")
    path = tmp_path / "p" / "plan.json"
    d = json.loads(path.read_text())
    edit(d)
    path.write_text(json.dumps(d))
    problems = schema_problems(path)
    assert problems and any(where in p for p in problems), problems


def test_format_1_without_regions_loads_and_with_regions_says_what_to_do(zoo_graphs, replicated, tmp_path):
    plain = edgesplit.partition(zoo_graphs["vgg"], Cluster.simulated(2))
    for plan, name in ((plain, "vertical"), (replicated, "horizontal")):
        plan.save(tmp_path / name)
        path = tmp_path / name / "plan.json"
        d = json.loads(path.read_text())
        assert d["format"] == FORMAT
        d["format"] = "edgesplit-plan/1"
        path.write_text(json.dumps(d))
        resign(path.parent)
    assert edgesplit.Plan.load(tmp_path / "vertical").stages == plain.stages
    with pytest.raises(PlanError, match="format-1 plan .* Re-create the plan with `edgesplit partition`"):
        edgesplit.Plan.load(tmp_path / "horizontal")


def _with_external_weights(plan_dir, location: str) -> str:
    """Rewrite the first stage so its weights live in `location` (relative to the plan directory), as an attacker
    would: onnx itself refuses to write a location with '..'."""
    import onnx
    from onnx import external_data_helper

    d = json.loads((plan_dir / "plan.json").read_text())
    stage = d["stages"][0]
    path = plan_dir / stage["file"]
    model = onnx.load(str(path))
    external_data_helper.convert_model_to_external_data(model, all_tensors_to_one_file=True, location="w.bin",
                                                        size_threshold=0)
    onnx.save(model, str(path))
    model = onnx.load(str(path), load_external_data=False)
    for t in model.graph.initializer:
        for e in t.external_data:
            if e.key == "location":
                e.value = location
    path.write_bytes(model.SerializeToString())
    (plan_dir / "w.bin").rename(plan_dir / location)
    stage["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()  # the hash updated too
    (plan_dir / "plan.json").write_text(json.dumps(d))
    resign(plan_dir)
    return stage["name"]


def test_a_stage_cannot_read_files_outside_its_plan(zoo_graphs, tmp_path, monkeypatch):
    plan = edgesplit.partition(zoo_graphs["vgg"], Cluster.simulated(2))
    plan.save(tmp_path / "p")
    secret = tmp_path / "secret.bin"
    name = _with_external_weights(tmp_path / "p", "../secret.bin")
    assert secret.is_file()
    monkeypatch.chdir(tmp_path / "p")
    with pytest.raises(PlanError, match=f"stage {name!r}.*outside the plan directory"):
        edgesplit.Plan.load(tmp_path / "p")
    # inside the plan directory, but not listed in plan.json with its hash: refused too
    plan.save(tmp_path / "q")
    _with_external_weights(tmp_path / "q", "weights.bin")
    with pytest.raises(PlanError, match="does not list"):
        edgesplit.Plan.load(tmp_path / "q")
    # listed with its hash: read from the plan directory, whatever the working directory
    path = tmp_path / "q" / "plan.json"
    d = json.loads(path.read_text())
    d["stages"][0]["external_data"] = {"weights.bin": hashlib.sha256((tmp_path / "q" / "weights.bin").read_bytes())
                                       .hexdigest()}
    path.write_text(json.dumps(d))
    resign(path.parent)
    monkeypatch.chdir("/")
    loaded = edgesplit.Plan.load(tmp_path / "q")
    x = {t.name: __import__("numpy").ones([1 if isinstance(s, str) else s for s in t.shape], dtype=t.dtype)
         for t in loaded.inputs}
    out = edgesplit.LocalExecutor(loaded).run(x).outputs
    ref = edgesplit.LocalExecutor(plan).run(x).outputs
    assert all((out[k] == ref[k]).all() for k in ref)
    (tmp_path / "q" / "weights.bin").write_bytes(b"\0" * 16)
    resign(tmp_path / "q")  # as if signed so: the hash plan.json gives it still refuses it
    with pytest.raises(PlanError, match="sha256 does not match"):
        edgesplit.Plan.load(tmp_path / "q")


def test_a_stage_name_cannot_climb_out_of_the_plan(replicated, tmp_path):
    replicated.save(tmp_path / "p")
    path = tmp_path / "p" / "plan.json"
    d = json.loads(path.read_text())
    d["stages"][0]["name"] = "../../x"
    path.write_text(json.dumps(d))
    resign(path.parent)
    with pytest.raises(PlanError, match="not a plain file name"):
        edgesplit.Plan.load(tmp_path / "p")


def test_a_stage_swapped_for_another_is_refused_even_with_its_hash_updated(zoo_graphs, tmp_path):
    plan = edgesplit.partition(zoo_graphs["vgg"], Cluster.simulated(3))
    plan.save(tmp_path / "p")
    path = tmp_path / "p" / "plan.json"
    d = json.loads(path.read_text())
    first, last = d["stages"][0], d["stages"][-1]
    (tmp_path / "p" / first["file"]).write_bytes((tmp_path / "p" / last["file"]).read_bytes())
    first["sha256"] = last["sha256"]
    path.write_text(json.dumps(d))
    resign(path.parent)
    with pytest.raises(PlanError, match=f"stage {first['name']!r}: its file reads .* but plan.json says"):
        edgesplit.Plan.load(tmp_path / "p")


def test_a_transfer_naming_a_missing_stage_is_refused(replicated, tmp_path):
    replicated.save(tmp_path / "p")
    path = tmp_path / "p" / "plan.json"
    d = json.loads(path.read_text())
    d["transfers"][0]["dst"] = "s99_nowhere"
    path.write_text(json.dumps(d))
    resign(path.parent)
    with pytest.raises(PlanError, match="names stage 's99_nowhere', which the plan lacks"):
        edgesplit.Plan.load(tmp_path / "p")
