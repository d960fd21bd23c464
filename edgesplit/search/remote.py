"""Profiles measured on the devices themselves, and the links between them, over Ray (`edgesplit profile --address`).

One probe actor lands on each device's node (the node that advertises the device, as `edgesplit device join` sets it
up). It profiles the model there at the device's cores, one device after another so that devices sharing a machine
do not slow each other. Then each pair of devices measures its link over a TCP connection between their probes, as
the peer data plane sends tensors: latency is half the median round trip of one byte; bandwidth is a payload big
enough to take a quarter of a second (at most 64 MiB) over its round trip less the one-byte round trip. A link is
measured in one direction (from the device listed first), as the cluster file describes links: one per pair.
"""

from __future__ import annotations

import hmac
import itertools
import secrets
import socket
import statistics
import struct
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import replace

import ray

from edgesplit.cluster import Cluster, Link
from edgesplit.errors import ClusterError
from edgesplit.graph import Graph
from edgesplit.runtime.peer import no_delay, recv_exact, recv_into
from edgesplit.search.profile import Profile, measure, threads_of

__all__ = ["DeviceProbe", "ProbeServer", "measure_link", "measure_on_devices", "measured_cluster"]

HEADER = struct.Struct("!QQ")  # bytes that follow, bytes to answer
SECRET = 32
PINGS = 30
BULK_SECONDS = 0.25
FIRST_BULK = 2**20
MAX_BULK = 64 * 2**20


class ProbeServer:
    """Answers link probes: a connection presents the secret, then sends (n, reply) headers each followed by n
    bytes, and gets `reply` bytes back for each."""

    def __init__(self, host: str) -> None:
        self.secret = secrets.token_bytes(SECRET)
        self._listener = socket.create_server((host, 0))
        threading.Thread(target=self._serve, daemon=True).start()

    @property
    def address(self) -> tuple[str, int, bytes]:
        host, port = self._listener.getsockname()[:2]
        return host, port, self.secret

    def close(self) -> None:
        self._listener.close()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            threading.Thread(target=self._answer, args=(conn,), daemon=True).start()

    def _answer(self, conn: socket.socket) -> None:
        with no_delay(conn):
            try:
                if not hmac.compare_digest(recv_exact(conn, SECRET), self.secret):
                    return
                buf = bytearray(FIRST_BULK)
                while True:
                    n, reply = HEADER.unpack(recv_exact(conn, HEADER.size))
                    if n > MAX_BULK:
                        return
                    if n > len(buf):
                        buf = bytearray(n)
                    recv_into(conn, memoryview(buf)[:n])
                    conn.sendall(bytes(reply))
            except ConnectionError:  # the prober is done, or went away
                return


def measure_link(peer: tuple[str, int, bytes], timeout: float = 120.0) -> Link:
    """The link from here to a `ProbeServer` at `peer` (host, port, secret)."""
    host, port, secret = peer
    with no_delay(socket.create_connection((host, port), timeout=timeout)) as sock:
        sock.sendall(secret)
        rtt = statistics.median([_exchange(sock, b"\0") for _ in range(PINGS)][5:])
        size = FIRST_BULK
        took = _exchange(sock, bytes(size))
        while took < BULK_SECONDS and size < MAX_BULK:
            size = min(MAX_BULK, size * max(2, int(BULK_SECONDS / max(took, 1e-6)) + 1))
            took = _exchange(sock, bytes(size))
        payload = bytes(size)
        took = statistics.median([took] + [_exchange(sock, payload) for _ in range(2)])
    return Link(bandwidth=size / max(took - rtt, 1e-9), latency=rtt / 2)


@ray.remote(num_cpus=0, max_restarts=0)
class DeviceProbe:
    """A device's end of the measurements: profiles the model where it runs, answers link probes, sends them."""

    def __init__(self, device: str) -> None:
        from ray.util import get_node_ip_address

        self.device = device
        self.server = ProbeServer(get_node_ip_address())

    def ping(self) -> str:
        return self.device

    def where(self) -> tuple[str, int, bytes]:
        return self.server.address

    def profile(self, graph: Graph, cores: int, repeats: int, dims: Mapping[str, int]) -> Profile:
        return replace(measure(graph, threads_of(cores), repeats, dims=dims), device=self.device)

    def link(self, peer: tuple[str, int, bytes]) -> Link:
        return measure_link(peer)


def _exchange(sock: socket.socket, payload: bytes) -> float:
    """Seconds from sending `payload` to the peer's one-byte answer."""
    start = time.perf_counter()
    sock.sendall(HEADER.pack(len(payload), 1))
    sock.sendall(payload)
    recv_exact(sock, 1)
    return time.perf_counter() - start


def measure_on_devices(graph: Graph, cluster: Cluster, address: str | None, repeats: int = 10,
                       dims: Mapping[str, int] | None = None, start_timeout: float = 60.0,
                       on_step: Callable[[str], None] = lambda what: None,
                       ) -> tuple[dict[str, Profile], dict[tuple[str, str], Link]]:
    """Each device's profile measured on it, and every pair's link measured between them: ({device: profile},
    {(a, b): link}). `on_step` is told each device and each pair when done."""
    from ray.exceptions import RayError

    from edgesplit.runtime import raycluster

    started = raycluster.connect(cluster, cluster.names, address)
    probes = {d: DeviceProbe.options(resources={raycluster.resource(d): 0.001}).remote(d) for d in cluster.names}
    doing = "starting"
    try:
        problems = raycluster.wait_ready(probes, start_timeout, lambda exc: str(exc).splitlines()[0])
        if problems:
            raise ClusterError("cannot profile on the devices:\n  " + "\n  ".join(problems))
        model = ray.put(graph)
        profiles = {}
        for d in cluster.devices:
            doing = f"profiling the model on {d.name}"
            profiles[d.name] = ray.get(probes[d.name].profile.remote(model, d.cores, repeats, dict(dims or {})))
            on_step(d.name)
        where = dict(zip(probes, ray.get([p.where.remote() for p in probes.values()])))
        links = {}
        for a, b in itertools.combinations(cluster.names, 2):
            doing = f"measuring the link {a}-{b}"
            links[(a, b)] = ray.get(probes[a].link.remote(where[b]))
            on_step(f"{a}-{b}")
    except (RayError, OSError) as exc:
        raise ClusterError(f"{doing} failed: {str(exc).splitlines()[0]}") from None
    finally:
        for p in probes.values():
            ray.kill(p)
        if started:
            ray.shutdown()
    return profiles, links


def measured_cluster(cluster: Cluster, links: Mapping[tuple[str, str], Link]) -> Cluster:
    """The cluster with its measured links in place of the declared ones (the default link kept for the rest)."""
    kept = {k: v for k, v in cluster.links.items() if k not in links and k[::-1] not in links}
    return replace(cluster, links={**kept, **links})
