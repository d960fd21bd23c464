"""Connecting to Ray: start a local instance or join a cluster, then find the nodes that host each device.

Convention shared with `edgesplit device join`: a node that hosts device NAME advertises the custom resource
`edgesplit_device:NAME` with value 1; an actor for NAME asks for a sliver of it and so lands on that node.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from edgesplit.cluster import Cluster
from edgesplit.errors import ClusterError
from edgesplit.runtime.raynodes import RESOURCE_PREFIX as RESOURCE
from edgesplit.runtime.raynodes import private_local_token, probe, require_token_auth, resource

__all__ = ["Host", "check_devices", "connect", "hosts", "local_cpus", "probe_head", "resource", "wait_ready"]
log = logging.getLogger("edgesplit")


@dataclass(frozen=True)
class Host:
    node_id: str
    address: str


def hosts(nodes: Iterable[Mapping]) -> dict[str, list[Host]]:
    """Device name -> the alive nodes advertising it (from `ray.nodes()`); a node advertising 2 counts twice."""
    found: dict[str, list[Host]] = {}
    for node in nodes:
        if not node.get("Alive"):
            continue
        for key, value in (node.get("Resources") or {}).items():
            if key.startswith(RESOURCE):
                host = Host(str(node.get("NodeID", "?"))[:12], str(node.get("NodeManagerAddress", "?")))
                found.setdefault(key[len(RESOURCE):], []).extend([host] * max(1, round(value)))
    return found


def check_devices(found: Mapping[str, list[Host]], wanted: Iterable[str]) -> None:
    """Every wanted device registered exactly once, else one ClusterError listing every problem."""
    wanted = list(wanted)
    problems = []
    missing = [d for d in wanted if d not in found]
    if missing:
        present = sorted(found) or "none"
        problems.append(f"the plan's devices {missing} are not in the Ray cluster (registered devices: {present}); "
                        f"run `edgesplit device join HEAD --name NAME` on each")
    for d in wanted:
        if len(found.get(d, ())) > 1:
            where = ", ".join(f"{h.address} (node {h.node_id})" for h in found[d])
            problems.append(f"device {d!r} is registered {len(found[d])} times ({where}); expected exactly once")
    if problems:
        raise ClusterError("cannot deploy the plan:\n  " + "\n  ".join(problems))


def probe_head(address: str, timeout: float) -> None:
    """Fail fast, naming the address, when the head does not answer (Ray itself would retry for a minute)."""
    host, port = probe(address.removeprefix("ray://"), timeout)
    _gcs_answers(f"{host}:{port}", timeout)


def _gcs_answers(address: str, timeout: float) -> None:
    """Something listens on the port; check that it is a Ray GCS that talks to us, in a thread we can abandon."""
    outcome: list[BaseException | None] = []

    def call() -> None:
        try:
            from ray._raylet import GcsClient

            GcsClient(address=address, cluster_id=None)  # connecting fetches the cluster id
            outcome.append(None)
        except BaseException as exc:  # noqa: BLE001 - carried over to the caller's thread
            outcome.append(exc)

    thread = threading.Thread(target=call, daemon=True)
    thread.start()
    thread.join(timeout)
    if not outcome:
        raise ClusterError(f"the Ray head at {address} accepted a connection but did not answer as Ray "
                           f"within {timeout:g} s")
    exc = outcome[0]
    if exc is not None:
        if "auth" in str(exc).lower() or type(exc).__name__ == "AuthenticationError":
            raise ClusterError(f"the Ray head at {address} refused us: token authentication failed; put the cluster's "
                               f"token in RAY_AUTH_TOKEN or ~/.ray/auth_token ({str(exc).splitlines()[0]})") from None
        raise ClusterError(f"the Ray head at {address} did not answer as Ray: {str(exc).splitlines()[0]}") from None


# Ray starts its workers at nice 15, so that the raylet stays responsive; but a device actor is the device's workload:
# at nice 15 any other busy process starves it (beside two busy loops on a 2-core machine, a ResNet-18 split
# request took 2.5 s instead of 90 ms)
WORKER_PRIORITY = {"worker_niceness": 0}


def connect(cluster: Cluster, devices: Iterable[str], address: str | None = None, timeout: float = 10.0) -> bool:
    """Make sure Ray runs and hosts every device once; returns True when this call started a local Ray instance."""
    import ray

    devices = list(devices)
    started = False
    if address:
        require_token_auth()
        if address != "auto":
            probe_head(address, timeout)
    if not ray.is_initialized():
        if address:
            ray.init(address=address, include_dashboard=False, log_to_driver=False, configure_logging=False)
        else:
            cores = sum(cluster.device(d).cores for d in devices)
            with private_local_token():
                ray.init(num_cpus=max(cores, 1), resources={resource(d): 1 for d in devices}, include_dashboard=False,
                         log_to_driver=False, configure_logging=False, _system_config=WORKER_PRIORITY)
            started = True
    check_devices(hosts(ray.nodes()), devices)
    return started


def local_cpus(cluster: Cluster, devices: Iterable[str]) -> dict[str, tuple[int, ...]]:
    """Devices simulated on this machine (all hosted by the driver's node) get disjoint CPU sets of their core
    counts, so that a 1-core device has one core, not a share of all of them; {} when the devices are elsewhere or
    need more cores than this machine has."""
    import ray

    devices = list(devices)
    here = ray.get_runtime_context().get_node_id()[:12]
    found = hosts(ray.nodes())
    if any(h.node_id != here for d in devices for h in found.get(d, [])):
        return {}
    free = sorted(os.sched_getaffinity(0))
    cores = [cluster.device(d).cores for d in devices]
    if sum(cores) > len(free):
        return {}
    starts = [sum(cores[:i]) for i in range(len(cores))]
    return {d: tuple(free[s:s + n]) for d, s, n in zip(devices, starts, cores)}


START_NOTE_EVERY = 5.0  # seconds between progress notes while device actors start


def wait_ready(actors: Mapping[str, Any], timeout: float, cause: Callable[[BaseException], str]) -> list[str]:
    """Wait up to `timeout` seconds for every device's actor to answer a ping, with a note every few seconds on who
    is still starting; returns what went wrong, one line per device (empty: all are ready)."""
    import ray
    from ray.exceptions import RayError

    refs = {d: a.ping.remote() for d, a in actors.items()}
    start, ready = time.monotonic(), []
    while len(ready) < len(refs):
        left = timeout - (time.monotonic() - start)
        if left <= 0:
            break
        ready, _ = ray.wait(list(refs.values()), num_returns=len(refs), timeout=min(left, START_NOTE_EVERY))
        late = [d for d, r in refs.items() if r not in ready]
        if late and time.monotonic() - start < timeout:
            log.info("starting device actors: %d of %d ready after %.0f s (waiting for %s; up to %g s, "
                     "--start-timeout)", len(ready), len(refs), time.monotonic() - start, ", ".join(late), timeout)
    problems = [f"{d}: not ready within {timeout:g} s (is its node alive and registered? a busy machine may need a "
                "longer --start-timeout)" for d, r in refs.items() if r not in ready]
    for d, r in refs.items():
        if r in ready:
            try:
                ray.get(r)
            except RayError as exc:
                problems.append(f"{d}: {cause(exc)}")
    return problems
