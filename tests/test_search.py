"""The design-space search: profiles, the cost model against real plans and runs, NSGA-II against its baselines."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from edgesplit.cli import main
from edgesplit.cluster import Cluster, Link
from edgesplit.graph import load
from edgesplit.place import balance
from edgesplit.planner import plan as make_plan
from edgesplit.search import validate
from edgesplit.search.cost import CostModel, Overheads, Vertical, equal_layers, from_placement
from edgesplit.search.space import Splits, to_plan
from edgesplit.search.nsga import Objective, encode, decode, search
from edgesplit.search.profile import check_profile, live_bytes, profile
from edgesplit.errors import InputError

BATCH = {"batch": 16}
MIXED = Path(__file__).resolve().parents[1] / "examples" / "mixed.yaml"


@pytest.fixture(scope="module")
def resnet(zoo_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """The zoo's ResNet in a folder of its own (profiles are cached beside the model)."""
    folder = tmp_path_factory.mktemp("search")
    shutil.copy(zoo_dir / "resnet.onnx", folder / "resnet.onnx")
    graph = load(folder / "resnet.onnx", dims=BATCH)  # batch 16: compute, not per-call overheads, dominates
    return graph, {t: profile(graph, t, repeats=5, dims=BATCH) for t in (1, 2)}


def layouts(n: int, k: int, count: int, seed: int = 0) -> list[Vertical]:
    rng = np.random.default_rng(seed)
    return [decode(rng.random(2 * k - 1), n, k) for _ in range(count)] + [equal_layers(n, k)]


def test_profile_is_cached_beside_the_model_and_checked(resnet, zoo_dir):
    graph, profiles = resnet
    p = profiles[1]
    assert len(p.layer_seconds) == len(graph.layers) and all(s >= 0 for s in p.layer_seconds)
    assert sum(p.layer_seconds) == pytest.approx(p.whole_seconds - p.call_seconds, rel=1e-6)
    cached = Path(graph.path).with_name(f"resnet.onnx.profile-{graph.sha256[:12]}-cpu-1t-batch16.json")
    assert cached.is_file()
    assert profile(graph, 1, dims=BATCH) == p  # read back, not measured again
    other = load(zoo_dir / "vgg.onnx")
    with pytest.raises(InputError, match="profile is of model"):
        check_profile(p, other, 1, "x.json")
    with pytest.raises(InputError, match="device kind cpu-1t, expected cpu-2t"):
        check_profile(p, graph, 2, "x.json")


def test_a_whole_model_time_measured_slow_once_does_not_slow_the_profile(resnet, monkeypatch):
    """The whole model is timed before and after the profiled runs; the faster decides the layers' scale."""
    from edgesplit.search import profile as profiling

    graph, _ = resnet
    times = iter([0.5, 0.01])  # a cold or busy moment first, then the model's real time
    monkeypatch.setattr(profiling, "_whole_seconds", lambda *args: next(times))
    p = profiling.measure(graph, 1, repeats=2, dims=BATCH)
    assert p.whole_seconds == 0.01
    assert sum(p.layer_seconds) == pytest.approx(0.01 - p.call_seconds, rel=1e-6)


def test_wire_bytes_and_received_bytes_match_the_cut_plan(resnet):
    graph, profiles = resnet
    cluster = Cluster.load(MIXED)
    model = CostModel(graph, cluster, profiles)
    for v in layouts(len(graph.layers), 4, 12):
        plan = make_plan(graph, cluster, v.placement(graph, cluster))
        c = model.costs(v)
        assert c.wire_bytes == plan.wire_bytes()
        received = {d: sum(t.nbytes for t in plan.cross_device_transfers if plan.stage(t.dst).device == d)
                    for d in cluster.names}
        assert dict(zip(cluster.names, c.received)) == received


