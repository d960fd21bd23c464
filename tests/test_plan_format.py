"""plan.json format 2: the JSON Schema in docs/ describes what edgesplit writes, and format-1 plans load or say
what to do."""

from __future__ import annotations

import json

import pytest
from conftest import schema_problems

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
    assert edgesplit.Plan.load(tmp_path / "vertical").stages == plain.stages
    with pytest.raises(PlanError, match="format-1 plan .* Re-create the plan with `edgesplit partition`"):
        edgesplit.Plan.load(tmp_path / "horizontal")
