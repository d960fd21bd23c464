"""Ray node management: bring edge devices into a Ray cluster under their edgesplit names, and list them.

A Ray node that hosts the edgesplit device NAME advertises the custom resource ``edgesplit_device:NAME`` = 1; the ray
executor (`raycluster`, `ray`) pins each device's actor with it. Clusters started here use Ray token authentication
(``RAY_AUTH_MODE=token``): every node and every client needs the same token, found by Ray in ``RAY_AUTH_TOKEN``,
the file named by ``RAY_AUTH_TOKEN_PATH``, or ``~/.ray/auth_token``, in that order.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from edgesplit.errors import ClusterError, EdgesplitError

RESOURCE_PREFIX = "edgesplit_device:"
PROVIDER_PREFIX = "edgesplit_provider:"  # the onnxruntime execution providers a device's node has
TOKEN_AUTH_SINCE = "2.52.0"
DEFAULT_PORT = 6379
TOKEN_MODE = 0o600  # a token file is readable and writable by its owner only
_NAME = re.compile(r"[A-Za-z0-9_.\-]+")


@dataclass(frozen=True)
class NodeDevice:
    """One Ray node seen by the cluster's GCS, with the edgesplit device it hosts (None for a plain node)."""

    name: str | None
    node_id: str
    address: str
    cores: float
    memory: int  # Ray's logical `memory` resource, bytes
    object_store: int
    alive: bool
    head: bool
    death: str = ""
    providers: tuple[str, ...] = ()  # as the node's onnxruntime reported them when it joined

    def to_dict(self) -> dict:
        return {"name": self.name, "alive": self.alive, "cores": self.cores, "memory": self.memory,
                "object_store": self.object_store, "address": self.address, "node_id": self.node_id,
                "head": self.head, "death": self.death, "providers": list(self.providers)}


def resource(name: str) -> str:
    return RESOURCE_PREFIX + check_name(name)


def provider_resources() -> dict[str, int]:
    """This machine's onnxruntime execution providers as Ray resources, so `edgesplit device list` can show them."""
    import onnxruntime as ort

    return {PROVIDER_PREFIX + p: 1 for p in ort.get_available_providers()}


def check_name(name: str) -> str:
    if not _NAME.fullmatch(name or ""):
        raise ClusterError(f"expected a device name of letters, digits, '_', '.', '-', got {name!r}")
    return name


def split_address(address: str) -> tuple[str, int]:
    """'10.0.0.1:6379' or '10.0.0.1' -> (host, port)."""
    host, sep, port = address.strip().rpartition(":")
    if not sep:
        host, port = address.strip(), str(DEFAULT_PORT)
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ClusterError(f"expected a head address HOST:PORT (e.g. 192.168.1.10:6379), got {address!r}")
    return host, int(port)


# ---- token authentication --------------------------------------------------------------------------------------

def require_token_auth() -> None:
    """Raise unless the installed Ray can enforce token authentication (Ray >= 2.52)."""
    try:
        import ray
        from ray._raylet import AuthenticationTokenLoader  # noqa: F401
    except ImportError as exc:
        version = _ray_version()
        raise ClusterError(
            f"Ray token authentication needs ray >= {TOKEN_AUTH_SINCE}, but the installed ray is {version} "
            f"({exc.msg}); upgrade with `pip install 'ray[default]>={TOKEN_AUTH_SINCE}'`, or pass --no-auth to run "
            "an unauthenticated cluster on a network you trust") from None
    del ray


def _ray_version() -> str:
    try:
        import ray
        return ray.__version__
    except ImportError:
        return "not installed"


def default_token_path() -> Path:
    return Path.home() / ".ray" / "auth_token"