def test_memory_splits_the_weights_and_counts_each_devices_live_activations(resnet):
    graph, profiles = resnet
    cluster = Cluster.simulated(3)
    model = CostModel(graph, cluster, profiles)
    p = profiles[1]
    live = live_bytes(graph)
    assert live.max() >= max(sum(graph.tensors[t].nbytes for t in (*l.inputs, *l.outputs)) for l in graph.layers)
    for v in layouts(len(graph.layers), 3, 8, seed=1):
        placement = v.placement(graph, cluster)
        weights = 0.0
        for d, m in zip(cluster.names, model.costs(v).memory):
            mine = [i for i, layer in enumerate(graph.layers) if placement[layer.name] == d]
            assert (m == 0) == (not mine)
            if mine:
                weights += m - p.session_bytes - live[mine].max() * p.activation_factor
        assert weights == pytest.approx(p.weight_factor * sum(l.param_bytes for l in graph.layers), abs=3)  # ints


@pytest.mark.parametrize("backend, cluster", [(validate.Backend.LOCAL, Cluster.simulated(3)),
                                              (validate.Backend.EMULATED, Cluster.load(MIXED))])
def test_predictions_agree_with_runs(resnet, backend, cluster):
    """Memory within 15 % of each device's measured model memory; latency within a wide margin (shared machine)."""
    graph, profiles = resnet
    checks = validate.check(graph, cluster, profiles, layouts(len(graph.layers), len(cluster.devices), 2, seed=2),
                            backend, threads=1, repeats=10, dims=BATCH)
    base = validate.overheads(backend)
    model = CostModel(graph, validate.as_run(cluster, base, backend), profiles, base)
    for check in checks:
        predicted = validate.model_memory(model, check.predicted)
        for p, m in zip(predicted, check.measured.memory):
            assert (p == 0) == (m == 0)
            if m > 2**20:  # below a MiB, allocator pages dominate
                assert abs(p - m) / m < 0.15, (predicted, check.measured.memory)
        assert check.predicted.latency / 3 < check.measured.latency < check.predicted.latency * 3
        if backend is validate.Backend.EMULATED:  # the links' latencies alone, waited for real
            links = sum(cluster.link(*pair).latency for pair in _crossings(graph, cluster, check.layout))
            assert check.measured.latency > links


def _crossings(graph, cluster, v):
    plan = make_plan(graph, cluster, v.placement(graph, cluster))
    return [(plan.stage(t.src).device, plan.stage(t.dst).device) for t in plan.cross_device_transfers]


def test_encoding_round_trips():
    v = Vertical((3, 3, 10), (2, 0, 3, 1))
    assert decode(encode(v, 20, 4), 20, 4) == v
    grouped = Vertical((3, 3, 10), (2, 0, 3, 1), (-1, -1, -1, 0), (True, False, False))
    assert decode(encode(grouped, 20, 4, standbys=True, horizontal=True), 20, 4) == grouped
    # a range in a horizontal group has no standby of its own
    again = decode(encode(replace(grouped, standby=(1, -1, 2, 0)), 20, 4, True, True), 20, 4)
    assert again == replace(grouped, standby=(-1, -1, 2, 0))
    assert [(g.first, g.end, g.devices) for g in grouped.groups(20)] == [(0, 3, (2, 0)), (3, 10, (3,)), (10, 20, (1,))]


FAST = Link(bandwidth=12.5e9, latency=5e-6)  # an idealised 100 Gbit/s link: the parts' compute decides


