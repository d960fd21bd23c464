"""Robust split inference on the shipped MNIST CNN over 4 devices: replication policies, their memory, their
accuracy under every failure set, against the unsplit model run by onnxruntime."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper

from edgesplit.cli import main
from edgesplit.cluster import Cluster
from edgesplit.datasets import accuracy, mnist_split, shipped_model
from edgesplit.graph import load
from edgesplit.planner import layout
from edgesplit.robust.evaluate import Samples, max_param_bytes, prepare, run_batched
from edgesplit.robust.importance import importance
from edgesplit.robust.policies import Policy, region_devices, replicas, vital_count
from edgesplit.runtime.local import LocalExecutor, run_whole_model

R = 0.25
ROW_FIELDS = {"policy", "r", "memory_vs_plain", "macs_vs_plain", "fault_free", "failures"}


@pytest.fixture(scope="module")
def cnn():
    split = mnist_split()
    source = load(shipped_model("mnist_cnn"))
    cluster = Cluster.simulated(4)
    rewritten, placement = layout(source, cluster, strategy="horizontal")
    samples = Samples({"input": split.test.images}, split.test.labels)
    study = prepare(rewritten, placement, cluster, source, samples, (1, 2))
    scores = importance(rewritten, "activation", {"input": split.train.images[:200]})  # calibration: train digits
    plans = {p: study.plan(p, R, scores) for p in Policy if p is not Policy.PARITY}  # parity: test_parity.py
    rows = {p: study.evaluate(p, R, plan) for p, plan in plans.items()}
    unsplit = run_whole_model(source.model, samples.inputs)["logits"]
    return study, scores, plans, rows, unsplit


def test_the_fault_free_plans_give_the_unsplit_models_accuracy(cnn):
    study, _, plans, rows, unsplit = cnn
    want = accuracy(unsplit, study.samples.labels)
    assert want > 0.95
    for policy, row in rows.items():
        assert row.fault_free == want, policy
    np.testing.assert_allclose(run_batched(LocalExecutor(plans[Policy.VITAL]), study.samples), unsplit,
                               rtol=1e-4, atol=1e-4)


def test_the_failure_sets_leave_out_the_device_holding_the_combines(cnn):
    study, *_ = cnn
    assert study.fatal == ("dev0",)
    assert [set(s) for s in study.sets[1]] == [{"dev1"}, {"dev2"}, {"dev3"}]
    assert len(study.sets[2]) == 3


def test_full_replication_keeps_the_fault_free_accuracy_under_every_single_failure(cnn):
    study, _, plans, rows, unsplit = cnn
    full = rows[Policy.FULL]
    assert all(v == full.fault_free for v in full.failures[1].values()), full.failures
    assert all(v == full.fault_free for v in full.failures[2].values()), full.failures
    # the replicas (spatial tiles included: their scatter is copied too) rebuild the exact logits
    got = LocalExecutor(plans[Policy.FULL], failed={"dev2"}).run(study.samples.take(slice(0, 64)).inputs)
    assert not got.degraded
    np.testing.assert_allclose(got.outputs["logits"], unsplit[:64], rtol=1e-4, atol=1e-4)


def test_the_plain_split_loses_accuracy(cnn):
    none = cnn[3][Policy.NONE]
    assert none.memory_vs_plain == 1.0 and none.macs_vs_plain == 1.0
    assert none.mean(1) < none.fault_free - 0.1
    assert none.worst(2) < none.worst(1) < none.fault_free


def test_vital_is_at_least_as_good_as_none_for_memory_between_none_and_full(cnn):
    rows = cnn[3]
    vital, none, full = rows[Policy.VITAL], rows[Policy.NONE], rows[Policy.FULL]
    assert vital.mean(1) >= none.mean(1) and vital.worst(1) >= none.worst(1)
    assert vital.mean(1) > none.mean(1) + 0.05
    assert none.memory_vs_plain < vital.memory_vs_plain <= full.memory_vs_plain


def test_random_holds_as_many_units_of_each_part_as_vital_for_the_same_memory(cnn):
    _, _, plans, rows, _ = cnn
    count = {p: [sorted(len(r.units) for r in part.replicas) for reg in plans[p].regions for part in reg.parts]
             for p in (Policy.VITAL, Policy.RANDOM)}
    assert count[Policy.VITAL] == count[Policy.RANDOM]
    assert max_param_bytes(plans[Policy.VITAL]) == max_param_bytes(plans[Policy.RANDOM])
    assert rows[Policy.VITAL].memory_vs_plain == rows[Policy.RANDOM].memory_vs_plain
    units = {p: [r.units for reg in plans[p].regions for part in reg.parts for r in part.replicas]
             for p in (Policy.VITAL, Policy.RANDOM)}
    assert units[Policy.VITAL] != units[Policy.RANDOM]


def test_k_of_n_survives_every_single_failure_of_vital_units_with_less_memory(cnn):
    study, scores, plans, rows, _ = cnn
    k_of_n, vital = plans[Policy.K_OF_N], rows[Policy.VITAL]
    for region in k_of_n.regions:
        top = set(np.argsort(-scores[region.name], kind="stable")[:vital_count(region, R)].tolist())
        for part in region.parts:
            vital_here = top & set(part.units)
            assert len(part.replicas) == (1 if vital_here else 0)
            for copy in part.replicas:  # f = 1: one more device, never the part's own
                assert copy.device != part.device and set(copy.units) == vital_here
    assert rows[Policy.K_OF_N].failures[1] == vital.failures[1]  # the same units recovered: the same answers
    assert rows[Policy.K_OF_N].memory_vs_plain < vital.memory_vs_plain


def test_the_evaluation_equals_the_executor_run_directly(cnn):
    study, _, plans, rows, _ = cnn
    for policy, failed in [(Policy.VITAL, ("dev1",)), (Policy.RANDOM, ("dev2", "dev3")), (Policy.NONE, ("dev3",))]:
        direct = LocalExecutor(plans[policy], failed=failed, allow_degraded=True).run(study.samples.inputs)
        assert direct.degraded
        assert rows[policy].failures[len(failed)][failed] == accuracy(direct.outputs["logits"], study.samples.labels)


def test_k_of_n_spreads_copies_round_robin(cnn):
    study, scores, *_ = cnn
    requests = replicas(study.graph, "k-of-n", scores, 1.0, f=2)  # every unit vital: every part copied
    region = study.graph.regions[0]
    devices = region_devices(region)
    for i, part in enumerate(region.parts):
        got = sorted({q.device for q in requests if q.region == region.name and q.part == i})
        at = devices.index(part.device)
        assert got == sorted(devices[(at + k) % 4] for k in (1, 2))


@pytest.fixture(scope="module")
def mnist_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("robust-data")
    test = mnist_split().test
    np.savez(root / "data.npz", input=test.images[::5], labels=test.labels[::5])
    np.savez(root / "wrong_dtype.npz", input=test.images[:20].astype(np.float64))
    np.savez(root / "wrong_name.npz", image=test.images[:20])
    np.savez(root / "wrong_shape.npz", input=test.images[:20, :, :14])
    np.savez(root / "unlabelled.npz", input=test.images[:20])
    np.savez(root / "short_labels.npz", input=test.images[:20], labels=test.labels[:19])
    return root


def _cli(*args):
    return CliRunner().invoke(main, ["robustness", *[str(a) for a in args]])


def test_the_cli_writes_the_table_json_plot_and_a_plan(mnist_files, tmp_path):
    out = tmp_path / "out"
    result = _cli(shipped_model("mnist_cnn"), "--devices", 4, "--data", mnist_files / "data.npz",
                  "--policy", "vital,none,full", "--r", "0.25", "--importance", "activation", "--failures", "1,2",
                  "--json", tmp_path / "r.json", "--plot", tmp_path / "r.png", "-o", out)
    assert result.exit_code == 0, result.output
    assert "memory vs plain" in result.output and "1 failed: worst" in result.output
    doc = json.loads((tmp_path / "r.json").read_text())
    assert doc["metric"] == "accuracy" and doc["fatal_devices"] == ["dev0"]
    assert doc["samples"] == 180  # 200 minus the calibration slice of 20
    assert [(r["policy"], r["r"]) for r in doc["rows"]] == [("vital", 0.25), ("none", 0.0), ("full", 1.0)]
    for row in doc["rows"]:
        assert set(row) == ROW_FIELDS
        assert set(row["failures"]) == {"1", "2"}
        sets = row["failures"]["1"]["sets"]
        assert [s["failed"] for s in sets] == [["dev1"], ["dev2"], ["dev3"]]
        assert row["failures"]["1"]["worst"] == min(s["value"] for s in sets)
    assert (tmp_path / "r.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    plan = json.loads((out / "plan.json").read_text())
    assert any(part["replicas"] for region in plan["regions"] for part in region["parts"])
    verified = CliRunner().invoke(main, ["verify", str(out)])
    assert verified.exit_code == 0 and "yes" in verified.output, verified.output


def test_mean_fill_is_calibrated_stored_in_the_plan_and_changes_the_answers(mnist_files, tmp_path):
    rows = {}
    for fill in ("zeros", "mean"):
        result = _cli(shipped_model("mnist_cnn"), "--devices", 4, "--data", mnist_files / "data.npz", "--policy",
                      "none", "--fill", fill, "--importance", "activation",  # both: the same calibration slice
                      "--json", tmp_path / f"{fill}.json", "-o", tmp_path / fill)
        assert result.exit_code == 0, result.output
        rows[fill] = json.loads((tmp_path / f"{fill}.json").read_text())["rows"][0]
        regions = json.loads((tmp_path / fill / "plan.json").read_text())["regions"]
        assert {r["fill"] for r in regions} == {fill}
        assert all(len(r.get("fill_values", [])) == r["units"] for r in regions) == (fill == "mean")
    assert rows["zeros"]["fault_free"] == rows["mean"]["fault_free"]
    assert rows["zeros"]["failures"]["1"]["mean"] != rows["mean"]["failures"]["1"]["mean"]


def _no_regions_model(path: Path) -> Path:
    x = helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 1, 28, 28])
    y = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 784])
    nodes = [helper.make_node("Relu", ["input"], ["r"]), helper.make_node("Flatten", ["r"], ["logits"])]
    model = helper.make_model(helper.make_graph(nodes, "plain", [x], [y]), opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, path)
    return path


@pytest.mark.parametrize("change, message", [
    ({"--r": "0,1.5"}, "expected fractions in [0, 1], got [1.5]"),
    ({"--failures": "4"}, "fewer than the 4 devices"),
    ({"--data": "unlabelled.npz", "--metric": "accuracy"}, "needs a 'labels' array"),
    ({"--policy": "vital,coded"}, "expected one of"),
    ({"--policy": "vital,parity"}, "parity: expected linear regions"),  # the CNN's parts end in Relu / MaxPool
    ({"--data": "wrong_dtype.npz"}, "expected dtype float32, got float64"),
    ({"--data": "wrong_name.npz"}, "missing input(s) ['input']"),
    ({"--data": "wrong_shape.npz"}, "expected shape"),
    ({"--data": "short_labels.npz"}, "expected 'labels' to be 20 integers"),
    ({"model": "no_regions"}, "horizontal regions"),
    ({"--score-output": "embedding"}, "expected an output of the model (['logits']) to score, got 'embedding'"),
    ({"--importance": "weight,gradient"}, "expected one of ['weight', 'activation', 'ablation']"),
])
def test_bad_input_exits_2_and_writes_nothing(mnist_files, tmp_path, change, message):
    model = _no_regions_model(tmp_path / "plain.onnx") if change.get("model") else shipped_model("mnist_cnn")
    options = {"--data": "data.npz", "--r": "0.25", "--failures": "1", "--policy": "none,vital"}
    options.update({k: v for k, v in change.items() if k != "model"})
    options["--data"] = mnist_files / options["--data"]
    out = tmp_path / "out"
    args = [a for k, v in options.items() for a in (k, v)]
    result = _cli(model, "--devices", 4, *args, "--json", out / "r.json", "--plot", out / "r.png", "-o", out / "plan")
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.split()), result.output
    assert not out.exists()


def test_heads_on_a_small_bert_full_replication_keeps_the_embeddings(tmp_path):
    from test_transformer_split_models import export

    model = export("bert", tmp_path)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 128, (24, 7)).astype(np.int64)
    np.savez(tmp_path / "data.npz", input_ids=ids, attention_mask=np.ones_like(ids))
    result = _cli(model, "--devices", 4, "--strategy", "heads", "--data", tmp_path / "data.npz",
                  "--policy", "none,full,k-of-n", "--r", "0.5", "--json", tmp_path / "r.json")
    assert result.exit_code == 0, result.output
    doc = json.loads((tmp_path / "r.json").read_text())
    assert doc["metric"] == "cosine"  # no labels, one vector per token: an embedding
    none, full, k_of_n = doc["rows"]
    for row in doc["rows"]:
        assert row["fault_free"] == pytest.approx(1.0, abs=1e-6)  # the split against the unsplit model
    assert all(s["value"] == pytest.approx(1.0, abs=1e-6) for s in full["failures"]["1"]["sets"])
    assert all(s["value"] < 1 - 1e-5 for s in none["failures"]["1"]["sets"])
    assert none["memory_vs_plain"] < k_of_n["memory_vs_plain"] < full["memory_vs_plain"]


def test_neighbour_agreement_is_the_share_of_samples_keeping_their_nearest_neighbour():
    from edgesplit.robust.evaluate import Metric, nearest_neighbours, score

    points = np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
    assert nearest_neighbours(points).tolist() == [1, 0, 3, 2]
    moved = points.copy()
    moved[3] = [0.8, 0.6]  # now nearer 1 than 2; 2's nearest is still 3
    assert nearest_neighbours(moved).tolist() == [1, 0, 3, 1]
    assert score(Metric.NEIGHBOURS, moved, points, None) == 0.75
    assert score(Metric.NEIGHBOURS, 3 * points, points, None) == 1.0  # scale does not move a cosine neighbour


def test_heads_scored_by_nearest_neighbour_agreement(tmp_path):
    from test_transformer_split_models import export

    model = export("bert", tmp_path)
    ids = np.random.default_rng(1).integers(0, 128, (24, 7)).astype(np.int64)
    np.savez(tmp_path / "data.npz", input_ids=ids, attention_mask=np.ones_like(ids))
    result = _cli(model, "--devices", 4, "--strategy", "heads", "--data", tmp_path / "data.npz", "--metric",
                  "neighbours", "--policy", "none,full", "--json", tmp_path / "r.json")
    assert result.exit_code == 0, result.output
    doc = json.loads((tmp_path / "r.json").read_text())
    none, full = doc["rows"]
    assert doc["metric"] == "neighbours" and none["fault_free"] == full["fault_free"] == 1.0
    assert all(s["value"] == 1.0 for s in full["failures"]["1"]["sets"])
    assert 0.0 <= none["failures"]["1"]["worst"] <= 1.0


def test_search_with_heads_has_one_fraction_per_transformer_block(tmp_path):
    from test_transformer_split_models import export

    from edgesplit.robust.frontier import groups

    rewritten, _ = layout(load(export("bert", tmp_path)), Cluster.simulated(4), strategy="heads")
    blocks = sorted({r.block for r in rewritten.regions})
    assert len(blocks) >= 2 and None not in blocks
    got = groups(rewritten, per_block=True)
    assert [label for label, _ in got] == [f"block {b}" for b in blocks]
    assert sorted(n for _, names in got for n in names) == sorted(r.name for r in rewritten.regions)
    block_of = {r.name: r.block for r in rewritten.regions}
    assert all({block_of[n] for n in names} == {int(label.split()[1])} for label, names in got)
    assert len(groups(rewritten, per_block=False)) == len(rewritten.regions)


def test_ablation_scores_are_the_measured_output_change_of_removing_a_unit(tmp_path):
    from test_parity import linear_model

    from edgesplit.robust import ablation

    source = load(linear_model(tmp_path / "linear.onnx"))
    rewritten, _ = layout(source, Cluster.simulated(4), strategy="horizontal")
    x = np.random.default_rng(2).normal(size=(8, 3, 8, 8)).astype(np.float32)
    scores = importance(rewritten, "ablation", {"input": x})
    logits = run_whole_model(source.model, {"input": x})["logits"]
    # the last region's units are the logits themselves: removing one changes the output by its magnitude
    np.testing.assert_allclose(scores[rewritten.regions[-1].name], np.abs(logits).mean(axis=0), rtol=1e-5)
    # the first region's: zero one output channel of the Conv in the unsplit model and measure
    conv = rewritten.regions[0]
    for unit in (0, 7):
        changed = onnx.load(str(source.path))
        w = next(t for t in changed.graph.initializer if t.name == "w1")
        b = next(t for t in changed.graph.initializer if t.name == "b1")
        for t in (w, b):
            a = onnx.numpy_helper.to_array(t).copy()
            a[unit] = 0
            t.CopyFrom(onnx.numpy_helper.from_array(a, t.name))
        got = run_whole_model(changed, {"input": x})["logits"]
        assert scores[conv.name][unit] == pytest.approx(np.linalg.norm(got - logits, axis=1).mean(), rel=1e-4)
    assert ablation.SAMPLES >= len(x)


def test_several_importance_scores_are_compared_row_by_row(mnist_files, tmp_path):
    result = _cli(shipped_model("mnist_cnn"), "--devices", 4, "--data", mnist_files / "data.npz", "--policy",
                  "none,vital", "--r", "0.1", "--importance", "weight,activation,ablation",
                  "--json", tmp_path / "r.json")
    assert result.exit_code == 0, result.output
    assert "importance" in result.output and "ablation" in result.output
    rows = json.loads((tmp_path / "r.json").read_text())["rows"]
    assert [(r["policy"], r.get("importance")) for r in rows] == [
        ("none", None), ("vital", "weight"), ("vital", "activation"), ("vital", "ablation")]
    assert len({r["failures"]["1"]["mean"] for r in rows[1:]}) > 1  # the rankings differ


def test_a_language_model_is_scored_by_next_token_agreement_and_perplexity(tmp_path):
    import torch

    from edgesplit.bench import transformers_zoo as tz

    model = tz.gpt2(tz.default_cache_dir(), kv_cache=False).path  # random weights, logits [batch, seq, 512]
    ids = np.random.default_rng(3).integers(0, 512, (12, 6)).astype(np.int64)
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids),
             "position_ids": np.broadcast_to(np.arange(6), ids.shape).copy()}
    np.savez(tmp_path / "tokens.npz", **feeds)
    args = [model, "--devices", 4, "--strategy", "heads", "--data", tmp_path / "tokens.npz", "--policy", "none,full"]
    result = _cli(*args, "--json", tmp_path / "r.json")
    assert result.exit_code == 0, result.output
    assert "next-token" in result.output and "perplexity" in result.output
    doc = json.loads((tmp_path / "r.json").read_text())
    assert doc["metric"] == "next-token"
    none, full = doc["rows"]
    logits = torch.from_numpy(run_whole_model(str(model), feeds)["logits"])
    want = torch.exp(torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 512),
                                                       torch.from_numpy(ids[:, 1:]).reshape(-1))).item()
    for row in (none, full):
        assert row["fault_free"] == 1.0
        assert row["perplexity"]["fault_free"] == pytest.approx(want, rel=1e-4)
    assert full["failures"]["1"]["worst"] == 1.0 and full["perplexity"]["1"]["worst"] == pytest.approx(want, rel=1e-4)
    assert none["failures"]["1"]["mean"] < 0.9
    overridden = _cli(*args, "--metric", "cosine", "--json", tmp_path / "c.json")
    assert overridden.exit_code == 0, overridden.output
    doc = json.loads((tmp_path / "c.json").read_text())
    assert doc["metric"] == "cosine" and "perplexity" not in doc["rows"][0]


def test_one_vector_per_sample_is_a_classifier_unless_every_vector_has_unit_length(cnn):
    from edgesplit.robust.evaluate import Metric, choose_metric

    study, *_ = cnn
    scores = np.random.default_rng(4).normal(size=(16, 10))
    assert choose_metric(study.plain, None, reference=scores) is Metric.AGREEMENT
    unit = scores / np.linalg.norm(scores, axis=1, keepdims=True)  # a normalised sentence embedding
    assert choose_metric(study.plain, None, reference=unit) is Metric.COSINE
    assert choose_metric(study.plain, None, "agreement", reference=unit) is Metric.AGREEMENT


def _single_failure_accuracy(plan, samples: Samples) -> float:
    executor = LocalExecutor(plan, allow_degraded=True)
    return float(np.mean([accuracy(run_batched(executor, samples, (d,)), samples.labels)
                          for d in ("dev1", "dev2", "dev3")]))


def test_search_finds_a_front_no_worse_than_uniform_r_and_writes_the_picked_point(mnist_files, tmp_path):
    from edgesplit.plan import Plan

    out = tmp_path / "plan"
    result = _cli(shipped_model("mnist_cnn"), "--devices", 4, "--data", mnist_files / "data.npz", "--policy", "k-of-n",
                  "--r", "0.25,0.5", "--importance", "activation", "--search", "--generations", 3, "--population", 6,
                  "--pick", "knee", "--json", tmp_path / "r.json", "--plot", tmp_path / "r.png", "-o", out)
    assert result.exit_code == 0, result.output
    doc = json.loads((tmp_path / "r.json").read_text())
    search, rows = doc["search"], doc["rows"]
    front, uniform = search["front"], search["uniform"]
    assert search["grid"] == [0.0, 0.25, 0.5] and len(search["groups"]) == 2  # the CNN's two regions
    # the uniform points are the table's rows (r = 0: the plain split), evaluated once
    assert [(u["memory_vs_plain"], u["mean_1"]) for u in uniform[1:]] == \
        [(r["memory_vs_plain"], r["failures"]["1"]["mean"]) for r in rows]
    assert uniform[0]["memory_vs_plain"] == 1.0
    memory = [p["memory_vs_plain"] for p in front]
    assert memory == sorted(memory)
    for p in front:  # non-dominated
        assert not any(q["memory_vs_plain"] <= p["memory_vs_plain"] and q["mean_1"] > p["mean_1"] for q in front)
    for u in uniform:  # the front is never worse than one r everywhere
        assert any(p["memory_vs_plain"] <= u["memory_vs_plain"] + 1e-12 and p["mean_1"] >= u["mean_1"] for p in front)
    gain = search["gain_over_uniform"]
    assert gain["gain"] == pytest.approx(gain["mean"] - gain["uniform_mean"]) and gain["gain"] >= 0
    # the picked plan: a front point's fractions, its accuracy under single failures measured directly
    plan = Plan.load(out)
    samples = Samples({"input": np.load(mnist_files / "data.npz")["input"][20:]},
                      np.load(mnist_files / "data.npz")["labels"][20:])  # past the calibration slice
    got = _single_failure_accuracy(plan, samples)
    picked = [p for p in front if p["mean_1"] == pytest.approx(got, abs=1e-9)]
    assert picked, (got, front)
    for region in plan.regions:
        copies = sum(len(rep.units) for part in region.parts for rep in part.replicas)
        want = vital_count(region, picked[0]["fractions"][region.name])
        assert copies == want, region.name  # k-of-n, f = 1: each vital unit copied once
    verified = CliRunner().invoke(main, ["verify", str(out)])
    assert verified.exit_code == 0 and "yes" in verified.output, verified.output


@pytest.mark.parametrize("extra, message", [
    (["--pick", "knee"], "--pick: only with --search (its front and the point written); expected --search, got none"),
    (["--generations", "2"], "--generations: only with --search"),
    (["--search", "--pick", "memory", "--no-plan"], "--pick writes the chosen point as a plan: expected -o"),
    (["--search", "--policy", "none,full"], "expected one in --policy, got ['none', 'full']"),
    (["--search", "--failures", "2"], "--search scores single failures: expected 1 in --failures, got [2]"),
])
def test_bad_search_input_exits_2_and_writes_nothing(mnist_files, tmp_path, extra, message):
    out = tmp_path / "out"
    plan = [] if "--no-plan" in extra else ["-o", out / "plan"]
    extra = [a for a in extra if a != "--no-plan"]
    result = _cli(shipped_model("mnist_cnn"), "--devices", 4, "--data", mnist_files / "data.npz", "--r", "0.25",
                  *extra, "--json", out / "r.json", *plan)
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.split()), result.output
    assert not out.exists()
