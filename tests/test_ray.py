"""The ray executor on one local Ray instance shared by the whole test session (devices dev0..dev3 simulated).

Correctness: identical outputs to the local executor on vertical, horizontal and hybrid plans, through ordinary
actor calls and through Ray Compiled Graphs, one request or a pipelined stream. Failures are injected from outside
the executor (`kill`, `stall`): every request gets an answer or a clear error.
"""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import numpy as np
import pytest

from edgesplit.cluster import Cluster, Device
from edgesplit.errors import ClusterError, DeviceFailedError, EdgesplitError, StageError
from edgesplit.planner import partition
from edgesplit.plan import SOURCE
from edgesplit.runtime import raycluster
from edgesplit.runtime.common import RunResult, random_inputs
from edgesplit.runtime.failures import DeviceLate, DeviceLost, DeviceRejoined
from edgesplit.runtime.local import LocalExecutor, run_whole_model
from test_failures import HORIZONTAL, HYBRID, split_conv_plan

import ray
pytestmark = pytest.mark.ray
DEVICES = ("dev0", "dev1", "dev2", "dev3")


@pytest.fixture(scope="session")
def ray_instance():
    """One local Ray instance for the session: the four simulated devices, and one name registered twice."""
    started = not ray.is_initialized()
    if started:
        resources = {raycluster.resource(d): 1 for d in DEVICES} | {raycluster.resource("twice"): 2}
        ray.init(num_cpus=4, resources=resources, include_dashboard=False, log_to_driver=False, configure_logging=False,
                 _system_config=raycluster.WORKER_PRIORITY)
    yield
    if started:
        ray.shutdown()


def executor(plan, **kw):
    from edgesplit.runtime.ray import RayExecutor

    return RayExecutor(plan, **kw)


# ---- fault injection: wraps the executor from outside, never part of the plan ----

def kill(ex, device: str) -> float:
    """Kill a device's actor process, as a crash would; returns when it happened."""
    ray.kill(ex.actors[device])
    return time.monotonic()


def stall(ex, device: str, seconds: float) -> None:
    """Keep a device alive but busy: its stage queue makes no progress for `seconds`."""
    ex.actors[device].__ray_call__.remote(lambda self: time.sleep(seconds))


def largest_message(plan, batch: int) -> int:
    """Bytes of the largest message between devices for one request: the inputs, or one stage's outputs."""
    return batch * max(sum(t.nbytes for t in plan.transfers if t.src == src) for src in
                       {SOURCE, *(s.name for s in plan.stages)})


def answers_meanwhile(stream, faults: dict) -> list:
    """Every answer of a stream; faults[i]() is injected right after answer i arrives."""
    answers = []
    for i, answer in enumerate(stream):
        answers.append(answer)
        if i in faults:
            faults[i]()
    return answers


@pytest.fixture(scope="module")
def vertical(zoo_graphs):
    graph = zoo_graphs["resnet"]
    return {n: partition(graph, Cluster.simulated(n)) for n in (2, 3)}, graph


@pytest.fixture(scope="module")
def plans(vertical):
    split, graph = vertical
    found = {"vertical2": split[2], "vertical3": split[3], "horizontal": split_conv_plan(HORIZONTAL)[0],
             "hybrid": split_conv_plan(HYBRID)[0]}
    for strategy in ("horizontal", "hybrid"):
        found[f"rewrite-{strategy}"] = partition(graph, Cluster.simulated(3), strategy=strategy)
    return found


def _requests(plan, n: int, batch: int = 1):
    return [random_inputs(plan.inputs, {"batch": batch}, seed=i) for i in range(n)]


def _same(result: RunResult, reference: RunResult) -> None:
    assert result.outputs.keys() == reference.outputs.keys()
    for name in reference.outputs:
        np.testing.assert_array_equal(result.outputs[name], reference.outputs[name])