def test_a_group_splits_its_split_layers_by_speed_and_the_rest_runs_on_its_lead(resnet):
    graph, profiles = resnet
    devices = Cluster.simulated(2).devices
    cluster = Cluster((devices[0], replace(devices[1], speed=3.0)), Link(bandwidth=1e15, latency=0.0))
    model = CostModel(graph, cluster, profiles, Overheads(), parallel=True)
    splits = model.splits
    assert len(splits.requests) >= 3
    t = np.asarray(profiles[1].layer_seconds)
    split = np.zeros(len(t), dtype=bool)
    for p in splits.layers:
        split[p] = True
    v = Vertical((0,), (0, 1), (), (True,))
    c = model.costs(v)
    # shares by speed (1 : 3): each part takes a quarter of the split layers' time on its own device
    assert c.latency == pytest.approx(t[~split].sum() + t[split].sum() / 4, rel=1e-5)
    serial = CostModel(graph, cluster, profiles, Overheads(), parallel=False).costs(v)
    assert serial.latency == pytest.approx(t[~split].sum() + t[split].sum() / 2, rel=1e-5)
    assert c.received[0] > 0 and c.received[1] > 0  # every split is exchanged both ways
    p = profiles[1]
    weights = [m - p.session_bytes - live_bytes(graph).max() * p.activation_factor for m in c.memory]
    params = sum(float(model.split_params[i]) for i in range(len(splits.requests)))
    unsplit = graph.total_param_bytes - params
    # the lead holds the unsplit layers and a quarter of the split ones, the helper three quarters
    assert weights == pytest.approx([p.weight_factor * (unsplit + params / 4), p.weight_factor * params * 3 / 4],
                                    abs=3)


def _flat_profile(graph, threads=1):
    """A profile that times every layer at 1 ms: for what the cost model predicts without timing (bytes)."""
    from edgesplit.search.profile import Profile

    return Profile(graph.sha256, threads, dict(graph.dims), (1e-3,) * len(graph.layers), 1e-3 * len(graph.layers),
                   0.0, 2**20, 1.0, 1.0, "test")


@pytest.mark.parametrize("name", ["resnet", "inception", "densenet", "vit"])
def test_grouped_layouts_move_the_bytes_their_plans_move(name, zoo_dir, tmp_path):
    """Per device, the bytes a grouped layout is predicted to receive are those its plan sends it (each tensor
    once per device): parts to the devices that read a split's result, shortcuts made on one lead to the copies
    of the ops that add them, other tensors between groups to the reader's lead or its whole group."""
    path = Path(__file__).resolve().parents[1] / "edgesplit" / "data" / "mnist_vit.onnx" if name == "vit" \
        else zoo_dir / f"{name}.onnx"
    graph = load(path, dims={"batch": 4})
    cluster = Cluster.simulated(4)  # equal shares: the plan's whole channels are the model's shares exactly
    model = CostModel(graph, cluster, {1: _flat_profile(graph), 2: _flat_profile(graph, 2)})
    n, k = len(graph.layers), len(cluster.devices)
    rng = np.random.default_rng(3)
    grouped = [Vertical((0, 0, 0), (0, 1, 2, 3), (), (True, True, True)),
               Vertical((0, n, n), (0, 1, 2, 3), (), (True, False, False))]
    while len(grouped) < 8:
        v = decode(rng.random(3 * k - 2), n, k)
        if v.horizontal:
            grouped.append(v)
    for v in grouped:
        plan = to_plan(graph, cluster, v, model.splits, {"batch": 4})
        sent = {(t.tensor, plan.stage(t.dst).device): t.nbytes for t in plan.cross_device_transfers}
        received = {d: sum(b for (_, dev), b in sent.items() if dev == d) for d in cluster.names}
        predicted = dict(zip(cluster.names, model.costs(v).received))
        assert sum(predicted.values()) == pytest.approx(sum(received.values()), rel=0.01), (v, predicted, received)
        for d in cluster.names:  # a part is a share of the channels in the model, whole channels in the plan
            assert predicted[d] == pytest.approx(received[d], rel=0.05, abs=64), (v, predicted, received)