def token_source(token_file: Path | None = None, environ: Mapping[str, str] = os.environ) -> str | None:
    """Where Ray will read the token from, or None when no token is available."""
    if token_file is not None:
        if not token_file.is_file() or not token_file.read_text().strip():
            raise EdgesplitError(f"expected a Ray auth token in {str(token_file)!r}, but it is missing or empty")
        return str(token_file)
    if environ.get("RAY_AUTH_TOKEN"):
        return "RAY_AUTH_TOKEN"
    if environ.get("RAY_AUTH_TOKEN_PATH"):
        path = Path(environ["RAY_AUTH_TOKEN_PATH"])
        if not path.is_file() or not path.read_text().strip():
            raise EdgesplitError(f"RAY_AUTH_TOKEN_PATH names {str(path)!r}, which is missing or empty")
        return str(path)
    path = default_token_path()
    return str(path) if path.is_file() and path.read_text().strip() else None


def ensure_token(token_file: Path | None = None) -> str:
    """Return where the token is, generating a new 256-bit one (mode 600) when there is none."""
    if token_file is None:
        found = token_source()
        if found:
            return found
    elif token_file.is_file() and token_file.read_text().strip():
        return str(token_file)
    path = token_file or default_token_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, TOKEN_MODE)
    os.fchmod(fd, TOKEN_MODE)  # an empty file that was already there keeps its own mode otherwise
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32))
    return str(path)


def describe_mode(where: Path) -> str:
    """How readable a token file is, for the line that prints its path."""
    if not where.is_file():
        return "read from the environment, no file"
    mode = stat.S_IMODE(where.stat().st_mode)
    if mode == TOKEN_MODE:
        return "mode 600: only you can read it"
    return f"mode {mode:o}: other users can read it; run `chmod 600 {where}`"


@contextmanager
def private_local_token() -> Iterator[None]:
    """Around starting a local Ray instance: Ray >= 2.52 turns token authentication on and writes a new token to
    ~/.ray/auth_token with the default mode (644: every user can read it). Write it first at mode 600, and leave any
    token file that appears meanwhile at mode 600 too."""
    path = default_token_path()
    existed = path.exists()
    if not existed and os.environ.get("RAY_AUTH_MODE", "token").lower() == "token" and _has_token_auth() \
            and token_source() is None:
        ensure_token()
        _reset_token_cache()
    try:
        yield
    finally:
        if not existed and path.is_file():
            os.chmod(path, TOKEN_MODE)


def _has_token_auth() -> bool:
    try:
        require_token_auth()
    except ClusterError:
        return False
    return True


def _reset_token_cache() -> None:
    if "ray._raylet" in sys.modules:
        from ray._raylet import AuthenticationTokenLoader

        AuthenticationTokenLoader.instance().reset_cache()


def auth_env(auth: bool = True, token_file: Path | None = None, base: Mapping[str, str] = os.environ) -> dict[str, str]:
    """The environment for a Ray process (or client) of an edgesplit cluster."""
    env = dict(base)
    env["RAY_worker_niceness"] = "0"  # the device actors at normal priority (raycluster.WORKER_PRIORITY)
    if not auth:
        env["RAY_AUTH_MODE"] = "disabled"
        return env
    require_token_auth()
    env["RAY_AUTH_MODE"] = "token"
    if token_file is not None:
        env["RAY_AUTH_TOKEN_PATH"] = str(token_file)
        env.pop("RAY_AUTH_TOKEN", None)
    if token_source(token_file, env) is None:
        raise EdgesplitError(
            "token authentication is on but no Ray auth token was found (looked at RAY_AUTH_TOKEN, "
            f"RAY_AUTH_TOKEN_PATH and {default_token_path()}); copy the head's token to this machine "
            "(on the head: `ray get-auth-token`) into ~/.ray/auth_token, or pass --token-file, or --no-auth for a "
            "cluster started without authentication")
    return env


# ---- talking to the head ---------------------------------------------------------------------------------------

def probe(address: str, timeout: float) -> tuple[str, int]:
    """Check that something accepts TCP connections at the head address within `timeout` seconds."""
    host, port = split_address(address)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return host, port
    except socket.timeout:
        raise ClusterError(f"the head at {host}:{port} did not answer within {timeout:g} s "
                           "(is it up, and is this machine on its network?)") from None
    except OSError as exc:
        raise ClusterError(f"cannot reach the head at {host}:{port}: {exc.strerror or exc} "
                           "(is `edgesplit device head` running there, on that port?)") from None