@pytest.mark.parametrize("name", ["vertical2", "vertical3", "horizontal", "hybrid", "rewrite-horizontal", "rewrite-hybrid"])
def test_outputs_identical_to_local_executor_for_both_dataplanes(ray_instance, plans, name):
    plan = plans[name]
    local = LocalExecutor(plan, threads=1)
    requests = _requests(plan, 6, batch=2)
    with executor(plan, dataplane="auto" if name == "vertical2" else "tasks") as ex:
        _same(ex.run(requests[0]), local.run(requests[0]))
        if name == "vertical2":  # auto: measures both dataplanes on the first request and keeps the faster
            assert set(ex.calibration) == {"tasks", "compiled", "peer"} and ex.chosen in ex.calibration
        ex.chosen = "tasks"
        for result, x in zip(ex.session(4).stream(requests), requests):
            _same(result, local.run(x))
        if name in ("horizontal", "hybrid"):
            return  # their compiled runs are checked against the local executor in the failure tests below
        ex.chosen = "compiled"
        session = ex.session(4)
        for result, x in zip(session.stream(requests), requests):
            _same(result, local.run(x))
        assert ex.compiled_graph_active, "the steady state should run on a compiled graph"
        assert session.report().full == len(requests)


def test_stream_keeps_order_with_many_in_flight_and_ships_what_the_plan_says(ray_instance, vertical):
    split, graph = vertical
    plan = split[2]
    requests = _requests(plan, 24)
    with executor(plan, dataplane="tasks") as ex:
        before = ex.stats()
        answers = list(ex.session(8).stream(requests))
        after = ex.stats()
    for answer, x in zip(answers, requests):
        np.testing.assert_allclose(answer.outputs["output"], run_whole_model(graph.model, x)["output"], rtol=1e-4, atol=1e-5)
    received = {d: sum(after[d]["bytes_in"].values()) - sum(before[d]["bytes_in"].values()) for d in after}
    first = plan.stages[0].device
    model_input = sum(t.nbytes for t in plan.inputs)
    assert received[first] == len(requests) * model_input  # the requester's feed only
    assert sum(received.values()) - received[first] == len(requests) * plan.wire_bytes()
    for d in after:  # each device loaded only its own stages
        assert set(after[d]["calls"]) == {s.name for s in plan.device_stages(d)}


@pytest.mark.parametrize("dataplane", ["tasks", "compiled"])
def test_chunked_stream_is_identical_in_order_and_a_bad_request_fails_alone(ray_instance, plans, dataplane):
    plan = plans["vertical3"]
    requests = _requests(plan, 17, batch=32)  # chunks of 4 larger than Ray's default 1 MB channel buffer
    requests[6] = {"wrong": np.zeros(3)}
    local = LocalExecutor(plan, threads=1)
    with executor(plan, dataplane=dataplane) as ex:
        before = ex.stats()
        session = ex.session(3, chunk=4)
        answers = list(session.stream(requests))
        after = ex.stats()
        if dataplane == "compiled":
            assert ex.compiled_graph_active
            message = largest_message(plan, batch=32)
            # every channel holds a whole chunk: buffers Ray had to grow left teardown waiting 30 s on a loop
            assert 4 * message > 10**6 and all(after[d]["channel_bytes"] >= 4 * message for d in after)
    assert len(answers) == 17 and isinstance(answers[6], EdgesplitError) and "missing input" in str(answers[6])
    for i, (answer, x) in enumerate(zip(answers, requests)):
        if i != 6:
            _same(answer, local.run(x))
    assert (session.report().full, session.report().failed) == (16, 1)
    calls = {d: sum(after[d]["calls"].values()) - sum(before[d]["calls"].values()) for d in after}
    warmup = dataplane == "compiled"  # a compiled graph's first execution sets its channels up, on one request
    assert all(n == 16 + warmup for n in calls.values())  # each valid request once through each device, not twice
    with pytest.raises(EdgesplitError, match="chunk of at least 1"):
        ex.session(chunk=0)


def test_compiled_graph_keeps_running_while_the_caller_keeps_every_answer(ray_instance, plans):
    plan = plans["vertical2"]
    requests = _requests(plan, 48)  # more than the graph has output buffers (MAX_IN_FLIGHT)
    with executor(plan, dataplane="compiled", deadline=15.0) as ex:  # patient: a busy machine is not a failure
        before = ex.stats()
        answers = list(ex.session(4).stream(requests))  # kept: none may pin a buffer of the graph
        after = ex.stats()
        assert ex.compiled_graph_active, ex.compile_error
    calls = {d: sum(after[d]["calls"].values()) - sum(before[d]["calls"].values()) for d in after}
    assert all(n == 48 + 1 for n in calls.values())  # the warm-up, then each request once: nothing re-sent
    local = LocalExecutor(plan, threads=1)
    for answer, x in zip(answers, requests, strict=True):
        _same(answer, local.run(x))


