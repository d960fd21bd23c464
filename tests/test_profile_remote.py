"""`edgesplit profile --address`: each device profiled on itself over Ray, and the links between devices measured.

The link probe is checked against a server whose answers are late and whose reading is paced, so the latency and
bandwidth it must find are known; the Ray path runs on the session's local instance (devices dev0..dev3).
"""

from __future__ import annotations

import json
import shutil
import socket
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest
from click.testing import CliRunner

from edgesplit.cli import main
from edgesplit.cluster import Cluster, Device, Link
from edgesplit.graph import load
from edgesplit.search.cost import CostModel, equal_layers
from edgesplit.search.remote import HEADER, ProbeServer, measure_link, measure_on_devices, measured_cluster
from test_ray import ray_instance  # noqa: F401 - a fixture

DELAY = 0.01  # seconds the paced server waits before each answer
RATE = 20e6  # bytes per second the paced server reads at most


def _paced_server(secret: bytes) -> tuple[socket.socket, tuple[str, int, bytes]]:
    """A probe server that answers DELAY late and reads no faster than RATE."""
    listener = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        conn, _ = listener.accept()
        with conn:
            assert conn.recv(len(secret), socket.MSG_WAITALL) == secret
            while len(head := conn.recv(HEADER.size, socket.MSG_WAITALL)) == HEADER.size:
                n, reply = HEADER.unpack(head)
                start, got = time.perf_counter(), 0
                while got < n:
                    got += len(conn.recv(min(65536, n - got)))
                    time.sleep(max(0.0, start + got / RATE - time.perf_counter()))
                time.sleep(DELAY)
                conn.sendall(bytes(reply))

    threading.Thread(target=serve, daemon=True).start()
    return listener, ("127.0.0.1", listener.getsockname()[1], secret)


def test_the_link_probe_finds_a_links_latency_and_bandwidth():
    listener, peer = _paced_server(b"s" * 32)
    with listener:
        link = measure_link(peer)
    # the answer's delay is half of it one way; a busy machine only adds to it
    assert DELAY / 2 <= link.latency < DELAY / 2 + 0.05
    # reading is paced to RATE: never faster, and not much slower unless the machine is starved
    assert RATE / 4 < link.bandwidth <= RATE * 1.05


def test_a_probe_server_answers_only_who_knows_its_secret():
    server = ProbeServer("127.0.0.1")
    try:
        link = measure_link(server.address)
        assert link.latency > 0 and link.bandwidth > 1e6  # loopback
        host, port, _ = server.address
        with pytest.raises(ConnectionError):
            measure_link((host, port, b"x" * 32))
    finally:
        server.close()


