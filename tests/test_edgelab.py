"""The emulated edge cluster (scripts/edge-lab): 3 devices + a head, each a Ray node in its own network namespace,
100 Mbit/s links with 2 ms one-way delay, token authentication on.

The requester runs inside the head's namespace (`edge-lab exec head -- python tests/test_edgelab.py MODE ...`): this
file is also that driver (see `_driver` at the bottom). The plan runs on edgesplit.runtime.ray.RayExecutor.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

ROOT = Path(__file__).resolve().parents[1]
LAB = ROOT / "scripts" / "edge-lab"
DEVICES = ("edge0", "edge1", "edge2")


def _why_not() -> str | None:
    if os.geteuid() != 0:
        return "the edge lab needs root (network namespaces, veth links, tc)"
    if shutil.which("ip") is None and shutil.which("apt-get") is None:
        return "neither iproute2 nor apt-get to install it is available"
    if shutil.which("ip") and subprocess.run(["ip", "netns", "list"], capture_output=True).returncode != 0:
        return "`ip netns` does not work here (no network namespaces)"
    return None


pytestmark = [pytest.mark.netns, pytest.mark.ray, pytest.mark.slow,
              pytest.mark.skipif(_why_not() is not None, reason=_why_not() or "")]


def lab(*args: str, check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, str(LAB), *args], capture_output=True, text=True, timeout=timeout)
    if check and done.returncode != 0:
        raise AssertionError(f"edge-lab {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}")
    return done


def cli_in(device: str, *args: str) -> subprocess.CompletedProcess:
    return lab("exec", device, "--", sys.executable, "-m", "edgesplit.cli", *args, check=False, timeout=180)


def driver(mode: str, *args: str) -> dict:
    """Run this file as the requester inside the head's namespace; it writes its findings as JSON."""
    out = Path(args[-1])
    done = lab("exec", "head", "--", sys.executable, __file__, mode, *args, check=False, timeout=600)
    assert done.returncode == 0 and out.is_file(), f"driver {mode} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return {**json.loads(out.read_text()), "stderr": done.stderr}


def chain_model(layers: int = 6, channels: int = 16, size: int = 32, seed: int = 0) -> onnx.ModelProto:
    """x[1,C,H,W] -> (Conv 3x3 + Relu) x layers -> GlobalAveragePool -> Flatten -> Gemm -> y[1,10]."""
    rng = np.random.default_rng(seed)
    nodes, inits, prev = [], [], "x"
    for i in range(layers):
        w = rng.standard_normal((channels, channels, 3, 3)).astype(np.float32) * (2 / (9 * channels)) ** 0.5
        inits += [numpy_helper.from_array(w, f"w{i}"), numpy_helper.from_array(np.zeros(channels, np.float32), f"b{i}")]
        nodes += [helper.make_node("Conv", [prev, f"w{i}", f"b{i}"], [f"c{i}"], name=f"conv{i}", pads=[1, 1, 1, 1]),
                  helper.make_node("Relu", [f"c{i}"], [f"r{i}"], name=f"relu{i}")]
        prev = f"r{i}"
    inits += [numpy_helper.from_array(rng.standard_normal((channels, 10)).astype(np.float32), "fc_w"),
              numpy_helper.from_array(np.zeros(10, np.float32), "fc_b")]
    nodes += [helper.make_node("GlobalAveragePool", [prev], ["gap"], name="gap"),
              helper.make_node("Flatten", ["gap"], ["flat"], name="flatten"),
              helper.make_node("Gemm", ["flat", "fc_w", "fc_b"], ["y"], name="fc")]
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, channels, size, size])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 10])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.fixture(scope="module")
def edge_lab():
    if os.environ.get("EDGE_LAB_REUSE") and lab("status", "--json", check=False).returncode == 0:
        yield json.loads(lab("status", "--json").stdout)  # a lab left up by hand, for quick iterations
        return
    lab("down", check=False)
    try:
        lab("up", "3", "--bandwidth", "100mbit", "--delay", "2ms", "--cores", "1", "--memory", "2GiB")
        yield json.loads(lab("status", "--json").stdout)
    finally:
        lab("down", check=False)
    assert not [ns for ns in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split()
                if ns.startswith("esl-")], "edge-lab down left namespaces behind"


