"""The peer data plane: devices run their own stages of a request and push tensors straight to each other.

Without Ray: the wire format, nodes in threads computing a plan exactly as the local executor does, the handshake
that keeps strangers out, and a peer that goes away. On Ray (`dataplane="peer"`): identical outputs to the local
executor on vertical, horizontal and hybrid plans, and a stopped device routed around within the deadline (a kill
mid-exchange and a failing stage: the dataplane-parametrized tests of test_ray.py).
"""

from __future__ import annotations

import os
import signal
import socket
import threading
import time

import numpy as np
import pytest
from test_failures import HORIZONTAL, HYBRID, split_conv_plan
from test_ray import _requests, _same, executor, plans, ray_instance, vertical  # noqa: F401 - fixtures

from edgesplit.runtime.common import RunResult, session_options
from edgesplit.runtime.failures import DeviceCaughtUp, DeviceLate, DeviceLost, Router
from edgesplit.runtime.local import LocalExecutor
from edgesplit.runtime.peer import PeerError, PeerNode, programs, recv_tensor, send_tensor
from edgesplit.runtime.stages import load_session, stage_specs


@pytest.mark.parametrize("array", [np.arange(24, dtype=np.float32).reshape(2, 3, 4), np.array(7, dtype=np.int64),
                                   np.zeros((0, 5), dtype=np.float16), np.array([[True, False]]),
                                   np.arange(6, dtype=np.float64).reshape(2, 3).T])
def test_the_wire_round_trips_dtype_shape_and_values(array):
    a, b = socket.socketpair()
    with a, b:
        send_tensor(a, 2**40, 3, "x/ü", array)
        xid, index, name, got = recv_tensor(b)
    assert (xid, index, name) == (2**40, 3, "x/ü")
    assert got.dtype == array.dtype and got.shape == array.shape
    np.testing.assert_array_equal(got, array)


def _mesh(plan):
    """One PeerNode per device of the plan, connected to each other, with the programs of the all-up route."""
    router = Router(plan)
    route = router.route()
    nodes = {d: PeerNode(d, "127.0.0.1") for d in route.devices}
    peers = {d: (*n.address, n.secret) for d, n in nodes.items()}
    for n in nodes.values():
        n.connect(1, peers)
    progs = programs(route.stages, router.inputs, router.outputs)
    for d, n in nodes.items():
        n.programs["all"] = progs[d]
    sessions = {s.name: load_session(s, session_options(1)) for s in stage_specs(plan)}
    specs = {s.name: s for s in stage_specs(plan)}
    return nodes, progs, lambda stage, feeds: sessions[stage].run(list(specs[stage].outputs), feeds)


def _run_all(nodes, progs, runner, requests, xid=0, seq=0):
    results, errors = {}, {}

    def one(d):
        try:
            feeds = [{t: r[t] for t in progs[d].feeds} for r in requests]
            results[d] = nodes[d].run(1, seq, "all", xid, feeds, runner)
        except Exception as exc:  # noqa: BLE001 - the test reads it
            errors[d] = exc

    threads = [threading.Thread(target=one, args=(d,)) for d in nodes]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    return results, errors


@pytest.mark.parametrize("layout", [HORIZONTAL, HYBRID], ids=["horizontal", "hybrid"])
def test_nodes_in_threads_compute_the_plan_exactly_as_the_local_executor(layout):
    plan, _ = split_conv_plan(layout)
    nodes, progs, runner = _mesh(plan)
    requests = _requests(plan, 3)
    results, errors = _run_all(nodes, progs, runner, requests)
    assert not errors
    local = LocalExecutor(plan, threads=1)
    for i, x in enumerate(requests):
        got = {t: v for per_device in results.values() for t, v in per_device[i].items()}
        _same(RunResult(got), local.run(x))
    # each tensor crosses once to each device that reads it, never through a third device
    stages = {s.name for s in plan.stages}
    crossing = {(t.tensor, plan.stage(t.dst).device) for t in plan.transfers
                if t.src in stages and t.dst in stages and plan.stage(t.src).device != plan.stage(t.dst).device
                and plan.stage(t.dst).device in progs}
    sent = {(t, d) for p in progs.values() for s in p.steps for t, ds in s.sends for d in ds}
    assert sent == crossing
    nbytes = {t.tensor: t.nbytes for t in plan.transfers}
    assert sum(n.bytes_in for n in nodes.values()) == 3 * sum(nbytes[t] for t, _ in crossing)
    for n in nodes.values():
        n.close()