def test_a_session_with_larger_chunks_gets_a_compiled_graph_with_larger_channels(ray_instance, plans):
    plan = plans["vertical3"]
    small, large = _requests(plan, 4), _requests(plan, 8, batch=32)
    local = LocalExecutor(plan, threads=1)
    message = largest_message(plan, batch=32)
    with executor(plan, dataplane="compiled") as ex:
        list(ex.session(2).stream(small))
        built_for_one = ex.stats()
        answers = list(ex.session(2, chunk=4).stream(large))
        assert ex.compiled_graph_active
        after = ex.stats()
    assert all(built_for_one[d]["channel_bytes"] < 4 * message <= after[d]["channel_bytes"] for d in after)
    for answer, x in zip(answers, large, strict=True):
        _same(answer, local.run(x))


@pytest.mark.parametrize("dataplane", ["tasks", "compiled", "peer"])
def test_a_stage_failing_on_one_request_of_a_chunk_fails_that_request_alone(ray_instance, plans, dataplane):
    plan = plans["vertical2"]
    requests = _requests(plan, 12)
    requests[5] = {t: np.full_like(v, np.nan) for t, v in requests[5].items()}
    local = LocalExecutor(plan, threads=1)
    def refuse_nan(worker) -> None:  # nested: Ray ships it by value (the test module is not importable there)
        """Every stage of this device fails on a request holding a NaN, a failure input checks cannot see."""
        for session in worker.sessions.values():
            def run(outputs, feeds, run=session.run):
                if any(np.isnan(v).any() for v in feeds.values()):
                    raise RuntimeError("NaN in a feed")
                return run(outputs, feeds)
            session.run = run

    with executor(plan, dataplane=dataplane) as ex:
        ray.get(ex.actors[plan.stages[0].device].__ray_call__.remote(refuse_nan))
        session = ex.session(2, chunk=4)
        answers = list(session.stream(requests))
        report = session.report()
        assert not ex.down  # a stage error is not a device failure
    assert isinstance(answers[5], StageError) and answers[5].request == 5 and "NaN in a feed" in str(answers[5])
    for i, (answer, x) in enumerate(zip(answers, requests, strict=True)):
        if i != 5:
            _same(answer, local.run(x))
    assert (report.full, report.failed) == (11, 1)


def test_chunked_stream_survives_a_kill_and_a_silent_device(ray_instance, plans):
    plan = plans["horizontal"]
    requests = _requests(plan, 24)
    local = LocalExecutor(plan, threads=1)
    with executor(plan, dataplane="tasks", deadline=2.5, rejoin_interval=None) as ex:  # a chunk of 4: 10 s
        session = ex.session(3, chunk=4)
        answers = answers_meanwhile(session.stream(requests), {
            5: lambda: kill(ex, "dev1"),  # part A: its replica on dev3 takes over
            9: lambda: stall(ex, "dev3", 20.0)})  # the replica falls late too: no part A left, no degraded answers
        report = session.report()
    assert len(answers) == 24
    for answer, x in zip(answers[:10], requests):
        _same(answer, local.run(x))
    failed = [a for a in answers[10:] if not isinstance(a, RunResult)]
    assert failed and all(isinstance(e, DeviceFailedError) for e in failed)
    assert [(e.device, e.reason) for e in report.events if isinstance(e, DeviceLost)] == [("dev1", "died")]
    assert [e.device for e in report.events if isinstance(e, DeviceLate)] == ["dev3"]  # late, not declared dead
    assert report.full + report.failed == 24