def nodes(address: str, timeout: float = 10.0, auth: bool = True, token_file: Path | None = None) -> list[NodeDevice]:
    """Every node the head's GCS knows (alive and dead), each with the device it hosts."""
    host, port = probe(address, timeout)
    if "ray._raylet" not in sys.modules:  # Ray reads these once; otherwise its client retries for 60 s
        os.environ.setdefault("RAY_py_gcs_connect_timeout_s", str(max(1, round(timeout))))
        os.environ.setdefault("RAY_gcs_rpc_server_connect_timeout_s", "1")
    _configure_client(auth_env(auth, token_file))
    box: dict = {}

    def query() -> None:
        try:
            from ray._raylet import GcsClient

            box["info"] = GcsClient(address=f"{host}:{port}").get_all_node_info(timeout=timeout)
        except Exception as exc:  # noqa: BLE001 - reported below with its message
            box["error"] = exc

    worker = threading.Thread(target=query, daemon=True)
    worker.start()
    worker.join(timeout + 5)
    if worker.is_alive():
        raise ClusterError(f"{host}:{port} accepts connections but no Ray head answered within {timeout:g} s")
    if "error" in box:
        exc = box["error"]
        if type(exc).__name__ == "AuthenticationError":
            raise ClusterError(f"the head at {host}:{port} refused this client's Ray auth token: {exc.message}. "
                               "Use the cluster's token (on the head: `ray get-auth-token`)") from None
        raise ClusterError(f"the head at {host}:{port} did not answer as a Ray cluster within {timeout:g} s: "
                           f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
    return sorted((_node(n) for n in box["info"].values()), key=lambda n: (not n.head, n.name or "", n.node_id))


def _configure_client(env: Mapping[str, str]) -> None:
    """Make this process's Ray client use `env`'s auth settings (Ray reads them from the environment)."""
    keys = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")
    changed = any(os.environ.get(k) != env.get(k) for k in keys)
    for k in keys:
        if env.get(k) is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = env[k]
    if changed and "ray._raylet" in sys.modules:
        from ray._raylet import AuthenticationTokenLoader, Config

        Config.initialize("")
        AuthenticationTokenLoader.instance().reset_cache()


def _node(info) -> NodeDevice:
    resources = dict(info.resources_total)
    names = sorted(k[len(RESOURCE_PREFIX):] for k in resources if k.startswith(RESOURCE_PREFIX))
    death = info.death_info.reason_message if info.HasField("death_info") else ""
    return NodeDevice(
        name=",".join(names) or None, node_id=info.node_id.hex(), address=info.node_manager_address,
        cores=resources.get("CPU", 0.0), memory=int(resources.get("memory", 0)),
        object_store=int(resources.get("object_store_memory", 0)), alive=info.state == 0,
        head=bool(info.is_head_node), death=death,
        providers=tuple(sorted(k[len(PROVIDER_PREFIX):] for k in resources if k.startswith(PROVIDER_PREFIX))))


def devices(all_nodes: Sequence[NodeDevice]) -> list[NodeDevice]:
    """One row per device name: its alive node if it has one, else its latest dead one. Plain nodes are dropped."""
    best: dict[str, NodeDevice] = {}
    for n in all_nodes:
        if n.name is None:
            continue
        if n.name not in best or (n.alive and not best[n.name].alive):
            best[n.name] = n
    return sorted(best.values(), key=lambda n: (not n.head, n.name))


def duplicates(all_nodes: Sequence[NodeDevice]) -> list[str]:
    alive = [n.name for n in all_nodes if n.alive and n.name]
    return sorted({x for x in alive if alive.count(x) > 1})


def wait_for_device(address: str, name: str, timeout: float, auth: bool = True,
                    token_file: Path | None = None) -> NodeDevice:
    deadline = time.monotonic() + timeout
    while True:
        found = [n for n in nodes(address, timeout=min(10.0, timeout), auth=auth, token_file=token_file)
                 if n.alive and n.name == name]
        if found:
            return found[0]
        if time.monotonic() > deadline:
            raise ClusterError(f"device {name!r} started but did not appear in the cluster at {address} "
                               f"within {timeout:g} s")
        time.sleep(0.5)


# ---- starting nodes --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class NodeOptions:
    """What a Ray node of an edgesplit cluster is started with (shared by `head` and `join`)."""

    name: str | None = None
    cores: int | None = None
    memory: int | None = None
    object_store_memory: int | None = None
    node_ip_address: str | None = None
    temp_dir: Path | None = None
    auth: bool = True
    token_file: Path | None = None
    block: bool = False

    def ray_args(self) -> list[str]:
        args = ["--disable-usage-stats"]
        if self.name:
            args += ["--resources", json.dumps({resource(self.name): 1, **provider_resources()})]
        if self.cores is not None:
            args += ["--num-cpus", str(self.cores)]
        if self.memory is not None:
            args += ["--memory", str(self.memory)]
        if self.object_store_memory is not None:
            args += ["--object-store-memory", str(self.object_store_memory)]
        if self.node_ip_address:
            args += ["--node-ip-address", self.node_ip_address]
        if self.temp_dir is not None:
            args += ["--temp-dir", str(self.temp_dir)]
        if self.block:
            args += ["--block"]
        return args


def join(address: str, options: NodeOptions, timeout: float = 10.0, start_timeout: float = 120.0) -> NodeDevice | None:
    """Start a Ray node that joins the cluster at `address` as device `options.name`."""
    if not options.name:
        raise ClusterError("expected --name NAME for the device joining the cluster, got none")
    check_name(options.name)
    if options.cores is not None and options.cores < 1:
        raise ClusterError(f"expected --cores >= 1, got {options.cores}")
    env = auth_env(options.auth, options.token_file)
    taken = [n for n in nodes(address, timeout, options.auth, options.token_file) if n.alive and n.name == options.name]
    if taken:
        raise ClusterError(f"device {options.name!r} is already registered in the cluster at {address} by the alive "
                           f"node {taken[0].address} (node {taken[0].node_id[:12]}); pick another --name, or stop "
                           "that node first")
    host, port = split_address(address)
    _ray_start(["--address", f"{host}:{port}", *options.ray_args()], env, start_timeout, options.block)
    if options.block:
        return None
    return wait_for_device(f"{host}:{port}", options.name, timeout=start_timeout, auth=options.auth,
                           token_file=options.token_file)


def start_head(options: NodeOptions, port: int = DEFAULT_PORT, dashboard: bool = False,
               start_timeout: float = 120.0) -> tuple[str, str | None]:
    """Start the head node; returns (address, where the auth token is) ."""
    if options.name:
        check_name(options.name)
    token = None
    if options.auth:
        require_token_auth()
        token = ensure_token(options.token_file)
    env = auth_env(options.auth, options.token_file)
    host = options.node_ip_address or _local_ip()
    _ray_start(["--head", "--port", str(port), "--include-dashboard", str(dashboard).lower(), *options.ray_args()],
               env, start_timeout, options.block)
    return f"{host}:{port}", token


def _local_ip() -> str:
    from ray.util import get_node_ip_address

    return get_node_ip_address()


def _ray_start(args: list[str], env: dict[str, str], timeout: float, block: bool) -> None:
    ray = shutil.which("ray", path=os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", ""))
    if ray is None:
        raise EdgesplitError("expected the `ray` command (pip install 'ray[default]'), found none on PATH")
    env = {**env, "RAY_USAGE_STATS_ENABLED": "0"}
    if block:
        raise SystemExit(subprocess.call([ray, "start", *args], env=env))
    try:
        done = subprocess.run([ray, "start", *args], env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise ClusterError(f"`ray start` did not finish within {timeout:g} s") from None
    if done.returncode != 0:
        tail = "\n".join((done.stderr + done.stdout).strip().splitlines()[-12:])
        raise ClusterError(f"`ray start {' '.join(args)}` failed (exit {done.returncode}):\n{tail}")
