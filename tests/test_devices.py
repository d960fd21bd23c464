"""edgesplit.runtime.raynodes and `edgesplit device ...` without a cluster: names, addresses, tokens, unreachable heads.

The bring-up against real Ray nodes (join, list, duplicate names, refused clients) is in test_edgelab.py.
"""

from __future__ import annotations

import builtins
import json
import os
import socket
import stat
import subprocess
import sys

import pytest

from edgesplit.cluster import Cluster
from edgesplit.errors import ClusterError, EdgesplitError
from edgesplit.runtime import raynodes


def _cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edgesplit.cli", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=120)


@pytest.mark.parametrize("name", ["pi-2", "jetson_0", "edge.7"])
def test_resource_name(name):
    assert raynodes.resource(name) == f"edgesplit_device:{name}"


@pytest.mark.parametrize("name", ["", "pi 2", "a:b", "x/y"])
def test_bad_device_name(name):
    with pytest.raises(ClusterError, match="expected a device name"):
        raynodes.resource(name)


def test_split_address():
    assert raynodes.split_address("10.0.0.1:6380") == ("10.0.0.1", 6380)
    assert raynodes.split_address("head.local") == ("head.local", 6379)
    for bad in ("10.0.0.1:x", ":6379", "h:0", "h:70000"):
        with pytest.raises(ClusterError, match="HOST:PORT"):
            raynodes.split_address(bad)


def test_ray_without_token_auth_is_a_clear_error(monkeypatch):
    import ray  # noqa: F401 - fully imported before the patch; only edgesplit's own import is made to fail

    real_import = builtins.__import__

    def old_ray(name, globals=None, locals=None, fromlist=(), level=0):
        if name == "ray._raylet" and (globals or {}).get("__name__") == "edgesplit.runtime.raynodes":
            raise ImportError("cannot import name 'AuthenticationTokenLoader' from 'ray._raylet'")
        return real_import(name, globals, locals, fromlist, level)

    monkeypatch.setattr(builtins, "__import__", old_ray)
    with pytest.raises(EdgesplitError, match=r"needs ray >= 2\.52.*--no-auth"):
        raynodes.require_token_auth()
    with pytest.raises(EdgesplitError, match="needs ray >= 2.52"):
        raynodes.auth_env(auth=True)
    assert raynodes.auth_env(auth=False)["RAY_AUTH_MODE"] == "disabled"  # opting out still works


def test_no_token_anywhere_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    for var in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(EdgesplitError, match="no Ray auth token was found.*ray get-auth-token"):
        raynodes.auth_env(auth=True)
    with pytest.raises(EdgesplitError, match="missing or empty"):
        raynodes.auth_env(auth=True, token_file=tmp_path / "nope")


def test_token_precedence_and_generation(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    for var in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(var, raising=False)
    where = raynodes.ensure_token()
    path = tmp_path / ".ray" / "auth_token"
    assert where == str(path) and len(path.read_text()) == 64
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert raynodes.ensure_token() == where and len(path.read_text()) == 64  # kept, not regenerated
    own = tmp_path / "lab_token"
    assert raynodes.ensure_token(own) == str(own) and own.read_text() != path.read_text()
    env = raynodes.auth_env(True, own)
    assert env["RAY_AUTH_MODE"] == "token" and env["RAY_AUTH_TOKEN_PATH"] == str(own)
    monkeypatch.setenv("RAY_AUTH_TOKEN", "abc")
    assert raynodes.token_source() == "RAY_AUTH_TOKEN"


def test_closed_port_is_a_clear_error():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again when the block ends
    with pytest.raises(ClusterError, match=f"cannot reach the head at 127.0.0.1:{port}"):
        raynodes.probe(f"127.0.0.1:{port}", timeout=2)


def test_silent_head_times_out_with_a_clear_error(tmp_path):
    """Something accepts TCP but never speaks Ray: `device list` and `device join` give up after --timeout."""
    token = tmp_path / "token"
    token.write_text("0" * 64)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(8)  # never accepted: the kernel completes handshakes, nobody answers
        address = f"127.0.0.1:{s.getsockname()[1]}"
        listed = _cli("device", "list", "--address", address, "--timeout", "2", "--token-file", str(token))
        joined = _cli("device", "join", address, "--name", "pi-2", "--timeout", "2", "--token-file", str(token))
    for done in (listed, joined):
        assert done.returncode == 2, done.stderr
        assert f"{address}" in done.stderr and "within 2 s" in done.stderr
        assert "Traceback" not in done.stderr


def test_cli_bad_input_is_exit_2(tmp_path):
    token = tmp_path / "token"
    token.write_text("0" * 64)
    bad_name = _cli("device", "join", "127.0.0.1:1", "--name", "pi 2", "--token-file", str(token))
    assert bad_name.returncode == 2 and "expected a device name" in bad_name.stderr
    bad_memory = _cli("device", "join", "127.0.0.1:1", "--name", "pi", "--memory", "lots", "--token-file", str(token))
    assert bad_memory.returncode == 2 and "--memory" in bad_memory.stderr
    no_address = _cli("device", "list", env={"RAY_ADDRESS": ""})
    assert no_address.returncode == 2 and "--address" in no_address.stderr


def test_devices_collapses_rejoined_names():
    def node(name, alive, node_id, head=False):
        return raynodes.NodeDevice(name, node_id, "10.0.0.1", 1.0, 2**30, 10**8, alive, head)

    nodes = [node("pi-1", False, "a"), node("pi-1", True, "b"), node("pi-2", False, "c"), node(None, True, "d", True),
             node("pi-3", True, "e"), node("pi-3", True, "f")]
    rows = raynodes.devices(nodes)
    assert [(r.name, r.alive, r.node_id) for r in rows] == [("pi-1", True, "b"), ("pi-2", False, "c"),
                                                            ("pi-3", True, "e")]
    assert raynodes.duplicates(nodes) == ["pi-3"]
    assert json.loads(json.dumps(rows[0].to_dict()))["name"] == "pi-1"


def test_ray_start_arguments():
    opts = raynodes.NodeOptions(name="pi-2", cores=2, memory=2**31, object_store_memory=10**8,
                               node_ip_address="10.0.0.7", temp_dir=None)
    args = opts.ray_args()
    assert json.loads(args[args.index("--resources") + 1]) == {"edgesplit_device:pi-2": 1, **raynodes.provider_resources()}
    assert args[args.index("--num-cpus") + 1] == "2" and args[args.index("--memory") + 1] == str(2**31)
    assert args[args.index("--node-ip-address") + 1] == "10.0.0.7" and "--block" not in args
    assert "--resources" not in raynodes.NodeOptions().ray_args()  # a head that hosts no device


def test_ray_instances_edgesplit_starts_run_device_actors_at_normal_priority(monkeypatch):
    """Ray's default nice 15 lets any busy process on a device starve its actor: edgesplit asks for nice 0."""
    import ray

    from edgesplit.runtime import raycluster

    seen = {}
    node = {"Alive": True, "NodeID": "n1", "NodeManagerAddress": "127.0.0.1", "Resources": {"edgesplit_device:dev0": 1}}
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: seen.update(kw))
    monkeypatch.setattr(ray, "nodes", lambda: [node])
    monkeypatch.setattr(raycluster, "private_local_token", __import__("contextlib").nullcontext)
    assert raycluster.connect(Cluster.simulated(1), ["dev0"]) is True
    assert seen["_system_config"]["worker_niceness"] == 0
    assert raynodes.auth_env(auth=False)["RAY_worker_niceness"] == "0"  # `device head` / `device join` too