def test_simulated_devices_get_their_own_cores(ray_instance, vertical):
    free = sorted(os.sched_getaffinity(0))
    if len(free) < 2:
        pytest.skip(f"needs 2 CPUs to pin 2 one-core devices, this machine gives {len(free)}")
    two = Cluster.simulated(2, cores=1)
    assert raycluster.local_cpus(two, ["dev0", "dev1"]) == {"dev0": (free[0],), "dev1": (free[1],)}
    assert raycluster.local_cpus(Cluster.simulated(2, cores=len(free)), ["dev0", "dev1"]) == {}  # does not fit
    plan = partition(vertical[1], two)
    with executor(plan, dataplane="tasks") as ex:
        assert {d: st["cpus"] for d, st in ex.stats().items()} == {"dev0": [free[0]], "dev1": [free[1]]}
    with executor(plan, dataplane="tasks", threads=2) as ex:  # threads set by hand: not pinned
        assert all(st["cpus"] == free for st in ex.stats().values())


@pytest.mark.parametrize("dataplane", ["tasks", "peer"])  # peer: killed mid-exchange, re-routed on actor calls
def test_dead_part_with_replica_mid_stream_answers_everything_in_full(ray_instance, plans, dataplane):
    plan = plans["horizontal"]
    requests = _requests(plan, 30)
    local = LocalExecutor(plan, threads=1)
    with executor(plan, dataplane=dataplane, rejoin_interval=None) as ex:
        session = ex.session(6)
        answers = answers_meanwhile(session.stream(requests), {5: lambda: kill(ex, "dev1")})
        report = session.report()
    assert len(answers) == len(requests) and all(isinstance(a, RunResult) and not a.degraded for a in answers)
    for answer, x in zip(answers, requests):
        _same(answer, local.run(x))
    lost = [e for e in report.events if isinstance(e, DeviceLost)]
    assert [(e.device, e.reason) for e in lost] == [("dev1", "died")] and lost[0].stage.endswith("dev1")
    assert report.full == 30 and len(report.recovery_seconds) == 1


def test_dead_part_without_replica_degrades_then_full_answers_resume(ray_instance, plans):
    plan = plans["horizontal"]
    requests = _requests(plan, 12)
    degraded_reference = LocalExecutor(plan, threads=1, allow_degraded=True, failed={"dev2"})
    full_reference = LocalExecutor(plan, threads=1)
    with executor(plan, dataplane="compiled", allow_degraded=True, rejoin_interval=None) as ex:
        session = ex.session(4)
        _same(session.run(requests[0]), full_reference.run(requests[0]))
        kill(ex, "dev2")
        answers = list(session.stream(requests))
        assert all(a.missing_devices == ("dev2",) for a in answers)
        for answer, x in zip(answers, requests):
            _same(answer, degraded_reference.run(x))
        assert ex.rejoin(timeout=60) == ("dev2",)
        again = list(session.stream(requests[:4]))
        assert not any(a.degraded for a in again)
        _same(again[0], full_reference.run(requests[0]))
        report = session.report()
    assert (report.full, report.degraded, report.failed) == (5, 12, 0)
    assert any(isinstance(e, DeviceRejoined) and e.device == "dev2" for e in report.events)


def test_a_device_that_comes_back_rejoins_on_its_own(ray_instance, plans):
    plan = plans["horizontal"]
    x = _requests(plan, 1)[0]
    with executor(plan, dataplane="tasks", allow_degraded=True, rejoin_interval=0.2) as ex:
        session = ex.session(2)
        session.run(x)
        kill(ex, "dev2")

        def paced():  # a slow trickle of requests, until full answers are back (bounded)
            for _ in range(1200):
                yield x
                time.sleep(0.05)

        kinds = []
        for answer in session.stream(paced()):
            kinds.append("degraded" if answer.degraded else "full")
            if kinds[-1] == "full" and "degraded" in kinds:
                break
        report = session.report()
    assert kinds[0] == "degraded" and kinds[-1] == "full"
    assert [type(e).__name__ for e in report.events] == ["DeviceLost", "DeviceRejoined"]