@pytest.fixture(scope="module")
def vertical_plan(tmp_path_factory) -> Path:
    from edgesplit.cluster import Cluster
    from edgesplit.graph import from_model
    from edgesplit.planner import partition

    directory = tmp_path_factory.mktemp("lab_plan")
    model = chain_model()
    onnx.save(model, directory / "model.onnx")
    plan = partition(from_model(model), Cluster.simulated(3, prefix="edge"))
    assert [s.device for s in plan.stages] == list(DEVICES)
    plan.save(directory / "plan")
    return directory


def test_device_list_sees_every_lab_device_alive(edge_lab):
    assert edge_lab["head"] == "10.250.0.1:6379"
    assert all(d["raylet"] and d["link"] == "up" and d["delay_daemon"] for d in edge_lab["devices"].values())
    done = cli_in("edge0", "device", "list", "--json")
    assert done.returncode == 0, done.stderr
    rows = {r["name"]: r for r in json.loads(done.stdout)["devices"]}
    assert set(rows) == {"head", *DEVICES}
    assert all(r["alive"] and r["cores"] == 1 and r["memory"] == 2 * 2**30 for r in rows.values())
    assert rows["head"]["head"] and rows["edge1"]["address"] == "10.250.0.11"
    table = cli_in("head", "device", "list")
    assert table.returncode == 0 and all(name in table.stdout for name in DEVICES), table.stderr


def test_unauthenticated_and_wrong_token_clients_are_refused(edge_lab, tmp_path):
    no_auth = cli_in("edge0", "device", "list", "--no-auth")
    assert no_auth.returncode == 2 and "refused this client's Ray auth token" in no_auth.stderr, no_auth.stderr
    wrong = tmp_path / "wrong_token"
    wrong.write_text("f" * 64)
    bad = cli_in("edge0", "device", "list", "--token-file", str(wrong))
    assert bad.returncode == 2 and "refused" in bad.stderr, bad.stderr
    out = tmp_path / "driver.json"  # a Ray driver without the token cannot connect either
    refused = driver("unauthenticated", str(out))
    assert refused["connected"] is False, refused
    assert "Unauthenticated" in refused["stderr"] or "AuthenticationError" in refused["error"], refused


def test_a_device_name_cannot_be_registered_twice(edge_lab):
    done = cli_in("edge0", "device", "join", edge_lab["head"], "--name", "edge1", "--cores", "1")
    assert done.returncode == 2, done.stdout + done.stderr
    assert "'edge1' is already registered" in done.stderr and "10.250.0.11" in done.stderr


def test_lab_bad_input_is_refused_before_touching_anything(edge_lab):
    for args, message in ((("up", "0"), "expected 1 <= N <= 200"), (("up", "2", "--bandwidth", "fast"), "bandwidth like"),
                          (("up", "2", "--delay", "2"), "delay like"), (("cut", "edge9"), "expected one of the lab's")):
        done = lab(*args, check=False)
        assert done.returncode == 2 and message in done.stderr, (args, done.stderr)
    assert json.loads(lab("status", "--json").stdout)["devices"].keys() == {"head", *DEVICES}