def test_a_connection_without_the_secret_is_closed_and_delivers_nothing():
    node = PeerNode("dev0", "127.0.0.1")
    with socket.create_connection(node.address) as stranger:
        stranger.settimeout(10)
        try:  # the node may close before the tensor is all sent, or with it unread (a reset)
            stranger.sendall(b"\0" * 32 + b"\x04\x00dev9")
            send_tensor(stranger, 0, 0, "x", np.ones(3, dtype=np.float32))
            closed = stranger.recv(1) == b""
        except (ConnectionResetError, BrokenPipeError):
            closed = True
        assert closed
    assert node.bytes_in == 0
    node.close()


def test_a_peer_that_goes_away_or_an_abort_ends_the_wait_with_an_error():
    plan, _ = split_conv_plan(HORIZONTAL)
    nodes, progs, runner = _mesh(plan)
    waiting = next(d for d, p in progs.items() if p.waits and not p.feeds)  # gets everything from peers
    senders = {s for _, s in progs[waiting].waits}
    errors = {}

    def wait(xid, seq):
        try:
            nodes[waiting].run(1, seq, "all", xid, [{}], runner)
        except PeerError as exc:
            errors[xid] = str(exc)

    t = threading.Thread(target=wait, args=(5, 0))
    t.start()
    nodes[waiting].abort(5)
    t.join(30)
    assert "gave up" in errors[5]
    for d in senders:
        nodes[d].close()
        for sock in nodes[d]._out.values():
            sock.close()
    t = threading.Thread(target=wait, args=(6, 1))
    t.start()
    t.join(30)
    assert not t.is_alive() and "went away" in errors[6]
    nodes[waiting].close()


# ---- on Ray ----

@pytest.mark.ray
@pytest.mark.parametrize("name", ["vertical2", "vertical3", "horizontal", "hybrid", "rewrite-horizontal"])
def test_peer_outputs_are_identical_to_the_local_executor(ray_instance, plans, name):
    plan = plans[name]
    local = LocalExecutor(plan, threads=1)
    requests = _requests(plan, 10, batch=2)
    with executor(plan, dataplane="peer") as ex:
        _same(ex.run(requests[0]), local.run(requests[0]))
        before = ex.stats()
        session = ex.session(4, chunk=3)
        answers = list(session.stream(requests))
        after = ex.stats()
        assert ex.chosen == "peer" and session.report().full == len(requests)
    for answer, x in zip(answers, requests, strict=True):
        _same(answer, local.run(x))
    calls = {d: sum(after[d]["calls"].values()) - sum(before[d]["calls"].values()) for d in after}
    ran = {d: sum(1 for s in ex.router.route().stages if s.device == d) for d in after}
    assert calls == {d: len(requests) * n for d, n in ran.items()}  # every stage once per request, nothing again
    peer_in = sum(after[d]["peer_bytes_in"] - before[d]["peer_bytes_in"] for d in after)
    assert peer_in > 0 or len(plan.devices) == 1


@pytest.mark.ray
def test_a_stopped_device_on_the_peer_mesh_is_routed_around_within_the_deadline(ray_instance):
    plan, _ = split_conv_plan(HORIZONTAL)
    requests = _requests(plan, 16)
    local = LocalExecutor(plan, threads=1)
    deadline, margin, slack = 4.0, 2.0, 2.5  # slack: seconds for a busy machine on top of the bound
    with executor(plan, dataplane="peer", deadline=deadline, margin=margin, rejoin_interval=0.2) as ex:
        pid = ex.stats()["dev1"]["pid"]
        session = ex.session(4)
        session.run(requests[0])
        times, answers = [], []
        try:
            for i, answer in enumerate(session.stream(requests)):
                times.append(time.monotonic())
                answers.append(answer)
                if i == 3:
                    os.kill(pid, signal.SIGSTOP)
                    stopped = time.monotonic()
                if i == 10:
                    os.kill(pid, signal.SIGCONT)
        finally:
            os.kill(pid, signal.SIGCONT)
        report = session.report()
    gaps = [b - a for a, b in zip([stopped, *times[4:]], times[4:])]
    assert max(gaps) < deadline + margin + slack
    for answer, x in zip(answers, requests):  # part A's standby on dev3 stands in: exact answers
        _same(answer, local.run(x))
    kinds = [type(e) for e in report.events]
    assert kinds[:1] == [DeviceLate] and DeviceLost not in kinds and report.full == len(requests) + 1
    assert DeviceCaughtUp in kinds


def test_bare_processes_compute_the_plan_exactly_and_time_an_exchange():
    from edgesplit.bench import bare

    plan, _ = split_conv_plan(HYBRID)
    requests = _requests(plan, 2)
    local = LocalExecutor(plan, threads=1)
    with bare.BareMesh(plan) as mesh:
        for x in requests:
            _same(RunResult(mesh.run(x)), local.run(x))
    seconds = bare.exchange_seconds(2048, rounds=20)
    assert len(seconds) == 20 and all(s > 0 for s in seconds)