def test_dead_device_without_fallback_answers_every_request_with_an_error(ray_instance, plans):
    plan = plans["vertical2"]
    dead = plan.stages[-1].device
    with executor(plan, dataplane="tasks", rejoin_interval=None) as ex:
        session = ex.session(8)
        answers = answers_meanwhile(session.stream(_requests(plan, 20)), {3: lambda: kill(ex, dead)})
        report = session.report()
    assert len(answers) == 20 and all(isinstance(a, RunResult) for a in answers[:4])
    errors = [a for a in answers if not isinstance(a, RunResult)]
    assert errors and all(isinstance(e, DeviceFailedError) and e.device == dead for e in errors)
    assert report.failed == len(errors) and report.full == 20 - len(errors)
    with pytest.raises(DeviceFailedError, match=dead):
        session.run(_requests(plan, 1)[0])


def test_alive_but_busy_device_hits_the_deadline_and_is_routed_around_as_late(ray_instance, plans):
    plan = plans["horizontal"]
    requests = _requests(plan, 8)
    reference = LocalExecutor(plan, threads=1)
    with executor(plan, dataplane="tasks", deadline=3.0, rejoin_interval=None) as ex:
        session = ex.session(4)
        session.run(requests[0])
        stall(ex, "dev1", 10.0)
        answers = list(session.stream(requests))
        report = session.report()
    for answer, x in zip(answers, requests):  # part A's replica on dev3 stands in: full answers
        _same(answer, reference.run(x))
    assert [(type(e), e.device) for e in report.events][:1] == [(DeviceLate, "dev1")]
    assert not any(isinstance(e, DeviceLost) for e in report.events)  # late, not declared dead


def test_compiled_graph_survives_a_kill_and_recovers_on_actor_calls(ray_instance, plans):
    plan = plans["hybrid"]
    requests = _requests(plan, 16)
    reference = LocalExecutor(plan, threads=1)
    with executor(plan, dataplane="compiled", rejoin_interval=None) as ex:
        session = ex.session(4)
        answers = answers_meanwhile(session.stream(requests), {2: lambda: kill(ex, "dev1")})
    assert len(answers) == 16
    for answer, x in zip(answers, requests):
        _same(answer, reference.run(x))


# ---- bad input: clear errors, no hang ----

def test_plan_devices_missing_from_the_cluster_are_listed(ray_instance, zoo_graphs):
    plan = partition(zoo_graphs["resnet"], Cluster.simulated(2, prefix="ghost"))
    with pytest.raises(ClusterError, match=r"\['ghost0', 'ghost1'\] are not in the Ray cluster"):
        executor(plan)


def test_device_registered_twice_is_refused(ray_instance, zoo_graphs):
    plan = partition(zoo_graphs["resnet"], Cluster((Device("twice", 1, 2**30),)))
    with pytest.raises(ClusterError, match="device 'twice' is registered 2 times"):
        executor(plan)
    with pytest.raises(ClusterError, match="registered 2 times"):
        raycluster.check_devices({"pi": [raycluster.Host("a", "10.0.0.2"), raycluster.Host("b", "10.0.0.3")]}, ["pi"])