@pytest.fixture(scope="module")
def small(zoo_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    folder = tmp_path_factory.mktemp("remote")
    shutil.copy(zoo_dir / "resnet.onnx", folder / "resnet.onnx")
    return load(folder / "resnet.onnx")


def test_each_device_is_profiled_on_itself_and_every_pair_of_links_measured(ray_instance, small):
    cluster = Cluster((Device("dev0", 1, 2**30), Device("dev1", 2, 2**30, speed=4.0), Device("dev2", 1, 2**30)))
    profiles, links = measure_on_devices(small, cluster, None, repeats=3)
    assert sorted(profiles) == ["dev0", "dev1", "dev2"]
    for name, p in profiles.items():
        assert p.device == name and p.model_sha256 == small.sha256 and len(p.layer_seconds) == len(small.layers)
        assert sum(p.layer_seconds) == pytest.approx(p.whole_seconds - p.call_seconds, rel=1e-6)
    assert profiles["dev1"].threads == 2 and profiles["dev0"].threads == 1
    assert not profiles["dev0"].machine.startswith(" ") and "cores)" in profiles["dev0"].machine
    assert sorted(links) == [("dev0", "dev1"), ("dev0", "dev2"), ("dev1", "dev2")]
    assert all(0 < link.latency < 0.1 and link.bandwidth > 1e6 for link in links.values())
    measured = measured_cluster(cluster, links)
    assert measured.link("dev2", "dev1") == links[("dev1", "dev2")]
    # measured on the device itself: its speed no longer scales the profile (a kind's profile it does)
    model = CostModel(small, measured, profiles)
    layout = equal_layers(len(small.layers), 3)
    assert model.seconds[1] == pytest.approx(profiles["dev1"].layer_seconds)
    kinds = {1: profiles["dev0"], 2: replace(profiles["dev1"], device="")}
    scaled = CostModel(small, measured, kinds)
    assert scaled.seconds[1] == pytest.approx(tuple(s / 4 for s in profiles["dev1"].layer_seconds))
    assert scaled.costs(layout).latency < model.costs(layout).latency


def _cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_profile_address_writes_device_profiles_and_the_measured_cluster_that_search_uses(ray_instance, small,
                                                                                            tmp_path):
    declared = Cluster((Device("dev0", 1, 2**30), Device("dev1", 1, 2**30)), Link(1e6, 0.5))
    declared.save(tmp_path / "two.yaml")
    r = _cli("profile", small.path, "--cluster", tmp_path / "two.yaml", "--address", "auto", "--repeats", 3)
    assert r.exit_code == 0, r.output
    measured = Cluster.load(tmp_path / "two.measured.yaml")
    assert measured.link("dev0", "dev1").latency < 0.1 and measured.link("dev0", "dev1").bandwidth > 1e6
    files = sorted(Path(small.path).parent.glob("resnet.onnx.profile-*-on-dev*.json"))
    assert [json.loads(f.read_text())["device"] for f in files] == ["dev0", "dev1"]
    assert "itself" in r.output and "8 Mbit/s, 500 ms" in r.output  # declared beside measured
    out = tmp_path / "out"
    r = _cli("search", small.path, "--cluster", tmp_path / "two.measured.yaml", *(x for f in files for x in
             ("--profile", f)), "--generations", 2, "--population", 8, "--plans", 1, "-o", out)
    assert r.exit_code == 0, r.output
    used = json.loads((out / "front.json").read_text())["profiles"]
    assert {k: v["measured_on"] for k, v in used.items()} == {"dev0": "dev0", "dev1": "dev1"}
    # a device's profile for a cluster without that device is refused
    other = Cluster((Device("pi", 1, 2**30), Device("nano", 1, 2**30)))
    other.save(tmp_path / "other.yaml")
    r = _cli("search", small.path, "--cluster", tmp_path / "other.yaml", "--profile", files[0], "-o", tmp_path / "o")
    assert r.exit_code == 2 and "measured on device 'dev0'; expected one of the cluster's devices" in r.output
    assert not (tmp_path / "o").exists()


def test_profile_address_refuses_unknown_devices_and_dead_heads_and_writes_nothing(ray_instance, small, tmp_path):
    Cluster((Device("dev0", 1, 2**30), Device("ghost", 1, 2**30))).save(tmp_path / "c.yaml")
    before = sorted(Path(small.path).parent.iterdir())
    r = _cli("profile", small.path, "--cluster", tmp_path / "c.yaml", "--address", "auto")
    assert r.exit_code == 2 and "['ghost'] are not in the Ray cluster" in r.output, r.output
    free = socket.socket()
    free.bind(("127.0.0.1", 0))
    port = free.getsockname()[1]
    free.close()
    r = _cli("profile", small.path, "--cluster", tmp_path / "c.yaml", "--address", f"127.0.0.1:{port}")
    assert r.exit_code == 2 and f"127.0.0.1:{port}" in r.output, r.output
    r = _cli("profile", small.path, "--cluster", tmp_path / "c.yaml", "--links", tmp_path / "l.yaml")
    assert r.exit_code == 2 and "expected --address with it" in r.output, r.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.yaml"]
    assert sorted(Path(small.path).parent.iterdir()) == before