def test_a_rewritten_graph_keeps_the_dims_it_was_loaded_with(resnet):
    """Transfers of a split plan count the bytes that really cross at the loaded batch size."""
    import onnxruntime as ort

    from edgesplit.runtime.common import random_inputs

    graph, _ = resnet
    cluster = Cluster.simulated(2)
    plan = to_plan(graph, cluster, Vertical((0,), (0, 1), (), (True,)), Splits(graph, 2), BATCH)
    assert plan.regions
    values = dict(random_inputs(plan.inputs, BATCH))
    for stage in plan.order():
        session = ort.InferenceSession(plan.stage_model(stage.name).SerializeToString())
        values.update(zip(stage.outputs, session.run(list(stage.outputs), {t: values[t] for t in stage.inputs})))
    crossing = plan.cross_device_transfers
    assert crossing and all(t.nbytes == values[t.tensor].nbytes for t in crossing)


def test_horizontal_layouts_run_correctly_and_their_predictions_agree_with_emulated_runs(resnet):
    import onnxruntime as ort

    from edgesplit.runtime.common import random_inputs
    from edgesplit.runtime.local import LocalExecutor

    graph, profiles = resnet
    cluster = Cluster.load(MIXED)
    n = len(graph.layers)
    grouped = [Vertical((n // 2, n, n), (1, 3, 0, 2), (), (True, False, False)),
               Vertical((n // 3, n // 2, n), (3, 1, 2, 0), (), (False, True, True)),
               Vertical((0, 0, 0), (0, 1, 2, 3), (), (True, True, True))]
    backend = validate.Backend.EMULATED
    checks = validate.check(graph, cluster, profiles, grouped, backend, threads=1, repeats=10, dims=BATCH)
    model = validate.run_model(graph, cluster, profiles, validate.overheads(backend), backend)
    whole = ort.InferenceSession(graph.path)
    feeds = random_inputs(make_plan(graph, cluster, balance(graph, cluster)).inputs, BATCH)
    for check in checks:
        assert check.predicted.latency / 2 < check.measured.latency < check.predicted.latency * 2
        plan = to_plan(graph, model.cluster, check.layout, model.splits, BATCH)
        groups = [g for g in check.layout.groups(n) if len(g.devices) > 1]
        assert groups and plan.regions
        names = {tuple(model.cluster.names[d] for d in g.devices) for g in groups}
        assert {tuple(p.device for p in r.parts) for r in plan.regions} <= names
        got = list(LocalExecutor(plan).run(feeds).outputs.values())[0]
        np.testing.assert_allclose(got, whole.run(None, feeds)[0], rtol=1e-4, atol=1e-5)


def test_horizontal_space_beats_vertical_where_links_are_fast(resnet):
    graph, profiles = resnet
    cluster = Cluster(Cluster.simulated(2).devices, FAST)
    model = CostModel(graph, cluster, profiles)
    bases = [from_placement(graph, cluster, balance(graph, cluster)), equal_layers(model.n, model.k)]
    objectives = [Objective.LATENCY, Objective.MEMORY]
    vertical = search(model, objectives, bases, population=30, generations=20, seed=1)
    hybrid = search(model, objectives, bases, population=30, generations=20, seed=1, horizontal=True)
    best = min(hybrid.front, key=lambda p: p.costs.latency)
    assert best.layout.horizontal
    assert best.costs.latency < 0.9 * min(p.costs.latency for p in vertical.front)
    # on a slow link the same search keeps to vertical layouts for latency
    slow = CostModel(graph, Cluster(cluster.devices, Link(bandwidth=12.5e6, latency=2e-3)), profiles)
    quick = min(search(slow, objectives, bases, 30, 20, 1, horizontal=True).front, key=lambda p: p.costs.latency)
    assert not quick.layout.horizontal


def test_search_beats_its_baselines_on_a_mixed_cluster(resnet):
    graph, profiles = resnet
    cluster = Cluster.load(MIXED)
    model = CostModel(graph, cluster, profiles)
    base = [from_placement(graph, cluster, balance(graph, cluster)), equal_layers(model.n, model.k)]
    result = search(model, [Objective.LATENCY, Objective.MEMORY], base, population=40, generations=30, seed=3)
    assert result.front and all(p.feasible and model.over_budget(p.costs) <= 0 for p in result.front)
    for b, gain in zip(map(model.costs, base), (1.0, 1.3)):  # this small model's balance already skips the Wi-Fi
        better = [p for p in result.front if p.costs.max_memory <= b.max_memory]
        assert better and min(p.costs.latency for p in better) * gain <= b.latency
    # the Wi-Fi board (pi4) receives nothing in the fastest point
    fastest = min(result.front, key=lambda p: p.costs.latency)
    assert fastest.costs.received[cluster.names.index("pi4")] == 0


def test_search_is_no_worse_on_identical_devices(resnet):
    graph, profiles = resnet
    cluster = Cluster.simulated(4)
    model = CostModel(graph, cluster, profiles)
    seed = from_placement(graph, cluster, balance(graph, cluster))
    result = search(model, [Objective.THROUGHPUT, Objective.MEMORY], [seed], population=30, generations=15)
    s = model.costs(seed)
    assert any(p.costs.period <= s.period and p.costs.max_memory <= s.max_memory for p in result.front)


def test_memory_budgets_are_respected(resnet):
    graph, profiles = resnet
    p = profiles[1]
    tight = int(graph.total_param_bytes * 0.6 * p.weight_factor + live_bytes(graph).max() * p.activation_factor
                + p.session_bytes)
    cluster = Cluster(tuple(replace(d, memory=tight) for d in Cluster.simulated(3).devices))
    model = CostModel(graph, cluster, profiles)
    result = search(model, [Objective.LATENCY, Objective.MEMORY], [], population=30, generations=20)
    assert result.front
    for p in result.front:
        assert max(p.costs.memory) <= tight
        assert sum(1 for m in p.costs.memory if m) >= 2  # the whole model fits on no single device


def _cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_search_cli_writes_a_front_and_runnable_plans(resnet, tmp_path):
    graph, _ = resnet
    out = tmp_path / "out"
    r = _cli("search", graph.path, "--cluster", MIXED, "--generations", 10, "--population", 20, "--plans", 3,
             "--validate", 2, "--dim", "batch=16", "-o", out)
    assert r.exit_code == 0, r.output
    doc = json.loads((out / "front.json").read_text())
    assert (out / "front.png").stat().st_size > 0
    assert {b["name"] for b in doc["baselines"]} == {"equal layers", "balance"}
    plans = [p["plan"] for p in doc["front"] if p["plan"]]
    assert 1 <= len(plans) <= 3 and doc["picked"]["plan"] in plans
    assert sum("measured" in p for p in doc["front"]) == 2
    verified = _cli("verify", out / doc["picked"]["plan"])
    assert verified.exit_code == 0, verified.output
    again = _cli("search", graph.path, "--cluster", MIXED, "--generations", 2, "-o", out)
    assert again.exit_code == 2 and "--force" in again.output
    (out / "notes.txt").write_text("mine")
    again = _cli("search", graph.path, "--cluster", MIXED, "--generations", 2, "--population", 8, "--plans", 1,
                 "--pick", "memory", "--dim", "batch=16", "-o", out, "--force")
    assert again.exit_code == 0, again.output
    now = json.loads((out / "front.json").read_text())
    assert sorted(p.name for p in (out / "plans").iterdir()) == [Path(now["picked"]["plan"]).name]
    assert (out / "notes.txt").read_text() == "mine"


def test_search_cli_horizontal_space_writes_split_plans_that_verify(resnet, tmp_path):
    graph, _ = resnet
    cluster = tmp_path / "fast.yaml"
    cluster.write_text("devices:\n  - {name: a, cores: 1, memory: 1GiB}\n  - {name: b, cores: 1, memory: 1GiB}\n"
                       "links:\n  default: {bandwidth: 100gbit, latency: 0.005ms}\n")
    out = tmp_path / "out"
    r = _cli("search", graph.path, "--cluster", cluster, "--space", "vertical,horizontal", "--generations", 15,
             "--population", 20, "--plans", 4, "--pick", "latency", "--validate", 2, "--backend", "emulated",
             "--dim", "batch=16", "-o", out)
    assert r.exit_code == 0, r.output
    doc = json.loads((out / "front.json").read_text())
    picked = doc["front"][doc["picked"]["index"]]
    assert any("split_over" in s for s in picked["layout"]["stages"]), picked["layout"]
    plan_dir = out / picked["plan"]
    assert json.loads((plan_dir / "plan.json").read_text())["regions"]
    verified = _cli("verify", plan_dir)
    assert verified.exit_code == 0, verified.output


@pytest.mark.parametrize("args, message", [
    (["--objectives", "latency,speed"], "expected one of"),
    (["--space", "vertical,sideways"], "expected one of"),
    (["--validate", "5", "--plans", "2"], "at most the 2 plans"),
    (["--space", "replication"], "expected 'vertical' among ['replication']"),
])
def test_search_cli_bad_input(resnet, tmp_path, args, message):
    graph, _ = resnet
    out = tmp_path / "out"
    r = _cli("search", graph.path, "--devices", 2, *args, "-o", out)
    assert r.exit_code == 2 and message in r.output, r.output
    assert not out.exists()


def test_search_cli_validate_more_than_the_front(resnet, tmp_path):
    graph, _ = resnet
    r = _cli("search", graph.path, "--devices", 2, "--objectives", "latency", "--validate", 3, "--plans", 3,
             "--generations", 2, "--population", 8, "--dim", "batch=16", "-o", tmp_path / "out")
    assert r.exit_code == 2 and "the front has only 1 point(s)" in r.output, r.output  # one objective: one point
    assert not (tmp_path / "out").exists()


def test_search_cli_model_too_big(resnet, tmp_path):
    graph, _ = resnet
    cluster = tmp_path / "small.yaml"
    cluster.write_text("devices:\n  - {name: a, cores: 1, memory: 1KiB}\n  - {name: b, cores: 1, memory: 1KiB}\n")
    r = _cli("search", graph.path, "--cluster", cluster, "-o", tmp_path / "out")
    assert r.exit_code == 2 and "MiB short" in r.output, r.output
    assert not (tmp_path / "out").exists()


def test_profile_cli(resnet):
    graph, _ = resnet
    r = _cli("profile", graph.path, "--cluster", MIXED, "--dim", "batch=16")
    assert r.exit_code == 0, r.output
    assert "pi4" in r.output and "scaled by their speed" in r.output


def test_a_profile_measured_elsewhere_is_used_for_its_kind_and_a_wrong_one_refused(resnet, zoo_dir, tmp_path):
    graph, profiles = resnet
    board = replace(profiles[2], threads=4, layer_seconds=tuple(10 * s for s in profiles[2].layer_seconds))
    (tmp_path / "board.json").write_text(json.dumps(board.to_dict()))
    free = Cluster(Cluster.simulated(4, cores=4).devices, Link(1e15, 0.0))  # links cost nothing: compute only
    here = CostModel(graph, free, profiles).costs(equal_layers(len(graph.layers), 4))
    there = CostModel(graph, free, {**profiles, 4: board}).costs(equal_layers(len(graph.layers), 4))
    assert there.latency == pytest.approx(10 * here.latency, rel=1e-6)
    out = tmp_path / "out"
    r = _cli("search", graph.path, "--cluster", MIXED, "--generations", 2, "--population", 8, "--plans", 1,
             "--profile", tmp_path / "board.json", "--dim", "batch=16", "-o", out)
    assert r.exit_code == 0, r.output
    kinds = json.loads((out / "front.json").read_text())["profiles"]
    assert kinds["4"]["whole_s"] == board.whole_seconds and "2" in kinds  # the xnx has 6 cores: profiled here
    wrong_kind = replace(board, threads=3)
    (tmp_path / "k.json").write_text(json.dumps(wrong_kind.to_dict()))
    r = _cli("search", graph.path, "--cluster", MIXED, "--profile", tmp_path / "k.json", "-o", tmp_path / "o2")
    assert r.exit_code == 2 and "expected one of the cluster's kinds ['cpu-4t', 'cpu-6t']" in r.output, r.output
    other = replace(board, model_sha256="0" * 64)
    (tmp_path / "m.json").write_text(json.dumps(other.to_dict()))
    r = _cli("search", graph.path, "--cluster", MIXED, "--profile", tmp_path / "m.json", "-o", tmp_path / "o3")
    assert r.exit_code == 2 and "the profile is of model 000000000000" in r.output, r.output
    assert not (tmp_path / "o2").exists() and not (tmp_path / "o3").exists()


def test_replication_space_gives_standbys_whose_survival_is_predicted_exactly(resnet, tmp_path):
    """Every single-device loss the cost model says is survived runs to the exact answer, the others fail."""
    from edgesplit.errors import DeviceFailedError
    from edgesplit.planner import with_standbys
    from edgesplit.runtime.local import LocalExecutor, run_whole_model
    from edgesplit.runtime.common import random_inputs

    graph, profiles = resnet
    cluster = Cluster.simulated(3)
    model = CostModel(graph, cluster, profiles)
    result = search(model, [Objective.LATENCY, Objective.MEMORY, Objective.ROBUSTNESS], [], population=30,
                    generations=15, seed=1, standbys=True)
    assert max(p.costs.survived for p in result.front) == 1.0  # some point survives every single loss
    for point in sorted(result.front, key=lambda p: p.costs.survived)[::4]:
        v = point.layout
        plan = with_standbys(make_plan(graph, cluster, v.placement(graph, cluster)), graph,
                             v.standby_requests(len(graph.layers), cluster))
        x = random_inputs(plan.inputs, BATCH)
        want = run_whole_model(graph.model, x)
        survived = 0
        for d in cluster.names:
            try:
                got = LocalExecutor(plan, failed=[d]).run(x)
            except DeviceFailedError:
                continue
            assert not got.degraded
            for name, value in want.items():
                np.testing.assert_allclose(got.outputs[name], value, rtol=1e-4, atol=1e-5)
            survived += 1
        assert survived / len(cluster.names) == pytest.approx(point.costs.survived)


def test_search_cli_replication_writes_plans_with_their_standbys(resnet, tmp_path):
    graph, _ = resnet
    out = tmp_path / "out"
    r = _cli("search", graph.path, "--devices", 3, "--space", "vertical,replication", "--objectives",
             "latency,robustness", "--pick", "knee", "--generations", 10, "--population", 20, "--plans", 8,
             "--dim", "batch=16", "-o", out)
    assert r.exit_code == 0, r.output
    doc = json.loads((out / "front.json").read_text())
    for point in doc["front"]:
        if point["plan"]:
            standbys = json.loads((out / point["plan"] / "plan.json").read_text()).get("standbys", [])
            wanted = [s["standby"] for s in point["layout"]["stages"] if s["standby"]]
            assert sorted(s["device"] for s in standbys) == sorted(wanted)
    assert any(p["predicted"]["survived_single_failures"] == 1.0 for p in doc["front"])


def test_a_devices_measured_memory_counts_every_stage_it_holds(big_first_stage):
    """Measured in a fresh process as a Ray device measures it: the stage files read before the baseline are in
    neither reading (they were once freed in between and the first stage's weights went missing)."""
    _, plan = big_first_stage
    weights = sum(s.param_bytes for s in plan.device_stages("dev0"))
    model, _ = validate._device_memory(plan, "dev0", random_inputs_for(plan))
    assert 0.9 * weights < model < 2 * weights


def random_inputs_for(plan):
    from edgesplit.runtime.common import random_inputs

    return random_inputs(plan.inputs, {"batch": 1})