def test_ray_without_token_auth_is_refused(ray_instance, plans, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def old_ray(name, globals=None, locals=None, fromlist=(), level=0):
        if name == "ray._raylet" and "AuthenticationTokenLoader" in (fromlist or ()):
            raise ImportError("cannot import name 'AuthenticationTokenLoader' from 'ray._raylet'")
        return real_import(name, globals, locals, fromlist, level)

    monkeypatch.setattr(builtins, "__import__", old_ray)
    with pytest.raises(ClusterError, match="token authentication needs ray >= 2.52"):
        executor(plans["vertical2"], address="127.0.0.1:6379")


def test_head_that_refuses_or_never_answers_fails_within_the_timeout(ray_instance, plans):
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    t0 = time.monotonic()
    with pytest.raises(ClusterError, match=f"cannot reach the head at 127.0.0.1:{port}"):
        executor(plans["vertical2"], address=f"127.0.0.1:{port}", connect_timeout=1.0)
    with socket.socket() as mute:  # accepts TCP (the kernel does) but never speaks
        mute.bind(("127.0.0.1", 0))
        mute.listen(8)
        with pytest.raises(ClusterError, match="did not answer as Ray"):
            executor(plans["vertical2"], address=f"127.0.0.1:{mute.getsockname()[1]}", connect_timeout=1.0)
    assert time.monotonic() - t0 < 30
    with pytest.raises(ClusterError, match="HOST:PORT"):
        executor(plans["vertical2"], address="head:not-a-port")


def test_bad_options_and_inputs_are_clear_errors(ray_instance, plans):
    with pytest.raises(EdgesplitError, match="dataplane"):
        executor(plans["vertical2"], dataplane="sockets")
    with executor(plans["vertical2"], dataplane="tasks") as ex:
        answers = list(ex.session().stream([{"wrong": np.zeros(3)}, _requests(plans["vertical2"], 1)[0]]))
    assert isinstance(answers[0], EdgesplitError) and "missing input" in str(answers[0])
    assert isinstance(answers[1], RunResult)


def test_cli_streams_a_directory_through_ray(ray_instance, plans, tmp_path: Path):
    from click.testing import CliRunner

    from edgesplit.cli import main

    plan = plans["vertical2"]
    plan.save(tmp_path / "plan")
    requests = _requests(plan, 5)
    (tmp_path / "in").mkdir()
    for i, x in enumerate(requests):
        np.savez(tmp_path / "in" / f"{i:03d}.npz", **x)
    result = CliRunner().invoke(main, ["run", str(tmp_path / "plan"), "--backend", "ray", "--dataplane", "tasks",
                                       "--chunk", "2", "--stream", str(tmp_path / "in"), "-o", str(tmp_path / "y.npz")])
    assert result.exit_code == 0, result.output
    assert "5 requests" in result.output and "5 full" in result.output and "/s" in result.output
    with np.load(tmp_path / "y.npz") as y:
        assert list(y["__status__"]) == [0] * 5
        local = LocalExecutor(plan, threads=1)
        for i, x in enumerate(requests):
            np.testing.assert_array_equal(y["output"][i], local.run(x).outputs["output"])
    stacked = {k: np.stack([x[k] for x in requests]) for k in requests[0]}
    np.savez(tmp_path / "stack.npz", **stacked)
    result = CliRunner().invoke(main, ["run", str(tmp_path / "plan"), "--stream", str(tmp_path / "stack.npz"),
                                       "-o", str(tmp_path / "z.npz")])
    assert result.exit_code == 0, result.output
    with np.load(tmp_path / "z.npz") as z, np.load(tmp_path / "y.npz") as y:
        np.testing.assert_array_equal(z["output"], y["output"])


@pytest.mark.parametrize("kind, layer", [("lop", "conv1"), ("lip", "conv2")])
def test_lost_parts_are_rebuilt_from_several_replicas_as_in_the_local_executor(ray_instance, kind, layer):
    from test_replicas import SPREAD, failure_sets, replicated

    plan, _ = replicated(kind, layer, SPREAD)
    local = LocalExecutor(plan, threads=1, allow_degraded=True)
    requests = _requests(plan, 2, batch=2)
    with executor(plan, dataplane="tasks", allow_degraded=True, rejoin_interval=None) as ex:
        for down in failure_sets():
            ex.down = dict.fromkeys(down, "died")  # routed around as after a loss; the actors stay up
            for x in requests:
                got, want = ex.run(x), local.run(x, failed=down)
                np.testing.assert_allclose(got.outputs["y"], want.outputs["y"], rtol=1e-6, atol=1e-7)
                assert got.missing_devices == want.missing_devices, sorted(down)


def test_killing_a_part_with_hot_and_standby_replicas_degrades_only_its_uncovered_units(ray_instance):
    from test_replicas import SPREAD, replicated

    plan, _ = replicated("lop", "conv1", SPREAD)
    reference = LocalExecutor(plan, threads=1, allow_degraded=True, failed={"dev1"})
    requests = _requests(plan, 10)
    with executor(plan, dataplane="tasks", allow_degraded=True, rejoin_interval=None) as ex:
        answers = answers_meanwhile(ex.session(4).stream(requests), {2: lambda: kill(ex, "dev1")})
    assert all(isinstance(a, RunResult) for a in answers)
    after = [(a, x) for a, x in zip(answers, requests) if a.degraded]
    assert after and all(a.missing_devices == ("dev1",) for a, _ in after)
    # part A lost: units 0-1 from dev2's standby replica, 3 from dev3's hot one, only unit 2 filled
    for a, x in after:
        np.testing.assert_allclose(a.outputs["y"], reference.run(x).outputs["y"], rtol=1e-6, atol=1e-7)


def test_device_start_up_is_noted_while_it_lasts_and_bounded_by_the_start_timeout(ray_instance, plans, monkeypatch,
                                                                                   caplog):
    import logging

    monkeypatch.setattr(raycluster, "START_NOTE_EVERY", 0.001)  # a note at once: no actor starts within 1 ms
    with caplog.at_level(logging.INFO, logger="edgesplit"), executor(plans["vertical2"]) as ex:
        assert ex.run(_requests(plans["vertical2"], 1)[0]).outputs
    assert any("starting device actors:" in r.getMessage() and "--start-timeout" in r.getMessage()
               for r in caplog.records)
    with pytest.raises(EdgesplitError, match=r"not ready within 0.001 s .*--start-timeout"):
        executor(plans["vertical2"], ready_timeout=0.001)


def test_devices_check_the_plan_signature_with_their_own_key(ray_instance, tmp_path):
    """The plan is signed, and loaded, with a key the devices lack: they have the suite's ($EDGESPLIT_KEY_FILE, in
    their environment), and each refuses before it loads a stage (issue 14, point 2; see test_signing.py)."""
    from test_signing import _other_key, _plan

    import edgesplit

    other = _other_key(tmp_path)
    plan = edgesplit.Plan.load(_plan(tmp_path, key=other), key=other)
    # whichever device answers first refuses (on a busy machine, not always dev0)
    with pytest.raises(EdgesplitError, match=f"device 'dev[0-9]+' refuses its stages: the plan is signed with key id "
                                             f"{other.key_id}, but this device's key is key id "):
        executor(plan, threads=1)


def test_a_parity_plan_rebuilds_a_killed_devices_part_exactly(ray_instance, tmp_path):
    from test_parity import linear_model

    from edgesplit.graph import load
    from edgesplit.planner import layout
    from edgesplit.robust.evaluate import Samples, prepare
    from edgesplit.robust.policies import Policy

    path = linear_model(tmp_path / "linear.onnx")
    source, cluster = load(path), Cluster.simulated(4)
    rewritten, placement = layout(source, cluster, strategy="horizontal")
    rng = np.random.default_rng(0)
    requests = [{"input": rng.normal(size=(2, 3, 8, 8)).astype(np.float32)} for _ in range(8)]
    study = prepare(rewritten, placement, cluster, source, Samples(requests[0]), (1,))
    plan = study.plan(Policy.PARITY, 0.0, None)
    dead = next(d for d in plan.devices if d not in study.fatal)
    with executor(plan, dataplane="tasks", allow_degraded=True, rejoin_interval=None) as ex:
        session = ex.session(2)
        answers = answers_meanwhile(session.stream(requests), {2: lambda: kill(ex, dead)})
        assert dead in ex.down and session.report().full == len(requests)  # the loss was seen, nothing degraded
    assert all(isinstance(a, RunResult) for a in answers), answers
    for answer, x in zip(answers, requests):
        np.testing.assert_allclose(answer.outputs["logits"], run_whole_model(str(path), x)["logits"],
                                   rtol=1e-5, atol=1e-5)


def test_a_devices_memory_counts_its_stages_not_the_files_it_was_sent(ray_instance, big_first_stage):
    """`uss - uss_runtime` is the stages' own memory: the stage files arrive after both baselines and are freed."""
    _, plan = big_first_stage
    with executor(plan, dataplane="tasks") as ex:
        ex.run(_requests(plan, 1)[0])
        stats = ex.stats()
    for device in ("dev0", "dev1"):
        weights = sum(s.param_bytes for s in plan.device_stages(device))
        model = stats[device]["uss"] - stats[device]["uss_runtime"]
        assert 0.9 * weights - 16 * 2**20 < model < 2 * weights + 16 * 2**20, (device, model, weights)
    assert stats["dev0"]["uss"] - stats["dev0"]["uss_runtime"] > 0.9 * sum(s.param_bytes for s in plan.stages)