def test_links_are_shaped(edge_lab, tmp_path):
    """Round trip >= 2 x 2 ms between two devices, and a bulk transfer no faster than 100 Mbit/s."""
    serve = subprocess.Popen([sys.executable, str(LAB), "exec", "edge1", "--", sys.executable, __file__, "serve",
                              "10.250.0.11"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(1.5)
        out = tmp_path / "net.json"
        done = lab("exec", "edge0", "--", sys.executable, __file__, "probe", "10.250.0.11", str(out), check=False)
        assert done.returncode == 0, done.stderr
        net = json.loads(out.read_text())
    finally:
        serve.kill()
        serve.wait()
    assert 4.0 <= net["rtt_ms"] < 30, net
    assert 20 < net["mbit_s"] <= 105, net


def test_profile_on_the_devices_finds_the_shaped_links(edge_lab, vertical_plan, tmp_path):
    """`edgesplit profile --address` from the head: each device profiled on itself, and every link measured as the
    lab shaped it (100 Mbit/s, 2 ms one way)."""
    from edgesplit.cluster import Cluster

    Cluster.simulated(3, cores=1, memory=2 * 2**30, prefix="edge").save(tmp_path / "lab.yaml")
    shutil.copy(vertical_plan / "model.onnx", tmp_path / "model.onnx")
    done = cli_in("head", "profile", str(tmp_path / "model.onnx"), "--cluster", str(tmp_path / "lab.yaml"),
                  "--address", edge_lab["head"], "--repeats", "2")
    assert done.returncode == 0, done.stdout + done.stderr
    measured = Cluster.load(tmp_path / "lab.measured.yaml")
    for a, b in (("edge0", "edge1"), ("edge0", "edge2"), ("edge1", "edge2")):
        link = measured.link(a, b)
        assert 1.5e-3 <= link.latency < 15e-3, (a, b, link)
        assert 20e6 / 8 < link.bandwidth <= 105e6 / 8, (a, b, link)
    profiles = [json.loads(p.read_text()) for p in sorted(tmp_path.glob("model.onnx.profile-*-on-edge*.json"))]
    assert [p["device"] for p in profiles] == list(DEVICES) and all(p["threads"] == 1 for p in profiles)


def test_vertical_plan_runs_across_three_devices(edge_lab, vertical_plan, tmp_path):
    result = driver("run", str(vertical_plan), str(tmp_path / "run.json"))
    assert result["answered"] == result["requests"] == 4
    assert result["max_abs_diff"] <= 1e-4 * max(1.0, result["max_abs_ref"]), result
    assert set(result["stage_devices"]) == set(DEVICES)
    assert result["sent_bytes"]["edge0"] > 0 and result["sent_bytes"]["edge1"] > 0


def test_cut_link_hits_the_deadline(edge_lab, vertical_plan, tmp_path):
    try:
        result = driver("cut", str(vertical_plan), str(tmp_path / "cut.json"))
    finally:
        lab("restore", "edge1", check=False)
    assert result["before"] == "full"
    assert result["during"]["kind"] == "error" and "edge1" in result["during"]["message"], result
    assert result["during"]["seconds"] < result["deadline"] + 15, result


def test_killing_a_device_mid_stream_answers_every_request(edge_lab, vertical_plan, tmp_path):
    result = driver("kill", str(vertical_plan), str(tmp_path / "kill.json"))
    kinds = result["kinds"]
    assert len(kinds) == result["requests"] == 16
    assert set(kinds) <= {"full", "degraded", "error"}
    assert kinds[:2] == ["full", "full"]
    assert "error" in kinds[2:], kinds  # edge1 holds a whole vertical stage: no replica, no fill
    assert all("edge1" in m for m in result["errors"]), result["errors"]
    assert result["full_answers_correct"], result
    old = _listed()["edge1"]
    lab("restart", "edge1")  # waits until the head has declared the old node dead, then joins again
    after = _listed(show_all=True)
    assert [n["alive"] for n in after if n["node_id"] == old["node_id"]] == [False]
    assert [n["address"] for n in after if n["name"] == "edge1" and n["alive"]] == ["10.250.0.11"]


def _listed(show_all: bool = False):
    done = cli_in("head", "device", "list", "--json", *(["--all"] if show_all else []))
    assert done.returncode == 0, done.stderr
    rows = json.loads(done.stdout)["devices"]
    return rows if show_all else {r["name"]: r for r in rows}


# ---- the requester, run inside the head's namespace ------------------------------------------------------------

def _driver(mode: str, args: list[str]) -> None:
    out = Path(args[-1])
    if mode == "serve":
        return _serve(args[0])
    if mode == "probe":
        return out.write_text(json.dumps(_probe(args[0])))
    if mode == "unauthenticated":
        return out.write_text(json.dumps(_unauthenticated()))
    from edgesplit.plan import Plan
    from edgesplit.runtime.local import run_whole_model
    from edgesplit.runtime.ray import RayExecutor

    plan_dir = Path(args[0])
    plan = Plan.load(plan_dir / "plan")
    model = str(plan_dir / "model.onnx")
    inputs = [{"x": np.random.default_rng(i).standard_normal((1, 16, 32, 32)).astype(np.float32)} for i in range(16)]
    refs = [run_whole_model(model, x)["y"] for x in inputs]
    address = os.environ["RAY_ADDRESS"]
    report: dict = {"mode": mode}
    if mode == "run":
        before = _counters()
        with RayExecutor(plan, address=address, deadline=20, dataplane="tasks") as ex:
            results = [ex.run(x) for x in inputs[:4]]
        after = _counters()
        diffs = [float(np.abs(r.outputs["y"] - ref).max()) for r, ref in zip(results, refs)]
        report.update(requests=4, answered=len(results), max_abs_diff=max(diffs),
                      max_abs_ref=float(max(np.abs(r).max() for r in refs[:4])),
                      stage_devices=[s.device for s in plan.stages],
                      sent_bytes={d: after[d] - before[d] for d in after})
    elif mode == "cut":
        deadline = 2.0
        with RayExecutor(plan, address=address, deadline=deadline, dataplane="tasks", rejoin_interval=None) as ex:
            report["before"] = "full" if not ex.run(inputs[0]).degraded else "degraded"
            _lab("cut", "edge1")
            t0 = time.monotonic()
            try:
                answer = next(iter(ex.session(1).stream([inputs[1]])))
                report["during"] = {"seconds": time.monotonic() - t0, **_kind(answer)}
            finally:
                _lab("restore", "edge1")  # before Ray's health checks declare the node dead (~10 s in the lab)
            report["rejoined"] = list(ex.rejoin(timeout=15))
            report["after"] = _kind(next(iter(ex.session(1).stream([inputs[2]]))))
        report["deadline"] = deadline
    elif mode == "kill":
        kinds, errors, correct = [], [], True
        with RayExecutor(plan, address=address, deadline=20, dataplane="tasks", rejoin_interval=None) as ex:
            session = ex.session(4)
            for i, answer in enumerate(session.stream(inputs)):
                kind = _kind(answer)
                kinds.append(kind["kind"])
                if kind["kind"] == "error":
                    errors.append(kind["message"])
                elif kind["kind"] == "full":
                    correct &= bool(np.allclose(answer.outputs["y"], refs[i], rtol=1e-4, atol=1e-4))
                if i == 1:
                    _lab("kill", "edge1")
            report["report"] = str(session.report().summary())
        report.update(requests=len(inputs), kinds=kinds, errors=errors, full_answers_correct=correct)
    out.write_text(json.dumps(report, indent=1))


def _kind(answer) -> dict:
    from edgesplit.errors import EdgesplitError

    if isinstance(answer, EdgesplitError):
        return {"kind": "error", "message": str(answer)}
    return {"kind": "degraded" if answer.degraded else "full", "missing": list(answer.missing_devices)}


def _lab(*args: str) -> None:
    subprocess.run([sys.executable, str(LAB), *args], check=True, capture_output=True)


def _counters() -> dict[str, int]:
    done = subprocess.run([sys.executable, str(LAB), "status", "--json"], check=True, capture_output=True, text=True)
    return {d: v["sent_bytes"] for d, v in json.loads(done.stdout)["devices"].items()}


def _unauthenticated() -> dict:
    import ray

    os.environ["RAY_AUTH_MODE"] = "disabled"
    for var in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        os.environ.pop(var, None)
    try:
        ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=False)
        return {"connected": True, "error": ""}
    except Exception as exc:  # noqa: BLE001 - the refusal is what this records
        return {"connected": False, "error": f"{type(exc).__name__}: {exc}"[:2000]}


def _serve(host: str) -> None:
    import socket

    with socket.create_server((host, 7878)) as server:
        conn, _ = server.accept()
        with conn:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            while data := conn.recv(1 << 16):
                if data == b"?":
                    conn.sendall(b"!")
                    continue
                total = len(data)
                while total < 4_000_000:
                    total += len(conn.recv(1 << 20))
                conn.sendall(b"k")


def _probe(host: str) -> dict:
    import socket

    with socket.create_connection((host, 7878), timeout=10) as conn:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        rtts = []
        for _ in range(20):
            t0 = time.perf_counter()
            conn.sendall(b"?")
            conn.recv(1)
            rtts.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        conn.sendall(b"\0" * 4_000_000)
        conn.recv(1)
        seconds = time.perf_counter() - t0
    return {"rtt_ms": float(np.median(rtts) * 1e3), "mbit_s": 4_000_000 * 8 / seconds / 1e6}


if __name__ == "__main__":
    _driver(sys.argv[1], sys.argv[2:])
